"""Serving MoE as fleets do (issue 21): deployment files, data-parallel attention memory, expert-parallel weight bytes,
all-to-all bytes and time, two-micro-batch overlap, prefill/decode split, MTP, MLA's absorbed decode FLOPs."""

from __future__ import annotations

import json

import pytest
from conftest import invoke_cli
from tokenfleet.capacity.config import Workload
from tokenfleet.capacity.deployment import IMBALANCE_DEFAULT, load_deployment
from tokenfleet.capacity.expert import DEEPEP_LOW_LATENCY_GBPS, PoolStep, deepep_gbps, emitted_per_step
from tokenfleet.capacity.pools import project_deployment
from tokenfleet.capacity.project import b_mem
from tokenfleet.config import ConfigError, config_dir, known_names
from tokenfleet.hardware import load_hardware
from tokenfleet.model.spec import load_model_config

DS = load_model_config("deepseek-v3")
H800 = load_hardware("h800")


def wl(i=4096, o=512, h=0.0, tpot=1e9, ttft=1e9, count="total"):
    return Workload(id="t", description="t", input_len=i, output_len=o, prefix_cache_hit=h, tpot_ms=tpot,
                    ttft_ms=ttft, count=count)


def step(**kw):
    base = dict(m=DS, hw=H800, dtype="fp8", kv_dtype="bf16", ep=144, kind="decode")
    return PoolStep(**{**base, **kw})


# ---- counts (harness/model/spec.py) ----------------------------------------------------------------------------
def test_absorbed_mla_flops():
    """FlashMLA's absorbed decode: 576-wide keys and 512-wide values per head, (576+512)/(192+128) = 3.4x."""
    assert DS.absorbed_attn_dims() == (576, 512)
    assert DS.attention_flops(4096, absorbed=True) / DS.attention_flops(4096) == pytest.approx(1088 / 320)
    assert DS.attention_flops(4096) == DS.attention_flops_per_token(4096)
    q = load_model_config("qwen3-235b-a22b")  # GQA: nothing to absorb
    assert q.attention_flops(1000, absorbed=True) == q.attention_flops(1000)
    # the tensor-parallel path costs decode tokens absorbed too; a mixed step by the decode share of its pairs
    from tokenfleet.capacity.serving import Projector, mixed_args

    core = {n: f for n, f, _ in Projector(DS, H800, "fp8", 8).ops(64, 4096, 64 * 4096, 64, 1.0)}["attn_core"]
    assert core == pytest.approx(64 * DS.attention_flops(4096, absorbed=True))
    *_, share = mixed_args(64, 4096, 512, 1024, 2048)
    assert share == pytest.approx(64 * 4096 / (64 * 4096 + 512 * 1024))


def test_ep_expert_bytes():
    """Each rank holds the non-routed weights and (E+R)/ep experts per MoE layer; it reads the held ones touched."""
    e = DS.expert_params
    assert DS.experts_per_rank(144, 32) == 2.0  # Day 6: "each GPU manages 2 routed experts"
    assert DS.experts_per_rank(32, 32) == 9.0  # and 9 in prefill
    held = DS.ep_weight_bytes_per_gpu(144, 32, 1)
    assert held == DS.nonrouted_params() + DS.num_moe_layers * 2 * e
    assert held < DS.ep_weight_bytes_per_gpu(32, 32, 1) < DS.weight_bytes(1)
    assert DS.ep_expert_bytes_read(0, 144, 32, 1) == 0
    assert DS.ep_expert_bytes_read(1e6, 144, 32, 1) == pytest.approx(DS.num_moe_layers * 2 * e)
    # one rank holding every expert reads what the replica's decode step reads
    touched = DS.num_moe_layers * DS.expected_experts_touched(64) * e
    assert DS.ep_expert_bytes_read(64, 1, 0, 1) == pytest.approx(touched)
    # the step reads the held experts the group's tokens touch, not 1/tp of every expert
    assert step().step(128, 4096)["expert_bytes"] <= 2 * DS.num_moe_layers * 2 * e


