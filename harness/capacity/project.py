"""The capacity model of DESIGN.md: one model on one accelerator type serving one workload -> tokens/s per GPU.

    W   = weight bytes;  kv = KV-cache bytes per token
    B_mem = floor((p·HBM·f_mem − W − p·reserve) / (kv·(I+O)))
    T_dec(B, C) = Σ_ops max(flops/(p·peak·e_c), bytes/(p·bw·e_m)) + overhead + TP all-reduce      (projected)
                = T_dec_projected · ratio(B, C) interpolated from a run's decode grid on this device  (measured)
    B_slo = largest B with T_dec(B, C) ≤ TPOT;  B* = min(B_mem, B_slo, cap)
    T_pre = prefill of I·(1−h) new tokens (same per-op roofline; compute-bound at any real prompt length)
    T_req = T_pre + O·T_dec(B*, C)/B*;  per GPU: (I+O)/T_req/p total, O/T_req/p output tokens/s

Fleet capacity against demand lives in `harness.capacity.fleet`.
"""

from __future__ import annotations

import functools
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from harness.capacity.config import Workload, load_workload
from harness.config import ConfigError
from harness.dtypes import dtype_bytes
from harness.hardware import Hardware, load_hardware
from harness.model.spec import ModelConfig, load_model_config
from harness.results import Run, load_run, usable

# ---- documented defaults (all overridable; every result says which were used) ----------------------------------
# Efficiencies when no run is given. Assumptions, not measurements of this project: replace them with a run.
#  e_c 0.5: fraction of the DENSE datasheet matmul peak a whole prefill sustains. Large bf16 GEMMs alone reach well
#           above this on Hopper; attention, norms, MoE grouping and launch gaps pull a full forward pass down.
#  e_m 0.7: fraction of datasheet HBM bandwidth a decode step streams weights + KV at (a plain device copy runs
#           near 0.8-0.9 of datasheet; decode GEMVs and paged attention do worse).
#  overhead 0.3 ms/step: scheduler, sampling and launch gaps per decode step with CUDA graphs.
DEFAULT_E_C, DEFAULT_E_M, DEFAULT_OVERHEAD_MS = 0.5, 0.7, 0.3
F_MEM = 0.9  # fraction of HBM the server may use: vLLM's default gpu_memory_utilization
RESERVE_GB_PER_GPU = 2.0  # activations, CUDA graphs, NCCL buffers, allocator slack (assumption)
BATCH_CAP = 256  # vLLM's default max_num_seqs: the batch cap a suite does not override
ALLREDUCE_LATENCY_US = 10.0  # per all-reduce, small-message NCCL latency order on NVLink (assumption)
INTERNODE_GBPS = 50.0  # tp > 8 spans nodes: one 400 Gb/s NIC per GPU (assumption)
ACT_BYTES = 2  # activations and all-reduces stay bf16 whatever the weight dtype
SECONDS_PER_DAY = 86400
B_SLO_MAX = 1 << 16


@dataclass(frozen=True)
class Efficiency:
    compute: float = DEFAULT_E_C
    memory: float = DEFAULT_E_M
    overhead_ms: float = DEFAULT_OVERHEAD_MS
    source: str = "defaults (e_c 0.5, e_m 0.7, 0.3 ms/step: assumptions, see harness/capacity.py)"

    def to_dict(self) -> dict:
        return {"compute": self.compute, "memory": self.memory, "overhead_ms": self.overhead_ms, "from": self.source}


# ---- runs: efficiencies and measured grids -------------------------------------------------------------------
def read_runs(paths: list[str | Path | Run] | None) -> list[Run]:
    """Run folders (paths or run ids under results/runs/) read once through harness.results; ConfigError when
    unreadable. Already-read `Run`s pass through, so callers may hand over either."""
    return [load_run(p) for p in paths or []]


