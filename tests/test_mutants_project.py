"""Oracles for tokenfleet.capacity.project (`make mutate`'s survivors): the per-GPU batch from memory, KV bytes, the
deployment defaults, the workload and its checks, the row `project` writes and `auto_tp`'s choice. Numbers worked
out by hand for a real config (Llama-3.1-8B on an H200: 8,030,261,248 parameters, 32 layers x 8 KV heads x 128 dims,
141 GiB), not by calling the code that computes them; the serving model's own figures (`serving.serve`, not mutated
here) are taken from `serve` and the arithmetic project.py adds (per GPU, per day, counted tokens, power) done here."""

import math

import pytest
from tokenfleet.capacity import project as P
from tokenfleet.capacity.calibrate import Efficiency, Measured
from tokenfleet.capacity.config import load_workload
from tokenfleet.capacity.serving import Projector, Steps, serve
from tokenfleet.config import ConfigError
from tokenfleet.hardware import load_hardware
from tokenfleet.model.spec import load_model_config

L8 = load_model_config("llama-3.1-8b")
H200 = load_hardware("h200")
TINY = load_model_config("tiny-qwen3")  # 102,848 params, 512-token context, 4 heads, 2 KV heads x 64 dims x 2 layers
GIB = 2**30


def _err(fn, *a, **kw) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        fn(*a, **kw)
    return e.value


def _hw_with(ratio: float, seq: int = 10, hw=H200):
    """A device (H200 otherwise) whose memory leaves exactly `ratio` tiny-qwen3 sequences of `seq` tokens."""
    need = 102848 * 2 + 2 * GIB + ratio * 512 * seq  # bf16 weights + reserve + KV (2 layers x 2 x 2 heads x 64 x 2 B)
    return hw.model_copy(update={"memory_gib": None, "memory_gb": need / 0.9 / 1e9})


# ---- constants ------------------------------------------------------------------------------------------------
def test_constants():
    assert P.F_MEM == 0.9 and P.RESERVE_BYTES_PER_GPU == 2147483648 and P.SECONDS_PER_DAY == 86400
    assert P.TP_CHOICES == (1, 2, 4, 8, 16) and P.KV_DTYPES == ("bf16", "fp16", "fp8")
    assert P.RATE_FIELDS == ("prefill_tokens_per_s_per_gpu", "decode_tokens_per_s_per_gpu",
                             "output_tokens_per_s_per_gpu", "total_tokens_per_s_per_gpu", "tokens_per_s_per_gpu",
                             "tokens_per_day_per_gpu")


# ---- KV bytes and the batch memory holds ---------------------------------------------------------------------
@pytest.mark.parametrize("tp, kv, expect", [
    (1, "bf16", 131072),  # 2 (K, V) x 32 layers x 8 heads x 128 x 2 B
    (1, "fp16", 131072),
    (1, "fp8", 65536),
    (2, "bf16", 65536),  # 4 heads per rank
    (8, "bf16", 16384),  # 1 head per rank
    (16, "bf16", 16384),  # 8 heads on 16 ranks: each keeps one (replicated twice)
])
def test_kv_bytes_per_gpu_by_hand(tp, kv, expect):
    assert P.kv_bytes_per_gpu(L8, tp, kv) == expect


@pytest.mark.parametrize("dtype, tp, kv, expect", [
    # 141 GiB x 0.9 = 136,257,837,465.6 B; bf16 weights 16,060,522,496 B; reserve 2 GiB; KV 131,072 B/token x 1280
    ("bf16", 1, "bf16", 703),  # 118,049,831,321.6 / 167,772,160 = 703.63
    ("fp8", 1, "bf16", 751),  # 8,030,261,248 B of weights: 126,080,092,569.6 / 167,772,160 = 751.50
    ("bf16", 1, "fp8", 1407),  # 65,536 B/token: 1407.26
    ("bf16", 2, "bf16", 1502),  # half the weights per GPU, half the KV heads: 1502.99
    ("bf16", 16, "bf16", 6347),  # 1/16 of the weights, one (replicated) head per GPU: 6347.02
])
def test_b_mem_by_hand(dtype, tp, kv, expect):
    assert P.b_mem(L8, H200, dtype, tp, 1280, kv) == expect