def test_dp_attention_holds_the_latent_once():
    """Data-parallel attention: each GPU holds its own sequences' MLA latent once; a TP group holds it per rank."""
    dp, tp8 = step(group=1), step(group=8, ep=144)
    assert dp.kvb == DS.kv_bytes_per_token(2)
    assert tp8.kvb == 8 * DS.kv_bytes_per_token(2)
    res = project_deployment("deepseek-v3", "h800", wl(4383, 1211), "deepseek-v3-day6")
    assert res["pools"]["decode"]["b_mem"] >= 128  # DeepSeek runs 128 sequences per GPU
    # the tensor-parallel replica across 16 GPUs holds the latent on every rank: a few sequences per GPU
    assert b_mem(DS, H800, "fp8", 16, 4383 + 1211) / 16 < 10


def test_alltoall_bytes_and_time():
    """Dispatch (FP8) and combine (BF16) of T·k copies of H per MoE layer, at DeepEP's reported bandwidths."""
    assert DS.alltoall_bytes(128, 1) == 128 * 8 * 7168
    d, c = step(ep=128, imbalance=1.0).alltoall_s(128)
    assert d == pytest.approx(192e-6, rel=0.1) and c == pytest.approx(369e-6, rel=0.1)  # DeepEP README, EP128
    assert deepep_gbps(DEEPEP_LOW_LATENCY_GBPS, 128) == (39, 39)
    assert deepep_gbps(DEEPEP_LOW_LATENCY_GBPS, 1024) == (39, 40)  # held beyond the table
    inside = step(ep=8).alltoall_s(128)
    assert inside[0] < d and inside[1] < c  # NVLink inside one node
    prefill = step(ep=32, kind="prefill").alltoall_s(4096)
    decode_kernels = step(ep=32, kind="decode").alltoall_s(4096)
    assert prefill[0] < decode_kernels[0]  # normal kernels send one copy per remote node
    assert step(ep=1).alltoall_s(128) == (0.0, 0.0)


def test_overlap():
    """Two micro-batches: the all-to-all hides behind compute (per layer: attention | dispatch, MoE | combine), but
    every weight is read twice, which costs more than it hides when there is nothing to hide."""
    on, off = step(overlap=True).step(128, 4096), step(overlap=False).step(128, 4096)
    assert on["step_s"] < off["step_s"]
    assert on["hidden_s"] > 0 and off["hidden_s"] == pytest.approx(0, abs=1e-12)
    assert on["step_s"] >= max(on["compute_s"], on["alltoall_s"]) * IMBALANCE_DEFAULT
    lone_on = step(ep=1, overlap=True, imbalance=1.0).step(1, 512)
    lone_off = step(ep=1, overlap=False, imbalance=1.0).step(1, 512)
    assert lone_on["step_s"] > lone_off["step_s"]  # batch 1, nothing to hide: weights read twice


def test_prefill_decode_split_and_cache_hits():
    """A request costs n/P + O/D GPU-seconds; the prefill share follows; cache hits skip their compute."""
    r = project_deployment("deepseek-v3", "h800", wl(4096, 1024, 0.5), "deepseek-v3-day6")
    pre, dec = r["pools"]["prefill"], r["pools"]["decode"]
    t_pre = pre["new_tokens_per_prompt"] / pre["new_tokens_per_s_per_gpu"]
    t_dec = 1024 / dec["output_tokens_per_s_per_gpu"]
    assert r["prefill_fraction"] == pytest.approx(t_pre / (t_pre + t_dec))
    assert r["total_tokens_per_s_per_gpu"] == pytest.approx((4096 + 1024) / (t_pre + t_dec))
    assert pre["input_tokens_per_s_per_gpu"] == pytest.approx(pre["new_tokens_per_s_per_gpu"] * 2)
    cold = project_deployment("deepseek-v3", "h800", wl(4096, 1024, 0.0), "deepseek-v3-day6")
    assert cold["prefill_fraction"] > r["prefill_fraction"]
    assert cold["total_tokens_per_s_per_gpu"] < r["total_tokens_per_s_per_gpu"]
    assert pre["kv_transfer_ms"] > 0 and pre["ttft_ms"] > pre["kv_transfer_ms"]



