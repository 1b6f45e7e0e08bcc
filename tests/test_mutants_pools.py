"""Oracles for tokenfleet.capacity.pools (`make mutate`): each pool's batch, rate, TTFT and limits, and the prefill/
decode split, on a fake pool step whose step time is 1/8 s per token (+ 1/2 s when it carries prefill tokens), so
every value is worked out by hand (written as the arithmetic, exact in binary where a `<=` limit is tested at
equality); the deployment wiring and the combined row with the pools faked."""

from __future__ import annotations

import math
from types import SimpleNamespace as NS

import pytest
from tokenfleet.capacity import pools as P
from tokenfleet.capacity.calibrate import Efficiency
from tokenfleet.capacity.config import Workload
from tokenfleet.capacity.deployment import DeploymentSpec, Pool
from tokenfleet.config import ConfigError
from tokenfleet.hardware import load_hardware
from tokenfleet.model.spec import load_model_config


def approx(x):
    """Tight: a mutant that moves a figure by a part in 1e9 (1e9 -> 1000000001.0) must fail."""
    return pytest.approx(x, rel=1e-12, abs=1e-18)


GiB = 2**30
KEYS = ("attention_s", "dense_s", "moe_s", "head_s", "dispatch_s", "combine_s", "allreduce_s", "hidden_s",
        "imbalance_s", "expert_read_s", "kv_read_s", "cache_load_s")
MS = {k.replace("_s", "_ms"): (i + 1) for i, k in enumerate(KEYS)}  # each part (i+1) ms


class PS:
    """A pool step: memory, weights and KV bytes given; 1/8 s per token (+ 1/2 s with prefill) per step."""

    def __init__(self, mem=20 * GiB, weights=GiB, kvb=2**20, mtp=0, ep=4, cache=0.0, extra=None):
        self.hw, self.wbytes, self.kvb, self.mtp_drafts, self.ep = NS(memory_bytes=mem), weights, kvb, mtp, ep
        self.m = NS(kv_bytes_per_token=lambda db: 9765625 * db)  # 320 tokens' bf16 KV = 6.25e9 B: 1/8 s at 50 GB/s
        self.kv_dtype, self.a2a_source, self.cache, self.extra, self.calls = "bf16", "a2a", cache, extra or {}, []

    def weight_bytes_per_gpu(self):
        return self.wbytes

    def cache_load_s(self, cached):
        return cached * self.cache

    def step(self, dec_seqs, dec_ctx, pre_tokens=0.0, pre_seqs=0.0, pre_ctx=0.0, pre_kv=0.0, pre_cached=0.0):
        self.calls.append((dec_seqs, dec_ctx, pre_tokens, pre_seqs, pre_ctx, pre_kv, pre_cached))
        s = {k: (i + 1) / 1000 for i, k in enumerate(KEYS)}
        s["step_s"] = 0.125 * (dec_seqs + pre_tokens) + (0.5 if pre_tokens > 0 else 0.0)
        return {**s, **self.extra}


def wl(i=320, o=128, h=0.0, tpot=1e9, ttft=1e9, count="total"):
    return Workload(id="t", description="t", input_len=i, output_len=o, prefix_cache_hit=h, tpot_ms=tpot,
                    ttft_ms=ttft, count=count)


def test_default_prefill_budget():
    assert P.DEFAULT_PREFILL_TOKENS == 16384


def test_free_bytes_and_breakdown():
    ps = PS(mem=40 * GiB, weights=3 * GiB)
    assert P._free_bytes(ps) == 40 * GiB * 0.9 - 3 * GiB - 2 * GiB
    s = ps.step(1, 1)
    assert P._breakdown(s) == {**MS, "step_ms": 125.0}


# ---- decode pool ------------------------------------------------------------------------------------------------
def test_decode_pool_at_the_tpot_limit():
    ps = PS()  # free 20*0.9 - 1 - 2 = 15 GiB; a sequence's KV 448 MiB: 34 fit
    r = P.decode_pool(ps, wl(tpot=2500), 30, 0.0)  # 125 ms per sequence: 20 at 2500 ms (equality counts)
    assert r == {"fits": True, "gpus": 4, "batch_per_gpu": 20, "batch_limit": "slo", "b_mem": 34, "b_slo": 20,
                 "tokens_per_step": 1.0, "tpot_ms": 2500.0, "tpot_ok": True, "output_tokens_per_s_per_gpu": 8.0,
                 "kv_bytes_per_gpu": 20 * 448 * 2**20, "expert_bytes": 0.0, "alltoall_source": "a2a",
                 "experts_source": "roofline", **MS, "step_ms": 2500.0}
    assert ps.calls[-1] == (20, 384.0, 0.0, 0.0, 0.0, 0.0, 0.0)  # at mean context 320 + 128/2
    assert P.decode_pool(PS(), wl(tpot=2499.9), 30, 0.0)["b_slo"] == 19


