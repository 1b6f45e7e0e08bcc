"""GEMM for linear layers: y = x @ w.T with x [..., K], w [N, K], y [..., N] in x.dtype.

Prefill (M = tokens, up to 16k) runs the classic tiled kernel (grouped tile order for L2 reuse).
Decode (M = 1..256) is skinny: with BLOCK_M >= M the grid is only cdiv(N, BLOCK_N) programs, too few
to keep every SM streaming the weight. For M <= SKINNY_M the launcher splits K across extra programs
(split-K) that write fp32 partials, and a small second kernel sums them in a fixed order (deterministic,
no atomics, so autotuning may rerun the kernel freely).
"""

import torch
import torch.nn.functional as F
from tokenfleet.kernels._triton import INTERPRET, check_float, check_out, num_sms, pin_config, smem_bytes, tl, triton

SKINNY_M = 64  # M at or below this takes the small-BLOCK_M configs and may split K
# K range of one split is a multiple of this, so it is a multiple of every BLOCK_K in the space.
_K_SPLIT_ALIGN = 32 if INTERPRET else 256


def _gemm_configs(interpret: bool = INTERPRET) -> list:
    if interpret:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4, num_stages=1)]

    def cfg(bm, bn, bk, gm, warps, stages):
        return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": gm},
                             num_warps=warps, num_stages=stages)

    return [
        # Tall M (prefill): the Triton matmul tutorial's space for sm80/sm90 plus a 256-wide tile.
        cfg(128, 256, 64, 8, 8, 3),
        cfg(256, 128, 64, 8, 8, 3),
        cfg(128, 128, 64, 8, 8, 4),
        cfg(64, 256, 32, 8, 4, 4),
        cfg(128, 128, 32, 8, 4, 4),
        cfg(128, 64, 32, 8, 4, 4),
        cfg(64, 128, 32, 8, 4, 4),
        cfg(64, 64, 64, 8, 4, 4),
        # Skinny M (decode): one or two M tiles, narrow N tiles for more programs, deep K pipelining
        # because the weight stream is the whole cost.
        cfg(16, 64, 128, 1, 4, 4),
        cfg(16, 64, 256, 1, 4, 3),
        cfg(16, 128, 128, 1, 4, 4),
        cfg(16, 32, 256, 1, 2, 4),
        cfg(32, 64, 128, 1, 4, 4),
        cfg(64, 64, 128, 1, 4, 4),
    ]


