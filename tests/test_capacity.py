"""Invariants of the capacity model (tokenfleet.capacity.project, tokenfleet.capacity.fleet) and its configs and CLI."""

import json

import pytest
import yaml
from tokenfleet.capacity.config import (
    Fleet,
    all_demand,
    all_fleets,
    all_workloads,
    load_demand,
    load_fleet,
    load_workload,
)
from tokenfleet.capacity.fleet import capacity_table, growth_fit, outgrows, sweep
from tokenfleet.capacity.project import Efficiency, Projector, b_mem, project, read_runs, resolve_workload
from tokenfleet.cli.main import app as tokenfleet_app
from tokenfleet.config import ConfigError
from tokenfleet.dtypes import DTYPE_BYTES
from tokenfleet.hardware import all_hardware, load_hardware
from tokenfleet.model.spec import all_model_configs, load_model_config
from tokenfleet.results import RunWriter
from typer.testing import CliRunner

MODELS = ["llama-3.1-8b", "qwen3-32b", "qwen3-30b-a3b", "qwen3-235b-a22b", "deepseek-v3"]


def small_fleet(**kw) -> Fleet:
    base = dict(id="t", description="test", gpus=[{"gpu": "h100-sxm", "count": 8, "source": "test"}],
                models=[{"model": "llama-3.1-8b", "share": 1.0}], workloads=[{"workload": "chat", "share": 1.0}])
    return Fleet.model_validate({**base, **kw})


# ---- the serving model ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_batch1_decode_never_beats_bandwidth(model, dtype):
    """One token per step can never come faster than streaming the weights it reads once per step."""
    m = load_model_config(model)
    for hw in all_hardware().values():
        for tp in (1, 8):
            p = Projector(m, hw, dtype, tp, Efficiency(compute=1.0, memory=1.0, overhead_ms=0.0))
            per_gpu = 1 / p.t_dec(1, 1) / tp
            assert per_gpu <= hw.bandwidth_bytes_per_s / (m.decode_weight_bytes(1, DTYPE_BYTES[dtype]) / tp) * 1.0001
            if m.moe is None:  # dense: a step reads every weight but the embedding table
                assert per_gpu * tp <= tp * hw.bandwidth_bytes_per_s / (m.weight_bytes(DTYPE_BYTES[dtype]) * 0.8)


def test_fp8_halves_weight_bytes_and_grows_batch():
    """b_mem of Llama 3.1 8B on an 80 GiB H100 for summarize-8k (8192 + 1024 tokens), counted here: the weights
    from the published parameter count (8,030,261,248) at 2 bytes (bf16) and 1 byte (fp8), KV 131,072 bytes per
    token (2 x 32 layers x 8 KV heads x 128 x bf16), F_MEM and the reserve as project.py cites them."""
    from tokenfleet.capacity.project import F_MEM, RESERVE_BYTES_PER_GPU

    params, kv_token, seq = 8_030_261_248, 2 * 32 * 8 * 128 * 2, 8192 + 1024
    usable = 80 * 2**30 * F_MEM - RESERVE_BYTES_PER_GPU
    want_bf = (usable - 2 * params) // (kv_token * seq)
    want_f8 = (usable - 1 * params) // (kv_token * seq)
    assert (want_bf, want_f8) == (48, 55)  # by hand: 59.10e9 and 67.13e9 free bytes over 1.208e9 per sequence
    bf, f8 = project("llama-3.1-8b", "h100-sxm", "summarize-8k", "bf16"), \
        project("llama-3.1-8b", "h100-sxm", "summarize-8k", "fp8")
    assert (bf["weight_bytes"], f8["weight_bytes"]) == (2 * params, params)
    assert (bf["b_mem"], f8["b_mem"]) == (want_bf, want_f8)  # fp8 weights: 7 more sequences, exactly


def test_count_output_vs_total_is_exact_ratio():
    w = load_workload("reasoning")
    tot = project("qwen3-30b-a3b", "h100-sxm", w, count="total")
    out = project("qwen3-30b-a3b", "h100-sxm", w, count="output")
    ratio = w.output_len / (w.input_len + w.output_len)
    assert out["tokens_per_s_per_gpu"] == pytest.approx(tot["tokens_per_s_per_gpu"] * ratio, rel=1e-12)
    assert out["tokens_per_day_per_gpu"] == pytest.approx(tot["tokens_per_day_per_gpu"] * ratio, rel=1e-12)


