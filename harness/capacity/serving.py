"""The serving model: one replica (a model on `tp` GPUs of one type) under continuous batching with chunked
prefill, as vLLM, SGLang and TensorRT-LLM schedule it.

Engine step (one forward): B decoding sequences plus prefill chunks of newly admitted requests, at most N tokens
(the token budget: vLLM `max_num_batched_tokens`, SGLang `chunked_prefill_size`, TensorRT-LLM `max_num_tokens`).
In steady state a sequence lives O decode steps, so B/O requests finish, and as many are admitted, per step: each
step carries P = B·n/O prefill tokens (n = I·(1−h) new prompt tokens). Hence

    T_step(B) = T_fwd(B decode tokens at context C, P prefill tokens)        TPOT = T_step(B*)
    without chunked prefill (TensorRT-LLM's `enable_chunked_prefill` off, trtllm-bench's default) a prompt is not
    split: a fraction f = min(1, B/O) of the steps each carry whole prompts, c = P/f = max(n, P) tokens, the rest
    decode only: T_step(B) = (1−f)·T_fwd(B, 0) + f·T_fwd(B, c) (prefill no longer hides under every decode step)
    B_budget  = floor(N / (1 + n/O))            (decode tokens + their share of prefill fit the budget)
    B*        = min(B_mem, B_slo, B_cap, B_budget);  B_slo = largest B with T_step(B) ≤ TPOT limit
    output tokens/s per replica = B*/T_step(B*);  total = (I+O)/O · that;  per GPU: ÷ tp
    TTFT = the single request's own prefill (n tokens in chunks of N after h·I cached): a lower bound under load

T_fwd is a per-op roofline, Σ_ops max(flops/(tp·peak·e_c), bytes/(tp·bw·e_m)) + overhead + collectives, with
every weight read once per forward (shared by the decode tokens and the prefill chunk); or, where a run measured
this device, model, dtype, backend and tp, that roofline scaled by measured/projected interpolated on the run's
grid (`tokenfleet.capacity.calibrate`): a tp replica's ratio covers its collectives, a shard's (one GPU alone) only
the compute, the collectives added.

Collectives per forward of T tokens: 2 all-reduces per layer (after attention, after the MLP) of T·H·2 bytes,
timed by a run's measured all-reduce curve of this device at world size tp (`allreduce_source` says which run),
else by the datasheet's interconnect (ring: latency + 2(p−1)/p·bytes/link). MoE across nodes (tp > 8) is
expert-parallel and stays projected: each MoE layer's MLP all-reduce becomes an all-to-all dispatch and combine of
each rank's T/p tokens × k experts × H × 2 bytes, (p−8)/p of it over the assumed inter-node NIC and the rest
over the scale-up link (`alltoall_source`: assumed, from the interconnect figures).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tokenfleet.capacity.calibrate import Efficiency, Measured, RatioGrid
from tokenfleet.dtypes import dtype_bytes
from tokenfleet.hardware import Hardware
from tokenfleet.model.spec import ModelConfig

if TYPE_CHECKING:  # the measure part's curve type; importing it loads every part (and torch)
    from tokenfleet.measure.parts.collective import CollectiveCurve

ALLREDUCE_LATENCY_US = 10.0  # per all-reduce, small-message NCCL latency order on NVLink (assumption)
INTERNODE_GBPS = 50.0  # tp > 8 spans nodes: one 400 Gb/s NIC per GPU (assumption)
PCIE_GBPS = 64.0  # a GPU with no interconnect figure: PCIe Gen5 x16 per direction
ACT_BYTES = 2  # activations and all-reduces stay bf16 whatever the weight dtype
GPUS_PER_NODE = 8  # scale-up domain of the datasheets' NVLink/HCCS figures (HGX/DGX, Atlas 800 boards)
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
    allreduce: tuple[CollectiveCurve, str] | None = None  # a run's measured curve at world size tp, and its label

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
        self._links()

    def _links(self) -> None:
        """Link figures for collectives not measured, and the row's labels saying where each comes from."""
        ic = self.hw.interconnect
        self.scaleup = ic.per_direction_gbps if ic and ic.per_direction_gbps else None
        self.link = self.scaleup
        what = f"datasheet {ic.type} {self.scaleup:g} GB/s" if self.scaleup else None
        if self.tp > GPUS_PER_NODE:
            self.link = min(self.link or INTERNODE_GBPS, INTERNODE_GBPS)
            what = f"assumed inter-node {INTERNODE_GBPS:g} GB/s per GPU (tp {self.tp} spans nodes)"
        elif self.tp > 1 and self.link is None:
            self.link = self.scaleup = PCIE_GBPS
            what = f"assumed PCIe Gen5 {PCIE_GBPS:g} GB/s ({self.hw.id} has no interconnect figure)"
        self.allreduce_source = None if self.tp == 1 else (
            self.allreduce[1] if self.allreduce else f"{what}; ring, {ALLREDUCE_LATENCY_US:g} us per call assumed")
        if self.tp > 1 and not self.allreduce and what.startswith("assumed"):
            self.notes.append(f"all-reduce at {what}")
        self.ep = bool(self.m.moe) and self.tp > GPUS_PER_NODE
        links = f"{INTERNODE_GBPS:g} GB/s inter-node, {self.scaleup or PCIE_GBPS:g} GB/s in-node"
        self.alltoall_source = f"assumed: expert-parallel all-to-all at {links}" if self.ep else None
        if self.ep:
            self.notes.append(f"MoE on {self.tp} GPUs spans nodes: expert-parallel all-to-all at {links} (assumed)")

    def ops(self, tokens: float, attn_ctx: float, kv_read_tokens: float, logits_tokens: float,
            absorbed: float = 0.0):
        return self.m.forward_ops(tokens, attn_ctx, kv_read_tokens, logits_tokens, self.wb, self.kvb, absorbed)

    def forward_s(self, tokens: float, attn_ctx: float, kv_read_tokens: float, logits_tokens: float,
                  absorbed: float = 0.0) -> float:
        """One forward on one replica, without all-reduces: roofline per op + the per-forward overhead. `absorbed`:
        the share of attention's query-key pairs that are decode tokens' (MLA's absorbed form, FlashMLA)."""
        ops = self.ops(tokens, attn_ctx, kv_read_tokens, logits_tokens, absorbed)
        return sum(max(f / self.peak, b / self.bw) for _, f, b in ops) + self.eff.overhead_ms * 1e-3

    def one_allreduce_s(self, tokens: float) -> float:
        """One all-reduce of tokens·H bf16 activations: the measured curve, else the ring on the link figure."""
        msg = tokens * self.m.hidden_size * ACT_BYTES
        if self.allreduce:
            return self.allreduce[0](msg) * 1e-3
        p = self.tp
        return ALLREDUCE_LATENCY_US * 1e-6 + 2 * (p - 1) / p * msg / (self.link * 1e9)

    def one_alltoall_s(self, tokens: float) -> float:
        """Dispatch or combine of one expert-parallel MoE layer: each rank sends its tokens/p tokens' k expert
        copies, (p−1)/p of them off the GPU, (p−8)/p off the node; the slower of NIC and scale-up link, + latency."""
        p, k = self.tp, self.m.moe.experts_per_token
        sent = tokens / p * k * self.m.hidden_size * ACT_BYTES
        off_node = sent * (p - GPUS_PER_NODE) / p / (INTERNODE_GBPS * 1e9)
        in_node = sent * (GPUS_PER_NODE - 1) / p / ((self.scaleup or PCIE_GBPS) * 1e9)
        return ALLREDUCE_LATENCY_US * 1e-6 + max(off_node, in_node)

    def allreduce_s(self, tokens: float) -> float:
        """The collectives of one forward of `tokens` tokens (module docstring): all-reduces, and all-to-alls for
        expert-parallel MoE layers."""
        if self.tp == 1:
            return 0.0
        L = self.m.num_layers
        if not self.ep:
            return 2 * L * self.one_allreduce_s(tokens)
        moe = self.m.num_moe_layers
        return (2 * L - moe) * self.one_allreduce_s(tokens) + 2 * moe * self.one_alltoall_s(tokens)

    def t_dec(self, batch: float, context: float) -> float:
        """Seconds per pure decode step: `batch` sequences, each attending to `context` tokens."""
        return self.forward_s(batch, context, batch * context, batch, 1.0) + self.allreduce_s(batch)

    def t_pre(self, new_tokens: float, cached: float = 0.0, batch: float = 1) -> float:
        """Seconds of one forward prefilling `batch` prompts of `new_tokens` after `cached` tokens."""
        n = batch * new_tokens
        return self.forward_s(n, cached + new_tokens / 2, batch * (cached + new_tokens), batch) + self.allreduce_s(n)



