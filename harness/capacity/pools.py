"""One model on one accelerator type served by a deployment file (`tokenfleet.capacity.deployment`): expert
parallelism, data-parallel attention, prefill and decode pools (or one mixed pool), MTP, two-micro-batch overlap.
The step of one GPU is `tokenfleet.capacity.expert.PoolStep`; this module finds each pool's batch and rate and
sizes the prefill/decode split for the workload.

    decode pool   b = min(batch_per_gpu, B_mem, B_slo) sequences per GPU at mean context C = I + O/2; each step
                  verifies 1 + d tokens per sequence and keeps e = 1 + a + … + a^d of them (MTP);
                  TPOT = T_step(b)/e; output tokens/s per GPU = b·e/T_step(b)
    prefill pool  N = tokens_per_gpu new tokens per step (n = I·(1−h) per prompt: cache hits skip their compute,
                  their KV is read, and loaded from an off-GPU cache where the deployment says so:
                  `cache_load_gbps_per_node`, overlapped), or the largest N that meets the TTFT limit; new tokens/s
                  per GPU = N/T_step; TTFT = the prompt's cache load + ⌈n/N⌉·T_step(N) + the prompt's KV sent to the
                  decode pool over the NIC
    split         a request costs n/P + O/D GPU-seconds (P, D: the pools' rates per GPU), so a fleet serving the
                  workload puts (n/P)/(n/P + O/D) of its GPUs in prefill; per GPU: (I+O)/(n/P + O/D) tokens/s
    mixed pool    continuous batching as `serving`: b decode sequences + b·n/O prefill tokens per step, under the
                  per-GPU token budget N
"""

from __future__ import annotations

import math

from tokenfleet.capacity.calibrate import Efficiency, measured_alltoall, read_runs
from tokenfleet.capacity.config import Workload
from tokenfleet.capacity.deployment import DeploymentSpec, check_fits_model, load_deployment, with_overrides
from tokenfleet.capacity.expert import PoolStep, emitted_per_step, measured_experts
from tokenfleet.capacity.families import efficiency_for
from tokenfleet.capacity.project import (
    F_MEM,
    RESERVE_BYTES_PER_GPU,
    SECONDS_PER_DAY,
    _hw,
    _model,
    _workload,
    refuse_fp8,
)
from tokenfleet.capacity.serving import B_SLO_MAX, INTERNODE_GBPS, largest
from tokenfleet.config import ConfigError
from tokenfleet.dtypes import dtype_bytes
from tokenfleet.results import Run

DEFAULT_PREFILL_TOKENS = 16384  # deepseek-ai/profile-data README: prefill "batch size of 16K tokens per GPU"


def _pool_step(m, hw, dtype, dep: DeploymentSpec, kind: str, eff: Efficiency, runs=()) -> PoolStep:
    p = dep.pools()[kind]
    return PoolStep(m, hw, dtype, dep.kv_dtype, ep=p.gpus, group=p.group, redundant=dep.redundant_experts,
                    imbalance=dep.imbalance if m.moe and p.gpus > 1 else 1.0, overlap=p.overlap, kind=kind,
                    mtp_drafts=dep.mtp.draft_tokens if dep.mtp and kind != "prefill" else 0,
                    dispatch_bytes=dep.dispatch_bytes, combine_bytes=dep.combine_bytes, eff=eff,
                    alltoall=measured_alltoall(list(runs), hw.id, p.gpus) if m.moe else None,
                    cache_load_gbps=dep.cache_load_gbps_per_node,
                    experts=measured_experts(runs, hw.id, m.id, p.gpus, dtype) if m.moe and p.gpus > 1 else None)


def _free_bytes(ps: PoolStep) -> float:
    return ps.hw.memory_bytes * F_MEM - ps.weight_bytes_per_gpu() - RESERVE_BYTES_PER_GPU


def _breakdown(s: dict) -> dict:
    """Where one step's time goes, ms (compute parts, all-to-all, what the overlap hid)."""
    keys = ("attention_s", "dense_s", "moe_s", "head_s", "dispatch_s", "combine_s", "allreduce_s", "hidden_s",
            "imbalance_s", "expert_read_s", "kv_read_s", "cache_load_s", "step_s")
    return {k.replace("_s", "_ms"): s[k] * 1e3 for k in keys}