@pytest.mark.parametrize("model", ["llama-3.1-8b", "qwen3-30b-a3b"])
def test_more_hbm_never_lowers_throughput(model):
    hw = load_hardware("h100-sxm")
    last = 0.0
    for gb in (40, 80, 120, 200, 400):
        r = project(model, hw.model_copy(update={"memory_gib": gb}), "summarize-8k")
        assert r["tokens_per_s_per_gpu"] >= last
        last = r["tokens_per_s_per_gpu"]


def test_tighter_tpot_never_raises_batch():
    w = load_workload("chat")
    batches = [project("llama-3.1-70b", "h100-sxm", w.model_copy(update={"tpot_ms": t}), tp=4)["batch"]
               for t in (200, 100, 50, 30, 20, 10, 5, 1)]
    assert batches == sorted(batches, reverse=True)
    assert batches[-1] >= 1
    r = project("llama-3.1-70b", "h100-sxm", w.model_copy(update={"tpot_ms": 1}), tp=4)
    assert r["tpot_ok"] is False and r["batch_limit"] == "slo"


def test_unmet_ttft_is_flagged():
    w = resolve_workload(None, input_len=32768, output_len=128, ttft_ms=10)
    r = project("llama-3.1-70b", "h100-sxm", w, tp=4)
    assert r["fits"] and r["ttft_ok"] is False and r["ttft_ms"] > 10
    assert any("TTFT" in n for n in r["notes"])


def test_model_that_does_not_fit():
    r = project("deepseek-v3", "l20", "chat", "bf16", tp=1)
    assert r["fits"] is False and r["batch"] == 0 and r["b_mem"] < 0
    assert r["tokens_per_s_per_gpu"] == 0
    assert b_mem(load_model_config("deepseek-v3"), load_hardware("h200"), "fp8", 8, 2048) > 0


def test_batch_limit_names_the_binding_limit():
    r = project("llama-3.1-8b", "h100-sxm", "chat", batch_cap=8)
    assert r["batch"] == 8 and r["batch_limit"] == "cap"
    r = project("llama-3.1-8b", "h100-sxm", "summarize-8k")
    assert r["batch"] == r["b_mem"] and r["batch_limit"] == "memory"


def test_tp_all_reduce_costs_time():
    m, hw = load_model_config("llama-3.1-70b"), load_hardware("h100-sxm")
    slow_link = hw.model_copy(update={"interconnect": hw.interconnect.model_copy(update={"per_direction_gbps": 1})})
    assert Projector(m, slow_link, tp=4).t_dec(64, 2000) > Projector(m, hw, tp=4).t_dec(64, 2000)
    assert Projector(m, hw, tp=1).allreduce_s(64) == 0


def _offline(i: int, o: int):
    return resolve_workload(None, i, o, tpot_ms=1e9, ttft_ms=1e9)


def test_whole_prompts_per_step_cost_the_overlap_chunking_buys():
    """Without chunked prefill (TensorRT-LLM's default) a prompt is one step's work: when fewer than one request
    finishes per step (B < O) the prefill no longer hides under every decode step's weight and KV reads, so the
    step is slower; when more than one finishes per step (B >= O) every step prefills and nothing changes."""
    kw = dict(tp=1, batch_cap=2048, max_batched_tokens=22048, kv_dtype="fp8")
    long = _offline(20000, 2000)
    chunked = project("llama-3.1-70b", "h200", long, "fp8", **kw)
    whole = project("llama-3.1-70b", "h200", long, "fp8", chunked_prefill=False, **kw)
    assert whole["batch"] == chunked["batch"] < 2000 and whole["chunked_prefill"] is False
    assert whole["output_tokens_per_s_per_gpu"] < 0.8 * chunked["output_tokens_per_s_per_gpu"]
    short = _offline(128, 128)
    a = project("llama-3.1-8b", "h200", short, "fp8", **kw)
    b = project("llama-3.1-8b", "h200", short, "fp8", chunked_prefill=False, **kw)
    assert a["batch"] >= 128 and b["output_tokens_per_s_per_gpu"] == pytest.approx(a["output_tokens_per_s_per_gpu"])


def test_whole_prompt_must_fit_the_token_budget():
    with pytest.raises(ConfigError, match="max-batched-tokens"):
        project("llama-3.1-8b", "h200", _offline(20000, 2000), "fp8", max_batched_tokens=8192, chunked_prefill=False)
    assert project("llama-3.1-8b", "h200", _offline(20000, 2000), "fp8", max_batched_tokens=8192)["fits"]


