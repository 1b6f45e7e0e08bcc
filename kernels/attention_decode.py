"""Decode attention over a KV cache, split-KV ("flash-decoding").

q [B, Hq, D] is one new token per sequence; k_cache/v_cache [B, Hkv, S_max, D]; sequence b attends to
cache positions [0, context_lens[b]). With one query row per head, a kernel with one program per
(sequence, head) would leave most SMs idle at small batch and long context, so:

1. `_attention_decode_kernel`, grid (B * Hkv, NUM_SPLITS): each program takes one CHUNK of one sequence's
   context for one kv head and all GROUP = Hq / Hkv query heads that share it (K/V read once per kv head,
   and the grouped query rows make a [GROUP, BLOCK_N] tensor-core dot). It writes the partial softmax
   state: running max m, sum l and unnormalized accumulator acc (fp32). Chunks past the sequence's
   length exit at once, so a ragged batch costs what its tokens cost.
2. `_attention_decode_reduce_kernel`, grid (B * Hq,): rescales the partials to a common max and divides.

The grid depends only on shapes (never on context_lens values), so the op needs no host sync and can be
captured in a CUDA graph.

FP8 KV cache: k_cache/v_cache may be e4m3 (half the bytes of bf16, and decode attention is all cache reads) with
fp32 scales per tensor (scalar) or per kv head ([Hkv]). Tiles are upcast to q's dtype after the load; k's scale
folds into the softmax scale and v's into the output (both constant over a head's positions), so the loop does
no extra multiplies.
"""

import math

import torch
import torch.nn.functional as F
from tokenfleet.kernels._triton import (
    INTERPRET,
    check_float,
    check_out,
    num_sms,
    pin_config,
    row_settings,
    smem_bytes,
    tl,
    triton,
)
from tokenfleet.kernels.attention_prefill import _check_head_dim

_LOG2E = 1.4426950408889634
FP8 = torch.float8_e4m3fn  # the FP8 KV cache's element type
_CHUNK_ALIGN = 16 if INTERPRET else 128  # CHUNK is a multiple of every BLOCK_N in the space
_MIN_CHUNK = 16 if INTERPRET else 256  # below this a program spends more on its partial than on K/V
_MAX_SPLITS = 64  # bounds the reduce kernel's [splits, D] tile


def _decode_configs(interpret: bool = INTERPRET) -> list:
    if interpret:
        return [triton.Config({"BLOCK_N": 16}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
        # (32, 4, 2) is the fallback that fits shared memory for fp32 with D = 256.
        for bn, w, s in [(32, 4, 2), (32, 4, 4), (64, 4, 3), (64, 4, 4), (64, 8, 3), (128, 4, 3), (128, 8, 3)]
    ]


def _prune_configs(configs, named_args, **kwargs):
    # Shared memory: num_stages - 1 buffered K and V tiles (sm90 compiles measured), the q tile aside.
    k = named_args["k_ptr"]
    limit = smem_bytes(k.device) - 32 * 1024
    fits = [c for c in configs
            if (c.num_stages - 1) * 2 * c.kwargs["BLOCK_N"] * kwargs["HEAD_D"] * k.element_size() <= limit]
    return fits or configs[:1]


@triton.autotune(
    configs=_decode_configs(),
    key=["CHUNK", "HEAD_D", "BLOCK_G"],
    prune_configs_by=None if INTERPRET else {"early_config_prune": _prune_configs},
)
@triton.jit
def _attention_decode_kernel(
    q_ptr, k_ptr, v_ptr, lens_ptr, m_ptr, l_ptr, acc_ptr, ks_ptr, vs_ptr,
    Hkv, GROUP, S_MAX, CHUNK, NUM_SPLITS, qk_scale, stride_sc,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    HEAD_D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, KV_FP8: tl.constexpr,
):
    pid_bh = tl.program_id(axis=0)
    split = tl.program_id(axis=1)
    b = (pid_bh // Hkv).to(tl.int64)
    kvh = (pid_bh % Hkv).to(tl.int64)
    # Clamp so a bad length can never read past the cache.
    ctx = tl.minimum(tl.load(lens_ptr + b).to(tl.int32), S_MAX)
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, ctx)
    if start < end:
        offs_g = tl.arange(0, BLOCK_G)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_D)
        g_mask = offs_g < GROUP
        heads = kvh * GROUP + offs_g  # query heads served by this kv head
        # Rows past GROUP load zeros (BLOCK_G >= 16 is the tensor-core minimum); they are never stored.
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=g_mask[:, None], other=0.0)
        k_ptrs = k_ptr + b * stride_kb + kvh * stride_kh + offs_n[None, :] * stride_ks + offs_d[:, None]
        v_ptrs = v_ptr + b * stride_vb + kvh * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :]

        if KV_FP8:  # dequantization scales of this kv head (stride_sc 0: one per tensor)
            k_sc = tl.load(ks_ptr + kvh * stride_sc)
            v_sc = tl.load(vs_ptr + kvh * stride_sc)
        else:
            k_sc = 1.0
            v_sc = 1.0
        m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_G, HEAD_D], dtype=tl.float32)
        # Every block holds at least one valid key, so m_i is finite after the first iteration.
        for start_n in range(start, end, BLOCK_N):
            cols = start_n + offs_n
            kv_mask = cols < end
            k = tl.load(k_ptrs + start_n * stride_ks, mask=kv_mask[None, :], other=0.0)  # k^T [D, BLOCK_N]
            qk = tl.dot(q, k.to(q.dtype)) * (qk_scale * k_sc)  # log2 domain
            qk = tl.where(kv_mask[None, :], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, axis=1))
            p = tl.exp2(qk - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_ptrs + start_n * stride_vs, mask=kv_mask[:, None], other=0.0).to(q.dtype)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
            m_i = m_new

        # Workspace: m, l [B, Hq, NUM_SPLITS]; acc [B, Hq, NUM_SPLITS, D] (contiguous, fp32).
        row = (b * Hkv * GROUP + heads) * NUM_SPLITS + split  # [BLOCK_G]
        tl.store(m_ptr + row, m_i, mask=g_mask)
        tl.store(l_ptr + row, l_i, mask=g_mask)
        tl.store(acc_ptr + row[:, None] * HEAD_D + offs_d[None, :], acc * v_sc, mask=g_mask[:, None])