def decode_pool(ps: PoolStep, w: Workload, cap: int | None, acceptance: float) -> dict:
    C = w.input_len + w.output_len / 2
    e = emitted_per_step(ps.mtp_drafts, acceptance) if ps.mtp_drafts else 1.0
    kv_seq = ps.kvb * (w.input_len + w.output_len)
    b_mem = math.floor(_free_bytes(ps) / kv_seq)
    b_slo = largest(lambda b: ps.step(b, C)["step_s"] / e * 1e3 <= w.tpot_ms, B_SLO_MAX)
    limits = {"memory": b_mem, "slo": max(b_slo, 1), "cap": cap or B_SLO_MAX}
    limit = min(limits, key=lambda k: limits[k])
    b = limits[limit]
    if b < 1:
        return {"fits": False, "batch_per_gpu": 0, "batch_limit": "memory", "b_mem": b_mem}
    s = ps.step(b, C)
    return {"fits": True, "gpus": ps.ep, "batch_per_gpu": b, "batch_limit": limit, "b_mem": b_mem, "b_slo": b_slo,
            "tokens_per_step": e, "tpot_ms": s["step_s"] / e * 1e3, "tpot_ok": b_slo >= 1,
            "output_tokens_per_s_per_gpu": b * e / s["step_s"], "kv_bytes_per_gpu": b * kv_seq,
            "expert_bytes": s.get("expert_bytes", 0.0), "alltoall_source": ps.a2a_source,
            "experts_source": s.get("experts_source", "roofline"), **_breakdown(s)}


def prefill_pool(ps: PoolStep, w: Workload, budget: int | None) -> dict:
    """The prefill pool at its token budget, or at the largest budget of at least one prompt that meets the TTFT
    limit (`batch_limit` says which): a smaller step per GPU answers sooner. Missed even at one prompt: the budget,
    flagged."""
    n = max(w.input_len * (1 - w.prefix_cache_hit), 1.0)
    cached = w.input_len - n
    kv_send = w.input_len * ps.m.kv_bytes_per_token(dtype_bytes(ps.kv_dtype)) / (INTERNODE_GBPS * 1e9)

    def at(N: int) -> tuple[dict, float]:
        s = ps.step(0, 0, N, N / n, cached + min(n, N) / 2, cached + min(n, N), cached)
        return s, ps.cache_load_s(cached) + math.ceil(n / N) * s["step_s"] + kv_send

    cfg = budget or DEFAULT_PREFILL_TOKENS
    if _free_bytes(ps) < cfg * ps.kvb:
        return {"fits": False, "batch_limit": "memory"}
    N, limit = cfg, "budget"
    one = math.ceil(n)  # below one prompt per step TTFT only grows (more chunks, each reading the weights)
    if at(cfg)[1] * 1e3 > w.ttft_ms and one < cfg and at(one)[1] * 1e3 <= w.ttft_ms:
        N = one + largest(lambda x: at(one + x)[1] * 1e3 <= w.ttft_ms, cfg - one)
        limit = "ttft"
    s, ttft = at(N)
    return {"fits": True, "gpus": ps.ep, "tokens_per_gpu": N, "batch_limit": limit, "new_tokens_per_prompt": n,
            "new_tokens_per_s_per_gpu": N / s["step_s"],
            "input_tokens_per_s_per_gpu": N / s["step_s"] * w.input_len / n,
            "ttft_ms": ttft * 1e3, "kv_transfer_ms": kv_send * 1e3, "ttft_ok": ttft * 1e3 <= w.ttft_ms,
            "expert_bytes": s.get("expert_bytes", 0.0), "alltoall_source": ps.a2a_source,
            "experts_source": s.get("experts_source", "roofline"), **_breakdown(s)}


