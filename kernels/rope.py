"""Rotary position embedding, rotate-half layout (Llama/Qwen, HF `rotate_half`).

For head dim D and j < D/2, with angle a_j = position * theta^(-2j/D) computed in fp32:
    out[j]       = x[j] * cos(a_j) - x[j + D/2] * sin(a_j)
    out[j + D/2] = x[j + D/2] * cos(a_j) + x[j] * sin(a_j)
Applied to q [T, Hq, D] and k [T, Hkv, D] in one launch; returns new tensors.
"""

import functools

import torch
from tokenfleet.kernels._triton import INTERPRET, check_float, check_out, row_settings, tl, triton

if INTERPRET:

    @triton.jit
    def _cos_sin(x):
        # The interpreter has no libdevice; its numpy sin/cos are exact enough.
        return tl.cos(x), tl.sin(x)

else:
    from triton.language.extra import libdevice

    @triton.jit
    def _cos_sin(x):
        # libdevice's cosf/sinf reduce large arguments exactly; an approximate sin/cos would be off by far
        # more than an ulp at long-context angles (position * inv_freq reaches ~1e5 rad at 128k).
        return libdevice.cos(x), libdevice.sin(x)


@triton.jit
def _rope_rotate(x_ptr, o_ptr, stride_xt, stride_xh, stride_ot, stride_oh, tok, n_heads, cos, sin,
                 HALF_D: tl.constexpr, BLOCK_HEADS: tl.constexpr):
    # Rotate all heads of one token: tile [BLOCK_HEADS, HALF_D] for each half.
    offs_h = tl.arange(0, BLOCK_HEADS)
    offs_d = tl.arange(0, HALF_D)
    mask = (offs_h < n_heads)[:, None]
    x1_ptrs = x_ptr + tok * stride_xt + offs_h[:, None] * stride_xh + offs_d[None, :]
    x1 = tl.load(x1_ptrs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x1_ptrs + HALF_D, mask=mask, other=0.0).to(tl.float32)
    o1_ptrs = o_ptr + tok * stride_ot + offs_h[:, None] * stride_oh + offs_d[None, :]
    o_ty = o_ptr.dtype.element_ty
    tl.store(o1_ptrs, (x1 * cos - x2 * sin).to(o_ty), mask=mask)
    tl.store(o1_ptrs + HALF_D, (x2 * cos + x1 * sin).to(o_ty), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, pos_ptr, inv_freq_ptr, qo_ptr, ko_ptr,
    n_q_heads, n_kv_heads,
    stride_qt, stride_qh, stride_kt, stride_kh,
    stride_qot, stride_qoh, stride_kot, stride_koh,
    HALF_D: tl.constexpr, BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr,
):
    # One program per token: cos/sin are computed once and shared by every q and k head of the token.
    tok = tl.program_id(axis=0).to(tl.int64)
    pos = tl.load(pos_ptr + tok).to(tl.float32)
    offs_d = tl.arange(0, HALF_D)
    # The fp32 angle is the op's definition: at position 1e5 one ulp of inv_freq moves it by ~1e-3 rad, so
    # inv_freq comes from the exact fp32 table the reference uses (an in-kernel exp2 differs by an ulp).
    inv_freq = tl.load(inv_freq_ptr + offs_d)
    angle = pos * inv_freq
    cos, sin = _cos_sin(angle)
    cos = cos[None, :]
    sin = sin[None, :]
    _rope_rotate(q_ptr, qo_ptr, stride_qt, stride_qh, stride_qot, stride_qoh, tok, n_q_heads, cos, sin,
                 HALF_D, BLOCK_QH)
    _rope_rotate(k_ptr, ko_ptr, stride_kt, stride_kh, stride_kot, stride_koh, tok, n_kv_heads, cos, sin,
                 HALF_D, BLOCK_KH)


def rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, theta: float | torch.Tensor, *, out=None):
    """Apply RoPE to q [T, Hq, D] and k [T, Hkv, D] at integer positions [T]; returns (q_out, k_out).

    `theta`: the base (inv_freq = theta^(-2j/D)), or an fp32 [D/2] inv_freq table for scaled RoPE.
    q and k may be strided views (e.g. slices of a fused qkv projection) as long as D is unit-stride.
    `out`: optional (q_out, k_out) contiguous buffers.
    """
    check_float("rope", q, k)
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"rope: need q [T, Hq, D] and k [T, Hkv, D], got {tuple(q.shape)} and {tuple(k.shape)}")
    t, hq, d = q.shape
    hkv = k.shape[1]
    if positions.shape != (t,) or positions.dtype not in (torch.int32, torch.int64) or positions.device != q.device:
        raise ValueError(f"rope: positions must be int32/int64 [{t}] on {q.device}, "
                         f"got {positions.dtype} {tuple(positions.shape)} on {positions.device}")
    # The rotated halves are loaded as power-of-2 tiles; Llama/Qwen head dims (64, 128, 256) all are.
    if d < 2 or d % 2 or (d // 2) & (d // 2 - 1):
        raise ValueError(f"rope: head_dim must be 2 * a power of 2, got {d}")
    inv_freq = _frequencies(theta, d, q.device)
    q_out, k_out = out if out is not None else (None, None)
    check_out("rope", q_out, q.shape, q.dtype, q.device)
    check_out("rope", k_out, k.shape, k.dtype, k.device)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if q_out is None else q_out
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device) if k_out is None else k_out
    if t == 0:
        return q_out, k_out
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    positions = positions.contiguous()

    block_qh = triton.next_power_of_2(max(hq, 1))
    block_kh = triton.next_power_of_2(max(hkv, 1))
    _, num_warps = row_settings(block_qh * d, "rope")  # the q tile: [BLOCK_QH, D/2] twice
    _rope_kernel[(t,)](
        q, k, positions, inv_freq, q_out, k_out,
        hq, hkv,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
        HALF_D=d // 2, BLOCK_QH=block_qh, BLOCK_KH=block_kh,
        num_warps=num_warps,
    )
    return q_out, k_out