def _prune_configs(configs, named_args, **kwargs):
    # Tall configs waste whole tiles on a decode batch; skinny ones starve tensor cores on prefill.
    m = named_args["M"]
    if m <= SKINNY_M:
        keep = [c for c in configs if c.kwargs["GROUP_M"] == 1 and c.kwargs["BLOCK_M"] <= max(16, m)]
    else:
        keep = [c for c in configs if c.kwargs["GROUP_M"] > 1]
    # Pipelined x and w tiles: num_stages copies in shared memory (fp32 doubles them; sm90 compile measured).
    x = named_args["x_ptr"]
    limit = smem_bytes(x.device)
    fits = [c for c in keep if c.num_stages * (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_K"]
            * x.element_size() <= limit]
    return fits or keep[-1:] or configs[-1:]


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n, pid_k) of this program. Grouped ordering: GROUP_M row-tiles share each w column-tile while
    it is still in L2. Shared with kernels.gemm_fp8."""
    pid = tl.program_id(axis=0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n, tl.program_id(axis=1)


@triton.jit
def _tile_offsets(pid_m, pid_n, pid_k, M, N, K, K_SPLIT,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # Rows/cols past the edge wrap around (always in bounds, so loads need no M/N mask); the store masks them.
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    k_start = pid_k * K_SPLIT
    return offs_m, offs_n, tl.arange(0, BLOCK_K), k_start, min(k_start + K_SPLIT, K)


@triton.jit
def _store_tile(c_ptr, acc, pid_m, pid_n, pid_k, M, N, stride_cs, stride_cm, stride_cn,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # int64: M * N passes 2^31 for e.g. 16k prefill tokens through a 152k-vocab LM head.
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    c_ptrs = c_ptr + pid_k * stride_cs + rows[:, None] * stride_cm + cols[None, :] * stride_cn
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


@triton.autotune(
    configs=_gemm_configs(),
    # M enters the key bucketed (M_BUCKET), so a decode loop over batch sizes 1..256 tunes ~9 times, not 256.
    key=["M_BUCKET", "N", "K", "SPLIT_K"],
    prune_configs_by=None if INTERPRET else {"early_config_prune": _prune_configs},
)
@triton.jit
def _gemm_kernel(
    x_ptr, w_ptr, c_ptr,
    M, N, K, K_SPLIT,
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_cs, stride_cm, stride_cn,
    M_BUCKET, SPLIT_K,  # autotune keys only
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # c[s] = x[:, ks] @ w[:, ks].T for the K range ks of split s (program axis 1); one split writes y directly.
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
        acc = tl.dot(a, b, acc)  # fp32 accumulate (tf32 inputs for fp32 on sm80+)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    _store_tile(c_ptr, acc, pid_m, pid_n, pid_k, M, N, stride_cs, stride_cm, stride_cn, BLOCK_M, BLOCK_N)


# Pinned for small-shape tests: the first skinny tile (16x64x128, 4 stages: 164 KiB of shared memory in fp32).
pin_config(_gemm_kernel, next(c for c in _gemm_configs() if c.kwargs["BLOCK_M"] == 16))


@triton.jit
def _gemm_splitk_reduce_kernel(
    ws_ptr, y_ptr, MN, SPLIT_K, stride_ws,
    BLOCK: tl.constexpr,
):
    # y = sum over splits of the fp32 partials, in split order (bitwise reproducible), cast once.
    pid = tl.program_id(axis=0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, SPLIT_K):
        acc += tl.load(ws_ptr + s * stride_ws + offs, mask=mask, other=0.0)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def _pick_split_k(m: int, n: int, k: int, device: torch.device) -> int:
    """Splits of K for a skinny GEMM so that about two programs per SM stream the weight."""
    if m > SKINNY_M:
        return 1
    tiles = triton.cdiv(m, 16) * triton.cdiv(n, 64)  # the skinny configs' typical tile count
    target = 2 * num_sms(device)
    split = 1
    # Keep at least two aligned K chunks per split: shorter splits spend more on partials than they save.
    while split < 16 and tiles * split < target and k >= 4 * split * _K_SPLIT_ALIGN:
        split *= 2
    return split


def gemm(x: torch.Tensor, w: torch.Tensor, *, out: torch.Tensor | None = None,
         split_k: int | None = None) -> torch.Tensor:
    """y = x @ w.T (a linear layer without bias). x [..., K], w [N, K] -> y [..., N] in x.dtype.

    `out`: optional contiguous output buffer. `split_k`: force the number of K splits (tests); by
    default 1 for M > SKINNY_M, else enough to fill the GPU.
    """
    check_float("gemm", x, w)
    if x.dim() < 1 or w.dim() != 2:
        raise ValueError(f"gemm: need x [..., K] and w [N, K], got {tuple(x.shape)} and {tuple(w.shape)}")
    n, k = w.shape
    if x.shape[-1] != k:
        raise ValueError(f"gemm: x [..., {x.shape[-1]}] and w [{n}, {k}] disagree on K")
    if k == 0:
        raise ValueError("gemm: K must be > 0")
    x2 = x.reshape(-1, k)  # x: [M, K] (a view when x's leading dims are mergeable)
    m = x2.shape[0]
    out_shape = (*x.shape[:-1], n)
    check_out("gemm", out, out_shape, x.dtype, x.device)
    y = torch.empty(out_shape, dtype=x.dtype, device=x.device) if out is None else out
    if m == 0 or n == 0:
        return y
    y2 = y.view(m, n)

    if split_k is None:
        split_k = _pick_split_k(m, n, k, x.device)
    if split_k < 1:
        raise ValueError(f"gemm: split_k must be >= 1, got {split_k}")
    k_split = triton.cdiv(triton.cdiv(k, split_k), _K_SPLIT_ALIGN) * _K_SPLIT_ALIGN
    split_k = triton.cdiv(k, k_split)  # splits actually needed after alignment
    if split_k == 1:
        c, stride_cs = y2, 0
    else:
        c = torch.empty((split_k, m, n), dtype=torch.float32, device=x.device)  # fp32 partials
        stride_cs = c.stride(0)
    stride_cm, stride_cn = c.stride(-2), c.stride(-1)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), split_k)

    _gemm_kernel[grid](
        x2, w, c,
        m, n, k, k_split,
        x2.stride(0), x2.stride(1),
        w.stride(0), w.stride(1),
        stride_cs, stride_cm, stride_cn,
        triton.next_power_of_2(m) if m <= 256 else triton.cdiv(m, 256) * 256, split_k,
    )
    if split_k > 1:
        block = 1024
        _gemm_splitk_reduce_kernel[(triton.cdiv(m * n, block),)](c, y2, m * n, split_k, c.stride(0), BLOCK=block)
    return y


def gemm_ref(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Torch reference: x @ w.T, accumulated at least in fp32 (float64 stays float64), output in x.dtype."""
    compute = torch.promote_types(x.dtype, torch.float32)
    return torch.matmul(x.to(compute), w.to(compute).T).to(x.dtype)