def mixed_args(batch: float, context: float, chunk: float, chunk_ctx: float, prompt: float) -> tuple:
    """`forward_s` arguments of one engine step (`Steps.step`): `batch` decode tokens at `context` plus `chunk`
    prefill tokens at mean `chunk_ctx`, from prompts of `prompt` new tokens: tokens, mean context, KV read (flash
    attention reads each prefilling request's KV once per step: max(1, chunk/prompt) requests' worth), logits, and
    the decode tokens' share of the attention pairs (MLA's absorbed form)."""
    tokens = batch + chunk
    pairs = batch * context + chunk * chunk_ctx
    attn = pairs / tokens if tokens else 0.0
    kv = batch * context + (max(1.0, chunk / prompt) * chunk_ctx if chunk > 0 else 0.0)
    return tokens, attn, kv, batch, batch * context / pairs if pairs else 0.0


def largest(ok, hi: int) -> int:
    """The largest integer in [0, hi] where `ok` holds, for `ok` true up to some point and false after (bisection);
    0 when it fails at 1 (`ok(0)` is never asked)."""
    lo = 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
    return lo


class Steps:
    """Step times of one replica: the projection, scaled by a run's measured/projected ratios where measured. A
    replica measured on tp ranks scales forward + collectives (its times hold both); tp=1 and shard points scale
    the forward alone, the collectives added unscaled."""

    def __init__(self, proj: Projector, meas: Measured | None = None):
        self.proj, self.meas = proj, meas
        p = proj
        self.whole = bool(meas) and proj.tp > 1 and not meas.shard
        self.dec = RatioGrid([(b, c, t / self._proj(p.forward_s(b, c, b * c, b, 1.0), b))
                              for (b, c), t in meas.decode.items()]) if meas and meas.decode else None
        self.pre = RatioGrid([(b, n, t / self._proj(p.forward_s(b * n, n / 2, b * n, b), b * n))
                              for (b, n), t in meas.prefill.items()]) if meas and meas.prefill else None

    def _proj(self, fwd: float, tokens: float) -> float:
        """The projected time a measured ratio divides: the forward, with its collectives for a tp replica."""
        return fwd + self.proj.allreduce_s(tokens) if self.whole else fwd

    def _scaled(self, fwd: float, comm: float, ratio: float) -> float:
        return (fwd + comm) * ratio if self.whole else fwd * ratio + comm

    def decode(self, batch: float, context: float) -> float:
        p = self.proj
        fwd = p.forward_s(batch, context, batch * context, batch, 1.0)
        return self._scaled(fwd, p.allreduce_s(batch), self.dec(batch, context) if self.dec else 1.0)

    def step(self, batch: float, context: float, chunk: float, chunk_ctx: float, prompt: float) -> float:
        """Decode step with `chunk` interleaved prefill tokens: the decode part as `decode`, the chunk's extra
        forward (and collective) time scaled by the prefill ratio at that chunk length."""
        p = self.proj
        fwd = p.forward_s(*mixed_args(batch, context, chunk, chunk_ctx, prompt)) - \
            p.forward_s(batch, context, batch * context, batch, 1.0)
        comm = p.allreduce_s(batch + chunk) - p.allreduce_s(batch)
        ratio = self.pre(1, max(chunk, 1.0)) if self.pre and chunk > 0 else 1.0
        return self.decode(batch, context) + self._scaled(max(fwd, 0.0), max(comm, 0.0), ratio)

    def ttft(self, new: float, cached: float, budget: int) -> float:
        """One request's prefill alone, in chunks of at most `budget` tokens (each chunk reads the weights)."""
        t, done = 0.0, 0.0
        p = self.proj
        while done < new:
            n = min(budget, new - done)
            c = cached + done
            fwd = p.forward_s(n, c + n / 2, c + n, 1)
            t += self._scaled(fwd, p.allreduce_s(n), self.pre(1, n) if self.pre else 1.0)
            done += n
        return t

    def extrapolated(self, batch: float, context: float) -> bool:
        return bool(self.dec) and not self.dec.inside(batch, context)