def test_b_mem_defaults_to_bf16_kv_and_floors():
    assert P.b_mem(L8, H200, "bf16", 1, 1280) == 703
    assert P.b_mem(TINY, _hw_with(1.5), "bf16", 1, 10) == 1  # floor, not round or ceil
    assert P.b_mem(TINY, _hw_with(2.999), "bf16", 1, 10) == 2
    assert P.b_mem(TINY, _hw_with(-0.5), "bf16", 1, 10) == -1  # floor, not int(): below zero when weights overflow
    assert P.b_mem(TINY, _hw_with(3.5), "bf16", 1, 5) == 7  # the sequence length divides


# ---- deployment ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, field, message", [
    ((0, None, None), "--batch", "must be >= 1, got 0"),
    ((None, 0, None), "--max-batched-tokens", "must be >= 1, got 0"),
    ((1, -3, None), "--max-batched-tokens", "must be >= 1, got -3"),
    ((None, None, "int8"), "--kv-dtype", "unknown KV dtype 'int8'; known: bf16, fp16, fp8"),
])
def test_check_deployment_names_the_flag(args, field, message):
    e = _err(P.check_deployment, *args)
    assert (e.file, e.field, e.message) == (field, None, message)


def test_check_deployment_accepts_the_smallest():
    for kv in (None, "bf16", "fp16", "fp8"):
        assert P.check_deployment(1, 1, kv) is None
    assert P.check_deployment(None, None, None) is None


def test_default_deployment_on_a_big_gpu():
    d = P.default_deployment(H200)
    assert d == P.Deployment(1024, 8192, "bf16", "vLLM V1 server defaults for >= 70 GiB GPUs: max_num_seqs 1024, "
                                                 "max_num_batched_tokens 8192, kv auto (bf16)", True)
    assert (d.kv_dtype, d.source, d.chunked_prefill) == ("bf16", d.source, True)


def test_deployment_defaults():
    d = P.Deployment(3, 4)
    assert (d.kv_dtype, d.source, d.chunked_prefill) == ("bf16", "given", True)


def test_default_deployment_on_small_gpus_and_a100():
    small = "vLLM V1 server defaults for smaller GPUs: max_num_seqs 256, max_num_batched_tokens 2048, kv auto (bf16)"
    for hw in (load_hardware("a100-sxm"), load_hardware("l40s")):  # A100 80 GB is not big; L40S 48 GB
        assert P.default_deployment(hw) == P.Deployment(256, 2048, "bf16", small, True)
    assert P.default_deployment(load_hardware("h800")).batch_cap == 1024  # 80 GiB, not an A100


def test_default_deployment_threshold_is_70_gib_inclusive():
    at = H200.model_copy(update={"memory_gib": 70})
    below = H200.model_copy(update={"memory_gib": 70 - 1e-6})
    assert (P.default_deployment(at).batch_cap, P.default_deployment(at).max_batched_tokens) == (1024, 8192)
    assert (P.default_deployment(below).batch_cap, P.default_deployment(below).max_batched_tokens) == (256, 2048)
    a100_like = H200.model_copy(update={"id": "a100-big", "memory_gib": 141})
    assert P.default_deployment(a100_like).batch_cap == 256
    not_prefix = H200.model_copy(update={"id": "x-a100"})  # only an id starting with a100
    assert P.default_deployment(not_prefix).batch_cap == 1024


def test_default_deployment_given_values_and_no_chunking():
    d = P.default_deployment(H200, batch_cap=7, max_batched_tokens=300, kv_dtype="fp8", chunked_prefill=False)
    assert d == P.Deployment(7, 300, "fp8", "vLLM V1 server defaults for >= 70 GiB GPUs: max_num_seqs 1024, "
                             "max_num_batched_tokens 8192, kv auto (bf16); given: batch_cap, max_batched_tokens, "
                             "kv_dtype; no chunked prefill (whole prompts per step)", False)
    d = P.default_deployment(H200, max_batched_tokens=300)
    assert (d.batch_cap, d.max_batched_tokens, d.kv_dtype) == (1024, 300, "bf16")
    assert d.source.endswith("kv auto (bf16); given: max_batched_tokens")
    d = P.default_deployment(H200, kv_dtype="fp16")
    assert d.source.endswith("; given: kv_dtype") and d.kv_dtype == "fp16"
    e = _err(P.default_deployment, H200, batch_cap=0)
    assert e.file == "--batch"
    assert _err(P.default_deployment, H200, max_batched_tokens=0).file == "--max-batched-tokens"
    assert _err(P.default_deployment, H200, kv_dtype="int8").file == "--kv-dtype"