def efficiency_from_runs(runs: list[Run]) -> Efficiency:
    """e_c = median datasheet MFU of ok prefill points; e_m = median datasheet MBU of ok decode points.
    A field no run measures keeps its default, and `source` says which is which."""
    mfu = [p["mfu_datasheet"] for r in runs for p in r.usable("prefill") if _pos(p.get("mfu_datasheet"))]
    mbu = [p["mbu_datasheet"] for r in runs for p in r.usable("decode") if _pos(p.get("mbu_datasheet"))]
    if not mfu and not mbu:
        return Efficiency()
    ids = ",".join(r.run_id for r in runs)
    # Clamp at 1: above-datasheet figures are byte-count bugs (DESIGN.md), not efficiencies to extrapolate from.
    e_c = min(statistics.median(mfu), 1.0) if mfu else DEFAULT_E_C
    e_m = min(statistics.median(mbu), 1.0) if mbu else DEFAULT_E_M
    how_c = f"median prefill mfu_datasheet of {len(mfu)} points" if mfu else "default"
    how_m = f"median decode mbu_datasheet of {len(mbu)} points" if mbu else "default"
    src = f"run {ids}: e_c {how_c}, e_m {how_m}"
    return Efficiency(e_c, e_m, DEFAULT_OVERHEAD_MS, src)


def _pos(v) -> bool:
    return isinstance(v, (int, float)) and v > 0 and math.isfinite(v)


def _interp2(xs: np.ndarray, ys: np.ndarray, grid: np.ndarray, x: float, y: float) -> float:
    """Bilinear interpolation on a rectangular grid, held constant beyond its edges."""
    row = np.array([np.interp(y, ys, grid[i]) for i in range(len(xs))])
    return float(np.interp(x, xs, row))


def _ratio_grid(samples: list[tuple[float, float, float]]):
    """samples (x, y, measured/projected) -> f(x, y) over log2 axes. Missing grid cells take the nearest sample."""
    xs = np.unique([math.log2(s[0]) for s in samples])
    ys = np.unique([math.log2(s[1]) for s in samples])
    pts = np.array([(math.log2(a), math.log2(b), r) for a, b, r in samples])
    grid = np.empty((len(xs), len(ys)))
    for i, x in enumerate(xs):
        for j, y in enumerate(ys):
            d = (pts[:, 0] - x) ** 2 + (pts[:, 1] - y) ** 2
            near = d == d.min()
            grid[i, j] = pts[near, 2].mean()
    return lambda x, y: _interp2(xs, ys, grid, math.log2(max(x, 1e-9)), math.log2(max(y, 1e-9)))


# ---- the serving model -------------------------------------------------------------------------------------
@dataclass
class Projector:
    """Per-op roofline of one replica: model `m` on `tp` GPUs of type `hw`, weights in `dtype`."""

    m: ModelConfig
    hw: Hardware
    dtype: str = "bf16"
    tp: int = 1
    eff: Efficiency = field(default_factory=Efficiency)
    kv_dtype: str = "bf16"
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.wb = dtype_bytes(self.dtype)
        self.kvb = self.m.kv_bytes_per_token(dtype_bytes(self.kv_dtype))
        peak = self.hw.peak(self.dtype)
        if peak is None:  # no fp8 tensor cores (A100, Ascend A2): weight-only 8-bit, bf16 matmuls
            peak = self.hw.peak("bf16")
            self.notes.append(f"{self.hw.id} has no {self.dtype} peak: {self.dtype} weights, bf16 compute")
        self.peak = peak * self.tp * self.eff.compute
        self.bw = self.hw.bandwidth_bytes_per_s * self.tp * self.eff.memory
        ic = self.hw.interconnect
        self.link = (ic.per_direction_gbps if ic and ic.per_direction_gbps else None)
        if self.tp > 8:
            self.link = min(self.link or INTERNODE_GBPS, INTERNODE_GBPS)
            self.notes.append(f"tp {self.tp} spans nodes: all-reduce at an assumed {INTERNODE_GBPS:g} GB/s per GPU")
        elif self.tp > 1 and self.link is None:
            self.link = 64.0
            self.notes.append(f"{self.hw.id} has no interconnect figure: all-reduce at PCIe Gen5 64 GB/s assumed")

    # Ops of one forward over `tokens` new tokens, summed over layers: (name, flops, bytes).
    def ops(self, tokens: float, attn_ctx: float, kv_read_tokens: float, logits_tokens: float):
        m, wb = self.m, self.wb
        L, H = m.num_layers, m.hidden_size
        attn_w = L * (m.attention_params() + 2 * H)  # projections + their norms + the two layer norms
        yield "attn_proj", 2 * tokens * attn_w, attn_w * wb
        yield "attn_core", tokens * m.attention_flops_per_token(attn_ctx), kv_read_tokens * self.kvb
        n_dense = m.moe.dense_layers if m.moe else L
        if n_dense:
            w = n_dense * m.dense_mlp_params
            yield "mlp", 2 * tokens * w, w * wb
        if m.moe:
            nl, ep = m.num_moe_layers, m.expert_params
            k, shared = m.moe.experts_per_token, m.moe.shared_experts
            router = nl * m.router_params()
            touched = m.expected_experts_touched(tokens)
            yield "experts", 2 * tokens * nl * (k + shared) * ep + 2 * tokens * router, \
                (nl * (touched + shared) * ep + router) * wb
        head = m.lm_head_params + H  # + final norm
        yield "lm_head", 2 * logits_tokens * head, head * wb

    def _time(self, ops) -> float:
        return sum(max(f / self.peak, b / self.bw) for _, f, b in ops)

    def allreduce_s(self, tokens: float) -> float:
        """Two all-reduces per layer (after attention and after the MLP) of tokens·H activations, ring algorithm."""
        if self.tp == 1:
            return 0.0
        p = self.tp
        msg = tokens * self.m.hidden_size * ACT_BYTES
        per = ALLREDUCE_LATENCY_US * 1e-6 + 2 * (p - 1) / p * msg / (self.link * 1e9)
        return 2 * self.m.num_layers * per

    def t_dec(self, batch: float, context: float) -> float:
        """Seconds per decode step: `batch` sequences, each attending to `context` tokens."""
        ops = self.ops(batch, context, batch * context, batch)
        return self._time(ops) + self.eff.overhead_ms * 1e-3 + self.allreduce_s(batch)

    def t_pre(self, new_tokens: float, cached: float = 0.0, batch: float = 1) -> float:
        """Seconds to prefill `batch` prompts of `new_tokens` after `cached` tokens (flash attention reads KV once)."""
        n = batch * new_tokens
        ops = self.ops(n, cached + new_tokens / 2, batch * (cached + new_tokens), batch)
        return self._time(ops) + self.eff.overhead_ms * 1e-3 + self.allreduce_s(n)