def serve(steps: Steps, input_len: int, output_len: int, prefix_hit: float, tpot_ms: float, ttft_ms: float,
          b_mem: int, batch_cap: int, budget: int, chunked: bool = True) -> dict:
    """The steady state of one replica (module docstring): batch and its limit, TPOT, TTFT, tokens/s. `chunked`:
    prefill split into chunks spread over the decode steps; False: whole prompts, in a fraction of the steps."""
    new = max(input_len * (1 - prefix_hit), 1.0)
    cached = input_len - new
    per_step = new / output_len  # prefill tokens each decoding sequence brings per step
    C = input_len + output_len / 2
    chunk_ctx = cached + new / 2

    def t(b: float) -> float:
        if chunked:
            return steps.step(b, C, b * per_step, chunk_ctx, new)
        f = min(1.0, b / output_len)  # steps that prefill: b/O requests finish (and are replaced) per step
        return (1 - f) * steps.step(b, C, 0.0, chunk_ctx, new) + f * steps.step(b, C, b * per_step / f, chunk_ctx, new)

    lo = largest(lambda b: t(b) * 1e3 <= tpot_ms, B_SLO_MAX)  # T_step grows with B (0 when B=1 misses)
    b_budget = max(1, math.floor(budget / (1 + per_step)))
    limits = {"memory": b_mem, "slo": max(lo, 1), "cap": batch_cap, "budget": b_budget}
    limit = min(limits, key=lambda k: limits[k])  # ties: memory, slo, cap, budget
    B = limits[limit]
    step = t(B)
    ttft = steps.ttft(new, cached, budget if chunked else max(budget, math.ceil(new)))
    return {"batch": B, "batch_limit": limit, "b_slo": lo, "b_budget": b_budget, "step_s": step,
            "decode_step_s": steps.decode(B, C), "ttft_s": ttft, "new_tokens": new, "context": C,
            "prefill_tokens_per_step": B * per_step,
            "output_per_s": B / step, "total_per_s": B / step * (input_len + output_len) / output_len,
            "tpot_ok": lo >= 1, "ttft_ok": ttft * 1e3 <= ttft_ms, "tpot_at_1_s": t(1)}