# ---- workload and checks ------------------------------------------------------------------------------------
def test_ad_hoc_workload_and_its_default_slos():
    w = P.resolve_workload(None, input_len=100, output_len=10)
    assert (w.id, w.description, w.input_len, w.output_len, w.ttft_ms, w.tpot_ms, w.count) == \
        ("custom", "from the command line", 100, 10, 2000, 50, "total")
    assert w.assumption == "default SLOs ttft 2000 ms, tpot 50 ms unless given"
    w = P.resolve_workload(None, input_len=100, output_len=10, tpot_ms=0.5, ttft_ms=300)
    assert (w.tpot_ms, w.ttft_ms) == (0.5, 300)  # below 1 ms is still positive


def test_named_workload_with_overrides():
    chat = load_workload("chat")  # 1024 in, 256 out, ttft 1000, tpot 50
    w = P.resolve_workload("chat", output_len=7, ttft_ms=900)
    assert (w.id, w.input_len, w.output_len, w.ttft_ms, w.tpot_ms) == ("chat", 1024, 7, 900, 50)
    w = P.resolve_workload("chat", input_len=9, tpot_ms=20)
    assert (w.id, w.input_len, w.output_len, w.ttft_ms, w.tpot_ms) == ("chat", 9, 256, 1000, 20)
    assert P.resolve_workload(chat) == chat
    assert P.resolve_workload("chat") == chat


@pytest.mark.parametrize("kw, field, message", [
    ({"input_len": 100}, "--workload", "give --workload, or both --input-len and --output-len"),
    ({"output_len": 10}, "--workload", "give --workload, or both --input-len and --output-len"),
    ({"input_len": 100, "output_len": -1}, "--output-len", "must be positive, got -1"),
    ({"input_len": 0, "output_len": 10}, "--input-len", "must be positive, got 0"),
    ({"input_len": 100, "output_len": 10, "ttft_ms": 0}, "--ttft-ms", "must be positive, got 0"),
    ({"input_len": 100, "output_len": 10, "tpot_ms": -2.5}, "--tpot-ms", "must be positive, got -2.5"),
])
def test_bad_lengths_name_their_flag(kw, field, message):
    e = _err(P.resolve_workload, None, **kw)
    assert (e.file, e.field, e.message) == (field, None, message)


def test_bad_length_checked_before_a_named_workload_is_read():
    e = _err(P.resolve_workload, "no-such-workload", output_len=0)
    assert (e.file, e.message) == ("--output-len", "must be positive, got 0")


def test_context_check_counts_prompt_and_output():
    ctx = TINY.max_position_embeddings
    fits = P.resolve_workload(None, input_len=ctx - 10, output_len=10)
    P.check_context(TINY, fits)
    over = P.resolve_workload(None, input_len=ctx - 10, output_len=11)
    e = _err(P.check_context, TINY, over)
    assert (e.file, e.field) == ("--input-len", None)
    assert str(e) == f"--input-len: {ctx - 10} prompt + 11 output tokens exceed {TINY.id}'s context of {ctx}"
    assert _err(P.check_context, TINY, over, "workloads.yaml").file == "workloads.yaml"


def test_check_tp_names_flag_or_file():
    assert P.check_tp(L8, 8) is None and P.check_tp(L8, 16) is None
    e = _err(P.check_tp, L8, 3)
    assert (e.file, e.field, e.message) == ("--tp", None, "llama-3.1-8b: num_heads 32 is not divisible by tp 3")
    e = _err(P.check_tp, L8, 3, "fleet.yaml", "models.tp")
    assert (e.file, e.field) == ("fleet.yaml", "models.tp")


def test_refuse_fp8():
    a100 = load_hardware("a100-sxm")
    for kw in ({"dtype": "fp8"}, {"dtype": "bf16", "kv_dtype": "fp8"}):
        e = _err(P.refuse_fp8, "llama-3.1-8b", "a100-sxm", **kw)
        assert e.field == "fp8_tensor_cores"
    e = _err(P.refuse_fp8, "deepseek-v3", a100, None)  # native fp8 weights when no dtype given
    assert e.field == "fp8_tensor_cores"
    assert P.refuse_fp8("deepseek-v3", a100, "bf16") is None
    assert P.refuse_fp8(L8, a100, None) is None and P.refuse_fp8(L8, a100, "bf16", "bf16") is None
    assert P.refuse_fp8(L8, "h200", "fp8", "fp8") is None