def test_decode_pool_mtp_and_limits():
    ps = PS(mtp=1, extra={"expert_bytes": 7.0, "experts_source": "measured"})
    # 1 draft at acceptance 1/2: 1.5 tokens a step; TPOT 125 b / 1.5 ms: 30 at 2500 ms
    r = P.decode_pool(ps, wl(tpot=2500), None, 0.5)
    assert (r["batch_per_gpu"], r["batch_limit"], r["tokens_per_step"], r["tpot_ms"]) == (30, "slo", 1.5, 2500.0)
    assert r["output_tokens_per_s_per_gpu"] == 30 * 1.5 / 3.75
    assert (r["expert_bytes"], r["experts_source"]) == (7.0, "measured")
    r = P.decode_pool(PS(), wl(), None, 0.0)
    assert (r["batch_per_gpu"], r["batch_limit"], r["b_slo"]) == (34, "memory", P.B_SLO_MAX)
    r = P.decode_pool(PS(), wl(), 12, 0.0)
    assert (r["batch_per_gpu"], r["batch_limit"]) == (12, "cap")
    assert P.decode_pool(PS(), wl(), 34, 0.0)["batch_limit"] == "memory"  # ties: memory, slo, cap
    assert P.decode_pool(PS(), wl(tpot=2500), 20, 0.0)["batch_limit"] == "slo"
    r = P.decode_pool(PS(), wl(tpot=100), 30, 0.0)  # 125 ms even at 1: batch 1, TPOT missed
    assert (r["batch_per_gpu"], r["batch_limit"], r["b_slo"], r["tpot_ok"], r["tpot_ms"]) == (1, "slo", 0, False, 125.0)
    assert P.decode_pool(PS(mtp=1), wl(), None, 0.0)["tokens_per_step"] == 1.0  # nothing accepted


def test_decode_pool_out_of_memory():
    ps = PS(mem=4 * GiB)  # 3.6 - 1 - 2 = 0.6 GiB: one 448 MiB sequence
    assert P.decode_pool(ps, wl(), None, 0.0)["batch_per_gpu"] == 1
    ps = PS(mem=4 * GiB, kvb=2**21)
    assert P.decode_pool(ps, wl(), None, 0.0) == {"fits": False, "batch_per_gpu": 0, "batch_limit": "memory",
                                                  "b_mem": 0}
    assert P.decode_pool(PS(mem=2 * GiB), wl(), None, 0.0)["b_mem"] == math.floor((1.8 - 3) * GiB / (448 * 2**20))


# ---- prefill pool -----------------------------------------------------------------------------------------------
def test_prefill_pool_at_its_budget():
    ps = PS(kvb=2**19)
    r = P.prefill_pool(ps, wl(), 1000)  # one step of 1000 tokens: 125.5 s; + the KV sent, 1/8 s
    assert r == {"fits": True, "gpus": 4, "tokens_per_gpu": 1000, "batch_limit": "budget",
                 "new_tokens_per_prompt": 320.0, "new_tokens_per_s_per_gpu": 1000 / 125.5,
                 "input_tokens_per_s_per_gpu": 1000 / 125.5, "ttft_ms": 125625.0, "kv_transfer_ms": 125.0,
                 "ttft_ok": True, "expert_bytes": 0.0, "alltoall_source": "a2a", "experts_source": "roofline",
                 **MS, "step_ms": 125500.0}
    assert ps.calls[-1] == (0, 0, 1000, 1000 / 320, 160.0, 320.0, 0.0)
    r = P.prefill_pool(PS(kvb=2**19), wl(), None)  # the default budget
    assert (r["tokens_per_gpu"], r["ttft_ms"]) == (16384, (0.125 * 16384 + 0.5 + 0.125) * 1e3)
    r = P.prefill_pool(PS(kvb=2**19), wl(ttft=125625), 1000)  # met exactly at the budget: kept
    assert (r["tokens_per_gpu"], r["batch_limit"], r["ttft_ok"]) == (1000, "budget", True)
    assert P.prefill_pool(PS(kvb=2**19), wl(ttft=40625), 320)["ttft_ok"] is True  # 40 + 0.5 + 0.125 s
    assert P.prefill_pool(PS(kvb=2**19), wl(ttft=40624.9), 320)["ttft_ok"] is False