@dataclass
class Measured:
    """A run on this very device, model and dtype: ratios measured/projected over its decode and prefill grids."""

    run_id: str
    decode: object | None = None  # f(batch, context) -> ratio
    prefill: object | None = None  # f(prompt_len, 1) -> ratio
    decode_range: tuple | None = None
    power_w: float | None = None


def _step_ms(p: dict, *keys: str) -> float | None:
    for k in keys:
        if _pos(p.get(k)):
            return float(p[k])
    return None


def measured_for(runs: list[Run], proj: Projector) -> Measured | None:
    """Grids from the first run whose datasheet is this GPU and whose points are this model and dtype (tp 1 only:
    a single-device run says nothing about all-reduce)."""
    if proj.tp != 1:
        return None
    for r in runs:
        if r.hardware_id != proj.hw.id:
            continue
        mine = [p for p in r.points if p.get("model") == proj.m.id and p.get("dtype") == proj.dtype
                and usable(p)]
        dec = [(p["batch"], p["context"], t / 1e3) for p in mine if p.get("kind") == "decode"
               and _pos(p.get("batch")) and _pos(p.get("context")) and (t := _step_ms(p, "tpot_ms", "median_ms"))]
        pre = [(p["batch"], p["prompt_len"], t / 1e3) for p in mine if p.get("kind") == "prefill"
               and _pos(p.get("batch")) and _pos(p.get("prompt_len")) and (t := _step_ms(p, "median_ms", "ttft_ms"))]
        if not dec and not pre:
            continue
        out = Measured(r.run_id)
        if dec:
            out.decode = _ratio_grid([(b, c, t / proj.t_dec(b, c)) for b, c, t in dec])
            out.decode_range = (min(d[0] for d in dec), max(d[0] for d in dec), min(d[1] for d in dec),
                                max(d[1] for d in dec))
        if pre:
            out.prefill = _ratio_grid([(n, 1, t / proj.t_pre(n, 0, b)) for b, n, t in pre])
        power = [p["telemetry"]["power_w"] for p in r.usable("decode")
                 if isinstance(p.get("telemetry"), dict) and _pos(p["telemetry"].get("power_w"))]
        out.power_w = statistics.median(power) if power else None
        return out
    return None


# ---- one projection ------------------------------------------------------------------------------------------
@functools.cache
def _model(name: str) -> ModelConfig:
    return load_model_config(name)


@functools.cache
def _hw(name: str) -> Hardware:
    return load_hardware(name)