def test_sources():
    eff, calib = Efficiency(), Efficiency(run_id="r1", kind="calibrated")
    dec = Measured("triton", ["r"], {(1, 64): 1e-3}, {})
    shard = Measured("triton", ["r"], {(1, 64): 1e-3}, {}, shard=True)
    empty = Measured("triton", ["r"], {}, {(1, 64): 1e-3})
    assert [P.source_of(m, e) for m, e in ((dec, eff), (shard, eff), (empty, eff), (empty, calib), (None, calib),
                                           (None, eff))] == \
        ["measured", "measured-shard", "projected", "calibrated", "calibrated", "projected"]
    assert [P.efficiency_source(m, e) for m, e in ((dec, calib), (shard, eff), (empty, calib), (None, eff))] == \
        ["measured", "measured", "calibrated", "global default"]


# ---- one projection ------------------------------------------------------------------------------------------
def _serve(m, hw, w, dtype="bf16", tp=1, eff=None, kv="bf16", cap=1024, budget=8192, chunked=True, meas=None):
    proj = Projector(m, hw, dtype, tp, eff or Efficiency(), kv)
    bm = P.b_mem(m, hw, dtype, tp, w.input_len + w.output_len, kv)
    s = serve(Steps(proj, meas), w.input_len, w.output_len, w.prefix_cache_hit, w.tpot_ms, w.ttft_ms, bm, cap,
              budget, chunked)
    return s, proj


def _rates_by_hand(s, w, tp, count, util):
    out, tot = s["output_per_s"] / tp, s["total_per_s"] / tp
    c = tot if count == "total" else out
    return {"prefill_tokens_per_s_per_gpu": s["new_tokens"] / s["ttft_s"] / tp,
            "decode_tokens_per_s_per_gpu": s["batch"] / s["decode_step_s"] / tp,
            "output_tokens_per_s_per_gpu": out, "total_tokens_per_s_per_gpu": tot, "tokens_per_s_per_gpu": c,
            "tokens_per_day_per_gpu": c * 86400 * util}


def test_project_llama8b_h200_chat_row():
    w = load_workload("chat")
    eff = Efficiency()
    r = P.project("llama-3.1-8b", "h200", "chat", eff=eff)
    s, proj = _serve(L8, H200, w, eff=eff)
    assert {k: r[k] for k in ("model", "gpu", "dtype", "tp", "workload", "input_len", "output_len",
                              "prefix_cache_hit", "count", "utilization", "weight_bytes",
                              "kv_bytes_per_token_per_gpu", "kv_dtype", "batch_cap", "max_batched_tokens",
                              "chunked_prefill", "allreduce_source", "alltoall_source")} == {
        "model": "llama-3.1-8b", "gpu": "h200", "dtype": "bf16", "tp": 1, "workload": "chat", "input_len": 1024,
        "output_len": 256, "prefix_cache_hit": 0.3, "count": "total", "utilization": 1.0,
        "weight_bytes": 16060522496, "kv_bytes_per_token_per_gpu": 131072, "kv_dtype": "bf16", "batch_cap": 1024,
        "max_batched_tokens": 8192, "chunked_prefill": True, "allreduce_source": proj.allreduce_source,
        "alltoall_source": proj.alltoall_source}
    assert r["deployment"] == P.default_deployment(H200).source
    assert (r["fits"], r["b_mem"], r["batch"], r["batch_limit"]) == (True, 703, s["batch"], s["batch_limit"])
    assert s["batch"] <= 703
    assert (r["b_slo"], r["b_budget"], r["prefill_tokens_per_step"]) == \
        (s["b_slo"], s["b_budget"], s["prefill_tokens_per_step"])
    assert r["tpot_ms"] == pytest.approx(s["step_s"] * 1e3, rel=1e-12)
    assert r["decode_step_ms"] == pytest.approx(s["decode_step_s"] * 1e3, rel=1e-12)
    assert r["ttft_ms"] == pytest.approx(s["ttft_s"] * 1e3, rel=1e-12)
    assert (r["tpot_limit_ms"], r["ttft_limit_ms"], r["tpot_ok"], r["ttft_ok"]) == (50, 1000, s["tpot_ok"],
                                                                                    s["ttft_ok"])
    for k, v in _rates_by_hand(s, w, 1, "total", 1.0).items():
        assert r[k] == pytest.approx(v, rel=1e-12), k
    assert r["total_tokens_per_s_per_gpu"] == pytest.approx(r["output_tokens_per_s_per_gpu"] * 1280 / 256)
    assert (r["power_w_per_gpu"], r["power_source"]) == (700, "datasheet TDP")
    assert r["joules_per_token"] == pytest.approx(700 / r["tokens_per_s_per_gpu"], rel=1e-12)
    assert (r["source"], r["decode_source"], r["prefill_source"], r["efficiency_source"]) == \
        ("projected", "projected", "projected", "global default")
    assert r["efficiency"] == eff.to_dict()
    assert r["notes"] == proj.notes and "extrapolated" not in r