# ---- fleets and demand ---------------------------------------------------------------------------------------
def test_capacity_linear_in_count_and_utilization():
    one, _ = capacity_table(small_fleet(), "china-nda")
    two, _ = capacity_table(small_fleet(gpus=[{"gpu": "h100-sxm", "count": 16, "source": "t"}]), "china-nda")
    assert two[-1]["tokens_per_day"] == pytest.approx(2 * one[-1]["tokens_per_day"])
    a, _ = capacity_table(small_fleet(), "china-nda", utilization=0.3)
    b, _ = capacity_table(small_fleet(), "china-nda", utilization=0.6)
    assert b[-1]["tokens_per_day"] == pytest.approx(2 * a[-1]["tokens_per_day"])


def test_workload_mix_is_harmonic_mean():
    mix = small_fleet(workloads=[{"workload": "chat", "share": 0.5}, {"workload": "reasoning", "share": 0.5}])
    rows, _ = capacity_table(mix, "china-nda")
    rows_chat, _ = capacity_table(small_fleet(), "china-nda")
    r1 = rows_chat[0]["tokens_per_s_per_gpu"]
    rows_r, _ = capacity_table(small_fleet(workloads=[{"workload": "reasoning", "share": 1.0}]), "china-nda")
    r2 = rows_r[0]["tokens_per_s_per_gpu"]
    assert rows[0]["tokens_per_s_per_gpu"] == pytest.approx(1 / (0.5 / r1 + 0.5 / r2))


def test_coverage_against_both_figures():
    rows, s = capacity_table("h100-10k")
    assert s["demand"] == "china-reported"
    assert s["coverage_vs_china_reported"] == pytest.approx(10 * s["coverage_vs_china_nda"])
    assert "万亿" in s["why_differs"]
    total = rows[-1]
    assert total["gpu"] == "total" and total["coverage"] == pytest.approx(s["coverage"])
    h100 = rows[0]
    assert h100["gpus_needed_alone"] * h100["tokens_per_day_per_gpu"] >= s["demand_tokens_per_day"] * s["peak_factor"]
    assert h100["power_mw"] == pytest.approx(10000 * 700 * 1.3 / 1e6)


def test_demand_fit_and_scenarios():
    nda, rep = load_demand("china-nda"), load_demand("china-reported")
    assert nda.latest.tokens_per_day == 10 * rep.latest.tokens_per_day == 1.4e14
    for d in (nda, rep, load_demand("doubao-volcano"), load_demand("openrouter-china")):
        fit = growth_fit(d)
        assert fit["growth_per_month"] > 0 and fit["doubling_months"] > 0
    fit = growth_fit(nda)
    assert outgrows(fit, 1e15, 1.0) > outgrows(fit, 1e14, 1.0)
    assert load_demand("openrouter-china").latest.tokens_per_day == pytest.approx(7.359e12 / 7, rel=1e-3)
    assert all(d.why_differs for d in all_demand().values())


def test_every_config_validates():
    assert {"chat", "summarize-8k", "reasoning", "baseline-1k1k", "coding-agent"} <= set(all_workloads())
    assert {"china-reported", "china-nda", "doubao-reported", "doubao-volcano", "openrouter-china"} <= set(all_demand())
    assert {"h100-node", "h100-10k", "h20-cluster", "china-2026-mix"} <= set(all_fleets())
    assert all_model_configs() and all_hardware()
    s8k = load_workload("summarize-8k")
    assert (s8k.input_len, s8k.output_len) == (8192, 1024)
    for name in all_fleets():
        rows, s = capacity_table(name)
        assert s["capacity_tokens_per_day"] > 0 and all(r["tokens_per_day"] >= 0 for r in rows)


def test_sweep_rows():
    rows = sweep("h100-node")
    assert {r["variable"] for r in rows} == {"baseline", "utilization", "workload", "dtype"}
    u = [r for r in rows if r["variable"] == "utilization"]
    assert [r["capacity_tokens_per_day"] for r in u] == sorted(r["capacity_tokens_per_day"] for r in u)