def mixed_pool(ps: PoolStep, w: Workload, cap: int | None, budget: int | None, acceptance: float) -> dict:
    N = budget or DEFAULT_PREFILL_TOKENS
    n = max(w.input_len * (1 - w.prefix_cache_hit), 1.0)
    cached = w.input_len - n
    C = w.input_len + w.output_len / 2
    e = emitted_per_step(ps.mtp_drafts, acceptance) if ps.mtp_drafts else 1.0
    per = n / w.output_len * e  # prefill tokens each sequence brings per step

    def step(b):
        return ps.step(b, C, b * per, b * e / w.output_len, cached + n / 2, cached + n, cached)

    kv_seq = ps.kvb * (w.input_len + w.output_len)
    b_mem = math.floor(_free_bytes(ps) / kv_seq)
    b_budget = max(1, math.floor(N / (1 + ps.mtp_drafts + per)))
    b_slo = largest(lambda b: step(b)["step_s"] / e * 1e3 <= w.tpot_ms, B_SLO_MAX)
    limits = {"memory": b_mem, "slo": max(b_slo, 1), "cap": cap or B_SLO_MAX, "budget": b_budget}
    limit = min(limits, key=lambda k: limits[k])
    b = limits[limit]
    if b < 1:
        return {"fits": False, "batch_per_gpu": 0, "batch_limit": "memory", "b_mem": b_mem}
    s = step(b)
    chunk = min(n, N)
    pre = ps.step(0, 0, chunk, chunk / n, cached + chunk / 2, cached + chunk, cached)["step_s"]
    ttft = ps.cache_load_s(cached) + math.ceil(n / N) * pre
    out = b * e / s["step_s"]
    return {"fits": True, "gpus": ps.ep, "batch_per_gpu": b, "batch_limit": limit, "b_mem": b_mem, "b_slo": b_slo,
            "tokens_per_step": e, "tpot_ms": s["step_s"] / e * 1e3, "tpot_ok": b_slo >= 1, "ttft_ms": ttft * 1e3,
            "ttft_ok": ttft * 1e3 <= w.ttft_ms, "output_tokens_per_s_per_gpu": out,
            "expert_bytes": s.get("expert_bytes", 0.0), "alltoall_source": ps.a2a_source,
            "experts_source": s.get("experts_source", "roofline"), **_breakdown(s)}


def resolve_deployment(dep: str | DeploymentSpec, m, batch: int | None = None, budget: int | None = None,
                       kv_dtype: str | None = None) -> DeploymentSpec:
    d = load_deployment(dep) if isinstance(dep, str) else dep
    check_fits_model(d, m, dep if isinstance(dep, str) else None)
    return with_overrides(d, batch, budget, kv_dtype)