def test_project_defaults_efficiency_from_the_family_and_dtype_from_the_model():
    r = P.project(L8, H200, load_workload("chat"))
    fam = P.efficiency_for([], "h200", "bf16")
    assert r["efficiency"] == fam.to_dict() and r["efficiency_source"] == fam.kind
    assert (r["dtype"], r["tp"], r["utilization"], r["kv_dtype"]) == ("bf16", 1, 1.0, "bf16")
    assert P.project("tiny-qwen3", "h200", "chat", eff=Efficiency())["dtype"] == "bf16"  # no native dtype


def test_project_tp_count_utilization_and_fp8():
    w = load_workload("chat")
    eff = Efficiency()
    r = P.project(L8, "h200", w, dtype="fp8", tp=2, eff=eff, count="output", utilization=0.5, kv_dtype="fp8",
                  batch_cap=64, max_batched_tokens=4096)
    s, proj = _serve(L8, H200, w, "fp8", 2, eff, "fp8", 64, 4096)
    assert (r["dtype"], r["tp"], r["count"], r["utilization"], r["kv_dtype"]) == ("fp8", 2, "output", 0.5, "fp8")
    assert (r["weight_bytes"], r["kv_bytes_per_token_per_gpu"], r["batch_cap"], r["max_batched_tokens"]) == \
        (8030261248, 32768, 64, 4096)
    assert r["b_mem"] == math.floor((141 * GIB * 0.9 - 8030261248 / 2 - 2 * GIB) / (32768 * 1280))
    assert r["batch"] == s["batch"] == 64 and r["batch_limit"] == "cap"
    for k, v in _rates_by_hand(s, w, 2, "output", 0.5).items():
        assert r[k] == pytest.approx(v, rel=1e-12), k
    assert r["tokens_per_s_per_gpu"] == r["output_tokens_per_s_per_gpu"]
    assert r["joules_per_token"] == pytest.approx(700 / r["output_tokens_per_s_per_gpu"], rel=1e-12)


def test_project_calibrated_efficiency_labels():
    eff = Efficiency(0.4, 0.6, 0.2, "run r9", "r9", "calibrated")
    r = P.project(L8, H200, "chat", eff=eff)
    assert (r["source"], r["decode_source"], r["prefill_source"], r["efficiency_source"]) == \
        ("calibrated", "calibrated (run r9)", "calibrated (run r9)", "calibrated")
    assert r["efficiency"] == {"compute": 0.4, "memory": 0.6, "overhead_ms": 0.2, "from": "run r9",
                               "kind": "calibrated"}


def test_project_without_tdp_has_no_energy():
    hw = H200.model_copy(update={"tdp_w": None})
    r = P.project(L8, hw, "chat", eff=Efficiency())
    assert (r["power_w_per_gpu"], r["power_source"], r["joules_per_token"]) == (None, None, None)


@pytest.mark.parametrize("u", [0, -0.1, 1.0000001, 2])
def test_utilization_outside_0_1(u):
    e = _err(P.project, L8, H200, "chat", utilization=u)
    assert (e.file, e.field, e.message) == ("--utilization", None, f"must be in (0, 1], got {u}")


def test_utilization_one_and_tiny_are_fine():
    assert P.project(L8, H200, "chat", utilization=1, eff=Efficiency())["utilization"] == 1
    r = P.project(L8, H200, "chat", utilization=1e-9, eff=Efficiency())
    assert r["tokens_per_day_per_gpu"] == pytest.approx(r["tokens_per_s_per_gpu"] * 86400e-9, rel=1e-12)


def test_project_checks_tp_and_fp8():
    assert _err(P.project, L8, H200, "chat", tp=3).file == "--tp"
    assert _err(P.project, L8, "a100-sxm", "chat", dtype="fp8").field == "fp8_tensor_cores"
    assert _err(P.project, L8, "a100-sxm", "chat", kv_dtype="fp8").field == "fp8_tensor_cores"
    r = P.project(L8, "a100-sxm", "chat", dtype="fp8", weight_only_fp8=True, eff=Efficiency())
    assert r["dtype"] == "fp8" and r["weight_bytes"] == 8030261248 and r["fits"]
    assert _err(P.project, L8, H200, "chat", batch_cap=0).file == "--batch"


