"""Flash-attention forward for prefill: o = softmax(q k^T / sqrt(D) [+ causal mask]) v, with GQA.

q [B, Hq, S, D], k and v [B, Hkv, S, D], o [B, Hq, S, D]; query head h reads kv head h // (Hq // Hkv).
Online softmax (running max m, running sum l, fp32 accumulator) over key blocks, so the S x S scores are
never written to memory. Causal: key blocks right of the diagonal are skipped (half the work); blocks left
of it run without masks; only the diagonal blocks and the ragged tail pay for masking.
"""

import math

import torch
import torch.nn.functional as F
from tokenfleet.kernels._triton import INTERPRET, check_float, check_out, pin_config, smem_bytes, tl, triton

_LOG2E = 1.4426950408889634  # softmax in base 2: exp(x) = exp2(x * log2 e), exp2 is the native instruction


def _attention_configs(interpret: bool = INTERPRET) -> list:
    if interpret:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    # BLOCK_M is a multiple of BLOCK_N (the unmasked stage must end on a key-block edge).
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in [
            (128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 3), (128, 32, 4, 4),
            (64, 64, 4, 3), (64, 32, 4, 4), (64, 64, 4, 4),
            (32, 32, 4, 2),  # the one that fits shared memory for fp32 with D = 256
        ]
    ]


def _prune_configs(configs, named_args, **kwargs):
    # Short sequences waste most of a 128-row tile.
    d = kwargs["HEAD_D"]
    q = named_args["q_ptr"]
    keep = [c for c in configs if named_args["S"] > 64 or c.kwargs["BLOCK_M"] <= 64]
    # Shared memory: the q tile plus num_stages K and V tiles (matches sm90 compiles of this kernel).
    limit = smem_bytes(q.device)
    fits = [c for c in keep
            if (c.kwargs["BLOCK_M"] + 2 * c.num_stages * c.kwargs["BLOCK_N"]) * d * q.element_size() <= limit]
    return fits or configs[-1:]


@triton.jit
def _attn_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n, lo, hi, S,
                qk_scale, MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr):
    # Keys [lo, hi) against one query block; k_ptrs/v_ptrs point at key 0.
    k_ptrs += lo * stride_kn
    v_ptrs += lo * stride_vn
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        if MASKED:
            kv_mask = cols < S
            k = tl.load(k_ptrs, mask=kv_mask[None, :], other=0.0)  # k^T tile [D, BLOCK_N]
        else:
            k = tl.load(k_ptrs)
        qk = tl.dot(q, k) * qk_scale  # [BLOCK_M, BLOCK_N], log2 domain
        if MASKED:
            valid = kv_mask[None, :]
            if CAUSAL:
                valid = valid & (offs_m[:, None] >= cols[None, :])
            qk = tl.where(valid, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)  # rescales what was accumulated under the old max
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if MASKED:
            v = tl.load(v_ptrs, mask=kv_mask[:, None], other=0.0)
        else:
            v = tl.load(v_ptrs)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)  # p rounded to the input dtype for the tensor-core dot
        m_i = m_new
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    return acc, l_i, m_i


@triton.autotune(
    configs=_attention_configs(),
    key=["S_BUCKET", "HEAD_D", "CAUSAL"],
    prune_configs_by=None if INTERPRET else {"early_config_prune": _prune_configs},
)
@triton.jit
def _attention_prefill_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr,
    S, Hq, GROUP, qk_scale,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os,
    S_BUCKET,  # autotune key only
    HEAD_D: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Grid: (query blocks, B * Hq). Causal programs get heavier with the block index; issue the heaviest
    # first so the last wave is made of short programs.
    num_m = tl.cdiv(S, BLOCK_M)
    start_m = (num_m - 1 - tl.program_id(axis=0)) if CAUSAL else tl.program_id(axis=0)
    bh = tl.program_id(axis=1)
    b = (bh // Hq).to(tl.int64)
    h = bh % Hq
    kvh = (h // GROUP).to(tl.int64)
    h = h.to(tl.int64)

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_D)
    q_ptrs = q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :]
    k_ptrs = k_ptr + b * stride_kb + kvh * stride_kh + offs_n[None, :] * stride_ks + offs_d[:, None]
    v_ptrs = v_ptr + b * stride_vb + kvh * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :]

    q = tl.load(q_ptrs, mask=(offs_m < S)[:, None], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32)

    # Stage 1: key blocks fully visible to every query row of this block, and fully inside S: no masks.
    # Every row sees key 0 in whichever stage runs first, so m_i is finite before any fully masked row.
    if CAUSAL:
        full_hi = start_m * BLOCK_M
        tail_hi = min((start_m + 1) * BLOCK_M, S)
    else:
        full_hi = (S // BLOCK_N) * BLOCK_N
        tail_hi = S
    acc, l_i, m_i = _attn_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_ks, stride_vs, offs_m, offs_n,
                                0, full_hi, S, qk_scale, False, CAUSAL, BLOCK_N)
    # Stage 2: the diagonal blocks (causal) and the ragged end of the sequence, masked.
    acc, l_i, m_i = _attn_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_ks, stride_vs, offs_m, offs_n,
                                full_hi, tail_hi, S, qk_scale, True, CAUSAL, BLOCK_N)

    acc = acc / l_i[:, None]
    o_ptrs = o_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :]
    tl.store(o_ptrs, acc.to(o_ptr.dtype.element_ty), mask=(offs_m < S)[:, None])


