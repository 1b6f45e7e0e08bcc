"""FP8 linear layer: y = dequant(q(x)) @ dequant(w_q).T, e4m3 operands, fp32 accumulation, bf16 output.

The op takes bf16 activations and an offline-quantized e4m3 weight, and counts the activation quantization in
its time (a serving engine pays it on every call): `_quant_fp8_kernel` writes e4m3 x and its scales, then
`_gemm_fp8_kernel` multiplies. Two scale layouts, chosen by the weight scale's shape:

- `tensor`: one weight scale, one static activation scale (a calibrated scalar, as FP8 checkpoints from
  NVIDIA ModelOpt ship it); the scales multiply the fp32 accumulator once at the end.
- `block` (DeepSeek-V3): activations per token per 128 channels (dynamic: amax of each group), weights per
  128x128 block; each K tile's partial product is scaled before it joins the accumulator, so BLOCK_K divides 128.

Vendor baseline: torch._scaled_mm (cuBLASLt) with the same scales: scalars for `tensor`; for `block`,
the 1x128 / 128x128 block recipe where torch and the device have it (sm90 and newer), else it fails as a point.
Its activations are quantized as a user's fp8 path does it, in one fused kernel (`baseline_quantization` says which):
on a GPU the op's own `_quant_fp8_kernel` (vLLM's fp8 linear quantizes in one kernel too), so the two sides differ
only in the GEMM; under torch.compile torch ops that Inductor fuses; on a CPU torch's eager ops.
Accumulation: both sides the same way (`ACCUMULATION`, recorded in every gemm_fp8 point): fp32, the fp8 products
promoted into the fp32 accumulator every ACC_PROMOTE_K of K (Triton's `max_num_imprecise_acc`; sm90's default is
2**30, i.e. fast accumulation, never promoted) and cuBLASLt's `use_fast_accum=False` (the fp8 ceiling's too).
Reference: the same quantization in fp32, then the dequantized product in fp32 (fp64 when handed fp64).
"""

import torch
from tokenfleet.kernels._triton import INTERPRET, check_out, pin_config, tl, triton
from tokenfleet.kernels.gemm import (
    _gemm_configs,
    _gemm_splitk_reduce_kernel,
    _pick_split_k,
    _prune_configs,
    _store_tile,
    _tile_ids,
    _tile_offsets,
)
from tokenfleet.kernels.gemm import model_shapes as _gemm_model_shapes

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn
SCALE_BLOCK = 128  # DeepSeek-V3's block: 1x128 for activations, 128x128 for weights
LAYOUTS = ("tensor", "block")
_K_SPLIT_ALIGN = 32 if INTERPRET else 256  # as kernels.gemm: a K split never cuts a 128-channel scale group badly
# One accumulation mode for every side compared (the Triton kernel, the _scaled_mm baseline, the fp8 ceiling):
# FAST_ACCUM False = fp32 accumulation with promotion, cuBLASLt's default and DeepSeek-V3's recipe (it promotes every
# 128 of K; we promote every 32, one sm90 fp8 wgmma's depth, the most precise Triton offers).
FAST_ACCUM = False
ACC_PROMOTE_K = 32  # Triton's max_num_imprecise_acc when not FAST_ACCUM (<= every BLOCK_K of the space)
ACCUMULATION = "fast" if FAST_ACCUM else "fp32"  # what a point records (`fp8_accum`)


def _fp8_configs(interpret: bool = INTERPRET) -> list:
    # gemm's space with BLOCK_K = 128: one scale group per K tile for block scales, and the K depth fp8
    # wgmma wants (32 bytes of K per row at minimum). The interpreter keeps gemm's single small config.
    if interpret:
        return _gemm_configs(True)
    out = []
    for c in _gemm_configs(False):
        kw = dict(c.kwargs, BLOCK_K=128)
        if kw not in [o.kwargs for o in out]:
            out.append(triton.Config(kw, num_warps=c.num_warps, num_stages=c.num_stages))
    return out