def test_prefill_pool_chunks_and_cache_hits():
    ps = PS(kvb=2**19, cache=1e-3, extra={"expert_bytes": 3.0, "experts_source": "m"})
    r = P.prefill_pool(ps, wl(), 100)  # 4 chunks of 100 (13 s each) for 320 tokens
    assert r["ttft_ms"] == approx((4 * 13 + 0.125) * 1e3)
    assert ps.calls[-1] == (0, 0, 100, 100 / 320, 50.0, 100.0, 0.0)
    assert (r["expert_bytes"], r["experts_source"]) == (3.0, "m")
    r = P.prefill_pool(ps, wl(h=0.5), 1000)  # 160 new after 160 cached, whose KV loads at 1 ms a token
    assert ps.calls[-1] == (0, 0, 1000, 1000 / 160, 160 + 80.0, 320.0, 160.0)
    assert r["new_tokens_per_prompt"] == 160.0
    assert r["ttft_ms"] == approx((0.16 + 125.5 + 0.125) * 1e3)
    assert r["input_tokens_per_s_per_gpu"] == approx(1000 / 125.5 * 320 / 160)


def test_prefill_pool_shrinks_its_budget_to_meet_ttft():
    # TTFT(N) = 0.125 N + 0.5 + 0.125 s for N >= 320: 50 s at N = 395
    r = P.prefill_pool(PS(kvb=2**19), wl(ttft=50000), 1000)
    assert (r["tokens_per_gpu"], r["batch_limit"], r["ttft_ms"], r["ttft_ok"]) == (395, "ttft", 50000.0, True)
    assert P.prefill_pool(PS(kvb=2**19), wl(ttft=49999.9), 1000)["tokens_per_gpu"] == 394
    r = P.prefill_pool(PS(kvb=2**19), wl(ttft=40625), 1000)  # one prompt a step just meets it
    assert (r["tokens_per_gpu"], r["batch_limit"]) == (320, "ttft")
    r = P.prefill_pool(PS(kvb=2**19), wl(ttft=40624.9), 1000)  # missed even at one prompt: the budget, flagged
    assert (r["tokens_per_gpu"], r["batch_limit"], r["ttft_ok"]) == (1000, "budget", False)
    # a budget under one prompt is kept (a whole prompt would answer sooner, but the budget is the deployment's)
    r = P.prefill_pool(PS(kvb=2**19), wl(ttft=45000), 100)
    assert (r["tokens_per_gpu"], r["batch_limit"], r["ttft_ok"]) == (100, "budget", False)


def test_prefill_pool_memory_for_the_budget():
    # free exactly 16384 tokens' KV at 2^19 B: 40 GiB * 0.9 - weights - 2 GiB = 8 GiB
    w = 40 * GiB * 0.9 - 2 * GiB - 16384 * 2**19
    assert P.prefill_pool(PS(mem=40 * GiB, weights=w, kvb=2**19), wl(), None)["fits"] is True
    assert P.prefill_pool(PS(mem=40 * GiB, weights=w + 1, kvb=2**19), wl(), None) == \
        {"fits": False, "batch_limit": "memory"}
    assert P.prefill_pool(PS(mem=40 * GiB, weights=w + 1, kvb=2**19), wl(), 16383)["fits"] is True


