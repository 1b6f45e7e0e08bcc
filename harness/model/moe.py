"""The parts of the MoE families (`qwen3_moe`, `deepseek_v3`) that dense layers lack: routers, the routed expert
layer, and DeepSeek's multi-head latent attention (MLA), as plain functions of tensors, one per backend flavour
(`tokenfleet.model.backends` picks them per backend; `tokenfleet.model.decoder` calls them in a layer).

Routers (transformers' Qwen3MoeTopKRouter and DeepseekV3TopkRouter):
- `route_softmax`: softmax over the router logits, top-k, renormalised when norm_topk_prob (Qwen3-MoE).
- `route_sigmoid`: sigmoid scores; the choice adds e_score_correction_bias and is group-limited (groups ranked by the
  sum of their top-2 choice scores, the top `topk_group` kept); the weights are the chosen sigmoid scores,
  renormalised, times routed_scaling_factor (DeepSeek-V3).
Both take `skew`, a per-expert bias added to the choice scores only (`routing_skew`: routing as a measured
condition; None: the router's own choice, which random weights make nearly uniform).

Expert layers, x [T, D], w13 [E, 2·I, D] (gate rows, then up), w2 [E, D, I], ids/weights [T, k] -> [T, D]:
- `experts_reference`: fp32 math, one expert at a time: the oracle.
- `experts_loop`: transformers' `eager` experts: one F.linear pair per expert the batch touches (a host sync).
- `experts_grouped_mm`: transformers' default `grouped_mm` experts: the (token, expert) pairs sorted by expert and
  two torch._grouped_mm calls over the per-expert offsets; static shapes, no host sync.
- `experts_gathered`: gpt-fast's Mixtral form: each token's k experts' weights gathered and multiplied; static
  shapes. The `compile` backend's form where torch.compile cannot trace _grouped_mm (it takes bf16 only).
- `experts_triton`: the fused MoE Triton kernel (`tokenfleet.kernels.moe`), the `triton` backend's.
A backend picks one per model when it is built (`backends.Ops.experts`, `torch_experts`), never inside a trace.

MLA (transformers' DeepseekV3Attention): the cache holds per token the normed latent (kv_lora_rank) and the
roped shared key (qk_rope_head_dim), FlashMLA's 512 + 64 layout, as one [B, 1, S, r + rope] tensor whose first r
channels are also the values. Decode runs the absorbed form (`mla_decode_*`): q_nope through the key up-projection
into the latent space, attention over the latent cache as one shared KV head, the output through the value
up-projection. Prefill runs as ordinary attention after up-projecting keys and values (`mla_prefill_*`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F


@dataclass
class MoEWeights:
    """One MoE MLP: router, routed experts (transformers' fused 3-D layout) and the shared experts (DeepSeek)."""

    router: torch.Tensor  # [E, D]; fp32 for DeepSeek-V3 (as transformers keeps it)
    score_bias: torch.Tensor | None  # [E] fp32: DeepSeek-V3's e_score_correction_bias
    w13: torch.Tensor  # [E, 2·I, D]: gate rows, then up rows
    w2: torch.Tensor  # [E, D, I]
    shared_w13: torch.Tensor | None = None  # [2·Is, D], Is = moe_intermediate_size · shared_experts
    shared_w2: torch.Tensor | None = None  # [D, Is]
    # e4m3 routed experts (`tokenfleet.model.fp8.quantize`): w13 / w2 in e4m3 with DeepSeek-V3's 128x128 block scales
    w13_scale: torch.Tensor | None = None  # [E, ceil(2·I/128), ceil(D/128)] fp32
    w2_scale: torch.Tensor | None = None  # [E, ceil(D/128), ceil(I/128)] fp32
    # an expert-parallel slice (`slice_experts`): w13 / w2 hold E/p experts; expert_map [E] int32, the local id of
    # each global expert or -1 (vLLM's expert_map)
    expert_map: torch.Tensor | None = None
    skew: torch.Tensor | None = None  # [E] this layer's routing skew (a replayed routing: `replay.replay_skew`)

    @property
    def kernel_form(self) -> bool:
        """Experts that only the kernels' form takes (`kernel_experts`): e4m3 with block scales, or an EP slice."""
        return self.w13_scale is not None or self.expert_map is not None


@dataclass
class MLAWeights:
    """One MLA attention (its output projection is the layer's `wo`)."""

    wa: torch.Tensor  # [Q + r + rope, D]: q_a_proj (Q = q_lora_rank) or q_proj (Q = H·(nope+rope)), then kv_a
    q_norm: torch.Tensor | None  # [q_lora_rank] (q_a_layernorm); None without q_lora_rank
    wq_b: torch.Tensor | None  # [H·(nope+rope), q_lora_rank]
    kv_norm: torch.Tensor  # [r] (kv_a_layernorm)
    wkv_b: torch.Tensor  # [H·(nope+v), r]: per head, nope key rows then value rows


# --- routers ----------------------------------------------------------------------------------------------------


def route_softmax(logits: torch.Tensor, k: int, norm: bool, skew: torch.Tensor | None = None):
    """logits [T, E] -> (weights [T, k] fp32, ids [T, k] int64): softmax, top-k, renormalised when `norm`."""
    probs = torch.softmax(logits.float(), dim=-1)
    if skew is None:
        weights, ids = torch.topk(probs, k, dim=-1)
    else:
        ids = torch.topk(logits.float() + skew, k, dim=-1).indices
        weights = probs.gather(1, ids)
    if norm:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, ids


def route_sigmoid(logits: torch.Tensor, k: int, norm: bool, bias: torch.Tensor | None, n_group: int,
                  topk_group: int, scale: float, skew: torch.Tensor | None = None):
    """logits [T, E] (fp32) -> (weights [T, k] fp32, ids [T, k] int64): DeepSeek-V3's router (module docstring)."""
    scores = logits.float().sigmoid()
    choice = scores if bias is None else scores + bias
    if skew is not None:
        choice = choice + skew
    t, e = choice.shape
    if n_group > 1:
        groups = choice.view(t, n_group, e // n_group).topk(2, dim=-1).values.sum(-1)  # [T, G]
        keep = torch.zeros_like(groups).scatter_(1, groups.topk(topk_group, dim=-1).indices, 1.0)  # [T, G]
        keep = keep[:, :, None].expand(t, n_group, e // n_group).reshape(t, e)
        choice = choice.masked_fill(keep == 0, float("-inf"))
    ids = torch.topk(choice, k, dim=-1).indices
    weights = scores.gather(1, ids)
    if norm:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * scale, ids


def routing_skew(num_experts: int, zipf: float, seed: int, device) -> torch.Tensor:
    """The `zipf` routing condition: a bias -zipf·ln(rank) on each expert's choice score, the ranks a seeded random
    permutation of the experts (so the popular experts are not the first ones). With router scores small beside it
    the chosen experts follow a Zipf law of exponent `zipf`; what a point ran is its measured tokens per expert."""
    gen = torch.Generator().manual_seed(seed)
    rank = torch.randperm(num_experts, generator=gen).float() + 1.0
    return (-zipf * rank.log()).to(device)


# --- expert layers ----------------------------------------------------------------------------------------------


def _swiglu(gu: torch.Tensor) -> torch.Tensor:
    i = gu.shape[-1] // 2
    return F.silu(gu[..., :i]) * gu[..., i:]


def experts_reference(x, w13, w2, ids, weights):
    """fp32 math, one expert at a time (the oracle; a host sync per expert)."""
    xf, out = x.float(), torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in ids.unique().tolist():
        tok, slot = (ids == e).nonzero(as_tuple=True)
        h = _swiglu(xf[tok] @ w13[e].float().T) @ w2[e].float().T
        out.index_add_(0, tok, h * weights[tok, slot, None].float())
    return out.to(x.dtype)


def experts_loop(x, w13, w2, ids, weights):
    """transformers' eager experts: one gate/up and one down F.linear per expert the batch touches, in x.dtype."""
    out = torch.zeros_like(x)
    for e in ids.unique().tolist():
        tok, slot = (ids == e).nonzero(as_tuple=True)
        h = F.linear(_swiglu(F.linear(x[tok], w13[e])), w2[e])
        out.index_add_(0, tok, h * weights[tok, slot, None].to(x.dtype))
    return out


def _grouped(x, w, offs):
    mm = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm
    return mm(x, w.transpose(1, 2), offs=offs)


def experts_grouped_mm(x, w13, w2, ids, weights):
    """transformers' grouped_mm experts: pairs sorted by expert, offsets from per-expert counts, two grouped GEMMs,
    each pair's output weighted and the k outputs of a token summed. Static shapes, no host sync."""
    t, k = ids.shape
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)  # [T·k]
    counts = torch.zeros(w13.shape[0], dtype=torch.int32, device=x.device).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    h = _grouped(_swiglu(_grouped(x[order // k], w13, offs)), w2, offs)  # [T·k, D], sorted by expert
    h = h * weights.reshape(-1)[order, None].to(h.dtype)
    return torch.empty_like(h).index_copy_(0, order, h).view(t, k, -1).sum(1)


def experts_gathered(x, w13, w2, ids, weights):
    """gpt-fast's Mixtral experts: the k experts' weights gathered per token, [T, k, ...], then two batched products."""
    h = _swiglu(torch.einsum("td,tkod->tko", x, w13[ids]))  # [T, k, I]
    h = torch.einsum("tki,tkdi->tkd", h, w2[ids])  # [T, k, D]
    return (h * weights[..., None].to(h.dtype)).sum(1)


@functools.cache
def grouped_mm_runs(dtype: torch.dtype, device: torch.device, compiled: bool = False, widths: tuple = ()) -> bool:
    """Whether torch's grouped GEMM takes this dtype on this device (eager: any on the CPU, bf16 on a GPU of sm80+,
    as transformers' `_can_use_grouped_mm` decides; under torch.compile bf16 only) and rows of these `widths`
    (elements; torch requires strides of multiples of 16 bytes)."""
    if not hasattr(torch, "_grouped_mm") or (compiled and dtype != torch.bfloat16):
        return False
    if any(w * dtype.itemsize % 16 for w in widths):
        return False
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (8, 0)
    return True


def _widths(w13: torch.Tensor, w2: torch.Tensor) -> tuple:
    return (*w13.shape[1:], *w2.shape[1:])


def experts_torch(x, w13, w2, ids, weights):
    """The `torch` backend's experts: transformers' default (grouped_mm) where torch runs it, else its eager loop."""
    return torch_experts(x.dtype, x.device, _widths(w13, w2))(x, w13, w2, ids, weights)


def torch_experts(dtype: torch.dtype, device: torch.device, widths: tuple, compiled: bool = False):
    """The expert layer the `torch` backend runs for this dtype, device and weight widths (grouped_mm where torch
    takes them, else transformers' eager loop); `compiled`: the `compile` backend's (grouped_mm in bf16, else the
    gathered form, the one torch.compile traces). Chosen when a model is built, outside any trace."""
    if grouped_mm_runs(dtype, device, compiled, widths):
        return experts_grouped_mm
    return experts_gathered if compiled else experts_loop


def experts_triton(x, w13, w2, ids, weights):
    """The `triton` backend's experts: the fused MoE Triton kernel (`tokenfleet.kernels.moe.moe`, same layout)."""
    from tokenfleet.kernels.moe import moe

    return moe(x, ids, weights, w13, w2)


def slice_experts(mw: MoEWeights, ep: int, rank: int) -> MoEWeights:
    """One GPU's slice of an expert-parallel pool of `ep` GPUs (rank `rank`): experts [rank·E/ep, (rank+1)·E/ep) held
    (copies: the full set can be freed), vLLM's expert_map from the global ids to them; router and shared experts
    whole (every rank holds them)."""
    e = mw.w13.shape[0] if mw.expert_map is None else mw.expert_map.numel()
    if mw.expert_map is not None or e % ep or not 0 <= rank < ep:
        raise ValueError(f"ep {ep} must divide {e} experts (not yet sliced), 0 <= rank {rank} < ep")
    held, lo = e // ep, rank * (e // ep)
    emap = torch.full((e,), -1, dtype=torch.int32, device=mw.w13.device)
    emap[lo:lo + held] = torch.arange(held, dtype=torch.int32, device=mw.w13.device)

    def cut(t):
        return None if t is None else t[lo:lo + held].clone()

    return replace(mw, w13=cut(mw.w13), w2=cut(mw.w2), w13_scale=cut(mw.w13_scale), w2_scale=cut(mw.w2_scale),
                   expert_map=emap)


def ep_degree(mw: MoEWeights) -> int:
    """The expert-parallel degree of a (sliced) MoE layer: global experts / experts held (1: not sliced)."""
    return 1 if mw.expert_map is None else mw.expert_map.numel() // mw.w13.shape[0]


def pool_tokens(y: torch.Tensor, ep: int) -> torch.Tensor:
    """The tokens an EP slice's MoE layer routes: this GPU's y [T, D] first, then stand-ins for the other ep-1
    GPUs' tokens (their dispatch brings the pairs routed to this GPU's experts): y's channels rotated by j·D/ep for
    GPU j, the same statistics, routed independently by the router (a random projection) -> [ep·T, D]. Static
    shapes, no host sync."""
    d = y.shape[1]
    return torch.cat([y] + [y.roll(j * d // ep, dims=1) for j in range(1, ep)])


def kernel_experts(backend: str, fp8: bool, dtype: torch.dtype, device: torch.device, widths: tuple):
    """The expert layer of e4m3 experts (128x128 block scales) or of an EP slice (`MoEWeights.kernel_form`), in the
    kernels' form (hidden, ids, weights, w13, w2, w13_scale, w2_scale, expert_map) -> [T, D]: `tokenfleet.kernels.moe`
    has every backend's. triton: the fused kernel; reference: its fp32 definition (x and h quantized as the kernel
    does); torch: transformers' grouped_mm experts (bf16 slice, non-local slots sorted past the offsets), else its
    eager loop (e4m3: torch._scaled_mm with block scales per expert, CUDA sm90+: torch has no block-scaled grouped
    GEMM). Not built under torch.compile (`compile`): the loop's host sync breaks its graph, and Inductor's grouped
    GEMM takes bf16 only."""
    from tokenfleet.kernels import moe as K

    if backend == "triton":
        return K.moe
    if backend == "reference":
        return K.moe_ref
    if backend == "torch":
        return K.moe_baseline if not fp8 and grouped_mm_runs(dtype, device, False, widths) else K.moe_loop
    raise ValueError(f"{backend}: e4m3 experts and expert-parallel slices are built on the triton, torch and "
                     f"reference backends only")


def run_kernel_experts(fn, x: torch.Tensor, mw: MoEWeights, ids: torch.Tensor, weights: torch.Tensor):
    """`fn` (from `kernel_experts`) on x [T, D]; e4m3 experts take bf16 activations (as served: the kernel quantizes
    them per token per 128 channels), so x of another dtype goes in as bf16 and the output comes back in x.dtype."""
    xin = x.to(torch.bfloat16) if mw.w13_scale is not None else x
    out = fn(xin, ids, weights, mw.w13, mw.w2, mw.w13_scale, mw.w2_scale, mw.expert_map)
    return out.to(x.dtype)


def experts_impl(fn) -> str:
    """In words, what an expert layer runs (a point's note)."""
    from tokenfleet.kernels import moe as K

    return {experts_reference: "fp32 per-expert loop", experts_loop: "per-expert F.linear loop (transformers' eager)",
            experts_grouped_mm: "torch._grouped_mm (transformers' grouped_mm)",
            experts_gathered: "gathered expert weights (gpt-fast's form)",
            experts_triton: "fused Triton MoE kernel (kernels/moe.py)",
            K.moe: "fused Triton MoE kernel (kernels/moe.py)", K.moe_ref: "fp32 per-expert definition (kernels/moe.py)",
            K.moe_baseline: "torch._grouped_mm (transformers' grouped_mm)",
            K.moe_loop: "per-expert loop (transformers' eager; e4m3: torch._scaled_mm with block scales)",
            }.get(fn, getattr(fn, "__name__", str(fn)))


# --- MLA attention ----------------------------------------------------------------------------------------------


def _absorbed_query(q_nope, q_rope, wkv_b, nope: int):
    # q_nope [B, H, nope], wkv_b [H·(nope+v), r] -> [B, H, r + rope]: the query in the latent space
    h = q_nope.shape[1]
    w_uk = wkv_b.view(h, -1, wkv_b.shape[1])[:, :nope]  # [H, nope, r]
    return torch.cat([torch.einsum("bhn,hnr->bhr", q_nope, w_uk), q_rope], -1)


def _value_up(o_lat, wkv_b, nope: int):
    # o_lat [B, H, r] -> [B, H, v] through the value up-projection
    h = o_lat.shape[1]
    w_uv = wkv_b.view(h, -1, wkv_b.shape[1])[:, nope:]  # [H, v, r]
    return torch.einsum("bhr,hvr->bhv", o_lat, w_uv)


def mla_decode_torch(q_nope, q_rope, kv_cache, context_lens, wkv_b, scale: float):
    """Absorbed MLA decode in the input dtype: q_nope [B, H, nope], q_rope [B, H, rope], kv_cache [B, 1, S, r+rope]
    (this layer's), context_lens [B], wkv_b [H·(nope+v), r] -> [B, H, v]. The heads are the query rows of one shared
    KV head (SDPA with a length mask)."""
    r = wkv_b.shape[1]
    q = _absorbed_query(q_nope, q_rope, wkv_b, q_nope.shape[-1])  # [B, H, r+rope]
    mask = torch.arange(kv_cache.shape[2], device=q.device)[None, :] < context_lens[:, None]  # [B, S]
    o = F.scaled_dot_product_attention(q[:, None], kv_cache, kv_cache[..., :r], attn_mask=mask[:, None, None, :],
                                       scale=scale)[:, 0]  # [B, H, r]
    return _value_up(o, wkv_b, q_nope.shape[-1])


def mla_decode_reference(q_nope, q_rope, kv_cache, context_lens, wkv_b, scale: float):
    """`mla_decode_torch` in fp32 math with an explicit softmax."""
    dt, r = q_nope.dtype, wkv_b.shape[1]
    w = wkv_b.float()
    q = _absorbed_query(q_nope.float(), q_rope.float(), w, q_nope.shape[-1])
    kv = kv_cache[:, 0].float()  # [B, S, r+rope]
    s = torch.einsum("bhc,bsc->bhs", q, kv) * scale
    valid = torch.arange(kv.shape[1], device=q.device)[None, :] < context_lens[:, None]
    p = torch.softmax(s.masked_fill(~valid[:, None, :], float("-inf")), -1)
    return _value_up(torch.einsum("bhs,bsr->bhr", p, kv[..., :r]), w, q_nope.shape[-1]).to(dt)


def mla_prefill_torch(q, k, v, scale: float):
    """Causal attention, q/k [B, H, S, nope+rope], v [B, H, S, v] (keys and values up-projected) -> [B, H, S, v]."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


def mla_prefill_reference(q, k, v, scale: float):
    s = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) * scale
    n = s.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    return torch.einsum("bhqk,bhkd->bhqd", torch.softmax(s.masked_fill(~causal, float("-inf")), -1),
                        v.float()).to(q.dtype)


def mla_scale(qk_head_dim: int) -> float:
    """The softmax scale 1/sqrt(nope + rope) (transformers' DeepseekV3Attention without yarn's mscale)."""
    return 1.0 / math.sqrt(qk_head_dim)