def project_deployment(model, gpu, workload, deployment: str | DeploymentSpec, dtype: str | None = None,
                       runs: list[Run] | None = None, utilization: float = 1.0, eff: Efficiency | None = None,
                       count: str | None = None, weight_only_fp8: bool = False, batch: int | None = None,
                       max_batched_tokens: int | None = None, kv_dtype: str | None = None) -> dict:
    """Tokens/s per GPU of `model` on `gpu` for `workload`, served as `deployment` says (module docstring); one
    flat dict with `project`'s rate fields, plus `pools` (each pool's batch, rate and step breakdown)."""
    m = _model(model) if isinstance(model, str) else model
    hw = _hw(gpu) if isinstance(gpu, str) else gpu
    w = _workload(workload) if isinstance(workload, str) else workload
    dep = resolve_deployment(deployment, m, batch, max_batched_tokens, kv_dtype)
    if not weight_only_fp8:
        refuse_fp8(m, hw, dtype, dep.kv_dtype)
    dtype = dtype or m.native_dtype or "bf16"
    if not 0 < utilization <= 1:
        raise ConfigError("--utilization", None, f"must be in (0, 1], got {utilization}")
    runs = read_runs(runs)
    eff = eff or efficiency_for(runs, hw.id, dtype)
    acc = dep.mtp.acceptance if dep.mtp else 0.0
    count = count or w.count
    pools, notes = {}, []
    for kind, p in dep.pools().items():
        ps = _pool_step(m, hw, dtype, dep, kind, eff, runs)
        notes += [n for n in ps.notes if n not in notes]
        pools[kind] = (decode_pool(ps, w, p.batch_per_gpu, acc) if kind == "decode" else
                       prefill_pool(ps, w, p.tokens_per_gpu) if kind == "prefill" else
                       mixed_pool(ps, w, p.batch_per_gpu, p.tokens_per_gpu, acc))
    source = "calibrated" if eff.run_id else "projected"
    too_long = w.input_len + w.output_len > m.max_position_embeddings
    fits = all(p["fits"] for p in pools.values()) and not too_long
    out = {"model": m.id, "gpu": hw.id, "dtype": dtype, "tp": f"{dep.id}", "deployment": dep.id,
           "workload": w.id, "input_len": w.input_len, "output_len": w.output_len,
           "prefix_cache_hit": w.prefix_cache_hit, "count": count, "utilization": utilization,
           "kv_dtype": dep.kv_dtype, "fits": fits, "pools": pools, "source": source, "efficiency": eff.to_dict(),
           "efficiency_source": eff.kind,
           "power_w_per_gpu": hw.tdp_w, "power_source": "datasheet TDP" if hw.tdp_w else None,
           "mtp": dep.mtp.model_dump() if dep.mtp else None, "notes": notes, "sources": dict(dep.sources)}
    if not fits:
        why = f"{w.input_len}+{w.output_len} tokens exceed the context" if too_long else \
            f"does not fit: {', '.join(k for k, p in pools.items() if not p['fits'])} pool out of memory"
        out.update(batch=0, tokens_per_s_per_gpu=0.0, tokens_per_day_per_gpu=0.0, output_tokens_per_s_per_gpu=0.0,
                   total_tokens_per_s_per_gpu=0.0, tpot_ok=False, ttft_ok=False, tpot_ms=None, ttft_ms=None)
        out["notes"].append(why)
        return out
    if dep.disaggregated:
        pre, dec = pools["prefill"], pools["decode"]
        n = pre["new_tokens_per_prompt"]
        t_pre, t_dec = n / pre["new_tokens_per_s_per_gpu"], w.output_len / dec["output_tokens_per_s_per_gpu"]
        per_req = t_pre + t_dec  # GPU-seconds one request costs
        out.update(prefill_fraction=t_pre / per_req, batch=dec["batch_per_gpu"], tpot_ms=dec["tpot_ms"],
                   tpot_ok=dec["tpot_ok"], ttft_ms=pre["ttft_ms"], ttft_ok=pre["ttft_ok"],
                   output_tokens_per_s_per_gpu=w.output_len / per_req,
                   total_tokens_per_s_per_gpu=(w.input_len + w.output_len) / per_req)
    else:
        mx = pools["mixed"]
        o = mx["output_tokens_per_s_per_gpu"]
        out.update(prefill_fraction=None, batch=mx["batch_per_gpu"], tpot_ms=mx["tpot_ms"], tpot_ok=mx["tpot_ok"],
                   ttft_ms=mx["ttft_ms"], ttft_ok=mx["ttft_ok"], output_tokens_per_s_per_gpu=o,
                   total_tokens_per_s_per_gpu=o * (w.input_len + w.output_len) / w.output_len)
    counted = out["total_tokens_per_s_per_gpu"] if count == "total" else out["output_tokens_per_s_per_gpu"]
    out.update(tokens_per_s_per_gpu=counted, tokens_per_day_per_gpu=counted * SECONDS_PER_DAY * utilization,
               joules_per_token=hw.tdp_w / counted if hw.tdp_w and counted else None)
    if not out["tpot_ok"]:
        out["notes"].append(f"TPOT limit {w.tpot_ms:g} ms not met even at batch 1 per GPU")
    if not out["ttft_ok"]:
        out["notes"].append(f"TTFT limit {w.ttft_ms:g} ms not met: {out['ttft_ms']:.0f} ms")
    return out


__all__ = ["DEFAULT_PREFILL_TOKENS", "decode_pool", "mixed_pool", "prefill_pool", "project_deployment",
           "resolve_deployment"]