@triton.jit
def _to_e4m3(v, ROUND_FIRST: tl.constexpr):
    # v: fp32, already within +-448. Under Triton 3.9's interpreter the fp32 -> e4m3 cast halves a value whose
    # rounding carries into the exponent (127.5 -> 64; 45 of 4096 random values measured) and truncates
    # subnormals, so there we round to the e4m3 grid first (RTNE on the fp32 bits: 3 mantissa bits kept;
    # subnormals to multiples of 2^-9) and the cast is exact. Compiled kernels cast directly (cvt.rn.satfinite).
    if ROUND_FIRST:
        bits = v.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576
        r = bits.to(tl.float32, bitcast=True)
        v = tl.where(tl.abs(v) < 0.015625, tl.floor(v * 512.0 + 0.5) / 512.0, r)
    return v.to(tl.float8e4nv)


@triton.jit
def _quant_fp8_kernel(
    x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, stride_sm, stride_sg,
    DYNAMIC: tl.constexpr, GROUP: tl.constexpr, ROUND_FIRST: tl.constexpr,
):
    # One (row, 128-channel group) per program: q = x / s in e4m3. DYNAMIC: s = amax(group) / 448, written to
    # s[row, group] (M-major: stride_sm 1, as cuBLASLt's block recipe takes them); else s is the one static scale.
    row = tl.program_id(axis=0).to(tl.int64)
    g = tl.program_id(axis=1)
    offs = g * GROUP + tl.arange(0, GROUP)
    mask = offs < K
    x = tl.load(x_ptr + row * stride_xm + offs, mask=mask, other=0.0).to(tl.float32)
    if DYNAMIC:
        s = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12) / 448.0
        tl.store(s_ptr + row * stride_sm + g * stride_sg, s)
    else:
        s = tl.load(s_ptr)
    q = tl.minimum(tl.maximum(x / s, -448.0), 448.0)
    tl.store(q_ptr + row * stride_qm + offs, _to_e4m3(q, ROUND_FIRST), mask=mask)


