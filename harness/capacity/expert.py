"""The step of one GPU in an expert-parallel pool with data-parallel attention, as DeepSeek serves V3/R1
(open-infra-index Day 6: prefill EP32/DP32, decode EP144/DP144) and SGLang reproduces it (LMSYS large-scale EP).

A pool instance is `ep` GPUs; attention runs data-parallel over groups of g GPUs (g = 1: each GPU holds its own
sequences' KV, MLA's latent once), every GPU holds the non-routed weights and (E+R)/ep routed experts. One forward
on one GPU carrying T tokens (decode: b sequences × (1 + MTP drafts); prefill: its token budget):

    attention   Σ_layers roofline of the projections (weights/g) and the core — decode in MLA's absorbed form
                (576-wide latent keys, 512-wide values, FlashMLA), prefill in the per-head form — reading its KV
    MoE         shared experts on its T tokens; routed experts on the T·k tokens it receives, reading the
                experts it holds that the group's tokens touch (`ModelConfig.ep_expert_bytes_read`); where a run
                of this device measured EP slices of this model at this ep (`measured_experts`: model points
                with `ep`, their `expert_ms`) and T lies within their token counts, the routed experts take that
                measured time per MoE layer instead (log-linear in tokens between the points)
    all-to-all  per MoE layer a dispatch (FP8) and a combine (BF16) of T·k copies of H: read off a run's measured
                all-to-all curve of this device at world size ep where one was given (`calibrate.measured_alltoall`),
                else DeepEP's low-latency kernels (decode: every copy over RDMA) or normal kernels (prefill: one
                copy per remote node, NVLink inside it), at the bandwidth DeepEP's README reports for that EP size,
                + a latency per call
    step        no overlap: everything in series; two micro-batches (overlap): each weight read twice (each
                micro-batch runs its own GEMMs) and per MoE layer attention hides dispatch and the MoE hides
                combine: max(attention, dispatch) + max(MoE, combine); what is left over is not hidden. The
                normal (prefill) kernels take 24 of 132 SMs while they run, so the compute they overlap is slower
                by 132/108; the low-latency (decode) kernels take none
    imbalance   every rank waits for the busiest at each dispatch and combine, so an expert-parallel step is the
                balanced step × `imbalance`: the step-time ratio SGLang measured between its default EPLB and a
                simulated perfect balance (deployment.IMBALANCE_DEFAULT, 1.18)
    cache load  where cache hits live off the GPU (DeepSeek Day 6: "the on-disk KV cache", 3FS), each prompt's
                cached tokens' KV (one copy per token) comes in over the node's storage link, shared by its GPUs,
                before its prefill: prefetched while the step before computes (assumed: the NIC and copy engines
                move it, no SMs), so the step is max(the step above, the load); `cache_load_s` says how long

Each op is max(flops/(peak·e_c), bytes/(bandwidth·e_m)) with the calibrated or default efficiencies; the attention
core runs at the bf16 peak (DeepSeek Day 6: "core MLA computations ... BF16").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from tokenfleet.capacity.calibrate import Efficiency
from tokenfleet.capacity.serving import ACT_BYTES, ALLREDUCE_LATENCY_US, GPUS_PER_NODE, INTERNODE_GBPS, PCIE_GBPS
from tokenfleet.dtypes import dtype_bytes
from tokenfleet.hardware import Hardware
from tokenfleet.model.spec import ModelConfig
from tokenfleet.results import usable

if TYPE_CHECKING:  # the measure part's curve type; importing it loads every part (and torch)
    from tokenfleet.measure.parts.collective import CollectiveCurve

# DeepEP README (github deepseek-ai/DeepEP, "Performance"): H800, one CX7 400 Gb/s NIC per GPU (~50 GB/s).
# Low-latency kernels (decode, 128 tokens per rank, pure RDMA): achieved bandwidth by EP size, (dispatch, combine).
DEEPEP_LOW_LATENCY_GBPS = {8: (98, 127), 16: (63, 74), 32: (48, 53), 64: (43, 46), 128: (39, 39), 256: (39, 40)}
# Normal kernels (prefill, 4096 tokens, NVLink + RDMA forwarding): bottleneck RDMA bandwidth by EP size.
DEEPEP_NORMAL_GBPS = {16: (43, 43), 32: (58, 57), 64: (51, 50)}
# Normal kernels inside one node (EP 8): 153 / 158 GB/s of H800's ~160 GB/s NVLink: that fraction of a datasheet's link.
DEEPEP_INTRANODE_FRACTION = (153 / 160, 158 / 160)
DEEPEP_NIC_GBPS = 50.0  # the NIC the tables were measured on; another NIC scales them
DEEPEP_SOURCE = "DeepEP README bandwidths (H800, CX7 400 Gb/s)"
# Normal kernels run on SMs (DeepEP README's prefill example: Buffer.set_num_sms(24), of H800's 132): while they
# overlap compute, that compute has 108/132 of the GPU. Low-latency kernels use none (profile-data README: "unlike
# in prefilling, the all-to-all communication during decoding does not occupy GPU SMs").
NORMAL_KERNEL_SM_SHARE = 24 / 132


def deepep_gbps(table: dict[int, tuple[float, float]], ep: int) -> tuple[float, float]:
    """DeepEP's reported (dispatch, combine) GB/s at `ep`, log-linear between its EP sizes, held beyond them."""
    xs = np.log2(sorted(table))
    return tuple(float(np.interp(math.log2(ep), xs, [table[k][i] for k in sorted(table)])) for i in (0, 1))


