"""MLA decode attention (DeepSeek-V3) in the absorbed form, over the compressed latent cache.

Per token the cache holds one latent row [R + Dr] shared by every head: the normed kv latent c (R = kv_lora_rank,
512) and the RoPE'd key k_pe (Dr = qk_rope_head_dim, 64), laid out as FlashMLA's and vLLM's [.., 576] rows. The key
up-projection W_UK [H, Dn, R] and value up-projection W_UV [H, Dv, R] (the two halves of kv_b_proj) are absorbed:

    q_lat[b, h] = q_nope[b, h] @ W_UK[h]                       (Dn -> R, per head)
    s[b, h, j]  = (q_lat[b, h] . c[b, j] + q_pe[b, h] . k_pe[b, j]) * scale
    o_lat[b, h] = softmax_j(s) @ c[b, :ctx]                     (the latent is the value too)
    out[b, h]   = o_lat[b, h] @ W_UV[h].T                       (R -> Dv, per head)

so the cache is read once for all heads, as multi-query attention with a 576-d key and a 512-d value. Three Triton
kernels: `_head_bmm_kernel` (the two per-head projections), `_mla_decode_kernel` (split-KV as attention_decode:
grid (B * head blocks, splits), BLOCK_H heads (autotuned, 16 to 64) share each cache tile) and attention_decode's
reduce kernel (same workspace layout, HEAD_D = R). Ragged context lengths; no host sync. FP8 cache: e4m3 rows with
one fp32 scale (scalar), tiles upcast after the load; the scale folds into the softmax scale and the output.

`scale` is the softmax scale the model uses (DeepSeek-V3: 1/sqrt(192) times YaRN's mscale^2); make_inputs takes
1/sqrt(Dn + Dr). Baseline: the same absorbed form as a torch user writes it (einsum, then SDPA with the heads as
query rows of one kv head over [.., 576] keys and [.., 512] values, a length mask; an e4m3 cache dequantized first).
Reference: the same math explicitly in fp32 (tests also check it against the un-absorbed form).
"""

import math

import torch
import torch.nn.functional as F
from tokenfleet.kernels._triton import INTERPRET, check_float, num_sms, pin_config, row_settings, smem_bytes, tl, triton
from tokenfleet.kernels.attention_decode import (
    _CHUNK_ALIGN,
    _MAX_SPLITS,
    _MIN_CHUNK,
    FP8,
    _attention_decode_reduce_kernel,
    _context_lens,
)

_LOG2E = 1.4426950408889634
_CHUNK_BLOCK_H = 16  # the smallest BLOCK_H in the space: what the split size is picked for