def test_cache_hits_loaded_from_an_off_gpu_cache():
    """Day 6's hits come from the on-disk KV cache (3FS): each prompt's cached KV is loaded over the node's storage
    link, shared by its 8 GPUs, prefetched: the step is max(compute step, load), and TTFT waits for its own load."""
    pre = dict(kind="prefill", ep=32, imbalance=1.0)
    seqs, cached = 8.0, 2466.0
    args = (0, 0, 16384, seqs, cached + 1024, cached + 2048, cached)
    hbm = step(**pre).step(*args)
    slow = step(**pre, cache_load_gbps=1.0).step(*args)
    kv = DS.kv_bytes_per_token(2)
    assert hbm["cache_load_s"] == 0.0
    assert slow["cache_load_s"] == pytest.approx(seqs * cached * kv / (1e9 / 8))
    assert slow["step_s"] == pytest.approx(slow["cache_load_s"] + slow["overhead_s"])  # binds
    assert slow["step_s"] > hbm["step_s"]
    fast = step(**pre, cache_load_gbps=42.9).step(*args)
    assert 0 < fast["cache_load_s"] < hbm["step_s"] and fast["step_s"] == hbm["step_s"]  # hidden behind compute
    d = load_deployment("deepseek-v3-day6")
    w = wl(4383, 1211, 0.5625)
    with_disk = project_deployment("deepseek-v3", "h800", w, d)["pools"]["prefill"]
    in_hbm = project_deployment("deepseek-v3", "h800", w, d.model_copy(update={"cache_load_gbps_per_node": None}))
    in_hbm = in_hbm["pools"]["prefill"]
    # counted, and at Day 6's rates it does not bind: ~11% of the step on the 3FS client link
    assert 0 < with_disk["cache_load_ms"] < 0.2 * with_disk["step_ms"] and in_hbm["cache_load_ms"] == 0
    assert with_disk["input_tokens_per_s_per_gpu"] == pytest.approx(in_hbm["input_tokens_per_s_per_gpu"])
    assert with_disk["ttft_ms"] > in_hbm["ttft_ms"]


def test_day6_per_node_rates_are_averages_over_deployed_nodes():
    """The reading the production prefill row's `expected_miss` rests on: Day 6's per-node rates are the day's tokens
    over each phase's node-time (input/73.7k + output/14.8k node-equivalents = the 226.75 nodes deployed on average),
    so they include prefill nodes' idle headroom; the decode rate is pinned by the 20-22 tokens/s per request (its
    average batch per GPU = 1,850/21 = 88, what the TPOT limit gives), the prefill rate by nothing published."""
    from tokenfleet.capacity.validate import load_published

    rows = [r for r in load_published().rows if r.source == "deepseek-day6"]
    fleet, = (r for r in rows if r.metric == "total")
    pre, = (r for r in rows if r.metric == "prefill_input")
    dec, = (r for r in rows if r.metric == "decode_output")
    share = fleet.input_len / (fleet.input_len + fleet.output_len)  # 608B / 776B
    nodes = fleet.published * share / pre.published + fleet.published * (1 - share) / dec.published
    assert nodes == pytest.approx(fleet.published_gpus / 8, rel=0.005)
    assert pre.expected_miss and "226.75" in pre.expected_miss
    r = project_deployment("deepseek-v3", "h800", wl(4383, 1211, 0.5625, tpot=dec.tpot_ms), "deepseek-v3-day6")
    assert r["pools"]["decode"]["batch_per_gpu"] == pytest.approx(dec.published / 8 / (1000 / dec.tpot_ms), rel=0.05)


def test_profile_deployment_is_balanced_as_its_source_says():
    """profile-data simulates "an absolutely balanced MoE routing": no expert imbalance on that deployment."""
    d = load_deployment("deepseek-v3-profile")
    assert d.imbalance == 1.0 and "absolutely balanced" in d.sources["imbalance"]
    assert load_deployment("deepseek-v3-day6").imbalance == IMBALANCE_DEFAULT


def test_mtp():
    """MTP: 1 + a tokens kept per step with one draft; the step verifies two tokens per sequence."""
    assert emitted_per_step(1, 0.85) == pytest.approx(1.85)
    assert emitted_per_step(2, 0.5) == pytest.approx(1.75)
    d = load_deployment("deepseek-v3-day6")
    no_mtp = d.model_copy(update={"mtp": None})
    w = wl(4096, 1024)
    a = project_deployment("deepseek-v3", "h800", w, d)["pools"]["decode"]
    b = project_deployment("deepseek-v3", "h800", w, no_mtp)["pools"]["decode"]
    assert a["batch_per_gpu"] == b["batch_per_gpu"] == 128  # the cap, offline
    assert b["output_tokens_per_s_per_gpu"] < a["output_tokens_per_s_per_gpu"] < 1.85 * b["output_tokens_per_s_per_gpu"]
    assert a["tpot_ms"] == pytest.approx(a["step_ms"] / 1.85)


