"""The serving model: one replica (a model on `tp` GPUs of one type) under continuous batching with chunked
prefill, as vLLM, SGLang and TensorRT-LLM schedule it.

Engine step (one forward): B decoding sequences plus prefill chunks of newly admitted requests, at most N tokens
(the token budget: vLLM `max_num_batched_tokens`, SGLang `chunked_prefill_size`, TensorRT-LLM `max_num_tokens`).
In steady state a sequence lives O decode steps, so B/O requests finish, and as many are admitted, per step: each
step carries P = B·n/O prefill tokens (n = I·(1−h) new prompt tokens). Hence

    T_step(B) = T_fwd(B decode tokens at context C, P prefill tokens)        TPOT = T_step(B*)
    B_budget  = floor(N / (1 + n/O))            (decode tokens + their share of prefill fit the budget)
    B*        = min(B_mem, B_slo, B_cap, B_budget);  B_slo = largest B with T_step(B) ≤ TPOT limit
    output tokens/s per replica = B*/T_step(B*);  total = (I+O)/O · that;  per GPU: ÷ tp
    TTFT = the single request's own prefill (n tokens in chunks of N after h·I cached): a lower bound under load

T_fwd is a per-op roofline, Σ_ops max(flops/(tp·peak·e_c), bytes/(tp·bw·e_m)) + overhead + TP all-reduces, with
every weight read once per forward (shared by the decode tokens and the prefill chunk); or, where a run measured
this device, model, dtype, backend and tp, that roofline scaled by measured/projected interpolated on the run's
grid (`harness.capacity.calibrate`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from harness.capacity.calibrate import Efficiency, Measured, RatioGrid
from harness.dtypes import dtype_bytes
from harness.hardware import Hardware
from harness.model.spec import ModelConfig

ALLREDUCE_LATENCY_US = 10.0  # per all-reduce, small-message NCCL latency order on NVLink (assumption)
INTERNODE_GBPS = 50.0  # tp > 8 spans nodes: one 400 Gb/s NIC per GPU (assumption)
PCIE_GBPS = 64.0  # a GPU with no interconnect figure: PCIe Gen5 x16 per direction
ACT_BYTES = 2  # activations and all-reduces stay bf16 whatever the weight dtype
B_SLO_MAX = 1 << 16


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
        # KV bytes per token summed over the ranks: replicated GQA heads and MLA latents are read by every rank.
        self.kvb = self.m.kv_bytes_per_token(dtype_bytes(self.kv_dtype)) * self.m.kv_replication(self.tp)
        peak = self.hw.peak(self.dtype)
        if peak is None:  # no fp8 tensor cores (A100, Ascend A2): weight-only 8-bit, bf16 matmuls
            peak = self.hw.peak("bf16")
            self.notes.append(f"{self.hw.id} has no {self.dtype} peak: {self.dtype} weights, bf16 compute")
        self.peak = peak * self.tp * self.eff.compute
        self.bw = self.hw.bandwidth_bytes_per_s * self.tp * self.eff.memory
        ic = self.hw.interconnect
        self.link = ic.per_direction_gbps if ic and ic.per_direction_gbps else None
        if self.tp > 8:
            self.link = min(self.link or INTERNODE_GBPS, INTERNODE_GBPS)
            self.notes.append(f"tp {self.tp} spans nodes: all-reduce at an assumed {INTERNODE_GBPS:g} GB/s per GPU")
        elif self.tp > 1 and self.link is None:
            self.link = PCIE_GBPS
            self.notes.append(f"{self.hw.id} has no interconnect figure: all-reduce at PCIe Gen5 64 GB/s assumed")

    def ops(self, tokens: float, attn_ctx: float, kv_read_tokens: float, logits_tokens: float):
        return self.m.forward_ops(tokens, attn_ctx, kv_read_tokens, logits_tokens, self.wb, self.kvb)

    def forward_s(self, tokens: float, attn_ctx: float, kv_read_tokens: float, logits_tokens: float) -> float:
        """One forward on one replica, without all-reduces: roofline per op + the per-forward overhead."""
        ops = self.ops(tokens, attn_ctx, kv_read_tokens, logits_tokens)
        return sum(max(f / self.peak, b / self.bw) for _, f, b in ops) + self.eff.overhead_ms * 1e-3

    def allreduce_s(self, tokens: float) -> float:
        """Two all-reduces per layer (after attention and after the MLP) of tokens·H activations, ring algorithm."""
        if self.tp == 1:
            return 0.0
        p = self.tp
        msg = tokens * self.m.hidden_size * ACT_BYTES
        per = ALLREDUCE_LATENCY_US * 1e-6 + 2 * (p - 1) / p * msg / (self.link * 1e9)
        return 2 * self.m.num_layers * per

    def t_dec(self, batch: float, context: float) -> float:
        """Seconds per pure decode step: `batch` sequences, each attending to `context` tokens."""
        return self.forward_s(batch, context, batch * context, batch) + self.allreduce_s(batch)

    def t_pre(self, new_tokens: float, cached: float = 0.0, batch: float = 1) -> float:
        """Seconds of one forward prefilling `batch` prompts of `new_tokens` after `cached` tokens."""
        n = batch * new_tokens
        return self.forward_s(n, cached + new_tokens / 2, batch * (cached + new_tokens), batch) + self.allreduce_s(n)

    def t_mixed(self, batch: float, context: float, chunk: float, chunk_ctx: float, prompt: float) -> float:
        """One engine step: `batch` decode tokens at `context` plus `chunk` prefill tokens at mean `chunk_ctx`,
        from prompts of `prompt` new tokens. Flash attention reads each prefilling request's KV once per step:
        max(1, chunk/prompt) requests' worth."""
        tokens = batch + chunk
        attn = (batch * context + chunk * chunk_ctx) / tokens if tokens else 0.0
        kv = batch * context + (max(1.0, chunk / prompt) * chunk_ctx if chunk > 0 else 0.0)
        return self.forward_s(tokens, attn, kv, batch) + self.allreduce_s(tokens)