# ---- mixed pool -------------------------------------------------------------------------------------------------
def test_mixed_pool():
    ps = PS()
    # 320 new per 128 outputs: 2.5 prefill tokens per sequence a step; T(b) = 0.125 * 3.5 b + 0.5 s: 2.25 s at 4
    r = P.mixed_pool(ps, wl(tpot=2250), None, 100, 0.0)
    chunk = 0.125 * 100 + 0.5  # TTFT: 4 chunks of 100
    assert r == {"fits": True, "gpus": 4, "batch_per_gpu": 4, "batch_limit": "slo", "b_mem": 34, "b_slo": 4,
                 "tokens_per_step": 1.0, "tpot_ms": 2250.0, "tpot_ok": True, "ttft_ms": 4 * chunk * 1e3,
                 "ttft_ok": True, "output_tokens_per_s_per_gpu": 4 / 2.25, "expert_bytes": 0.0,
                 "alltoall_source": "a2a", "experts_source": "roofline", **MS, "step_ms": 2250.0}
    assert ps.calls[-2] == (4, 384.0, 10.0, 4 / 128, 160.0, 320.0, 0.0)
    assert ps.calls[-1] == (0, 0, 100, 100 / 320, 50.0, 100.0, 0.0)
    assert P.mixed_pool(PS(), wl(tpot=2249.9), None, 100, 0.0)["b_slo"] == 3
    assert P.mixed_pool(PS(), wl(ttft=52000), None, 100, 0.0)["ttft_ok"] is True
    assert P.mixed_pool(PS(), wl(ttft=51999.9), None, 100, 0.0)["ttft_ok"] is False


def test_mixed_pool_limits_mtp_and_defaults():
    r = P.mixed_pool(PS(), wl(), None, 100, 0.0)  # budget floor(100 / 3.5) = 28
    assert (r["batch_per_gpu"], r["batch_limit"]) == (28, "budget")
    r = P.mixed_pool(PS(), wl(), 28, 100, 0.0)
    assert r["batch_limit"] == "cap"  # ties: memory, slo, cap, budget
    r = P.mixed_pool(PS(), wl(), None, None, 0.0)  # default budget 16384: memory binds
    assert (r["batch_per_gpu"], r["batch_limit"]) == (34, "memory")
    assert r["ttft_ms"] == (0.125 * 320 + 0.5) * 1e3  # one chunk holds the prompt
    assert P.mixed_pool(PS(), wl(), 34, None, 0.0)["batch_limit"] == "memory"
    r = P.mixed_pool(PS(), wl(), None, 2, 0.0)  # floor(2 / 3.5) = 0: held at 1
    assert (r["batch_per_gpu"], r["batch_limit"]) == (1, "budget")
    ps = PS(mtp=1, cache=1e-3, extra={"expert_bytes": 5.0, "experts_source": "m"})
    # 160 new after 160 cached, MTP 1 at 1/2: 1.5 tokens a step, 160/128 * 1.5 = 1.875 prefill tokens per sequence;
    # budget floor(100 / (1 + 1 + 1.875)) = 25
    r = P.mixed_pool(ps, wl(h=0.5), None, 100, 0.5)
    assert (r["batch_per_gpu"], r["batch_limit"], r["tokens_per_step"]) == (25, "budget", 1.5)
    assert ps.calls[-2] == (25, 384.0, 25 * 1.875, 25 * 1.5 / 128, 160 + 80.0, 320.0, 160.0)
    assert ps.calls[-1] == (0, 0, 100, 100 / 160, 160 + 50.0, 160 + 100.0, 160.0)
    step = 0.125 * (25 + 25 * 1.875) + 0.5
    assert r["tpot_ms"] == approx(step / 1.5 * 1e3)
    assert r["output_tokens_per_s_per_gpu"] == approx(25 * 1.5 / step)
    assert r["ttft_ms"] == approx((0.16 + 2 * 13) * 1e3)
    assert (r["expert_bytes"], r["experts_source"]) == (5.0, "m")
    r = P.mixed_pool(PS(), wl(tpot=100), None, 100, 0.0)
    assert (r["batch_per_gpu"], r["b_slo"], r["tpot_ok"]) == (1, 0, False)
    assert P.mixed_pool(PS(mem=4 * GiB, kvb=2**21), wl(), None, 100, 0.0) == \
        {"fits": False, "batch_per_gpu": 0, "batch_limit": "memory", "b_mem": 0}


# ---- wiring: the deployment's pools ----------------------------------------------------------------------------------
DS = load_model_config("deepseek-v3")
DENSE = load_model_config("tiny")
H800 = load_hardware("h800")
A100 = load_hardware("a100-sxm")


def dep(**kw):
    base = dict(id="d", description="d", prefill=Pool(gpus=32, tokens_per_gpu=1000),
                decode=Pool(gpus=16, batch_per_gpu=64))
    base.update(kw)
    base = {k: v for k, v in base.items() if v is not None}
    return DeploymentSpec(**base, assumptions={k: "t" for k in base if k not in ("id", "description")})