pin_config(_attention_decode_kernel, _decode_configs()[0])  # small-shape tests: the config that always fits

@triton.jit
def _attention_decode_reduce_kernel(
    m_ptr, l_ptr, acc_ptr, lens_ptr, o_ptr,
    Hq, S_MAX, CHUNK, NUM_SPLITS,
    stride_ob, stride_oh,
    HEAD_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid = tl.program_id(axis=0).to(tl.int64)  # = b * Hq + h, the workspace row
    b = pid // Hq
    h = pid % Hq
    ctx = tl.minimum(tl.load(lens_ptr + b).to(tl.int32), S_MAX)
    n_splits = tl.cdiv(ctx, CHUNK)  # only these splits wrote partials
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_D)
    s_mask = offs_s < n_splits
    m_s = tl.load(m_ptr + pid * NUM_SPLITS + offs_s, mask=s_mask, other=float("-inf"))
    l_s = tl.load(l_ptr + pid * NUM_SPLITS + offs_s, mask=s_mask, other=0.0)
    acc_s = tl.load(acc_ptr + (pid * NUM_SPLITS + offs_s)[:, None] * HEAD_D + offs_d[None, :],
                    mask=s_mask[:, None], other=0.0)
    m = tl.max(m_s, axis=0)
    w = tl.exp2(m_s - m)  # masked splits: exp2(-inf) = 0
    l_sum = tl.sum(w * l_s, axis=0)
    o = tl.sum(acc_s * w[:, None], axis=0) / l_sum
    tl.store(o_ptr + b * stride_ob + h * stride_oh + offs_d, o.to(o_ptr.dtype.element_ty))


def _pick_chunk(bsz: int, hkv: int, s_max: int, device: torch.device) -> int:
    """Context positions per split: ~4 programs per SM overall, aligned, at most _MAX_SPLITS splits."""
    want_splits = triton.cdiv(4 * num_sms(device), bsz * hkv)
    chunk = max(triton.cdiv(s_max, want_splits), _MIN_CHUNK, triton.cdiv(s_max, _MAX_SPLITS))
    return triton.cdiv(chunk, _CHUNK_ALIGN) * _CHUNK_ALIGN