def gemm_baseline(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # x: [..., K], w: [N, K] -> [..., N]. cuBLAS / oneDNN accumulate in fp32 without upcasting the weight;
    # gemm_ref converts the whole weight to fp32 first: 12x slower for a bf16 [1,1024]x[75968,1024] matvec on
    # this CPU (186 ms vs 16 ms), which would make the torch backend's decode numbers about that copy.
    return F.linear(x, w)


def model_shapes(cfg, tokens=(), batch=(), context=()) -> list[dict]:
    """The four projections of a dense layer of `cfg` (ModelConfig fields; fused QKV and gate/up), m = tokens."""
    h, d, hq, hkv, inter = cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size
    parts = (("qkv", (hq + 2 * hkv) * d, h), ("o", h, hq * d), ("gate_up", 2 * inter, h), ("down", h, inter))
    return [{"m": t, "n": n, "k": k, "source": f"{cfg.id}.{part}"} for t in tokens for part, n, k in parts]


MODEL_GRID = ("tokens",)
SHAPE_FIELDS = ("m", "n", "k")  # sizes make_inputs reads


def flops(shape: dict) -> int:
    # One multiply and one add per (m, n, k).
    return 2 * shape["m"] * shape["n"] * shape["k"]


def bytes_moved(shape: dict, dtype: torch.dtype) -> int:
    # x and w read once, y written once (split-K partials are extra traffic, not minimum bytes).
    es = torch.empty((), dtype=dtype).element_size()
    m, n, k = shape["m"], shape["n"], shape["k"]
    return (m * k + n * k + m * n) * es


def make_inputs(shape: dict, dtype: torch.dtype, device, seed: int) -> tuple:
    # Drawn where they are used, in their dtype: no host draw and copy, no fp32 temporary (seeded per device).
    g = torch.Generator(device=device).manual_seed(seed)
    m, n, k = shape["m"], shape["n"], shape["k"]
    x = torch.randn((m, k), generator=g, device=device, dtype=dtype)
    w = torch.randn((n, k), generator=g, device=device, dtype=dtype).div_(k**0.5)  # keeps y ~ N(0, 1) at any K
    return x, w


def tolerance(dtype: torch.dtype) -> float:
    # Relative (norm) error vs a float64 reference. Output rounding dominates: fp16 has a 10-bit mantissa
    # (half-ulp 4.9e-4), bf16 7 bits (3.9e-3). fp32 operands go through tf32 (10-bit mantissa) tensor-core
    # dots on sm80+, so fp32 gets an fp16-like bound rather than 1e-6.
    return {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 2e-3}.get(dtype, 1e-6)