def test_pool_step_takes_the_deployment(monkeypatch):
    seen = []
    monkeypatch.setattr(P, "measured_alltoall", lambda runs, hw, ep: seen.append(("a2a", runs, hw, ep)) or ("c", ep))
    monkeypatch.setattr(P, "measured_experts",
                        lambda runs, hw, m, ep, dt: seen.append(("exp", runs, hw, m, ep, dt)) or f"e{ep}")
    d = dep(redundant_experts=32, imbalance=1.5, dispatch_bytes=0.5, combine_bytes=3.0, cache_load_gbps_per_node=7.0,
            mtp={"draft_tokens": 2, "acceptance": 0.5},
            prefill=Pool(gpus=32, overlap=False), decode=Pool(gpus=16, attention_tp=2))
    eff = Efficiency(compute=0.4)
    ps = P._pool_step(DS, H800, "fp8", d, "decode", eff, ("r",))
    assert (ps.m, ps.hw, ps.dtype, ps.kv_dtype, ps.ep, ps.group, ps.redundant, ps.imbalance, ps.overlap, ps.kind,
            ps.mtp_drafts, ps.dispatch_bytes, ps.combine_bytes, ps.eff, ps.alltoall, ps.cache_load_gbps,
            ps.experts) == (DS, H800, "fp8", "bf16", 16, 2, 32, 1.5, True, "decode", 2, 0.5, 3.0, eff, ("c", 16),
                            7.0, "e16")
    assert seen == [("a2a", ["r"], "h800", 16), ("exp", ("r",), "h800", "deepseek-v3", 16, "fp8")]
    ps = P._pool_step(DS, H800, "fp8", d, "prefill", eff, ())
    assert (ps.ep, ps.group, ps.overlap, ps.kind, ps.mtp_drafts, ps.imbalance) == (32, 1, False, "prefill", 0, 1.5)
    d1 = dep(imbalance=1.5, mtp={"draft_tokens": 1, "acceptance": 0.5}, mixed=Pool(gpus=1), prefill=None,
             decode=None)
    seen.clear()
    ps = P._pool_step(DS, H800, "fp8", d1, "mixed", eff, ())
    assert (ps.ep, ps.imbalance, ps.mtp_drafts, ps.kind, ps.experts, ps.alltoall) == (1, 1.0, 1, "mixed", None,
                                                                                       ("c", 1))
    assert seen == [("a2a", [], "h800", 1)]
    seen.clear()
    d1 = dep(imbalance=1.5, mixed=Pool(gpus=2), prefill=None, decode=None)
    ps = P._pool_step(DS, H800, "fp8", d1, "mixed", eff, ())
    assert (ps.ep, ps.imbalance, ps.experts, ps.alltoall) == (2, 1.5, "e2", ("c", 2))
    seen.clear()
    d2 = dep(imbalance=1.5, mixed=Pool(gpus=4), prefill=None, decode=None)
    ps = P._pool_step(DENSE, H800, "bf16", d2, "mixed", eff, ())
    assert (ps.imbalance, ps.mtp_drafts, ps.alltoall, ps.experts, seen) == (1.0, 0, None, None, [])
    assert P._pool_step(DS, H800, "fp8", d2, "mixed", eff).ep == 4  # runs default to none


def test_resolve_deployment(tmp_path):
    d = P.resolve_deployment("deepseek-v3-day6", DS, batch=7, budget=99, kv_dtype="fp8")
    assert (d.id, d.decode.batch_per_gpu, d.prefill.tokens_per_gpu, d.kv_dtype) == ("deepseek-v3-day6", 7, 99, "fp8")
    spec = dep()
    assert P.resolve_deployment(spec, DS) is spec
    bad = dep(decode=Pool(gpus=16, attention_tp=16))
    with pytest.raises(ConfigError) as e:
        P.resolve_deployment(bad, DENSE)  # 4 heads do not split over 16
    assert (e.value.file, e.value.field) == ("d", "decode.attention_tp")
    f = tmp_path / "two.yaml"
    f.write_text("id: two\ndescription: t\nmixed: {gpus: 2, attention_tp: 2}\nassumptions: {mixed: t}\n")
    with pytest.raises(ConfigError) as e:  # a file: the file is named
        P.resolve_deployment(str(f), DENSE.model_copy(update={"num_heads": 3}))
    assert (e.value.file, e.value.field) == (str(f), "mixed.attention_tp")