def test_decode_latency_limit_binds():
    """DeepSeek's 20-22 tokens/s per request, as a TPOT limit, sets the batch per GPU below the cap."""
    r = project_deployment("deepseek-v3", "h800", wl(4383, 1211, 0.5625, tpot=1000 / 21), "deepseek-v3-day6")
    dec = r["pools"]["decode"]
    assert dec["batch_limit"] == "slo" and dec["batch_per_gpu"] < 128 and dec["tpot_ms"] <= 1000 / 21


def test_every_deployment_validates_and_cites():
    for name in known_names("deployments"):
        d = load_deployment(name)
        assert d.id == name and d.pools()
        for f in d.model_fields_set - {"id", "description", "assumptions", "sources", "model", "gpu"}:
            assert f in d.sources or f in d.assumptions, (name, f)


@pytest.mark.parametrize("body, field", [
    ("decode: {gpus: 0}\nprefill: {gpus: 32}", "decode.gpus"),
    ("decode: {gpus: 8, batch: 4}\nprefill: {gpus: 8}", "decode.batch"),
    ("decode: {gpus: 8}\nprefill: {gpus: 8}\nredundant_experts: 32\nassumptions: {decode: t, prefill: t}",
     "redundant_experts is set without a source"),
    ("mixed: {gpus: 8, attention_tp: 3}", "attention_tp 3 does not divide"),
    ("decode: {gpus: 8}", "give `mixed`, or both"),
])
def test_bad_deployment_file_exits_2_with_one_line(tmp_path, body, field):
    p = tmp_path / "bad.yaml"
    p.write_text(f"id: bad\ndescription: t\n{body}\n")
    with pytest.raises(ConfigError, match=field.split()[0]):
        load_deployment(str(p))
    r = invoke_cli("project", "-m", "deepseek-v3", "-g", "h800", "--deployment", str(p))
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1 and str(p) in lines[0] and field in lines[0], r.stderr


def test_cli_project_deployment_shows_pools():
    r = invoke_cli("project", "-m", "deepseek-v3", "-g", "h800", "--deployment", "deepseek-v3-day6",
                   "--input-len", "4383", "--output-len", "1211", "--prefix-cache-hit", "0.5625", "--tpot-ms", "47.6")
    assert r.exit_code == 0, r.stderr
    for s in ("prefill", "decode", "dispatch", "hidden", "all-to-all: DeepEP", "source decode:", "batch per gpu"):
        assert s in r.stdout, s
    j = invoke_cli("project", "-m", "deepseek-v3", "-g", "h800", "--deployment", "deepseek-v3-day6", "--offline",
                   "--batch", "64", "-f", "json")
    res = json.loads(j.stdout)
    assert res["pools"]["decode"]["batch_per_gpu"] == 64 and res["pools"]["decode"]["batch_limit"] == "cap"
    assert res["tpot_ok"] and res["ttft_ok"]
    bad = invoke_cli("project", "-m", "deepseek-v3", "-g", "h800", "--deployment", "deepseek-v3-day6", "--tp", "8")
    assert bad.exit_code == 2 and "--tp" in bad.stderr
    hit = invoke_cli("project", "-m", "deepseek-v3", "-g", "h800", "--prefix-cache-hit", "1")
    assert hit.exit_code == 2 and "--prefix-cache-hit" in hit.stderr


def test_offline_lifts_the_limits():
    strict = invoke_cli("project", "-m", "llama-3.1-8b", "-g", "h200", "--tp", "1", "--tpot-ms", "5", "-f", "json")
    free = invoke_cli("project", "-m", "llama-3.1-8b", "-g", "h200", "--tp", "1", "--tpot-ms", "5", "--offline",
                      "-f", "json")
    a, b = json.loads(strict.stdout), json.loads(free.stdout)
    assert b["batch"] > a["batch"] and b["tpot_ok"]