def _check_kv_scales(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale, v_scale):
    """Cache dtype (q's, or e4m3 for both) and the fp8 scales: None, or fp32-able scalars / [Hkv] on q's device."""
    if k_cache.dtype != FP8:
        check_float("attention_decode", q, k_cache, v_cache)
        if k_scale is not None or v_scale is not None:
            raise ValueError("attention_decode: k_scale/v_scale apply to an e4m3 cache only")
        return None, None
    check_float("attention_decode", q)
    if v_cache.dtype != FP8:
        raise ValueError(f"attention_decode: k and v caches must share one dtype, got {FP8} and {v_cache.dtype}")
    hkv = k_cache.shape[1] if k_cache.dim() == 4 else 0
    out = []
    for name, sc in (("k_scale", k_scale), ("v_scale", v_scale)):
        if sc is None or sc.numel() not in (1, hkv) or sc.device != q.device:
            raise ValueError(f"attention_decode: an e4m3 cache needs {name} (a scalar or [{hkv}] per kv head) on "
                             f"{q.device}, got {None if sc is None else tuple(sc.shape)}")
        out.append(sc.reshape(-1).to(torch.float32).contiguous())
    if out[0].numel() != out[1].numel():
        raise ValueError("attention_decode: k_scale and v_scale must both be per tensor or both per head")
    return out[0], out[1]


def attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, context_lens: torch.Tensor,
                     k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None, *,
                     out: torch.Tensor | None = None, chunk_size: int | None = None) -> torch.Tensor:
    """One decode step of attention: q [B, Hq, D] over k_cache/v_cache [B, Hkv, S_max, D] -> o [B, Hq, D].

    context_lens [B] (int32; 1 <= len <= S_max, not checked on device to avoid a host sync; lengths above
    S_max are clamped, a length of 0 gives NaN rows). An e4m3 cache takes k_scale/v_scale (fp32, a scalar or
    [Hkv]): cached value = e4m3 value x scale. `chunk_size` forces the split size (a multiple of
    the block alignment; tests use it); by default it is derived from the shapes and the SM count.
    """
    k_sc, v_sc = _check_kv_scales(q, k_cache, v_cache, k_scale, v_scale)
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"attention_decode: need q [B, Hq, D], k/v cache [B, Hkv, S_max, D], got "
                         f"{tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    bsz, hq, d = q.shape
    _, hkv, s_max, _ = k_cache.shape
    if k_cache.shape[0] != bsz or k_cache.shape[3] != d:
        raise ValueError(f"attention_decode: cache {tuple(k_cache.shape)} does not match q {tuple(q.shape)}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"attention_decode: q heads {hq} must be a multiple of kv heads {hkv}")
    _check_head_dim("attention_decode", d)
    if (context_lens.shape != (bsz,) or context_lens.dtype not in (torch.int32, torch.int64)
            or context_lens.device != q.device):
        raise ValueError(f"attention_decode: context_lens must be int32 [{bsz}] on {q.device}, got "
                         f"{context_lens.dtype} {tuple(context_lens.shape)} on {context_lens.device}")
    if s_max == 0:
        raise ValueError("attention_decode: empty cache (S_max = 0)")
    check_out("attention_decode", out, q.shape, q.dtype, q.device)
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device) if out is None else out
    if o.numel() == 0:
        return o
    q, k_cache, v_cache = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k_cache, v_cache))
    context_lens = context_lens.contiguous()

    if chunk_size is None:
        chunk = _pick_chunk(bsz, hkv, s_max, q.device)
    elif chunk_size <= 0 or chunk_size % _CHUNK_ALIGN:
        raise ValueError(f"attention_decode: chunk_size must be a positive multiple of {_CHUNK_ALIGN}")
    else:
        chunk = chunk_size
    num_splits = triton.cdiv(s_max, chunk)
    group = hq // hkv
    ws = dict(dtype=torch.float32, device=q.device)
    m_ws = torch.empty((bsz, hq, num_splits), **ws)
    l_ws = torch.empty((bsz, hq, num_splits), **ws)
    acc_ws = torch.empty((bsz, hq, num_splits, d), **ws)

    fp8 = k_sc is not None
    _attention_decode_kernel[(bsz * hkv, num_splits)](
        q, k_cache, v_cache, context_lens, m_ws, l_ws, acc_ws, k_sc if fp8 else m_ws, v_sc if fp8 else m_ws,
        hkv, group, s_max, chunk, num_splits, _LOG2E / math.sqrt(d), 1 if fp8 and k_sc.numel() > 1 else 0,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        HEAD_D=d, BLOCK_G=max(16, triton.next_power_of_2(group)), KV_FP8=fp8,
    )
    block_s = triton.next_power_of_2(num_splits)
    _, reduce_warps = row_settings(block_s * d, "attention_decode")  # the [BLOCK_S, D] partials tile
    _attention_decode_reduce_kernel[(bsz * hq,)](
        m_ws, l_ws, acc_ws, context_lens, o,
        hq, s_max, chunk, num_splits,
        o.stride(0), o.stride(1),
        HEAD_D=d, BLOCK_S=block_s, num_warps=reduce_warps,
    )
    return o