@triton.autotune(
    configs=_fp8_configs(),
    key=["M_BUCKET", "N", "K", "SPLIT_K", "BLOCK_SCALES"],
    prune_configs_by=None if INTERPRET else {"early_config_prune": _prune_configs},
)
@triton.jit
def _gemm_fp8_kernel(
    x_ptr, w_ptr, xs_ptr, ws_ptr, c_ptr,
    M, N, K, K_SPLIT,
    stride_xm, stride_xk, stride_wn, stride_wk,
    stride_xsm, stride_xsk, stride_wsn, stride_wsk,
    stride_cs, stride_cm, stride_cn,
    M_BUCKET, SPLIT_K,  # autotune keys only
    BLOCK_SCALES: tl.constexpr, ACC_PROMOTE: tl.constexpr,  # ACC_PROMOTE None: the backend's default (fast on sm90)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # c[s] = scaled x[:, ks] @ w[:, ks].T over the K range ks of split s; tiles as kernels.gemm.
    pid_m, pid_n, pid_k = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m, offs_n, offs_k, k_start, k_end = _tile_offsets(pid_m, pid_n, pid_k, M, N, K, K_SPLIT,
                                                           BLOCK_M, BLOCK_N, BLOCK_K)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + (k_start + offs_k)[None, :] * stride_xk
    w_ptrs = w_ptr + offs_n[None, :] * stride_wn + (k_start + offs_k)[:, None] * stride_wk  # w.T tile [BK, BN]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_start, k_end, BLOCK_K):
        k_mask = (k + offs_k) < k_end
        a = tl.load(x_ptrs, mask=k_mask[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_mask[:, None], other=0.0)
        if BLOCK_SCALES:
            # This K tile lies inside one 128-channel group (BLOCK_K divides 128, splits start on a tile).
            kb = k // 128
            xs = tl.load(xs_ptr + offs_m * stride_xsm + kb * stride_xsk)  # [BM]: per token
            ws = tl.load(ws_ptr + (offs_n // 128) * stride_wsn + kb * stride_wsk)  # [BN]: per 128x128 block
            acc += tl.dot(a, b, max_num_imprecise_acc=ACC_PROMOTE) * xs[:, None] * ws[None, :]
        else:
            acc = tl.dot(a, b, acc, max_num_imprecise_acc=ACC_PROMOTE)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    if not BLOCK_SCALES:
        acc = acc * (tl.load(xs_ptr) * tl.load(ws_ptr))

    _store_tile(c_ptr, acc, pid_m, pid_n, pid_k, M, N, stride_cs, stride_cm, stride_cn, BLOCK_M, BLOCK_N)


# ---------------------------------------------------------------------------------------------------------------
# Scales


pin_config(_gemm_fp8_kernel, next(c for c in _fp8_configs() if c.kwargs["BLOCK_M"] == 16))  # as gemm's


def layout_of(w_scale: torch.Tensor) -> str:
    """`block` for a 2-D weight scale (even [1, 1] when N, K <= 128), `tensor` for a scalar."""
    return "block" if w_scale.dim() == 2 else "tensor"


def _check(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, x_scale: torch.Tensor | None) -> str:
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32) or w_q.dtype != FP8:
        raise ValueError(f"gemm_fp8: need x in bf16/fp16/fp32 and w_q in {FP8}, got {x.dtype} and {w_q.dtype}")
    if x.dim() < 1 or w_q.dim() != 2 or x.shape[-1] != w_q.shape[1] or w_q.shape[1] == 0:
        raise ValueError(f"gemm_fp8: need x [..., K] and w_q [N, K], got {tuple(x.shape)} and {tuple(w_q.shape)}")
    n, k = w_q.shape
    layout = layout_of(w_scale)
    blocks = (triton.cdiv(n, SCALE_BLOCK), triton.cdiv(k, SCALE_BLOCK))
    if layout == "block" and tuple(w_scale.shape) != blocks:
        raise ValueError(f"gemm_fp8: w_scale must be one scalar or [{blocks[0]}, {blocks[1]}] (per 128x128 block), "
                         f"got {tuple(w_scale.shape)}")
    if layout == "tensor" and w_scale.numel() != 1:
        raise ValueError(f"gemm_fp8: w_scale must be a scalar or 2-D, got {tuple(w_scale.shape)}")
    if (layout == "tensor") != (x_scale is not None and x_scale.numel() == 1):
        raise ValueError("gemm_fp8: a scalar w_scale needs a scalar static x_scale; block scales take x_scale=None")
    for t in (w_q, w_scale) + ((x_scale,) if x_scale is not None else ()):
        if t.device != x.device:
            raise ValueError(f"gemm_fp8: inputs on different devices: {x.device} and {t.device}")
    return layout


def quantize_fp8(x: torch.Tensor, x_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations -> (e4m3 x [M, K], fp32 scales): the static scalar `x_scale`, or per token per 128 channels
    ([M, ceil(K/128)] M-major, amax/448) when it is None. One Triton kernel (its time is part of the op's)."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, k = x2.shape
    q = torch.empty((m, k), dtype=FP8, device=x.device)
    dynamic = x_scale is None
    s = torch.empty((triton.cdiv(k, SCALE_BLOCK), m), dtype=torch.float32, device=x.device).t() if dynamic \
        else x_scale.reshape(1).to(torch.float32)
    if m and k:
        _quant_fp8_kernel[(m, triton.cdiv(k, SCALE_BLOCK))](
            x2, q, s, k, x2.stride(0), q.stride(0), s.stride(0) if dynamic else 0, s.stride(1) if dynamic else 0,
            DYNAMIC=dynamic, GROUP=SCALE_BLOCK, ROUND_FIRST=INTERPRET, num_warps=1 if INTERPRET else 4)
    return q, s


def gemm_fp8(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, x_scale: torch.Tensor | None = None, *,
             out: torch.Tensor | None = None, split_k: int | None = None) -> torch.Tensor:
    """y = x @ dequant(w_q).T with x quantized to e4m3 on the way. x [..., K] (bf16), w_q [N, K] e4m3,
    w_scale a scalar (with a scalar static x_scale) or [ceil(N/128), ceil(K/128)] (x_scale None: per token per
    128 channels) -> y [..., N] in bf16 (fp32 when x is fp32). Under the interpreter bf16 stores truncate."""
    layout = _check(x, w_q, w_scale, x_scale)
    n, k = w_q.shape
    out_dtype = torch.float32 if x.dtype == torch.float32 else torch.bfloat16
    out_shape = (*x.shape[:-1], n)
    check_out("gemm_fp8", out, out_shape, out_dtype, x.device)
    y = torch.empty(out_shape, dtype=out_dtype, device=x.device) if out is None else out
    m = y.numel() // n if n else 0
    if m == 0 or n == 0:
        return y
    xq, xs = quantize_fp8(x, None if layout == "block" else x_scale)
    ws = w_scale.to(torch.float32).reshape(w_scale.shape if layout == "block" else (1, 1))
    y2 = y.view(m, n)
    split_k = _pick_split_k(m, n, k, x.device) if split_k is None else split_k
    if split_k < 1:
        raise ValueError(f"gemm_fp8: split_k must be >= 1, got {split_k}")
    k_split = triton.cdiv(triton.cdiv(k, split_k), _K_SPLIT_ALIGN) * _K_SPLIT_ALIGN
    split_k = triton.cdiv(k, k_split)
    c = y2 if split_k == 1 else torch.empty((split_k, m, n), dtype=torch.float32, device=x.device)
    stride_cs = 0 if split_k == 1 else c.stride(0)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), split_k)

    xs2 = xs.view(-1, 1) if layout == "tensor" else xs
    _gemm_fp8_kernel[grid](
        xq, w_q, xs2, ws, c,
        m, n, k, k_split,
        xq.stride(0), xq.stride(1), w_q.stride(0), w_q.stride(1),
        xs2.stride(0), xs2.stride(1), ws.stride(0), ws.stride(1),
        stride_cs, c.stride(-2), c.stride(-1),
        triton.next_power_of_2(m) if m <= 256 else triton.cdiv(m, 256) * 256, split_k,
        BLOCK_SCALES=layout == "block", ACC_PROMOTE=None if FAST_ACCUM else ACC_PROMOTE_K,
    )
    if split_k > 1:
        block = 1024
        _gemm_splitk_reduce_kernel[(triton.cdiv(m * n, block),)](c, y2, m * n, split_k, c.stride(0), BLOCK=block)
    return y


# ---------------------------------------------------------------------------------------------------------------
# Reference, weight quantization, baseline


def _expand(s: torch.Tensor, rows: int, cols: int, block_rows: int) -> torch.Tensor:
    # scales [R, C] per (block_rows x 128) -> [rows, cols] per element
    return s.repeat_interleave(block_rows, 0)[:rows].repeat_interleave(SCALE_BLOCK, 1)[:, :cols]


def quantize_fp8_ref(x: torch.Tensor, x_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch version of `quantize_fp8` (fp32 math, the kernel's rounding): (e4m3 x [M, K], scales)."""
    x2 = x.reshape(-1, x.shape[-1]).float()
    m, k = x2.shape
    if x_scale is None:
        g = triton.cdiv(k, SCALE_BLOCK)
        pad = torch.nn.functional.pad(x2, (0, g * SCALE_BLOCK - k)).view(m, g, SCALE_BLOCK)
        s = pad.abs().amax(-1).clamp_min(1e-12) / FP8_MAX  # [M, G]
        full = _expand(s, m, k, 1)
    else:
        s = x_scale.reshape(1).float()
        full = s
    return (x2 / full).clamp(-FP8_MAX, FP8_MAX).to(FP8), s


def quantize_weight_fp8(w: torch.Tensor, layout: str = "block") -> tuple[torch.Tensor, torch.Tensor]:
    """Offline weight quantization: w [N, K] -> (e4m3 w_q, fp32 scale): one amax/448 for `tensor`, one per
    128x128 block ([ceil(N/128), ceil(K/128)]) for `block`."""
    if layout not in LAYOUTS:
        raise ValueError(f"gemm_fp8: unknown scale layout {layout!r}; known: {', '.join(LAYOUTS)}")
    wf = w.float()
    n, k = wf.shape
    if layout == "tensor":
        s = (wf.abs().amax().clamp_min(1e-12) / FP8_MAX).reshape(())
        return (wf / s).clamp(-FP8_MAX, FP8_MAX).to(FP8), s
    bn, bk = triton.cdiv(n, SCALE_BLOCK), triton.cdiv(k, SCALE_BLOCK)
    pad = torch.nn.functional.pad(wf, (0, bk * SCALE_BLOCK - k, 0, bn * SCALE_BLOCK - n))
    s = pad.view(bn, SCALE_BLOCK, bk, SCALE_BLOCK).abs().amax((1, 3)).clamp_min(1e-12) / FP8_MAX  # [BN, BK]
    return (wf / _expand(s, n, k, SCALE_BLOCK)).clamp(-FP8_MAX, FP8_MAX).to(FP8), s


def gemm_fp8_ref(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                 x_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The same activation quantization, then dequant(x_q) @ dequant(w_q).T in fp32 (fp64 when x is fp64).
    w_q may arrive upcast (the harness upcasts floating inputs): its values are e4m3 values either way."""
    compute = torch.promote_types(x.dtype, torch.float32)
    n, k = w_q.shape
    block = x_scale is None
    xq, xs = quantize_fp8_ref(x, x_scale)
    m = xq.shape[0]
    xd = xq.to(compute) * (_expand(xs, m, k, 1) if block else xs).to(compute)
    wd = w_q.to(compute) * (_expand(w_scale.reshape(-1, triton.cdiv(k, SCALE_BLOCK)), n, k, SCALE_BLOCK)
                            if block else w_scale.reshape(()).to(compute)).to(compute)
    return (xd @ wd.T).reshape(*x.shape[:-1], n)


def baseline_quantization(device_type: str, compiling: bool = False) -> str:
    """How `gemm_fp8_baseline` quantizes its activations on `device_type` (what its time holds), as points say it."""
    if compiling:
        return "torch ops fused by Inductor"
    if device_type == "cuda" and not INTERPRET:
        return "fused: one kernel (quantize_fp8)"
    return "eager torch ops"


def _quantize_input(x2: torch.Tensor, x_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    # (e4m3 x, fp32 scales, M-major for block) as a user's fp8 path makes them: one fused kernel where Triton
    # compiles (`baseline_quantization`), else the same math in torch ops (Inductor fuses them under compile).
    if baseline_quantization(x2.device.type, torch.compiler.is_compiling()).startswith("fused:"):
        return quantize_fp8(x2, x_scale)
    if x_scale is not None:
        xs = x_scale.reshape(1).float()
        return (x2.float() / xs).clamp(-FP8_MAX, FP8_MAX).to(FP8), xs
    xq, xs = quantize_fp8_ref(x2)
    return xq, xs.t().contiguous().t()  # cuBLASLt wants the activation scales M-major ("outer-dim major")


def gemm_fp8_baseline(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                      x_scale: torch.Tensor | None = None) -> torch.Tensor:
    # What a user's fp8 path runs: x quantized in one fused kernel (`_quantize_input`), then torch._scaled_mm
    # (cuBLASLt; the CPU build takes scalar scales) with FAST_ACCUM. Block scales: torch's 1x128 x 128x128 recipe
    # (cuBLASLt, sm90+); torch or the device lacking it fails here and the point records the error.
    x2 = x.reshape(-1, x.shape[-1])
    out_dtype = torch.float32 if x.dtype == torch.float32 else torch.bfloat16
    if x_scale is None and x.device.type != "cuda":
        raise RuntimeError("gemm_fp8: torch._scaled_mm block scales (1x128 x 128x128) run on CUDA sm90+ only")
    xq, xs = _quantize_input(x2, x_scale)
    if x_scale is not None:
        xs, ws = xs.reshape(()), w_scale.reshape(()).float()
    else:
        ws = w_scale.float().t()  # cuBLASLt wants the weight's as [K/128, N/128]
    y = torch._scaled_mm(xq, w_q.t(), scale_a=xs, scale_b=ws, out_dtype=out_dtype, use_fast_accum=FAST_ACCUM)
    return y.reshape(*x.shape[:-1], w_q.shape[0])


def timing_fields(backend: str, device_type: str) -> dict:
    """What a gemm_fp8 point records beside its time: the accumulation (the same on every backend) and how its
    activations were quantized inside the timed call."""
    quant = {"triton": "fused: one kernel (quantize_fp8)", "compile": baseline_quantization(device_type, True)}
    return {"fp8_accum": ACCUMULATION, "quantization": quant.get(backend) or baseline_quantization(device_type)}


def model_shapes(cfg, tokens=(), batch=(), context=()) -> list[dict]:
    """A dense layer's four projections of `cfg`, as kernels.gemm (the suite adds the scale layout)."""
    return _gemm_model_shapes(cfg, tokens=tokens)


MODEL_GRID = ("tokens",)
SHAPE_FIELDS = ("m", "n", "k")  # sizes make_inputs reads (scale: tensor or block, tensor by default)


def flops(shape: dict) -> int:
    return 2 * shape["m"] * shape["n"] * shape["k"]


def bytes_moved(shape: dict, dtype: torch.dtype) -> int:
    # bf16 x read (by the quantizer), e4m3 x written and read back, e4m3 w read, scales, bf16 y written: the
    # activation quantization's round trip is part of the op.
    m, n, k = shape["m"], shape["n"], shape["k"]
    scales = 4 * (m * triton.cdiv(k, SCALE_BLOCK) * 2 + triton.cdiv(n, SCALE_BLOCK) * triton.cdiv(k, SCALE_BLOCK)) \
        if shape.get("scale", "tensor") == "block" else 8
    return 2 * m * k + 2 * m * k + n * k + scales + 2 * m * n


def make_inputs(shape: dict, dtype: torch.dtype, device, seed: int) -> tuple:
    """(x bf16 [M, K], w_q e4m3 [N, K], w_scale, x_scale): shape {m, n, k, scale: tensor|block}. `dtype` is the
    point's (e4m3 or bf16; activations are bf16 either way, fp32 only when asked for fp32)."""
    # Drawn on `device` (seeded per device) in fp32, quantized there: no host draw and copy.
    g = torch.Generator(device=device).manual_seed(seed)
    m, n, k = shape["m"], shape["n"], shape["k"]
    layout = shape.get("scale", "tensor")
    x = torch.randn((m, k), generator=g, device=device)
    w = torch.randn((n, k), generator=g, device=device).div_(k**0.5)
    if layout == "block":  # channels of different magnitude: what block scales exist for
        x.mul_(torch.exp(torch.randn((1, k), generator=g, device=device)))
    w_q, w_scale = quantize_weight_fp8(w, layout)
    del w
    x = x.to(torch.float32 if dtype == torch.float32 else torch.bfloat16)
    x_scale = (x.float().abs().amax() / FP8_MAX).reshape(()) if layout == "tensor" else None  # "calibrated"
    return x, w_q, w_scale, x_scale


def tolerance(dtype: torch.dtype) -> float:
    # Kernel and reference quantize identically (a division rounding differently flips an element by one e4m3
    # step, rarely), so the bf16 output rounding dominates as for gemm: half-ulp 3.9e-3, a full ulp (7.8e-3)
    # under the interpreter, whose bf16 stores truncate. cuBLASLt's fast accumulation stays well inside it.
    return 1.6e-2