@functools.cache
def _workload(name: str) -> Workload:
    return load_workload(name)


def resolve_workload(workload: str | Workload | None, input_len: int | None = None, output_len: int | None = None,
                     tpot_ms: float | None = None, ttft_ms: float | None = None) -> Workload:
    """A named workload, with explicit lengths/SLOs overriding; or an ad-hoc one from lengths alone."""
    if isinstance(workload, str):
        workload = _workload(workload)
    if workload is None:
        if not input_len or not output_len:
            raise ConfigError("--workload", None, "give --workload, or both --input-len and --output-len")
        workload = Workload(id="custom", description="from the command line", input_len=input_len,
                            output_len=output_len, ttft_ms=ttft_ms or 2000, tpot_ms=tpot_ms or 50, count="total",
                            assumption="default SLOs ttft 2000 ms, tpot 50 ms unless given")
    upd = {k: v for k, v in dict(input_len=input_len, output_len=output_len, tpot_ms=tpot_ms, ttft_ms=ttft_ms).items()
           if v is not None}
    for k, v in upd.items():
        if v <= 0:
            raise ConfigError(f"--{k.replace('_', '-')}", None, f"must be positive, got {v}")
    return workload.model_copy(update=upd) if upd else workload


def b_mem(m: ModelConfig, hw: Hardware, dtype: str, tp: int, seq_tokens: int, kv_dtype: str = "bf16") -> int:
    """Sequences of `seq_tokens` whose KV fits beside the weights (may be ≤ 0: the model does not fit)."""
    free = tp * hw.memory_bytes * F_MEM - m.weight_bytes(dtype_bytes(dtype)) - tp * RESERVE_GB_PER_GPU * 1e9
    return math.floor(free / (m.kv_bytes_per_token(dtype_bytes(kv_dtype)) * seq_tokens))