def test_whole_prompts_must_fit_the_token_budget():
    # chat: 1024 prompt tokens, 30% cached: ceil(716.8) = 717 new tokens per prompt
    e = _err(P.project, L8, H200, "chat", max_batched_tokens=716, chunked_prefill=False, eff=Efficiency())
    assert (e.file, e.field, e.message) == ("--max-batched-tokens", None, "716 is below the prompt's 717 new tokens: "
                                            "without chunked prefill a whole prompt is one step")
    r = P.project(L8, H200, "chat", max_batched_tokens=717, chunked_prefill=False, eff=Efficiency())
    w = load_workload("chat")
    s, _ = _serve(L8, H200, w, budget=717, chunked=False)
    assert (r["fits"], r["chunked_prefill"], r["max_batched_tokens"]) == (True, False, 717)
    assert r["deployment"].endswith("; given: max_batched_tokens; no chunked prefill (whole prompts per step)")
    assert r["tpot_ms"] == pytest.approx(s["step_s"] * 1e3, rel=1e-12)
    assert r["ttft_ms"] == pytest.approx(s["ttft_s"] * 1e3, rel=1e-12)
    r = P.project(L8, H200, "chat", max_batched_tokens=716, eff=Efficiency())  # chunked: any budget
    assert r["fits"] and r["max_batched_tokens"] == 716


def _fields_of_a_row_that_does_not_fit(r, w, limit, bm, why, eff):
    assert (r["fits"], r["batch"], r["batch_limit"], r["b_mem"], r["b_slo"]) == (False, 0, limit, bm, None)
    assert (r["tpot_ms"], r["tpot_limit_ms"], r["tpot_ok"], r["ttft_ms"], r["ttft_limit_ms"], r["ttft_ok"]) == \
        (None, w.tpot_ms, False, None, w.ttft_ms, False)
    assert all(r[k] == 0.0 for k in P.RATE_FIELDS)
    assert (r["joules_per_token"], r["power_w_per_gpu"]) == (None, None)
    assert (r["source"], r["decode_source"], r["prefill_source"]) == ("projected",) * 3
    assert r["efficiency"] == eff.to_dict() and r["efficiency_source"] == "global default"
    assert r["notes"][-1] == why and "b_budget" not in r


def test_a_model_that_does_not_fit():
    eff = Efficiency()
    w = load_workload("chat")
    m = load_model_config("llama-3.1-70b")
    r = P.project(m, "l40s", w, eff=eff)
    hw = load_hardware("l40s")
    bm = math.floor((hw.memory_bytes * 0.9 - m.param_count() * 2 - 2 * GIB) / (327680 * 1280))
    assert bm < 0
    why = f"does not fit: {m.param_count() * 2 / GIB:.0f} GiB of weights on 1x {hw.memory_bytes / GIB:.0f} GiB " \
          "at f_mem 0.9"
    assert why == "does not fit: 131 GiB of weights on 1x 48 GiB at f_mem 0.9"
    _fields_of_a_row_that_does_not_fit(r, w, "memory", bm, why, eff)
    assert r["weight_bytes"] == m.param_count() * 2 and r["model"] == "llama-3.1-70b"


def test_batch_one_fits_batch_zero_does_not():
    w = P.resolve_workload(None, input_len=6, output_len=4)
    eff = Efficiency()
    one = P.project(TINY, _hw_with(1.5), w, eff=eff)
    assert (one["fits"], one["b_mem"], one["batch"], one["batch_limit"]) == (True, 1, 1, "memory")
    hw = _hw_with(0.5)
    zero = P.project(TINY, hw, w, eff=eff)
    why = f"does not fit: 0 GiB of weights on 1x {hw.memory_bytes / GIB:.0f} GiB at f_mem 0.9"
    _fields_of_a_row_that_does_not_fit(zero, w, "memory", 0, why, eff)


def test_context_limit_is_inclusive():
    eff = Efficiency()
    ok = P.project(TINY, H200, P.resolve_workload(None, input_len=500, output_len=12), eff=eff)
    assert ok["fits"] and ok["batch"] >= 1
    w = P.resolve_workload(None, input_len=500, output_len=13)
    r = P.project(TINY, H200, w, eff=eff)
    bm = math.floor((141 * GIB * 0.9 - 102848 * 2 - 2 * GIB) / (512 * 513))
    _fields_of_a_row_that_does_not_fit(r, w, "context", bm, "500+13 tokens exceed the 512-token context", eff)