# ---- the combined row, with the pools faked --------------------------------------------------------------------------
class Fake:
    def __init__(self, monkeypatch, pre=None, dec=None, mixed=None):
        self.calls = []
        base_pre = {"fits": True, "new_tokens_per_prompt": 320.0, "new_tokens_per_s_per_gpu": 1000.0, "ttft_ms": 300.0,
                    "ttft_ok": True}
        base_dec = {"fits": True, "output_tokens_per_s_per_gpu": 64.0, "batch_per_gpu": 16, "tpot_ms": 20.0,
                    "tpot_ok": True}
        base_mix = {"fits": True, "output_tokens_per_s_per_gpu": 10.0, "batch_per_gpu": 8, "tpot_ms": 30.0,
                    "tpot_ok": True, "ttft_ms": 400.0, "ttft_ok": True}
        pre, dec, mixed = {**base_pre, **(pre or {})}, {**base_dec, **(dec or {})}, {**base_mix, **(mixed or {})}
        self.pre, self.dec, self.mixed = pre, dec, mixed
        monkeypatch.setattr(P, "_pool_step", lambda m, hw, dt, d, kind, eff, runs: self.calls.append(
            ("step", m.id, hw.id, dt, d.id, kind, eff, runs)) or NS(notes=[f"note {kind}", "shared"], kind=kind))
        # each pool gets its own pool step and the workload (a mutant passing None fails on the attribute)
        monkeypatch.setattr(P, "decode_pool", lambda ps, w, cap, acc: self.calls.append(
            ("dec", ps.kind, w.input_len, cap, acc)) or dec)
        monkeypatch.setattr(P, "prefill_pool", lambda ps, w, budget: self.calls.append(
            ("pre", ps.kind, w.input_len, budget)) or pre)
        monkeypatch.setattr(P, "mixed_pool", lambda ps, w, cap, budget, acc: self.calls.append(
            ("mix", ps.kind, w.input_len, cap, budget, acc)) or mixed)


def test_disaggregated_row(monkeypatch):
    f = Fake(monkeypatch)
    eff = Efficiency()
    d = dep(mtp={"draft_tokens": 1, "acceptance": 0.5})
    r = P.project_deployment(DS, H800, wl(), d, eff=eff, utilization=0.5)
    assert r["pools"] == {"prefill": f.pre, "decode": f.dec}
    # a request: 320 / 1000 prefill GPU-s + 128 / 64 decode GPU-s = 2.32
    assert r["prefill_fraction"] == approx(0.32 / 2.32)
    assert r["output_tokens_per_s_per_gpu"] == approx(128 / 2.32)
    assert r["total_tokens_per_s_per_gpu"] == approx(448 / 2.32)
    assert r["tokens_per_s_per_gpu"] == approx(448 / 2.32)
    assert r["tokens_per_day_per_gpu"] == approx(448 / 2.32 * 86400 * 0.5)
    assert r["joules_per_token"] == approx(H800.tdp_w / (448 / 2.32))
    assert (r["batch"], r["tpot_ms"], r["tpot_ok"], r["ttft_ms"], r["ttft_ok"]) == (16, 20.0, True, 300.0, True)
    assert (r["model"], r["gpu"], r["dtype"], r["tp"], r["deployment"], r["workload"], r["input_len"],
            r["output_len"], r["prefix_cache_hit"], r["count"], r["utilization"], r["kv_dtype"], r["fits"],
            r["source"], r["efficiency"], r["efficiency_source"], r["power_w_per_gpu"], r["power_source"], r["mtp"],
            r["notes"], r["sources"]) == \
        ("deepseek-v3", "h800", "fp8", "d", "d", "t", 320, 128, 0.0, "total", 0.5, "bf16", True, "projected",
         eff.to_dict(), "global default", H800.tdp_w, "datasheet TDP", {"draft_tokens": 1, "acceptance": 0.5},
         ["note prefill", "shared", "note decode"], {})
    assert f.calls == [("step", "deepseek-v3", "h800", "fp8", "d", "prefill", eff, []), ("pre", "prefill", 320, 1000),
                       ("step", "deepseek-v3", "h800", "fp8", "d", "decode", eff, []), ("dec", "decode", 320, 64, 0.5)]
    r = P.project_deployment(DS, H800, wl(), dep(), eff=eff, count="output", batch=9)
    assert r["tokens_per_s_per_gpu"] == approx(128 / 2.32) and r["count"] == "output"
    assert (r["mtp"], r["utilization"]) == (None, 1.0)
    assert f.calls[-1] == ("dec", "decode", 320, 9, 0.0)
    r = P.project_deployment(DS, H800, wl(count="output"), dep(), eff=eff)
    assert r["count"] == "output"
    r = P.project_deployment(DS, H800, wl(), dep(), eff=Efficiency(run_id="r1", kind="calibrated"))
    assert (r["source"], r["efficiency_source"]) == ("calibrated", "calibrated")
    r = P.project_deployment(DS, H800.model_copy(update={"tdp_w": None}), wl(), dep(), eff=eff)
    assert (r["power_w_per_gpu"], r["power_source"], r["joules_per_token"]) == (None, None, None)
    r = P.project_deployment(DS, H800, wl(), dep())  # no efficiencies given: the device's, from no runs
    assert r["efficiency"] == P.efficiency_for([], "h800", "fp8").to_dict()
    assert f.calls[-1][0] == "dec" and f.calls[-2][6] == P.efficiency_for([], "h800", "fp8")