@functools.lru_cache(maxsize=64)
def _inv_freq(theta: float, d: int, device: torch.device) -> torch.Tensor:
    """fp32 [D/2] table theta^(-2j/D), computed as HF does; cached so a decode step launches one kernel."""
    return 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))


def _frequencies(theta: float | torch.Tensor, d: int, device: torch.device) -> torch.Tensor:
    """The fp32 [D/2] inverse-frequency table: from a base `theta`, or given (scaled RoPE such as Llama 3.1's,
    whose per-frequency factors the model computes: tokenfleet.model.rope_frequencies)."""
    if isinstance(theta, torch.Tensor):
        if theta.shape != (d // 2,) or theta.dtype != torch.float32 or theta.device != torch.device(device):
            raise ValueError(f"rope: an inv_freq table must be fp32 [{d // 2}] on {device}, "
                             f"got {theta.dtype} {tuple(theta.shape)} on {theta.device}")
        return theta.contiguous()
    if theta <= 0:
        raise ValueError(f"rope: theta must be > 0, got {theta}")
    return _inv_freq(float(theta), d, device)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_ref(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, theta: float | torch.Tensor):
    """HF-style reference: inv_freq and angles in fp32 (the op's definition), rotation in >= fp32."""
    angles = positions.to(torch.float32)[:, None] * _frequencies(theta, q.shape[-1], q.device)  # [T, D/2]
    compute = torch.promote_types(q.dtype, torch.float32)
    emb = torch.cat((angles, angles), dim=-1).to(compute)[:, None, :]  # [T, 1, D]
    cos, sin = emb.cos(), emb.sin()

    def rotate(x):
        xf = x.to(compute)
        return (xf * cos + _rotate_half(xf) * sin).to(x.dtype)

    return rotate(q), rotate(k)


def rope_cos_sin(positions: torch.Tensor, theta: float | torch.Tensor, head_dim: int, dtype: torch.dtype):
    """cos and sin [T, D] of the angles at `positions` [T], as transformers' rotary embedding computes them once per
    forward for all layers: fp32 angles (the op's definition), rounded to `dtype`."""
    angles = positions.to(torch.float32)[:, None] * _frequencies(theta, head_dim, positions.device)  # [T, D/2]
    emb = torch.cat((angles, angles), dim=-1)  # [T, D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rope_rotate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q [T, Hq, D] and k [T, Hkv, D] rotated by cos/sin [T, D] in the input dtype (transformers'
    `apply_rotary_pos_emb`): the per-layer part of the vendor path."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def rope_baseline(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, theta: float | torch.Tensor):
    """The vendor path as a torch model runs it: cos/sin of the positions, then the rotation in q.dtype. (A model
    computes cos/sin once per forward and rotates in every layer; a kernel point times both, as the Triton kernel,
    which computes its own cos/sin, does both.)"""
    cos, sin = rope_cos_sin(positions, theta, q.shape[-1], q.dtype)
    return rope_rotate(q, k, cos, sin)


def model_shapes(cfg, tokens=(), batch=(), context=()) -> list[dict]:
    """The shape in a dense layer of `cfg` (ModelConfig fields): q and k heads of `tokens` tokens."""
    return [{"tokens": t, "q_heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
             "source": cfg.id} for t in tokens]


MODEL_GRID = ("tokens",)
SHAPE_FIELDS = ("tokens", "q_heads", "kv_heads", "head_dim")  # sizes make_inputs reads


def flops(shape: dict) -> int:
    # 2 multiplies + 1 add per output element (sin/cos per token and frequency not counted).
    return 3 * shape["tokens"] * (shape["q_heads"] + shape["kv_heads"]) * shape["head_dim"]


def bytes_moved(shape: dict, dtype: torch.dtype) -> int:
    # q and k read, q_out and k_out written, int32 positions read.
    es = torch.empty((), dtype=dtype).element_size()
    t = shape["tokens"]
    return 2 * t * (shape["q_heads"] + shape["kv_heads"]) * shape["head_dim"] * es + 4 * t


def make_inputs(shape: dict, dtype: torch.dtype, device, seed: int) -> tuple:
    g = torch.Generator(device=device).manual_seed(seed)  # drawn on `device` in `dtype`, as kernels.gemm's
    t, hq, hkv, d = shape["tokens"], shape["q_heads"], shape["kv_heads"], shape["head_dim"]
    q = torch.randn((t, hq, d), generator=g, device=device, dtype=dtype)
    k = torch.randn((t, hkv, d), generator=g, device=device, dtype=dtype)
    positions = torch.randint(0, shape.get("max_position", 4096), (t,), generator=g, device=device, dtype=torch.int32)
    return q, k, positions, float(shape.get("theta", 1_000_000.0))


def tolerance(dtype: torch.dtype) -> float:
    # Rounding of the output to dtype dominates (fp16 half-ulp 4.9e-4, bf16 3.9e-3). fp32: both sides use
    # the same fp32 angles; only fp32 sin/cos (a few ulps) and the rotation's rounding differ.
    return {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-5}.get(dtype, 1e-6)