def test_slo_notes():
    w = P.resolve_workload(None, input_len=100, output_len=10, tpot_ms=0.001, ttft_ms=0.001)
    r = P.project(L8, H200, w, eff=Efficiency())
    s, _ = _serve(L8, H200, w)
    assert (r["tpot_ok"], r["ttft_ok"]) == (False, False)
    assert r["notes"][-2:] == [f"TPOT limit 0.001 ms not met even at batch 1 ({s['tpot_at_1_s'] * 1e3:.1f} ms)",
                               f"TTFT limit 0.001 ms not met: the prefill alone takes {s['ttft_s'] * 1e3:.0f} ms"]
    w = P.resolve_workload(None, input_len=100, output_len=10, tpot_ms=0.001, ttft_ms=1e6)
    r = P.project(L8, H200, w, eff=Efficiency())
    assert r["ttft_ok"] and r["notes"][-1].startswith("TPOT limit 0.001 ms not met even at batch 1 (")
    w = P.resolve_workload(None, input_len=100, output_len=10, tpot_ms=1e6, ttft_ms=0.001)
    r = P.project(L8, H200, w, eff=Efficiency())
    assert r["tpot_ok"] and r["notes"][-1].startswith("TTFT limit 0.001 ms not met: the prefill alone takes ")
    r = P.project(L8, H200, "chat", eff=Efficiency())
    assert r["tpot_ok"] and r["ttft_ok"] and r["notes"] == []


def _measured(monkeypatch, meas):
    seen = []

    def fake(runs, hw_id, model, dtype, tp):
        seen.append((runs, hw_id, model, dtype, tp))
        return meas
    monkeypatch.setattr(P, "measured_for", fake)
    return seen


def test_measured_row(monkeypatch):
    w = P.resolve_workload(None, input_len=64, output_len=64)
    meas = Measured("triton", ["r1", "r2"], {(1, 96): 2e-3, (8, 96): 3e-3}, {(1, 64): 4e-3}, power_w=321.0,
                    energy_w={1: 250.0, 8: 300.0})
    seen = _measured(monkeypatch, meas)
    r = P.project(L8, H200, w, eff=Efficiency(), batch_cap=8)
    assert seen == [([], "h200", "llama-3.1-8b", "bf16", 1)]
    s, _ = _serve(L8, H200, w, cap=8, meas=meas)
    assert (r["source"], r["efficiency_source"]) == ("measured", "measured")
    assert r["decode_source"] == r["prefill_source"] == "measured (triton, run r1, r2)"
    assert r["batch"] == s["batch"] == 8
    assert r["tpot_ms"] == pytest.approx(s["step_s"] * 1e3, rel=1e-12)
    assert r["power_w_per_gpu"] == 300.0
    assert r["power_source"] == "measured: NVML energy counter, decode batch 8 (run r1, r2)"
    assert r["joules_per_token"] == pytest.approx(300.0 / r["tokens_per_s_per_gpu"], rel=1e-12)
    assert "extrapolated" not in r


def test_measured_shard_without_prefill_is_extrapolated(monkeypatch):
    w = P.resolve_workload(None, input_len=64, output_len=64)
    meas = Measured("compile", ["r1"], {(1, 96): 2e-3, (2, 96): 2.5e-3}, {}, shard=True)
    _measured(monkeypatch, meas)
    r = P.project(L8, H200, w, tp=2, eff=Efficiency(run_id="c", kind="calibrated"), batch_cap=8)
    assert (r["source"], r["efficiency_source"]) == ("measured-shard", "measured")
    assert r["decode_source"] == "measured (shard on one GPU, collectives added: compile, run r1)"
    assert r["prefill_source"] == "calibrated (run c)"
    assert (r["power_w_per_gpu"], r["power_source"]) == (700, "datasheet TDP")
    assert r["extrapolated"] is True
    assert r["notes"][-1] == (f"decode at batch 8, context {64 + 32:g} is outside the measured grid: the nearest "
                              "measured ratio is held (extrapolated)")


def test_measured_prefill_only(monkeypatch):
    meas = Measured("triton", ["r1"], {}, {(1, 64): 4e-3}, power_w=200.0)
    _measured(monkeypatch, meas)
    r = P.project(L8, H200, "chat", eff=Efficiency())
    assert (r["source"], r["decode_source"]) == ("projected", "projected")
    assert r["prefill_source"] == "measured (triton, run r1)"
    assert (r["power_w_per_gpu"], r["power_source"]) == \
        (200.0, "measured: NVML power read after the decode points (run r1)")


