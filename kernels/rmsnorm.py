"""RMSNorm, optionally fused with the residual add that precedes it in a pre-norm transformer block.

    y = x * rsqrt(mean(x^2) + eps) * weight                 (fp32 math, y in x.dtype)
    h = x + residual; y = rmsnorm(h)  -> returns (y, h)     (h rounded to x.dtype before it is normalized,
                                                             as a model that stores h and then normalizes it)

One program per row holds the whole row in registers: one read of x (and residual), one write of y (and h),
instead of the three passes of an unfused add + norm.
"""

import torch
import torch.nn.functional as F
from tokenfleet.kernels._triton import check_float, check_out, row_settings, tl, triton


@triton.jit
def _rmsnorm_kernel(
    x_ptr, r_ptr, w_ptr, y_ptr, h_ptr,
    H, eps,
    stride_xm, stride_rm, stride_ym, stride_hm,
    HAS_RESIDUAL: tl.constexpr, BLOCK_H: tl.constexpr,
):
    row = tl.program_id(axis=0).to(tl.int64)  # rows * stride can pass 2^31 at prefill sizes
    offs_h = tl.arange(0, BLOCK_H)
    mask = offs_h < H
    x = tl.load(x_ptr + row * stride_xm + offs_h, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * stride_rm + offs_h, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(h_ptr + row * stride_hm + offs_h, x, mask=mask)
    x = x.to(tl.float32)
    # Masked lanes loaded 0, so they add nothing to the sum; divide by the true H.
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / H + eps)
    w = tl.load(w_ptr + offs_h, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_ym + offs_h, (x * rstd * w).to(y_ptr.dtype.element_ty), mask=mask)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None, *,
            out=None):
    """RMSNorm over the last dim of x [..., H] with weight [H].

    Returns y, or (y, h) with h = x + residual when `residual` is given. `out`: optional contiguous
    buffer(s) of the same structure as the result (a tensor, or a (y, h) tuple).
    """
    check_float("rmsnorm", x, *(() if residual is None else (residual,)))
    if weight.dtype not in (torch.float16, torch.bfloat16, torch.float32) or weight.device != x.device:
        raise ValueError(f"rmsnorm: weight must be a float tensor on {x.device}, got {weight.dtype} on {weight.device}")
    if x.dim() < 1 or weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rmsnorm: need x [..., H] and weight [H], got {tuple(x.shape)} and {tuple(weight.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"rmsnorm: residual {tuple(residual.shape)} must match x {tuple(x.shape)}")
    h_size = x.shape[-1]
    block_h, num_warps = row_settings(h_size, "rmsnorm")  # one row per program, in registers

    if out is None:
        y_out = h_out = None
    elif residual is None:
        y_out, h_out = out, None
    else:
        y_out, h_out = out
    check_out("rmsnorm", y_out, x.shape, x.dtype, x.device)
    check_out("rmsnorm", h_out, x.shape, x.dtype, x.device)
    y = torch.empty_like(x, memory_format=torch.contiguous_format) if y_out is None else y_out
    h = None
    if residual is not None:
        h = torch.empty_like(x, memory_format=torch.contiguous_format) if h_out is None else h_out

    # Rows may be strided (e.g. a slice of a larger buffer); the hidden dim must be unit-stride.
    x2 = x.reshape(-1, h_size)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    r2 = x2
    if residual is not None:
        r2 = residual.reshape(-1, h_size)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
    w = weight.contiguous()
    rows = x2.shape[0]
    if rows == 0:
        return y if residual is None else (y, h)
    y2 = y.view(rows, h_size)
    h2 = h.view(rows, h_size) if h is not None else y2

    _rmsnorm_kernel[(rows,)](
        x2, r2, w, y2, h2,
        h_size, eps,
        x2.stride(0), r2.stride(0), y2.stride(0), h2.stride(0),
        HAS_RESIDUAL=residual is not None, BLOCK_H=block_h, num_warps=num_warps,
    )
    return y if residual is None else (y, h)


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """Torch reference with the same rounding points as the kernel (h in x.dtype, norm math in >= fp32)."""
    h = x if residual is None else (x + residual)
    compute = torch.promote_types(x.dtype, torch.float32)
    hf = h.to(compute)
    y = hf * torch.rsqrt(hf.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.to(compute)
    y = y.to(x.dtype)
    return y if residual is None else (y, h)


def rmsnorm_baseline(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """The vendor path: the residual add in x.dtype, then F.rms_norm (fused kernel; fp32 math inside)."""
    h = x if residual is None else x + residual
    y = F.rms_norm(h, (h.shape[-1],), weight, eps)
    return y if residual is None else (y, h)


def model_shapes(cfg, tokens=(), batch=(), context=()) -> list[dict]:
    """The shape in a dense layer of `cfg` (ModelConfig fields): the pre-attention / pre-MLP norm, residual fused."""
    return [{"rows": t, "hidden": cfg.hidden_size, "residual": True, "source": cfg.id} for t in tokens]


MODEL_GRID = ("tokens",)  # the model_shapes arguments a kernel case must give
SHAPE_FIELDS = ("rows", "hidden")  # sizes make_inputs reads


def flops(shape: dict) -> int:
    # Per element: square, accumulate, scale by rstd, scale by weight (+1 for the residual add).
    per_elem = 5 if shape.get("residual") else 4
    return per_elem * shape["rows"] * shape["hidden"]


def bytes_moved(shape: dict, dtype: torch.dtype) -> int:
    # x and weight read, y written; with a residual also residual read and h written.
    es = torch.empty((), dtype=dtype).element_size()
    rows, hidden = shape["rows"], shape["hidden"]
    n_row_tensors = 4 if shape.get("residual") else 2
    return (n_row_tensors * rows * hidden + hidden) * es


def make_inputs(shape: dict, dtype: torch.dtype, device, seed: int) -> tuple:
    g = torch.Generator(device=device).manual_seed(seed)  # drawn on `device` in `dtype`, as kernels.gemm's
    rows, hidden = shape["rows"], shape["hidden"]
    x = torch.randn((rows, hidden), generator=g, device=device, dtype=dtype)
    # Near 1 like a trained norm, not constant.
    weight = torch.randn((hidden,), generator=g, device=device, dtype=dtype).mul_(0.1).add_(1.0)
    eps = 1e-6
    if shape.get("residual"):
        return x, weight, eps, torch.randn((rows, hidden), generator=g, device=device, dtype=dtype)
    return x, weight, eps


def tolerance(dtype: torch.dtype) -> float:
    # Elementwise with fp32 math: the error is the final rounding to dtype (fp16 half-ulp 4.9e-4,
    # bf16 3.9e-3), plus h's own rounding feeding y when the residual is fused.
    return {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-5}.get(dtype, 1e-6)