# ---- bad input -----------------------------------------------------------------------------------------------
def write_fleet(tmp_path, **kw):
    data = dict(id="bad", description="x", gpus=[{"gpu": "h100-sxm", "count": 8, "source": "t"}],
                models=[{"model": "llama-3.1-8b", "share": 1.0}], workloads=[{"workload": "chat", "share": 1.0}])
    data.update(kw)
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(data, allow_unicode=True))
    return p


@pytest.mark.parametrize("kw,field", [
    (dict(gpus=[{"gpu": "h100-sxm", "count": -1, "source": "t"}]), "gpus.0.count"),
    (dict(utilization=1.5, assumptions={"utilization": "t"}), "utilization"),
    (dict(utilization=0.0, assumptions={"utilization": "t"}), "utilization"),
    (dict(models=[{"model": "llama-3.1-8b", "share": 0.5}]), None),
    (dict(gpus=[{"gpu": "h100-sxm", "count": 8}]), "gpus.0"),
    (dict(gpus=[{"gpu": "h100-sxm", "count": 8, "source": "t", "colour": "red"}]), "gpus.0.colour"),
    (dict(gpus=[{"gpu": "h999", "count": 8, "source": "t"}]), "gpus.0.gpu"),
    (dict(utilization=0.5), None),  # a knob without a source or assumption
])
def test_bad_fleet_names_file_and_field(tmp_path, kw, field):
    p = write_fleet(tmp_path, **kw)
    with pytest.raises(ConfigError) as e:
        capacity_table(str(p))
    assert e.value.file == str(p)
    if field:
        assert e.value.field == field
    if field == "gpus.0.gpu":
        assert "known:" in e.value.message and "h100-sxm" in e.value.message


def test_unknown_names_list_known():
    for fn, arg in ((load_workload, "nope"), (load_demand, "nope"), (load_fleet, "nope"),
                    (load_model_config, "nope"), (load_hardware, "nope")):
        with pytest.raises(ConfigError, match="known: "):
            fn(arg)
    with pytest.raises(ConfigError, match="utilization"):
        capacity_table("h100-node", utilization=1.5)
    with pytest.raises(ConfigError):
        project("llama-3.1-8b", "h100-sxm", "chat", utilization=0)


# ---- runs: measured efficiencies and grids -------------------------------------------------------------------
def make_run(tmp_path, factor=2.0):
    """A run folder written the way the runner writes one (RunWriter; the whole datasheet in the manifest)."""
    d = tmp_path / "run1"
    w = RunWriter(d, {"run_id": "run1", "environment": {"device": {"name": "NVIDIA H100 80GB HBM3"},
                                                        "datasheet": load_hardware("h100-sxm").model_dump()},
                      "ceilings": {}})
    proj = Projector(load_model_config("llama-3.1-8b"), load_hardware("h100-sxm"))
    for b in (1, 8, 64, 256):
        for c in (512, 2048):
            w.append({"kind": "decode", "model": "llama-3.1-8b", "backend": "torch", "dtype": "bf16", "tp": 1,
                      "status": "ok", "batch": b, "context": c, "median_ms": factor * proj.t_dec(b, c) * 1e3,
                      "mbu_datasheet": 0.6})
    for n in (512, 2048):
        w.append({"kind": "prefill", "model": "llama-3.1-8b", "backend": "torch", "dtype": "bf16", "tp": 1,
                  "status": "ok", "batch": 1, "prompt_len": n, "median_ms": factor * proj.t_pre(n) * 1e3,
                  "mfu_datasheet": 0.4})
    w.close()
    return d


def test_measured_run(tmp_path):
    runs = read_runs([make_run(tmp_path)])
    r = project("llama-3.1-8b", "h100-sxm", "baseline-1k1k", runs=runs, batch_cap=64)
    assert r["source"] == "measured" and r["efficiency"]["compute"] == 0.4 and r["efficiency"]["memory"] == 0.6
    # the measured step time (twice the default projection at every grid point) wins over the projection
    p = Projector(load_model_config("llama-3.1-8b"), load_hardware("h100-sxm"))
    assert r["tpot_ms"] == pytest.approx(2 * p.t_dec(r["batch"], 1024 + 512) * 1e3, rel=0.05)
    other = project("llama-3.1-8b", "h200", "baseline-1k1k", runs=runs)  # efficiencies carry, grid does not
    assert other["source"] == "calibrated" and other["efficiency"]["memory"] == 0.6


def test_bad_run_folder(tmp_path):
    with pytest.raises(ConfigError):
        read_runs([tmp_path / "missing"])
    d = tmp_path / "r"
    d.mkdir()
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(ConfigError) as e:
        read_runs([d])
    assert "manifest.json" in str(e.value)