def test_fleet_names_deployment_and_workload_by_path(tmp_path):
    from tokenfleet.capacity.fleet import capacity_table

    (tmp_path / "w.yaml").write_text("id: w\ndescription: t\ninput_len: 2000\noutput_len: 500\nttft_ms: 5000\n"
                                     "tpot_ms: 100\ncount: total\n")
    dep = (tmp_path / "d.yaml")
    text = (config_dir("deployments") / "deepseek-v3-day6.yaml").read_text()
    dep.write_text(text.replace("id: deepseek-v3-day6", "id: d"))
    fleet = tmp_path / "f.yaml"
    fleet.write_text("id: f\ndescription: t\ngpus: [{gpu: h800, count: 144, source: t}]\n"
                     "models: [{model: deepseek-v3, share: 1.0}]\nworkloads: [{workload: w.yaml, share: 1.0}]\n"
                     "deployments: [{model: deepseek-v3, deployment: d.yaml, source: t}]\n")
    rows, summary = capacity_table(str(fleet), "china-nda")
    served = project_deployment("deepseek-v3", "h800", str(tmp_path / "w.yaml"), str(dep))
    assert rows[0]["alone_tokens_per_s_per_gpu"] == pytest.approx(served["tokens_per_s_per_gpu"])
    assert summary["deployments"] == {"deepseek-v3": str(dep)}
    fleet.write_text(fleet.read_text().replace("d.yaml", "missing.yaml"))
    with pytest.raises(ConfigError, match="deployments.0.deployment"):
        capacity_table(str(fleet))


def test_count_ranges_carry_into_the_headline():
    """Published low/high GPU counts give low/central/high capacity; 'GPUs needed' does not move with them."""
    from tokenfleet.capacity.config import Fleet
    from tokenfleet.capacity.fleet import capacity_table
    from tokenfleet.capacity.headline import headline, headline_lines

    base = dict(id="t", description="t", models=[{"model": "llama-3.1-8b", "share": 1.0}],
                workloads=[{"workload": "chat", "share": 1.0}])
    gpus = [{"gpu": "h100-sxm", "count": 100, "source": "t", "count_range": {"low": 50, "high": 200, "source": "t"}},
            {"gpu": "h20", "count": 10, "assumption": True, "reason": "t"}]
    rows, s = capacity_table(Fleet.model_validate({**base, "gpus": gpus}), "china-nda")
    assert s["capacity_low_tokens_per_day"] < s["capacity_tokens_per_day"] < s["capacity_high_tokens_per_day"]
    assert (s["gpus_low"], s["gpus_high"]) == (60, 210)
    h = headline(rows, s)
    text = "\n".join(headline_lines(h))
    assert "counts low / central / high: 60 / 110 / 210 GPUs" in text and "placeholder counts" in text
    doubled = [{**gpus[0], "count": 200, "count_range": {"low": 50, "high": 200, "source": "t"}}, gpus[1]]
    rows2, s2 = capacity_table(Fleet.model_validate({**base, "gpus": doubled}), "china-nda")
    assert headline(rows2, s2)["demands"][0]["gpus_needed_alone"] == h["demands"][0]["gpus_needed_alone"]
    with pytest.raises(ValueError, match="outside count_range"):
        Fleet.model_validate({**base, "gpus": [{**gpus[0], "count": 300}]})


def test_china_mix_serves_moe_with_its_deployments():
    """The China mix names DeepSeek's and the Qwen MoE deployments; DeepSeek rows come from the pools."""
    from tokenfleet.capacity.fleet import fleet_of, gpu_mix

    f, _ = fleet_of("china-2026-mix")
    assert {d.model for d in f.deployments} == {"deepseek-v3", "qwen3-235b-a22b"}
    mix = gpu_mix("h800", f, None, [])
    ds = [r for _, r in mix["classes"] if r["model"] == "deepseek-v3"]
    assert all(r["deployment"] == "deepseek-v3-day6" and r["pools"]["decode"]["gpus"] == 144 for r in ds)
    assert all(r["prefill_fraction"] is not None for r in ds)


def test_cli_capacity_deployment_and_offline():
    base = ("capacity", "--fleet", "china-2026-mix", "-f", "json")
    r = invoke_cli(*base, "--deployment", "deepseek-v3-profile", "--offline")
    assert r.exit_code == 0, r.stderr
    s = json.loads(r.stdout)["summary"]
    assert s["deployments"]["deepseek-v3"] == "deepseek-v3-profile" and s["offline"]
    assert s["deployments"]["qwen3-235b-a22b"] == "qwen3-moe-dp-ep8"  # the file names its model: only that one
    rows = json.loads(r.stdout)["rows"]
    assert not any(r.get("ttft_missed") or r.get("tpot_missed") for r in rows)  # no limits offline
    bad = invoke_cli(*base, "--deployment", "nope")
    assert bad.exit_code == 2 and len(bad.stderr.strip().splitlines()) == 1 and "deployment" in bad.stderr