def test_mixed_row_and_notes(monkeypatch):
    f = Fake(monkeypatch, mixed={"tpot_ok": False, "ttft_ok": False, "ttft_ms": 1234.4})
    d = dep(mixed=Pool(gpus=8, batch_per_gpu=5, tokens_per_gpu=77), prefill=None, decode=None,
            mtp={"draft_tokens": 1, "acceptance": 0.25})
    r = P.project_deployment(DS, H800, wl(tpot=50, ttft=1000), d, dtype="bf16", max_batched_tokens=88)
    assert f.calls[-1] == ("mix", "mixed", 320, 5, 88, 0.25)
    assert r["pools"] == {"mixed": f.mixed}
    assert (r["prefill_fraction"], r["batch"], r["tpot_ms"], r["ttft_ms"], r["dtype"]) == (None, 8, 30.0, 1234.4,
                                                                                            "bf16")
    assert r["output_tokens_per_s_per_gpu"] == 10.0
    assert r["total_tokens_per_s_per_gpu"] == approx(10.0 * 448 / 128)
    assert r["notes"] == ["note mixed", "shared", "TPOT limit 50 ms not met even at batch 1 per GPU",
                          "TTFT limit 1000 ms not met: 1234 ms"]
    assert (r["tpot_ok"], r["ttft_ok"]) == (False, False)


def test_rows_that_do_not_fit(monkeypatch):
    Fake(monkeypatch, dec={"fits": False})
    r = P.project_deployment(DS, H800, wl(), dep())
    zero = dict(batch=0, tokens_per_s_per_gpu=0.0, tokens_per_day_per_gpu=0.0, output_tokens_per_s_per_gpu=0.0,
                total_tokens_per_s_per_gpu=0.0, tpot_ok=False, ttft_ok=False, tpot_ms=None, ttft_ms=None)
    assert r["fits"] is False and {k: r[k] for k in zero} == zero
    assert r["notes"][-1] == "does not fit: decode pool out of memory" and "prefill_fraction" not in r
    Fake(monkeypatch, pre={"fits": False}, dec={"fits": False})
    assert P.project_deployment(DS, H800, wl(), dep())["notes"][-1] == \
        "does not fit: prefill, decode pool out of memory"
    Fake(monkeypatch)
    ctx = DS.max_position_embeddings
    assert P.project_deployment(DS, H800, wl(i=ctx - 128), dep())["fits"] is True
    r = P.project_deployment(DS, H800, wl(i=ctx - 127), dep())
    assert r["fits"] is False and r["notes"][-1] == f"{ctx - 127}+128 tokens exceed the context"


