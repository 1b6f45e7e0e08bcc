"""SwiGLU activation: silu(gate) * up, the elementwise step between a gated MLP's up and down projections.

Computed in fp32, output in gate's dtype. gate and up may be row-strided views (e.g. the two halves of a
fused gate_up projection [T, 2I]); only the last dim must be unit-stride.
"""

import torch
import torch.nn.functional as F
from tokenfleet.kernels._triton import INTERPRET, check_float, check_out, tl, triton

# Big enough for 16-byte vector loads in every thread on GPU; the interpreter prefers few, large programs.
_BLOCK_N = 4096 if INTERPRET else 1024


@triton.jit
def _silu_mul_kernel(
    g_ptr, u_ptr, y_ptr,
    N,
    stride_gm, stride_um, stride_ym,
    BLOCK_N: tl.constexpr,
):
    # Grid: (rows, column blocks). Rows on axis 0, whose limit is 2^31-1 (axis 1 stops at 65535).
    row = tl.program_id(axis=0).to(tl.int64)
    offs_n = tl.program_id(axis=1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs_n < N
    g = tl.load(g_ptr + row * stride_gm + offs_n, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_um + offs_n, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(y_ptr + row * stride_ym + offs_n, y.to(y_ptr.dtype.element_ty), mask=mask)


def silu_mul(gate: torch.Tensor, up: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up for gate, up [..., N] of one shape; output [..., N] in gate.dtype."""
    check_float("silu_mul", gate, up)
    if gate.shape != up.shape or gate.dim() < 1:
        raise ValueError(f"silu_mul: gate {tuple(gate.shape)} and up {tuple(up.shape)} must match, rank >= 1")
    n = gate.shape[-1]
    check_out("silu_mul", out, gate.shape, gate.dtype, gate.device)
    y = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device) if out is None else out
    if y.numel() == 0:
        return y
    g2 = gate.reshape(-1, n)
    u2 = up.reshape(-1, n)
    if g2.stride(-1) != 1:
        g2 = g2.contiguous()
    if u2.stride(-1) != 1:
        u2 = u2.contiguous()
    y2 = y.view(-1, n)
    rows = g2.shape[0]
    _silu_mul_kernel[(rows, triton.cdiv(n, _BLOCK_N))](
        g2, u2, y2, n,
        g2.stride(0), u2.stride(0), y2.stride(0),
        BLOCK_N=_BLOCK_N, num_warps=4,
    )
    return y


def silu_mul_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Torch reference in >= fp32: g * sigmoid(g) * u, output in gate.dtype."""
    compute = torch.promote_types(gate.dtype, torch.float32)
    g = gate.to(compute)
    return (g * torch.sigmoid(g) * up.to(compute)).to(gate.dtype)


def silu_mul_baseline(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The vendor path as a model writes it: F.silu(gate) * up, in the input dtype."""
    return F.silu(gate) * up


def model_shapes(cfg, tokens=(), batch=(), context=()) -> list[dict]:
    """The shape in a dense layer of `cfg` (ModelConfig fields): the MLP activation over intermediate_size."""
    return [{"rows": t, "n": cfg.intermediate_size, "source": cfg.id} for t in tokens]


MODEL_GRID = ("tokens",)
SHAPE_FIELDS = ("rows", "n")  # sizes make_inputs reads


def flops(shape: dict) -> int:
    # Per element: sigmoid as exp + add + reciprocal, then two multiplies (exp counted as one op).
    return 5 * shape["rows"] * shape["n"]


def bytes_moved(shape: dict, dtype: torch.dtype) -> int:
    # gate and up read, y written.
    es = torch.empty((), dtype=dtype).element_size()
    return 3 * shape["rows"] * shape["n"] * es


def make_inputs(shape: dict, dtype: torch.dtype, device, seed: int) -> tuple:
    g = torch.Generator(device=device).manual_seed(seed)  # drawn on `device` in `dtype`, as kernels.gemm's
    rows, n = shape["rows"], shape["n"]
    # gate spans silu's curved region and both tails.
    gate = torch.randn((rows, n), generator=g, device=device, dtype=dtype).mul_(2.0)
    return gate, torch.randn((rows, n), generator=g, device=device, dtype=dtype)


def tolerance(dtype: torch.dtype) -> float:
    # Elementwise with fp32 math: output rounding (fp16 half-ulp 4.9e-4, bf16 3.9e-3); fp32 exp/sigmoid
    # approximations on GPU are within a few ulps.
    return {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-5}.get(dtype, 1e-6)