# ---- auto_tp -------------------------------------------------------------------------------------------------
def test_valid_tps():
    assert P.valid_tps(L8) == [1, 2, 4, 8, 16]
    assert P.valid_tps(TINY) == [1, 2, 4]  # 4 heads
    assert P.valid_tps(L8, (3, 8)) == [8]


def _fake_project(monkeypatch, table):
    calls = []

    def fake(m, gpu, workload, dtype=None, tp=1, **kw):
        calls.append((m.id, gpu, workload, dtype, tp, kw))
        fits, ok, tps = table[tp]
        tpot, ttft = ok if isinstance(ok, tuple) else (ok, ok)
        return {"tp": tp, "fits": fits, "tpot_ok": tpot, "ttft_ok": ttft, "tokens_per_s_per_gpu": tps}
    monkeypatch.setattr(P, "project", fake)
    return calls


def test_auto_tp_prefers_meeting_the_slos_then_speed(monkeypatch):
    calls = _fake_project(monkeypatch, {1: (False, True, 999.0), 2: (True, False, 500.0), 4: (True, True, 50.0),
                                        8: (True, True, 50.0), 16: (True, True, 40.0)})
    r = P.auto_tp("llama-3.1-8b", "h200", "chat", "fp8", batch_cap=3)
    assert r["tp"] == 4  # meets both SLOs; tp 8 ties and is not preferred; tp 2 is faster but misses one
    assert calls == [("llama-3.1-8b", "h200", "chat", "fp8", p, {"batch_cap": 3}) for p in (1, 2, 4, 8, 16)]


def test_auto_tp_needs_both_slos(monkeypatch):
    _fake_project(monkeypatch, {1: (True, (True, False), 90.0), 2: (True, (False, True), 80.0),
                                4: (True, (True, True), 10.0)})
    assert P.auto_tp(L8, "h200", "chat", choices=(1, 2, 4))["tp"] == 4


def test_auto_tp_fastest_when_none_meets_the_slos(monkeypatch):
    _fake_project(monkeypatch, {1: (True, False, 10.0), 2: (True, False, 30.0), 4: (True, False, 20.0)})
    assert P.auto_tp(L8, "h200", "chat", choices=(1, 2, 4))["tp"] == 2


def test_auto_tp_last_tried_when_none_fits(monkeypatch):
    _fake_project(monkeypatch, {1: (False, False, 0.0), 2: (False, False, 0.0), 4: (False, False, 0.0)})
    assert P.auto_tp(L8, "h200", "chat", choices=(1, 2, 4))["tp"] == 4
    assert P.auto_tp(L8, "h200", "chat", choices=(3,)) is None


def test_auto_tp_on_a_real_model():
    rows = {p: P.project(L8, H200, "chat", tp=p, eff=Efficiency()) for p in (1, 2, 4, 8, 16)}
    best = max(rows.values(), key=lambda r: (r["tpot_ok"] and r["ttft_ok"], r["tokens_per_s_per_gpu"]))
    assert P.auto_tp(L8, "h200", "chat", eff=Efficiency())["tp"] == best["tp"]


def test_runs_reach_every_lookup(monkeypatch):
    seen = {}
    monkeypatch.setattr(P, "read_runs", lambda runs: seen.setdefault("read", runs) and ["R"])
    monkeypatch.setattr(P, "measured_for", lambda *a: seen.setdefault("measured", a) and None)
    monkeypatch.setattr(P, "efficiency_for", lambda *a: seen.setdefault("eff", a) and Efficiency(kind="k"))
    monkeypatch.setattr(P, "measured_allreduce", lambda *a: seen.setdefault("allreduce", a) and None)
    r = P.project(L8, H200, "chat", dtype="fp8", tp=2, runs=["run-a"])
    assert seen == {"read": ["run-a"], "measured": (["R"], "h200", "llama-3.1-8b", "fp8", 2),
                    "eff": (["R"], "h200", "fp8"), "allreduce": (["R"], "h200", 2)}
    assert r["efficiency_source"] == "k"


def test_tpot_note_in_milliseconds():
    eff = Efficiency(memory=0.001)  # a step of seconds: the note's figure shows any scale error
    w = P.resolve_workload(None, input_len=100, output_len=10, tpot_ms=50, ttft_ms=1e9)
    r = P.project(L8, H200, w, eff=eff)
    s, _ = _serve(L8, H200, w, eff=eff)
    assert s["tpot_at_1_s"] > 1
    assert r["notes"][-1] == f"TPOT limit 50 ms not met even at batch 1 ({s['tpot_at_1_s'] * 1000:.1f} ms)"