class Steps:
    """Step times of one replica: the projection, scaled by a run's measured/projected ratios where measured."""

    def __init__(self, proj: Projector, meas: Measured | None = None):
        self.proj, self.meas = proj, meas
        p = proj
        self.dec = RatioGrid([(b, c, t / p.forward_s(b, c, b * c, b)) for (b, c), t in meas.decode.items()]) \
            if meas and meas.decode else None
        self.pre = RatioGrid([(b, n, t / p.forward_s(b * n, n / 2, b * n, b)) for (b, n), t in meas.prefill.items()]) \
            if meas and meas.prefill else None

    def decode(self, batch: float, context: float) -> float:
        p = self.proj
        fwd = p.forward_s(batch, context, batch * context, batch)
        return fwd * (self.dec(batch, context) if self.dec else 1.0) + p.allreduce_s(batch)

    def step(self, batch: float, context: float, chunk: float, chunk_ctx: float, prompt: float) -> float:
        """Decode step with `chunk` interleaved prefill tokens: the decode part as `decode`, the chunk's extra
        forward time scaled by the prefill ratio at that chunk length."""
        p = self.proj
        extra = p.t_mixed(batch, context, chunk, chunk_ctx, prompt) - p.t_dec(batch, context)
        ratio = self.pre(1, max(chunk, 1.0)) if self.pre and chunk > 0 else 1.0
        return self.decode(batch, context) + max(extra, 0.0) * ratio

    def ttft(self, new: float, cached: float, budget: int) -> float:
        """One request's prefill alone, in chunks of at most `budget` tokens (each chunk reads the weights)."""
        t, done = 0.0, 0.0
        while done < new:
            n = min(budget, new - done)
            fwd = self.proj.t_pre(n, cached + done)
            t += fwd * (self.pre(1, n) if self.pre else 1.0)
            done += n
        return t

    def extrapolated(self, batch: float, context: float) -> bool:
        return bool(self.dec) and not self.dec.inside(batch, context)


def serve(steps: Steps, input_len: int, output_len: int, prefix_hit: float, tpot_ms: float, ttft_ms: float,
          b_mem: int, batch_cap: int, budget: int) -> dict:
    """The steady state of one replica (module docstring): batch and its limit, TPOT, TTFT, tokens/s."""
    new = max(input_len * (1 - prefix_hit), 1.0)
    cached = input_len - new
    per_step = new / output_len  # prefill tokens each decoding sequence brings per step
    C = input_len + output_len / 2
    chunk_ctx = cached + new / 2

    def t(b: float) -> float:
        return steps.step(b, C, b * per_step, chunk_ctx, new)

    lo, hi = 0, B_SLO_MAX  # T_step grows with B: bisect the largest B meeting TPOT (0 when B=1 misses)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if t(mid) * 1e3 <= tpot_ms else (lo, mid - 1)
    b_budget = max(1, math.floor(budget / (1 + per_step)))
    limits = {"memory": b_mem, "slo": max(lo, 1), "cap": batch_cap, "budget": b_budget}
    limit = min(limits, key=lambda k: limits[k])  # ties: memory, slo, cap, budget
    B = limits[limit]
    step = t(B)
    ttft = steps.ttft(new, cached, budget)
    return {"batch": B, "batch_limit": limit, "b_slo": lo, "b_budget": b_budget, "step_s": step,
            "decode_step_s": steps.decode(B, C), "ttft_s": ttft, "new_tokens": new, "context": C,
            "prefill_tokens_per_step": B * per_step,
            "output_per_s": B / step, "total_per_s": B / step * (input_len + output_len) / output_len,
            "tpot_ok": lo >= 1, "ttft_ok": ttft * 1e3 <= ttft_ms, "tpot_at_1_s": t(1)}