@triton.jit
def _head_bmm_kernel(
    a_ptr, w_ptr, c_ptr, M, N, K,
    stride_am, stride_ah, stride_ak, stride_wh, stride_wk, stride_wn, stride_cm, stride_ch, stride_cn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # c[:, h, :] = a[:, h, :] @ w[h] for head h = program_id(1): [M, K] @ [K, N] (w's strides give either layout).
    h = tl.program_id(axis=1).to(tl.int64)
    pid = tl.program_id(axis=0)
    num_n = tl.cdiv(N, BLOCK_N)
    offs_m = (pid // num_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (pid % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    a_ptrs = a_ptr + h * stride_ah + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    w_ptrs = w_ptr + h * stride_wh + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        k_mask = (k + offs_k) < K
        a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(a, w, acc)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
    tl.store(c_ptr + h * stride_ch + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn,
             acc.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _head_bmm(a: torch.Tensor, w: torch.Tensor, transpose_w: bool) -> torch.Tensor:
    """a [M, H, K] @ w[h] per head -> [M, H, N] in a's dtype; w [H, K, N], or [H, N, K] when transpose_w."""
    m, h, k = a.shape
    n = w.shape[1] if transpose_w else w.shape[2]
    c = torch.empty((m, h, n), dtype=a.dtype, device=a.device)
    sw = (w.stride(0), w.stride(2), w.stride(1)) if transpose_w else (w.stride(0), w.stride(1), w.stride(2))
    bm = 16 if m <= 16 or INTERPRET else 64
    bn, bk = (32, 32) if INTERPRET else (64, 64)
    _head_bmm_kernel[(triton.cdiv(m, bm) * triton.cdiv(n, bn), h)](
        a, w, c, m, n, k, a.stride(0), a.stride(1), a.stride(2), *sw, c.stride(0), c.stride(1), c.stride(2),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=4)
    return c


def _mla_configs(interpret: bool = INTERPRET) -> list:
    if interpret:
        return [triton.Config({"BLOCK_H": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    # BLOCK_H heads share each cache tile (16: the tensor-core minimum M; 64, as FlashMLA's CTA, reads the cache
    # half as often from L2 for 128 heads at four times the accumulator). A [BLOCK_N, 576] bf16 tile is 36 KiB at 32
    # rows. In bf16/fp16 every config fits sm90 (at most 128 KiB, compiled ahead of time); fp32 prunes the widest.
    return [triton.Config({"BLOCK_H": bh, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bh, bn, w, s in [(16, 32, 4, 2), (16, 32, 8, 2), (16, 32, 4, 3), (16, 64, 8, 2), (16, 16, 4, 3),
                                 (32, 32, 8, 2), (64, 16, 8, 2), (64, 32, 8, 2)]]


def _prune_configs(configs, named_args, **kwargs):
    # Shared memory, fitted to sm90 compiles (Triton 3.9, tests/test_kernels_compile.py): q and num_stages cache
    # tiles in q's dtype (an e4m3 tile is upcast there), or the fp32 accumulator's layout conversion if larger.
    es = named_args["ql_ptr"].element_size()
    width = kwargs["R"] + kwargs["DR"]
    limit = smem_bytes(named_args["ql_ptr"].device)
    fits = [c for c in configs
            if max(es * (c.kwargs["BLOCK_H"] + c.num_stages * c.kwargs["BLOCK_N"]) * width,
                   4 * c.kwargs["BLOCK_H"] * kwargs["R"]) <= limit]
    return fits or configs[:1]


@triton.autotune(configs=_mla_configs(), key=["CHUNK", "R", "DR", "H"],
                 prune_configs_by=None if INTERPRET else {"early_config_prune": _prune_configs})
@triton.jit
def _mla_decode_kernel(
    ql_ptr, qp_ptr, kv_ptr, lens_ptr, m_ptr, l_ptr, acc_ptr, sc_ptr,
    H, S_MAX, CHUNK, NUM_SPLITS, qk_scale,
    stride_qlb, stride_qlh, stride_qpb, stride_qph, stride_kvb, stride_kvs,
    R: tl.constexpr, DR: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, KV_FP8: tl.constexpr,
):
    pid = tl.program_id(axis=0)
    split = tl.program_id(axis=1)
    HB = tl.cdiv(H, BLOCK_H)
    b = (pid // HB).to(tl.int64)
    hb = pid % HB
    ctx = tl.minimum(tl.load(lens_ptr + b).to(tl.int32), S_MAX)
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, ctx)
    if start < end:
        heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
        h_mask = heads < H
        offs_r = tl.arange(0, R)
        offs_p = tl.arange(0, DR)
        offs_n = tl.arange(0, BLOCK_N)
        ql = tl.load(ql_ptr + b * stride_qlb + heads[:, None] * stride_qlh + offs_r[None, :], mask=h_mask[:, None],
                     other=0.0)
        qp = tl.load(qp_ptr + b * stride_qpb + heads[:, None] * stride_qph + offs_p[None, :], mask=h_mask[:, None],
                     other=0.0)
        c_ptrs = kv_ptr + b * stride_kvb + offs_n[:, None] * stride_kvs + offs_r[None, :]  # [BN, R]
        p_ptrs = kv_ptr + b * stride_kvb + offs_n[:, None] * stride_kvs + R + offs_p[None, :]  # [BN, DR]
        if KV_FP8:
            sc = tl.load(sc_ptr)
        else:
            sc = 1.0
        m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
        acc = tl.zeros([BLOCK_H, R], dtype=tl.float32)
        for start_n in range(start, end, BLOCK_N):
            cols = start_n + offs_n
            kv_mask = cols < end
            c = tl.load(c_ptrs + start_n * stride_kvs, mask=kv_mask[:, None], other=0.0).to(ql.dtype)
            pe = tl.load(p_ptrs + start_n * stride_kvs, mask=kv_mask[:, None], other=0.0).to(ql.dtype)
            s = tl.dot(ql, tl.trans(c))
            s = tl.dot(qp, tl.trans(pe), s) * (qk_scale * sc)  # log2 domain
            s = tl.where(kv_mask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = tl.dot(p.to(c.dtype), c, acc * alpha[:, None])
            m_i = m_new
        # Workspace as attention_decode's: m, l [B, H, NUM_SPLITS]; acc [B, H, NUM_SPLITS, R] (fp32).
        row = (b * H + heads) * NUM_SPLITS + split
        tl.store(m_ptr + row, m_i, mask=h_mask)
        tl.store(l_ptr + row, l_i, mask=h_mask)
        tl.store(acc_ptr + row[:, None] * R + offs_r[None, :], acc * sc, mask=h_mask[:, None])


pin_config(_mla_decode_kernel, _mla_configs()[0])


def _pick_chunk(bsz: int, head_blocks: int, s_max: int, device: torch.device) -> int:
    """As attention_decode's: ~4 programs per SM, aligned, at most _MAX_SPLITS splits."""
    want = triton.cdiv(4 * num_sms(device), bsz * head_blocks)
    chunk = max(triton.cdiv(s_max, want), _MIN_CHUNK, triton.cdiv(s_max, _MAX_SPLITS))
    return triton.cdiv(chunk, _CHUNK_ALIGN) * _CHUNK_ALIGN


def _check(q_nope, q_pe, kv_cache, context_lens, w_uk, w_uv, kv_scale) -> tuple[int, int]:
    check_float("attention_mla", q_nope, q_pe, w_uk, w_uv)
    if q_nope.dim() != 3 or q_pe.dim() != 3 or kv_cache.dim() != 3 or w_uk.dim() != 3 or w_uv.dim() != 3:
        raise ValueError("attention_mla: need q_nope [B, H, Dn], q_pe [B, H, Dr], kv_cache [B, S_max, R + Dr], "
                         "w_uk [H, Dn, R], w_uv [H, Dv, R]")
    b, h, dn = q_nope.shape
    dr = q_pe.shape[2]
    r = w_uk.shape[2]
    if (q_pe.shape[:2] != (b, h) or tuple(w_uk.shape) != (h, dn, r) or w_uv.shape[0] != h or w_uv.shape[2] != r
            or kv_cache.shape[0] != b or kv_cache.shape[2] != r + dr):
        raise ValueError(f"attention_mla: shapes do not fit: q_nope {tuple(q_nope.shape)}, q_pe {tuple(q_pe.shape)}, "
                         f"kv_cache {tuple(kv_cache.shape)}, w_uk {tuple(w_uk.shape)}, w_uv {tuple(w_uv.shape)}")
    for name, d in (("kv_lora_rank", r), ("rope dim", dr)):
        if d < 16 or d > 1024 or d & (d - 1):
            raise ValueError(f"attention_mla: {name} must be a power of 2 in [16, 1024], got {d}")
    if kv_cache.shape[1] == 0:
        raise ValueError("attention_mla: empty cache (S_max = 0)")
    if (context_lens.shape != (b,) or context_lens.dtype not in (torch.int32, torch.int64)
            or context_lens.device != q_nope.device):
        raise ValueError(f"attention_mla: context_lens must be int32 [{b}] on {q_nope.device}")
    if kv_cache.dtype == FP8:
        if kv_scale is None or kv_scale.numel() != 1 or kv_scale.device != q_nope.device:
            raise ValueError("attention_mla: an e4m3 cache needs kv_scale (one fp32 scalar) on q's device")
    elif kv_cache.dtype != q_nope.dtype or kv_scale is not None:
        raise ValueError(f"attention_mla: the cache is q's dtype {q_nope.dtype} (no kv_scale) or e4m3 with kv_scale, "
                         f"got {kv_cache.dtype}")
    return r, dr


def attention_mla(q_nope: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, context_lens: torch.Tensor,
                  w_uk: torch.Tensor, w_uv: torch.Tensor, scale: float, kv_scale: torch.Tensor | None = None, *,
                  chunk_size: int | None = None) -> torch.Tensor:
    """One MLA decode step, absorbed: q_nope [B, H, Dn], q_pe [B, H, Dr] (RoPE applied), kv_cache [B, S_max, R + Dr]
    (latent then rope key; q's dtype, or e4m3 with a scalar fp32 kv_scale), context_lens [B] (int32, 1..S_max),
    w_uk [H, Dn, R], w_uv [H, Dv, R], softmax `scale` -> out [B, H, Dv] in q's dtype."""
    r, dr = _check(q_nope, q_pe, kv_cache, context_lens, w_uk, w_uv, kv_scale)
    b, h, _ = q_nope.shape
    s_max = kv_cache.shape[1]
    dv = w_uv.shape[1]
    if b == 0 or h == 0:
        return torch.empty((b, h, dv), dtype=q_nope.dtype, device=q_nope.device)
    q_lat = _head_bmm(q_nope, w_uk, transpose_w=False)  # [B, H, R]
    if q_pe.stride(-1) != 1:
        q_pe = q_pe.contiguous()
    if kv_cache.stride(-1) != 1:
        kv_cache = kv_cache.contiguous()
    if chunk_size is None:
        chunk = _pick_chunk(b, triton.cdiv(h, _CHUNK_BLOCK_H), s_max, q_nope.device)
    elif chunk_size <= 0 or chunk_size % _CHUNK_ALIGN:
        raise ValueError(f"attention_mla: chunk_size must be a positive multiple of {_CHUNK_ALIGN}")
    else:
        chunk = chunk_size
    splits = triton.cdiv(s_max, chunk)
    ws = dict(dtype=torch.float32, device=q_nope.device)
    m_ws, l_ws = torch.empty((b, h, splits), **ws), torch.empty((b, h, splits), **ws)
    acc_ws = torch.empty((b, h, splits, r), **ws)
    fp8 = kv_cache.dtype == FP8
    sc = kv_scale.reshape(1).to(torch.float32) if fp8 else m_ws
    context_lens = context_lens.contiguous()
    def grid(meta):
        return (b * triton.cdiv(h, meta["BLOCK_H"]), splits)

    _mla_decode_kernel[grid](
        q_lat, q_pe, kv_cache, context_lens, m_ws, l_ws, acc_ws, sc,
        h, s_max, chunk, splits, float(scale) * _LOG2E,
        q_lat.stride(0), q_lat.stride(1), q_pe.stride(0), q_pe.stride(1), kv_cache.stride(0), kv_cache.stride(1),
        R=r, DR=dr, KV_FP8=fp8,
    )
    o_lat = torch.empty((b, h, r), dtype=q_nope.dtype, device=q_nope.device)
    block_s = triton.next_power_of_2(splits)
    _, warps = row_settings(block_s * r, "attention_mla")
    _attention_decode_reduce_kernel[(b * h,)](
        m_ws, l_ws, acc_ws, context_lens, o_lat, h, s_max, chunk, splits, o_lat.stride(0), o_lat.stride(1),
        HEAD_D=r, BLOCK_S=block_s, num_warps=warps)
    return _head_bmm(o_lat, w_uv, transpose_w=True)  # [B, H, Dv]


def _dequant(kv_cache: torch.Tensor, kv_scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    if kv_scale is None:
        return kv_cache.to(dtype)
    return kv_cache.to(dtype) * kv_scale.to(dtype).reshape(())


def attention_mla_ref(q_nope: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, context_lens: torch.Tensor,
                      w_uk: torch.Tensor, w_uv: torch.Tensor, scale: float,
                      kv_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The absorbed form explicitly in >= fp32: masked scores over the whole (dequantized) cache, softmax, values."""
    compute = torch.promote_types(q_nope.dtype, torch.float32)
    r = w_uk.shape[2]
    kv = _dequant(kv_cache, kv_scale, compute)
    q_lat = torch.einsum("bhd,hdr->bhr", q_nope.to(compute), w_uk.to(compute))
    s = (torch.einsum("bhr,bsr->bhs", q_lat, kv[..., :r])
         + torch.einsum("bhp,bsp->bhs", q_pe.to(compute), kv[..., r:])) * scale
    valid = torch.arange(kv.shape[1], device=kv.device)[None, :] < context_lens.to(kv.device)[:, None]
    p = torch.softmax(s.masked_fill(~valid[:, None, :], float("-inf")), dim=-1)
    o_lat = torch.einsum("bhs,bsr->bhr", p, kv[..., :r])
    return torch.einsum("bhr,hvr->bhv", o_lat, w_uv.to(compute)).to(q_nope.dtype)


def attention_mla_baseline(q_nope: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor,
                           context_lens: torch.Tensor, w_uk: torch.Tensor, w_uv: torch.Tensor, scale: float,
                           kv_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The absorbed form as a torch user writes it: einsum for the two projections, SDPA over the latent cache (the
    heads as query rows of its one kv head; keys the 576-d rows, values their first R), a length mask."""
    r = w_uk.shape[2]
    kv = _dequant(kv_cache, kv_scale, q_nope.dtype) if kv_scale is not None else kv_cache
    q_lat = torch.einsum("bhd,hdr->bhr", q_nope, w_uk)
    q = torch.cat([q_lat, q_pe], dim=-1)[:, None]  # [B, 1, H, R + Dr]
    valid = torch.arange(kv.shape[1], device=kv.device)[None, :] < context_lens[:, None]
    o = F.scaled_dot_product_attention(q, kv[:, None], kv[:, None, :, :r], attn_mask=valid[:, None, None, :],
                                       scale=scale)  # [B, 1, H, R]
    return torch.einsum("bhr,hvr->bhv", o[:, 0], w_uv)


# ---------------------------------------------------------------------------------------------------------------
# Shapes, counts, inputs


def model_shapes(cfg, tokens=(), batch=(), context=()) -> list[dict]:
    """One decode step's MLA of an MLA `cfg` (all heads: DeepSeek-V3 decode runs attention data-parallel) for each
    batch x context; none for a model without MLA."""
    if cfg.mla is None:
        return []
    m = cfg.mla
    return [{"batch": b, "heads": cfg.num_heads, "context": c, "max_context": c, "kv_lora_rank": m.kv_lora_rank,
             "rope_dim": m.qk_rope_head_dim, "nope_dim": m.qk_nope_head_dim, "v_dim": m.v_head_dim,
             "source": f"{cfg.id}.mla"} for b in batch for c in context]


MODEL_GRID = ("batch", "context")
SHAPE_FIELDS = ("batch", "heads", "context", "kv_lora_rank", "rope_dim", "nope_dim", "v_dim")


def _lens(shape: dict) -> list[int]:
    lens = _context_lens(shape)
    if lens is None:
        raise ValueError("attention_mla: flops/bytes need shape['context'] (an int or per-sequence lengths)")
    return lens


def flops(shape: dict) -> int:
    # q absorption and output projection per (sequence, head), scores over R + Dr and values over R per cached token.
    b, h, r, dr = shape["batch"], shape["heads"], shape["kv_lora_rank"], shape["rope_dim"]
    proj = 2 * b * h * r * (shape["nope_dim"] + shape["v_dim"])
    return proj + 2 * h * (2 * r + dr) * sum(_lens(shape))


def _dtypes(shape: dict, dtype: torch.dtype) -> tuple[torch.dtype, torch.dtype]:
    """(q/weights dtype, cache dtype): fp8 means bf16 q with an e4m3 cache (or kv_dtype fp8 beside q's dtype)."""
    if dtype == FP8:
        return torch.bfloat16, FP8
    return dtype, FP8 if shape.get("kv_dtype") == "fp8" else dtype


def bytes_moved(shape: dict, dtype: torch.dtype) -> int:
    # The cache rows each sequence attends to (once for all heads), both up-projections, q in and out written.
    q_dt, kv_dt = _dtypes(shape, dtype)
    b, h, r, dr = shape["batch"], shape["heads"], shape["kv_lora_rank"], shape["rope_dim"]
    dn, dv = shape["nope_dim"], shape["v_dim"]
    cache = (r + dr) * sum(_lens(shape)) * kv_dt.itemsize
    weights = h * r * (dn + dv) * q_dt.itemsize
    return cache + weights + b * h * (dn + dr + dv) * q_dt.itemsize + 4 * b


def make_inputs(shape: dict, dtype: torch.dtype, device, seed: int) -> tuple:
    """(q_nope, q_pe, kv_cache, context_lens, w_uk, w_uv, scale[, kv_scale]): `context` is one length or one per
    sequence (ragged), in a cache of max_context rows (default: the longest)."""
    g = torch.Generator(device=device).manual_seed(seed)
    b, h, r, dr = shape["batch"], shape["heads"], shape["kv_lora_rank"], shape["rope_dim"]
    dn, dv = shape["nope_dim"], shape["v_dim"]
    lens = _lens(shape)
    s_max = shape.get("max_context") or max(lens)
    if min(lens) < 1 or max(lens) > s_max:
        raise ValueError(f"attention_mla: context lengths must be in [1, {s_max}], got {lens}")
    q_dt, kv_dt = _dtypes(shape, dtype)
    q_nope = torch.randn((b, h, dn), generator=g, device=device, dtype=q_dt)
    q_pe = torch.randn((b, h, dr), generator=g, device=device, dtype=q_dt)
    # Up-projections ~ N(0, 1/R) per entry: q_lat . c and the output stay O(1), as q_pe . k_pe.
    w_uk = torch.randn((h, dn, r), generator=g, device=device, dtype=q_dt).mul_(dn ** -0.5)
    w_uv = torch.randn((h, dv, r), generator=g, device=device, dtype=q_dt).mul_(r ** -0.5)
    lens_t = torch.tensor(lens, dtype=torch.int32, device=device)
    scale = 1.0 / math.sqrt(dn + dr)
    if kv_dt != FP8:
        kv = torch.randn((b, s_max, r + dr), generator=g, device=device, dtype=kv_dt)
        return q_nope, q_pe, kv, lens_t, w_uk, w_uv, scale
    kv = torch.randn((b, s_max, r + dr), generator=g, device=device)
    sc = (torch.maximum(kv.amax(), kv.amin().neg()) / 448.0).reshape(())
    return q_nope, q_pe, kv.div_(sc).clamp_(-448, 448).to(FP8), lens_t, w_uk, w_uv, scale, sc


def tolerance(dtype: torch.dtype) -> float:
    # As attention_decode, plus two projections whose outputs (q_lat, o_lat) are rounded to q's dtype: fp16 and
    # tf32 fp32 within 2e-3 of the reference, bf16 (and bf16 q over an e4m3 cache, which kernel and reference
    # dequantize alike) within 1.6e-2.
    return {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 2e-3, FP8: 1.6e-2}.get(dtype, 1e-6)