def project(model: str | ModelConfig, gpu: str | Hardware, workload: str | Workload, dtype: str | None = None,
            tp: int = 1, batch_cap: int | None = None, runs: list[Run] | None = None, utilization: float = 1.0,
            eff: Efficiency | None = None, kv_dtype: str = "bf16", count: str | None = None) -> dict:
    """Tokens/s per GPU of `model` on `gpu` for `workload` (one flat dict; see the module docstring)."""
    m = _model(model) if isinstance(model, str) else model
    hw = _hw(gpu) if isinstance(gpu, str) else gpu
    w = _workload(workload) if isinstance(workload, str) else workload
    dtype = dtype or m.native_dtype or "bf16"
    if tp < 1:
        raise ConfigError("--tp", None, f"must be ≥ 1, got {tp}")
    if not 0 < utilization <= 1:
        raise ConfigError("--utilization", None, f"must be in (0, 1], got {utilization}")
    runs = read_runs(runs)
    eff = eff or efficiency_from_runs(runs)
    proj = Projector(m, hw, dtype, tp, eff, kv_dtype)
    meas = measured_for(runs, proj)
    n_in, n_out, h = w.input_len, w.output_len, w.prefix_cache_hit
    count = count or w.count
    C = n_in + n_out / 2  # mean context over the decode
    cap = batch_cap or BATCH_CAP
    out = {"model": m.id, "gpu": hw.id, "dtype": dtype, "tp": tp, "workload": w.id, "input_len": n_in,
           "output_len": n_out, "prefix_cache_hit": h, "count": count, "utilization": utilization,
           "weight_gb": m.weight_bytes(proj.wb) / 1e9, "kv_bytes_per_token": proj.kvb}

    def t_dec(b: float) -> float:
        t = proj.t_dec(b, C)
        return t * meas.decode(b, C) if meas and meas.decode else t

    bm = b_mem(m, hw, dtype, tp, n_in + n_out, kv_dtype)
    if bm < 1:
        out.update(fits=False, batch=0, batch_limit="memory", b_mem=bm, b_slo=None, tpot_ms=None,
                   tpot_limit_ms=w.tpot_ms, tpot_ok=False, ttft_ms=None, ttft_limit_ms=w.ttft_ms, ttft_ok=False,
                   **{k: 0.0 for k in RATE_FIELDS}, joules_per_token=None, power_w_per_gpu=None,
                   source="projected", decode_source="projected", prefill_source="projected",
                   efficiency=eff.to_dict(),
                   notes=proj.notes + [f"does not fit: {m.weight_bytes(proj.wb) / 1e9:.0f} GB of weights on "
                                       f"{tp}x {hw.memory_gb:g} GB at f_mem {F_MEM}"])
        return out

    # SLO batch: T_dec grows with B, so bisect for the largest B that meets TPOT (0 when even B=1 misses),
    # searched past the memory and cap limits so `batch_limit` names the limit that really binds.
    lo, hi = 0, B_SLO_MAX
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if t_dec(mid) * 1e3 <= w.tpot_ms:
            lo = mid
        else:
            hi = mid - 1
    b_slo = lo
    limits = {"memory": bm, "slo": max(b_slo, 1), "cap": cap}
    limit = min(limits, key=lambda k: limits[k])  # ties: memory, then slo, then cap
    B = limits[limit]
    step = t_dec(B)

    new = max(n_in * (1 - h), 1.0)
    t_pre = proj.t_pre(new, n_in - new)
    if meas and meas.prefill:
        t_pre *= meas.prefill(new, 1)
    t_req = t_pre + n_out * step / B
    total = (n_in + n_out) / t_req / tp
    output = n_out / t_req / tp
    counted = total if count == "total" else output
    power = meas.power_w if meas and meas.power_w else hw.tdp_w
    out.update(
        fits=True, batch=B, batch_limit=limit, b_mem=bm, b_slo=b_slo,
        tpot_ms=step * 1e3, tpot_limit_ms=w.tpot_ms, tpot_ok=b_slo >= 1,
        ttft_ms=t_pre * 1e3, ttft_limit_ms=w.ttft_ms, ttft_ok=t_pre * 1e3 <= w.ttft_ms,
        prefill_tokens_per_s_per_gpu=new / t_pre / tp,
        decode_tokens_per_s_per_gpu=B / step / tp,
        output_tokens_per_s_per_gpu=output, total_tokens_per_s_per_gpu=total,
        tokens_per_s_per_gpu=counted, tokens_per_day_per_gpu=counted * SECONDS_PER_DAY * utilization,
        power_w_per_gpu=power,
        # Energy per counted token while serving: GPU board power (TDP unless measured), no PUE, no host.
        joules_per_token=power / counted if power else None,
        power_source=("measured" if meas and meas.power_w else "datasheet TDP") if power else None,
        source="measured" if meas and (meas.decode or meas.prefill) else "projected",
        decode_source=f"measured (run {meas.run_id})" if meas and meas.decode else "projected",
        prefill_source=f"measured (run {meas.run_id})" if meas and meas.prefill else "projected",
        efficiency=eff.to_dict(), notes=list(proj.notes),
    )
    if not out["tpot_ok"]:
        out["notes"].append(f"TPOT limit {w.tpot_ms:g} ms not met even at batch 1 ({t_dec(1) * 1e3:.1f} ms)")
    if not out["ttft_ok"]:
        out["notes"].append(f"TTFT limit {w.ttft_ms:g} ms not met: prefill alone takes {t_pre * 1e3:.0f} ms")
    if meas and meas.decode_range and not (meas.decode_range[0] <= B <= meas.decode_range[1]
                                           and meas.decode_range[2] <= C <= meas.decode_range[3]):
        out["notes"].append("decode outside the measured grid: projection scaled by the nearest measured ratio")
    return out


RATE_FIELDS = ("prefill_tokens_per_s_per_gpu", "decode_tokens_per_s_per_gpu", "output_tokens_per_s_per_gpu",
               "total_tokens_per_s_per_gpu", "tokens_per_s_per_gpu", "tokens_per_day_per_gpu")


def auto_tp(model: str | ModelConfig, gpu: str | Hardware, workload: str | Workload, dtype: str | None = None,
            choices: tuple[int, ...] = (1, 2, 4, 8, 16), **kw) -> dict:
    """`project` at the tensor-parallel degree with the most counted tokens/s per GPU among those that fit
    (more GPUs per replica buy KV room, hence batch, at the price of all-reduces); the last tried if none fits."""
    best = None
    for p in choices:
        res = project(model, gpu, workload, dtype, tp=p, **kw)
        if res["fits"] and (best is None or res["tokens_per_s_per_gpu"] > best["tokens_per_s_per_gpu"]):
            best = res
    return best or res


__all__ = ["Efficiency", "Projector", "Run", "auto_tp", "b_mem", "efficiency_from_runs", "project",
           "read_runs", "resolve_workload"]