@dataclass
class ExpertCurve:
    """Measured routed-expert seconds of one MoE layer on one GPU of an EP pool against the tokens per GPU (the
    fastest backend at each token count and rank, the mean over ranks), log-linear between them; not used outside
    them (`inside`)."""

    tokens: list[float]
    seconds: list[float]
    label: str

    def inside(self, t: float) -> bool:
        return self.tokens[0] * (1 - 1e-9) <= t <= self.tokens[-1] * (1 + 1e-9)

    def __call__(self, t: float) -> float:
        return float(np.interp(math.log(max(t, 1e-9)), np.log(self.tokens), self.seconds))


def measured_experts(runs, hardware_id: str, model: str, ep: int, dtype: str) -> ExpertCurve | None:
    """The routed-expert time of `model`'s EP slices at `ep` on this device in `dtype`, from the runs' usable decode
    and prefill points with `ep` and `expert_ms` under the model's own routing (parts/model_points._expert_time);
    tokens per GPU: the batch (decode) or batch × prompt length (prefill). None when no run has them. A slice holds
    E/ep experts; a pool with redundant experts holds (E+R)/ep, the same pairs spread over more copies: the slice's
    time is taken as the pool's (an assumption the label's `EP slices` names)."""
    best: dict[tuple[float, int], tuple[float, str, str]] = {}  # (tokens, rank) -> the fastest (s, run, backend)
    for r in runs:
        if r.hardware_id != hardware_id:
            continue
        for p in r.points:
            if (p.get("kind") not in ("decode", "prefill") or p.get("model") != model or p.get("ep") != ep
                    or p.get("dtype") != dtype or p.get("routing", "router") != "router" or not usable(p)
                    or not isinstance(p.get("expert_ms"), (int, float)) or not p["expert_ms"] > 0):
                continue
            cell = (float(p["batch"] * (p["prompt_len"] if p["kind"] == "prefill" else 1)), p.get("ep_rank", 0))
            if cell not in best or p["expert_ms"] * 1e-3 < best[cell][0]:
                best[cell] = (p["expert_ms"] * 1e-3, r.run_id, p.get("backend") or "?")
    if not best:
        return None
    ts = sorted({t for t, _ in best})
    # the balanced step (PoolStep applies the imbalance): the mean over the ranks measured at a token count
    secs = [float(np.mean([v[0] for (t, _), v in best.items() if t == x])) for x in ts]
    runs_ = sorted({v[1] for v in best.values()})
    backends = sorted({v[2] for v in best.values()})
    ranks = len({rank for _, rank in best})
    return ExpertCurve(ts, secs, f"measured (run {', '.join(runs_)}, EP slices ep {ep}, {ranks} rank(s), "
                                 f"{'/'.join(backends)}, {len(ts)} token counts {ts[0]:g}-{ts[-1]:g})")