# ---- CLI -----------------------------------------------------------------------------------------------------
@pytest.fixture
def cli():
    return tokenfleet_app


def _err(result) -> str:
    try:
        return result.stderr
    except ValueError:
        return result.output


def test_cli_project_json(cli):
    res = CliRunner().invoke(cli, ["project", "--model", "llama-3.1-8b", "--gpu", "h100-sxm", "--workload", "chat",
                                   "--format", "json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    for k in ("model", "gpu", "dtype", "tp", "input_len", "output_len", "batch", "batch_limit", "tpot_ms", "ttft_ms",
              "prefill_tokens_per_s_per_gpu", "decode_tokens_per_s_per_gpu", "output_tokens_per_s_per_gpu",
              "total_tokens_per_s_per_gpu", "tokens_per_day_per_gpu", "joules_per_token", "source", "efficiency"):
        assert k in out
    assert set(out["efficiency"]) >= {"compute", "memory", "from"}
    assert out["chunked_prefill"] is True


def test_cli_project_without_chunked_prefill(cli):
    base = ["project", "-m", "llama-3.1-70b", "-g", "h200", "--dtype", "fp8", "--tp", "1", "--input-len", "20000",
            "--output-len", "2000", "--offline", "--max-batched-tokens", "22048", "-f", "json"]
    on = json.loads(CliRunner().invoke(cli, base).stdout)
    res = CliRunner().invoke(cli, base + ["--no-chunked-prefill"])
    assert res.exit_code == 0, res.output
    off = json.loads(res.stdout)
    assert off["chunked_prefill"] is False and off["output_tokens_per_s_per_gpu"] < on["output_tokens_per_s_per_gpu"]


@pytest.mark.parametrize("args", [
    ["project", "--model", "nope", "--gpu", "h100-sxm", "--workload", "chat"],
    ["project", "--model", "llama-3.1-8b", "--gpu", "nope", "--workload", "chat"],
    ["project", "--model", "llama-3.1-8b", "--gpu", "h100-sxm", "--workload", "nope"],
    ["capacity", "--fleet", "nope"],
    ["capacity", "--fleet", "h100-node", "--demand", "nope"],
    ["capacity", "--fleet", "h100-node", "--utilization", "1.5"],
    ["project", "-m", "llama-3.1-8b", "-g", "h200", "--input-len", "9000", "--output-len", "100",
     "--no-chunked-prefill"],
    ["project", "-m", "deepseek-v3", "-g", "h800", "--deployment", "deepseek-v3-day6", "--no-chunked-prefill"],
])
def test_cli_bad_input_exits_2(cli, args):
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 2, res.output
    lines = [ln for ln in _err(res).splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ")
    if "nope" in args:
        assert "known: " in lines[0]


def test_cli_capacity_formats(cli, tmp_path):
    for fmt in ("table", "json", "csv", "md"):
        res = CliRunner().invoke(cli, ["capacity", "--fleet", "h100-node", "--format", fmt])
        assert res.exit_code == 0, res.output
    res = CliRunner().invoke(cli, ["capacity", "--fleet", "h100-node", "--format", "json", "--sweep"])
    out = json.loads(res.stdout)
    assert out["summary"]["coverage_vs_china_nda"] > 0 and out["sweep"]
    res = CliRunner().invoke(cli, ["capacity", "--fleet", str(write_fleet(tmp_path,
                             gpus=[{"gpu": "h100-sxm", "count": -3, "source": "t"}]))])
    assert res.exit_code == 2 and "gpus.0.count" in _err(res)


def test_a_reports_fleet_file_points_inside_the_repository(tmp_path, monkeypatch):
    """A committed report names its fleet file as `configs/...` (not this machine's absolute checkout path); a fleet
    file under the working folder relative to it."""
    from tokenfleet.capacity.fleet import capacity_table, fleet_of

    _, s = capacity_table("china-2026-mix")
    assert s["fleet_file"] == "configs/fleets/china-2026-mix.yaml"
    _, path = fleet_of("china-2026-mix")
    (tmp_path / "mine.yaml").write_bytes(open(path, "rb").read())
    monkeypatch.chdir(tmp_path)
    _, s = capacity_table(str(tmp_path / "mine.yaml"))
    assert s["fleet_file"] == "mine.yaml"