def dequantize_kv(cache: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """cache [B, Hkv, S, D] (e4m3 when `scale` is given: a scalar or [Hkv]) -> values in `dtype`."""
    if scale is None:
        return cache.to(dtype)
    return cache.to(dtype) * scale.to(dtype).reshape(1, -1, 1, 1)


def attention_decode_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         context_lens: torch.Tensor, k_scale: torch.Tensor | None = None,
                         v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Explicit-math reference in >= fp32: masked scores over the whole (dequantized) cache, softmax, weighted sum."""
    compute = torch.promote_types(q.dtype, torch.float32)
    bsz, hq, d = q.shape
    hkv, s_max = k_cache.shape[1], k_cache.shape[2]
    qf = q.to(compute).reshape(bsz, hkv, hq // hkv, d)  # query heads grouped under their kv head
    k_cache, v_cache = dequantize_kv(k_cache, k_scale, compute), dequantize_kv(v_cache, v_scale, compute)
    scores = qf @ k_cache.transpose(-1, -2) / math.sqrt(d)  # [B, Hkv, G, S_max]
    valid = torch.arange(s_max, device=q.device)[None, :] < context_lens.to(q.device)[:, None]  # [B, S_max]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    p = torch.softmax(scores, dim=-1)
    return (p @ v_cache).reshape(bsz, hq, d).to(q.dtype)


def _context_lens(shape: dict) -> list[int] | None:
    ctx = shape.get("context")
    if ctx is None:
        return None
    if isinstance(ctx, int):
        return [ctx] * shape["batch"]
    ctx = [int(c) for c in ctx]
    if len(ctx) != shape["batch"]:
        raise ValueError(f"attention_decode: {len(ctx)} context lengths for batch {shape['batch']}")
    return ctx


def _total_context(shape: dict) -> int:
    lens = _context_lens(shape)
    if lens is None:
        raise ValueError("attention_decode: flops/bytes need shape['context'] (an int or per-sequence lengths)")
    return sum(lens)


def attention_decode_baseline(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              context_lens: torch.Tensor, k_scale: torch.Tensor | None = None,
                              v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The vendor path: F.scaled_dot_product_attention with a length mask, in the input dtype.

    The G = Hq/Hkv query heads that share a kv head go in as G query rows of that head ([B, Hkv, G, D] against
    [B, Hkv, S_max, D]): the same result as `enable_gqa=True`, which with a mask falls back to the math kernel on
    CUDA (K/V copied per query head, scores materialized; transformers' SDPA path avoids it for the same reason),
    while this stays on the fused kernels (memory-efficient / cuDNN on CUDA, flash on CPU). An e4m3 cache is
    dequantized to q's dtype first: torch has no attention that reads fp8 K/V, so a torch user pays that copy."""
    if k_scale is not None:
        k_cache, v_cache = dequantize_kv(k_cache, k_scale, q.dtype), dequantize_kv(v_cache, v_scale, q.dtype)
    b, hq, d = q.shape
    hkv, s_max = k_cache.shape[1], k_cache.shape[2]
    valid = torch.arange(s_max, device=q.device)[None, :] < context_lens[:, None]  # [B, S_max]
    qg = q.reshape(b, hkv, hq // hkv, d)  # [B, Hkv, G, D]
    o = F.scaled_dot_product_attention(qg, k_cache, v_cache, attn_mask=valid[:, None, None, :])  # [B, Hkv, G, D]
    return o.reshape(b, hq, d)


def model_shapes(cfg, tokens=(), batch=(), context=()) -> list[dict]:
    """One decode step's attention with `cfg`'s heads (ModelConfig fields) for each batch x context."""
    return [{"batch": b, "q_heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads, "context": c, "max_context": c,
             "head_dim": cfg.head_dim, "source": cfg.id} for b in batch for c in context]


MODEL_GRID = ("batch", "context")
SHAPE_FIELDS = ("batch", "q_heads", "kv_heads", "context", "head_dim")  # sizes make_inputs reads


def flops(shape: dict) -> int:
    # q.k and p.v: 2 * D flops each per (query head, cached token).
    return 4 * shape["q_heads"] * shape["head_dim"] * _total_context(shape)


def _dtypes(shape: dict, dtype: torch.dtype) -> tuple[torch.dtype, torch.dtype]:
    """(q/o dtype, cache dtype): dtype fp8 means bf16 q with an e4m3 cache; shape kv_dtype "fp8" an e4m3 cache
    beside q in `dtype`."""
    if dtype == FP8:
        return torch.bfloat16, FP8
    return dtype, FP8 if shape.get("kv_dtype") == "fp8" else dtype


def bytes_moved(shape: dict, dtype: torch.dtype) -> int:
    # Only the K/V rows a sequence attends to (not the whole S_max cache), plus q, o and the int32 lengths.
    q_dt, kv_dt = _dtypes(shape, dtype)
    es = q_dt.itemsize
    kv = 2 * shape["kv_heads"] * shape["head_dim"] * _total_context(shape) * kv_dt.itemsize
    qo = 2 * shape["batch"] * shape["q_heads"] * shape["head_dim"] * es
    return kv + qo + 4 * shape["batch"]


def make_inputs(shape: dict, dtype: torch.dtype, device, seed: int) -> tuple:
    # Tensors are drawn on `device` in their dtype (seeded per device): no host draw and copy.
    g = torch.Generator(device=device).manual_seed(seed)
    b, hq, hkv, d = shape["batch"], shape["q_heads"], shape["kv_heads"], shape["head_dim"]
    lens = _context_lens(shape)
    s_max = shape.get("max_context") or (max(lens) if lens else None)
    if s_max is None:
        raise ValueError("attention_decode: shape needs 'context' or 'max_context'")
    if lens is None:
        # A seeded ragged batch: B integers the host needs as a list, so drawn on the host (from g itself on a CPU):
        # the same lengths on every device.
        host = g if g.device.type == "cpu" else torch.Generator().manual_seed(seed)
        lens = torch.randint(1, s_max + 1, (b,), generator=host).tolist()
    if min(lens) < 1 or max(lens) > s_max:
        raise ValueError(f"attention_decode: context lengths must be in [1, {s_max}], got {lens}")
    q_dt, kv_dt = _dtypes(shape, dtype)
    q = torch.randn((b, hq, d), generator=g, device=device, dtype=q_dt)
    context_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    # The whole cache is random (not just the valid prefix): a kernel that reads past a length is wrong.
    size = (b, hkv, s_max, d)
    if kv_dt != FP8:
        k_cache, v_cache = (torch.randn(size, generator=g, device=device, dtype=kv_dt) for _ in range(2))
        return q, k_cache, v_cache, context_lens
    # e4m3 cache: per kv head scales (kv_scale "head", default) or one per tensor, amax / 448 of each.
    (k_cache, k_scale), (v_cache, v_scale) = (_fp8_cache(size, shape.get("kv_scale", "head") == "head", g, device)
                                              for _ in range(2))
    return q, k_cache, v_cache, context_lens, k_scale, v_scale


def _fp8_cache(size: tuple, per_head: bool, g: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    """A random e4m3 cache and its fp32 scales ([Hkv] per head, else [1]), through one fp32 cache-sized buffer
    (scaled in place; amax as max(amax, -amin), without an abs() copy)."""
    c = torch.randn(size, generator=g, device=device)
    if per_head:
        # Heads differ in scale, mildly (e^N(0, 1/16)): larger K sharpens the softmax and the bf16 error with it
        # (torch baseline, bf16 q, 512 tokens: 6e-3..9e-3 over 5 seeds here, up to 1.6e-2 with wider spreads).
        c.mul_(torch.exp(0.25 * torch.randn((1, size[1], 1, 1), generator=g, device=device)))
    dims = (0, 2, 3) if per_head else (0, 1, 2, 3)
    sc = (torch.maximum(c.amax(dims), c.amin(dims).neg()) / 448.0).reshape(-1)
    return c.div_(sc.reshape(1, -1, 1, 1)).clamp_(-448, 448).to(FP8), sc


def tolerance(dtype: torch.dtype) -> float:
    # As prefill: p rounded to dtype before p @ v, o rounded at the end (fp16 half-ulp 4.9e-4, bf16
    # 3.9e-3); fp32 dots run as tf32 (10-bit mantissa) on sm80+. fp8 (bf16 q, e4m3 cache): kernel and reference
    # read the same dequantized values, so bf16's bound holds.
    return {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 2e-3, FP8: 1.6e-2}.get(dtype, 1e-6)