def test_utilization_fp8_and_names(monkeypatch):
    Fake(monkeypatch)
    for u in (0, 1.01, -0.5):
        with pytest.raises(ConfigError) as e:
            P.project_deployment(DS, H800, wl(), dep(), utilization=u)
        assert (e.value.file, e.value.field, e.value.message) == ("--utilization", None, f"must be in (0, 1], got {u}")
    with pytest.raises(ConfigError):  # DeepSeek-V3 ships fp8: refused on a GPU without fp8
        P.project_deployment(DS, A100, wl(), dep())
    with pytest.raises(ConfigError):
        P.project_deployment(DENSE, A100, wl(), dep(), dtype="fp8")
    with pytest.raises(ConfigError):  # fp8 KV from the deployment file
        P.project_deployment(DENSE, A100, wl(), dep(kv_dtype="fp8"))
    with pytest.raises(ConfigError):  # or from the flag
        P.project_deployment(DENSE, A100, wl(), dep(), kv_dtype="fp8")
    assert P.project_deployment(DENSE, A100, wl(), dep(kv_dtype="fp8"), weight_only_fp8=True)["kv_dtype"] == "fp8"
    r = P.project_deployment(DS, A100, wl(), dep(), weight_only_fp8=True)
    assert (r["dtype"], r["power_w_per_gpu"]) == ("fp8", 400)
    assert P.project_deployment(DENSE, A100, wl(), dep())["dtype"] == "bf16"  # no native dtype: bf16
    r = P.project_deployment("deepseek-v3", "h800", "chat", "deepseek-v3-day6")
    assert (r["model"], r["gpu"], r["workload"], r["deployment"]) == ("deepseek-v3", "h800", "chat", "deepseek-v3-day6")
    assert r["sources"]["mtp"].startswith("DeepSeek-V3 technical report")


def test_a_prompt_almost_all_cached_still_prefills_one_token():
    ps = PS(kvb=2**19)
    r = P.prefill_pool(ps, wl(h=0.999), 1000)  # 0.32 new tokens: one
    assert r["new_tokens_per_prompt"] == 1.0
    assert ps.calls[-1] == (0, 0, 1000, 1000.0, 319.5, 320.0, 319.0)
    ps = PS()
    P.mixed_pool(ps, wl(h=0.999), None, 100, 0.0)
    assert ps.calls[-1] == (0, 0, 1.0, 1.0, 319.5, 320.0, 319.0)
    assert ps.calls[-2][2:] == (ps.calls[-2][0] / 128, ps.calls[-2][0] / 128, 319.5, 320.0, 319.0)


def test_tpot_met_at_batch_one_only():
    ps = PS()
    r = P.decode_pool(ps, wl(tpot=125), None, 0.0)  # 125 ms at one sequence
    assert (r["batch_per_gpu"], r["b_slo"], r["tpot_ok"]) == (1, 1, True)
    assert {c[1] for c in ps.calls} == {384.0}  # every step tried at the mean context
    r = P.mixed_pool(PS(), wl(tpot=937.5), None, 100, 0.0)  # 0.125 * 3.5 + 0.5 s at one sequence
    assert (r["batch_per_gpu"], r["b_slo"], r["tpot_ok"]) == (1, 1, True)


def test_mixed_pool_tpot_counts_the_tokens_mtp_emits():
    # 160 new after 160 cached, MTP 1 at 1/2: T(b) = 0.125 * (b + 1.875 b) + 0.5; TPOT T(b)/1.5: 2250 ms at 8
    r = P.mixed_pool(PS(mtp=1), wl(h=0.5, tpot=2250), None, 100, 0.5)
    assert (r["b_slo"], r["batch_per_gpu"], r["batch_limit"], r["tpot_ms"]) == (8, 8, "slo", 2250.0)


def test_runs_efficiencies_and_kv_override_reach_the_pools(monkeypatch):
    f = Fake(monkeypatch)
    monkeypatch.setattr(P, "read_runs", lambda runs: ["R"] if runs == ["x"] else [])
    seen = []
    monkeypatch.setattr(P, "efficiency_for",
                        lambda runs, hw, dt: seen.append((runs, hw, dt)) or Efficiency(compute=0.3))
    r = P.project_deployment(DS, H800, wl(), dep(), runs=["x"], kv_dtype="fp8")
    assert seen == [(["R"], "h800", "fp8")]
    assert f.calls[0] == ("step", "deepseek-v3", "h800", "fp8", "d", "prefill", Efficiency(compute=0.3), ["R"])
    assert (r["kv_dtype"], r["efficiency"]["compute"]) == ("fp8", 0.3)