pin_config(_attention_prefill_kernel, _attention_configs()[-1])  # small-shape tests: the config that always fits


def _check_head_dim(name: str, d: int) -> None:
    if d < 16 or d > 256 or d & (d - 1):
        raise ValueError(f"{name}: head_dim must be a power of 2 in [16, 256], got {d}")


def attention_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, *,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled dot-product attention (scale 1/sqrt(D)) for q [B, Hq, S, D], k/v [B, Hkv, S, D] -> o [B, Hq, S, D].

    Causal masking aligns query i with key i (self-attention over one prompt). The head dim must be
    unit-stride; other dims may be strided (e.g. q as a [B, S, H, D] tensor transposed to [B, H, S, D]).
    """
    check_float("attention_prefill", q, k, v)
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"attention_prefill: need q [B, Hq, S, D], k and v [B, Hkv, S, D], "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    bsz, hq, s, d = q.shape
    hkv = k.shape[1]
    if k.shape[0] != bsz or k.shape[2] != s or k.shape[3] != d:
        raise ValueError(f"attention_prefill: k/v {tuple(k.shape)} do not match q {tuple(q.shape)} in B, S or D")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"attention_prefill: q heads {hq} must be a multiple of kv heads {hkv}")
    _check_head_dim("attention_prefill", d)
    check_out("attention_prefill", out, q.shape, q.dtype, q.device)
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device) if out is None else out
    if o.numel() == 0:
        return o
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))

    def grid(meta):
        return (triton.cdiv(s, meta["BLOCK_M"]), bsz * hq)

    _attention_prefill_kernel[grid](
        q, k, v, o,
        s, hq, hq // hkv, _LOG2E / math.sqrt(d),
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        triton.next_power_of_2(s),
        HEAD_D=d, CAUSAL=bool(causal),
    )
    return o


def attention_prefill_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """Explicit-math reference in >= fp32: scores, causal mask, softmax, weighted sum; o in q.dtype."""
    compute = torch.promote_types(q.dtype, torch.float32)
    bsz, hq, s, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    # Fold the query heads of one kv head together instead of copying K/V per query head.
    qf = q.to(compute).reshape(bsz, hkv, group * s, d)
    scores = (qf @ k.to(compute).transpose(-1, -2)).reshape(bsz, hkv, group, s, s) / math.sqrt(d)
    if causal:
        mask = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
    p = torch.softmax(scores, dim=-1).reshape(bsz, hkv, group * s, s)
    return (p @ v.to(compute)).reshape(bsz, hq, s, d).to(q.dtype)


def attention_prefill_baseline(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> torch.Tensor:
    # q: [B, Hq, S, D], k/v: [B, Hkv, S, D]. Flash / fused SDPA instead of the reference's materialized fp32
    # S×S scores (5x faster on CPU at S=2048, and no O(S²) memory).
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])


def model_shapes(cfg, tokens=(), batch=(), context=()) -> list[dict]:
    """Causal self-attention of one prompt of each length in `tokens` with `cfg`'s heads (ModelConfig fields)."""
    return [{"batch": 1, "q_heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads, "seq": t, "head_dim": cfg.head_dim,
             "causal": True, "source": cfg.id} for t in tokens]


MODEL_GRID = ("tokens",)
SHAPE_FIELDS = ("batch", "q_heads", "kv_heads", "seq", "head_dim")  # sizes make_inputs reads


def flops(shape: dict) -> int:
    # q k^T and p v: 2 * D flops each per (query, visible key) pair; causal sees S(S+1)/2 pairs, not S^2.
    s = shape["seq"]
    pairs = s * (s + 1) // 2 if shape.get("causal", True) else s * s
    return 4 * shape["batch"] * shape["q_heads"] * shape["head_dim"] * pairs


def bytes_moved(shape: dict, dtype: torch.dtype) -> int:
    # q, k, v read once and o written once (K/V re-reads by other query blocks hit L2 or are not minimum).
    es = torch.empty((), dtype=dtype).element_size()
    per_head = shape["batch"] * shape["seq"] * shape["head_dim"] * es
    return 2 * shape["q_heads"] * per_head + 2 * shape["kv_heads"] * per_head


def make_inputs(shape: dict, dtype: torch.dtype, device, seed: int) -> tuple:
    g = torch.Generator(device=device).manual_seed(seed)  # drawn on `device` in `dtype`, as kernels.gemm's
    b, hq, hkv, s, d = shape["batch"], shape["q_heads"], shape["kv_heads"], shape["seq"], shape["head_dim"]
    # Unit-variance q and k give logits q.k/sqrt(D) ~ N(0, 1): a softmax that is neither flat nor one-hot.
    q, k, v = (torch.randn(size, generator=g, device=device, dtype=dtype)
               for size in ((b, hq, s, d), (b, hkv, s, d), (b, hkv, s, d)))
    return q, k, v, bool(shape.get("causal", True))


def tolerance(dtype: torch.dtype) -> float:
    # Inputs are exact in dtype; the errors are p rounded to dtype before p @ v, and o rounded at the end
    # (fp16 half-ulp 4.9e-4, bf16 3.9e-3). fp32 dots run as tf32 (10-bit mantissa) on sm80+.
    return {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 2e-3}.get(dtype, 1e-6)