@dataclass
class PoolStep:
    """The step model of one pool kind (`kind`: prefill | decode | mixed) on one GPU type."""

    m: ModelConfig
    hw: Hardware
    dtype: str
    kv_dtype: str
    ep: int
    group: int = 1  # GPUs per attention group
    redundant: int = 0
    imbalance: float = 1.0
    overlap: bool = True
    kind: str = "decode"
    mtp_drafts: int = 0
    dispatch_bytes: float = 1.0
    combine_bytes: float = 2.0
    eff: Efficiency = field(default_factory=Efficiency)
    notes: list[str] = field(default_factory=list)
    alltoall: tuple[CollectiveCurve, str] | None = None  # a run's measured all-to-all at world size ep, and its label
    cache_load_gbps: float | None = None  # GB/s per node that cache-hit KV is loaded at (None: the hits are in HBM)
    experts: ExpertCurve | None = None  # a run's measured routed-expert time at this ep (measured_experts)

    def __post_init__(self) -> None:
        m = self.m
        self.wb = dtype_bytes(self.dtype)
        self.kvb = m.kv_bytes_per_token(dtype_bytes(self.kv_dtype)) * m.kv_replication(self.group)
        peak = self.hw.peak(self.dtype)
        if peak is None:  # no fp8 tensor cores (A100, Ascend A2): weight-only 8-bit, bf16 matmuls
            peak = self.hw.peak("bf16")
            self.notes.append(f"{self.hw.id} has no {self.dtype} peak: {self.dtype} weights, bf16 compute")
        self.mm_peak = peak * self.eff.compute  # FLOP/s
        self.attn_peak = self.hw.peak("bf16") * self.eff.compute
        self.bw = self.hw.bandwidth_bytes_per_s * self.eff.memory
        ic = self.hw.interconnect
        self.scaleup = ic.per_direction_gbps if ic and ic.per_direction_gbps else PCIE_GBPS
        self.a2a_source = self._a2a_source()

    # ---- all-to-all ----
    def _a2a_source(self) -> str | None:
        if not self.m.moe or self.ep == 1:
            return None
        if self.alltoall:
            return self.alltoall[1]
        if self.ep <= GPUS_PER_NODE:
            return f"{DEEPEP_SOURCE}: intranode fraction of {self.hw.id}'s {self.scaleup:g} GB/s scale-up link"
        mode = "low-latency" if self.kind == "decode" else "normal"
        return f"{DEEPEP_SOURCE}: {mode} kernels at EP {self.ep}, {DEEPEP_NIC_GBPS:g} GB/s NIC per GPU"

    def alltoall_s(self, tokens: float) -> tuple[float, float]:
        """(dispatch, combine) seconds of one MoE layer for `tokens` tokens on this rank, balanced."""
        m, ep = self.m, self.ep
        if not m.moe or ep == 1:
            return 0.0, 0.0
        lat = ALLREDUCE_LATENCY_US * 1e-6
        d_bytes = m.alltoall_bytes(tokens, self.dispatch_bytes)
        c_bytes = m.alltoall_bytes(tokens, self.combine_bytes)
        if self.alltoall:  # measured: what one rank sends, read off the run's curve
            return self.alltoall[0](d_bytes) * 1e-3, self.alltoall[0](c_bytes) * 1e-3
        if ep <= GPUS_PER_NODE:  # NVLink only: the copies that leave the GPU
            off = (ep - 1) / ep
            fd, fc = DEEPEP_INTRANODE_FRACTION
            return (lat + d_bytes * off / (self.scaleup * fd * 1e9), lat + c_bytes * off / (self.scaleup * fc * 1e9))
        scale = INTERNODE_GBPS / DEEPEP_NIC_GBPS
        if self.kind == "decode":  # low-latency kernels: every copy over RDMA (DeepEP counts them all)
            bd, bc = deepep_gbps(DEEPEP_LOW_LATENCY_GBPS, ep)
            return lat + d_bytes / (bd * scale * 1e9), lat + c_bytes / (bc * scale * 1e9)
        # normal kernels: one copy per remote node over RDMA (forwarded over NVLink inside it)
        nodes = math.ceil(ep / GPUS_PER_NODE)
        k = m.moe.experts_per_token
        remote = nodes * (1 - (1 - 1 / nodes) ** k) * (nodes - 1) / nodes / k  # share of the k copies' bytes
        bd, bc = deepep_gbps(DEEPEP_NORMAL_GBPS, ep)
        return lat + d_bytes * remote / (bd * scale * 1e9), lat + c_bytes * remote / (bc * scale * 1e9)

    def cache_load_s(self, cached_tokens: float) -> float:
        """Seconds to bring `cached_tokens` cache hits' KV onto this GPU over its share of the node's storage link
        (`cache_load_gbps` per node over GPUS_PER_NODE GPUs); 0 where the hits are in HBM."""
        if not self.cache_load_gbps:
            return 0.0
        return cached_tokens * self.kvb / (self.cache_load_gbps * 1e9 / GPUS_PER_NODE)

    # ---- one forward ----
    def _t(self, flops: float, nbytes: float, peak: float) -> float:
        return max(flops / peak, nbytes / self.bw)

    def step(self, dec_seqs: float, dec_ctx: float, pre_tokens: float = 0.0, pre_seqs: float = 0.0,
             pre_ctx: float = 0.0, pre_kv_tokens: float = 0.0, pre_cached: float = 0.0) -> dict:
        """One forward on one GPU: `dec_seqs` decoding sequences at context `dec_ctx` (each with 1 + MTP draft
        tokens, absorbed MLA) plus `pre_tokens` prefill tokens from `pre_seqs` prompts (attention at mean context
        `pre_ctx`, reading `pre_kv_tokens` cached+new tokens per prompt, `pre_cached` of them cache hits loaded
        over the storage link where `cache_load_gbps` is set). Returns the parts and the step."""
        m, g = self.m, self.group
        L, H = m.num_layers, m.hidden_size
        d = self.mtp_drafts
        dec_tokens = dec_seqs * (1 + d)
        T = dec_tokens + pre_tokens
        reads = 2 if self.overlap else 1  # two micro-batches: each reads every weight
        mtp_l = (L + d) / L if dec_seqs else 1.0  # the MTP module: one more layer per draft (DeepSeek-V3)
        attn_w = L * (m.attention_params() + 2 * H)
        kv = (dec_seqs * dec_ctx + pre_seqs * pre_kv_tokens) * self.kvb
        attn_f = 2 * T * attn_w + dec_tokens * m.attention_flops(dec_ctx, absorbed=True) \
            + pre_tokens * m.attention_flops(pre_ctx)
        attn_mm = self._t(2 * T * attn_w, reads * attn_w / g * self.wb, self.mm_peak)
        attn_core = self._t(attn_f - 2 * T * attn_w, kv, self.attn_peak)
        attn = (attn_mm + attn_core) * mtp_l
        parts = {"attention_s": attn, "kv_bytes": kv, "flops": attn_f * mtp_l}
        dense = moe = 0.0
        n_dense = m.moe.dense_layers if m.moe else L
        if n_dense:
            w = n_dense * m.dense_mlp_params
            dense = self._t(2 * T * w, reads * w * self.wb, self.mm_peak)
            parts["flops"] += 2 * T * w
        disp = comb = 0.0
        if m.moe:
            nl, ep_p = m.num_moe_layers, m.expert_params
            k, shared = m.moe.experts_per_token, m.moe.shared_experts
            other_w = nl * (shared * ep_p + m.router_params())
            routed_f = 2 * T * k * nl * ep_p
            # each micro-batch touches experts with half the tokens
            routed_b = reads * m.ep_expert_bytes_read(T / reads, self.ep, self.redundant, self.wb)
            if self.experts is not None and self.experts.inside(T / reads):  # measured, each micro-batch its own
                moe = self._t(2 * T * other_w, reads * other_w * self.wb, self.mm_peak) \
                    + reads * nl * self.experts(T / reads)
                parts["experts_source"] = self.experts.label
            else:
                moe = self._t(2 * T * other_w + routed_f, reads * other_w * self.wb + routed_b, self.mm_peak)
            mtp_moe = (nl + d) / nl if dec_seqs else 1.0  # the MTP module's MoE layer, once per draft
            moe *= mtp_moe
            parts["flops"] += (2 * T * other_w + routed_f) * mtp_moe
            parts["expert_bytes"] = routed_b
            disp, comb = self.alltoall_s(T)
        head_w = m.lm_head_params + H
        logits = dec_tokens + dec_seqs * d + pre_seqs
        head = self._t(2 * logits * head_w, reads * head_w * self.wb, self.mm_peak)
        ar = 0.0
        if g > 1:  # attention's TP all-reduce inside its group, one per layer over the scale-up link
            msg = T * g * H * ACT_BYTES
            ar = L * (ALLREDUCE_LATENCY_US * 1e-6 + 2 * (g - 1) / g * msg / (self.scaleup * 1e9))
        nl = m.num_moe_layers + (d if dec_seqs else 0)
        comm = nl * (disp + comb)
        compute = attn + dense + moe + head
        if self.overlap and m.moe:
            slow = 1 / (1 - NORMAL_KERNEL_SM_SHARE) if self.kind != "decode" and self.ep > 1 else 1.0
            per_attn = attn / (L + (d if dec_seqs else 0)) * slow
            per_moe = moe / nl * slow
            moe_part = nl * (max(per_attn, disp) + max(per_moe, comb))
            step = (attn - nl * per_attn / slow) + dense + head + moe_part
        else:
            step = compute + comm
        balanced = step + ar
        load = self.cache_load_s(pre_seqs * pre_cached)
        step = max(balanced * self.imbalance, load) + self.eff.overhead_ms * 1e-3
        parts.update(dense_s=dense, moe_s=moe, head_s=head, dispatch_s=nl * disp, combine_s=nl * comb,
                     alltoall_s=comm, allreduce_s=ar, compute_s=compute, hidden_s=compute + comm + ar - balanced,
                     imbalance_s=balanced * (self.imbalance - 1), overhead_s=self.eff.overhead_ms * 1e-3,
                     expert_read_s=parts.get("expert_bytes", 0.0) / self.bw, kv_read_s=kv / self.bw,
                     cache_load_s=load, step_s=step, tokens=T)
        return parts

    # ---- memory ----
    def weight_bytes_per_gpu(self) -> float:
        m = self.m
        w = m.ep_weight_bytes_per_gpu(self.ep, self.redundant, self.wb) if m.moe else m.weight_bytes(self.wb)
        return w - m.num_layers * m.attention_params() * (1 - 1 / self.group) * self.wb


def emitted_per_step(drafts: int, acceptance: float) -> float:
    """Tokens a sequence gains per step with `drafts` MTP draft tokens each accepted with `acceptance` given the one
    before: 1 + a + a² + … + a^d."""
    return 1 + sum(acceptance ** i for i in range(1, drafts + 1))
