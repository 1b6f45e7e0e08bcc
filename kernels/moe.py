"""Fused MoE expert layer: out[t] = sum_j w[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t])), e = topk_ids[t, j].

Inputs (transformers' and vLLM's layout): hidden x [T, D], topk_ids [T, k] (int), topk_weights [T, k] (fp32),
w13 [E, 2I, D] (gate rows 0..I-1, then up), w2 [E, D, I]. Optional fp8: w13/w2 in e4m3 with DeepSeek-V3's
128x128 block scales w13_scale [E, ceil(2I/128), ceil(D/128)], w2_scale [E, ceil(D/128), ceil(I/128)]
(`gemm_fp8.quantize_weight_fp8` per expert); activations then go e4m3 per token per 128 channels (`quantize_fp8`).

The T*k (token, slot) pairs are sorted by expert and each expert's run padded to a multiple of BLOCK_M
(`align_tokens`, the block alignment of vLLM's and SGLang's Triton fused_moe: `sorted_ids` lists slot ids, padding
slots hold T*k; `block_expert` gives each BLOCK_M rows' expert, E past the last block). An expert no token chose
gets no block, so weight bytes are read for the touched experts only. All of it runs on the device without a host
sync (the grid is sized by the worst case, T*k + min(T*k, E) * (BLOCK_M - 1) rows; blocks past the end exit).

Two launches of `_moe_gemm_kernel`:
1. GATED: one program per (BLOCK_M sorted slots, BLOCK_N of I) computes the gate and the up tile from the same x rows
   (x row = slot // k) and writes silu(gate) * up to h [T*k, I] at the slots' rows. fp8: the epilogue quantizes h per
   slot per 128 channels (BLOCK_N = 128: one scale group per tile) and writes e4m3 h and its scales, no bf16 round
   trip.
2. down: h rows @ w2[e].T, times the slot's routing weight, to y [T*k, D]; then out = y.view(T, k, D).sum(1).

Block sizes are picked per call in Python (not autotuned: the alignment must know BLOCK_M before the launch): `config`
when given, else the device's tuned file (configs/tuned/<device>.json, written by benchmarks/tune_moe.py; the point
names it in `tuned_config`), else vLLM's default rule (fused_moe.get_default_config: BLOCK_M 16 when the slots are no
more than the experts, else 64; block fp8: BLOCK_N = BLOCK_K = 128).

Baselines: `moe_baseline` is torch's grouped GEMM (`F.grouped_mm`, else `torch._grouped_mm`) as transformers'
`grouped_mm` experts implementation runs it (sort by expert, offsets, two grouped GEMMs, index_add); it has no host
sync, so the harness's `compile` backend compiles it whole. `moe_loop` is transformers' eager per-expert loop
(`DeepseekV3Experts.forward`: one_hot, nonzero, a Python loop over the experts hit), the backend `loop`. fp8: the loop
runs torch._scaled_mm with block scales per expert (CUDA sm90+); torch has no grouped GEMM with 128x128 block scales,
so the grouped baseline fails there and the point records it.
"""

import functools
import json
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenfleet.kernels._triton import INTERPRET, tl, triton
from tokenfleet.kernels.gemm_fp8 import (
    ACC_PROMOTE_K,
    FAST_ACCUM,
    FP8,
    SCALE_BLOCK,
    _expand,
    _to_e4m3,
    gemm_fp8_baseline,
    quantize_fp8,
    quantize_fp8_ref,
    quantize_weight_fp8,
)

# shape["routing"]: "uniform", "zipf:<exponent>", or "replay:<file label>" with the file's expert popularity in
# shape["routing_hist"] (pairs per expert; the harness reads and validates the file: tokenfleet.model.replay)
ROUTINGS = ("uniform", "zipf", "replay")


# ---------------------------------------------------------------------------------------------------------------
# Alignment


def max_padded_rows(slots: int, experts: int, block_m: int) -> int:
    """Rows of the sorted, padded slot list in the worst case: every touched expert (at most min(slots, E)) wastes
    up to BLOCK_M - 1 rows of padding; rounded up to whole blocks."""
    rows = slots + min(slots, experts) * (block_m - 1)
    return triton.cdiv(rows, block_m) * block_m


def align_tokens(topk_ids: torch.Tensor, experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted_ids [P] int32: slot ids grouped by expert, each expert's run padded to BLOCK_M with T*k;
    block_expert [P / BLOCK_M] int32: the expert of each block, `experts` past the last). An id of -1 (a slot whose
    expert another rank holds, after `expert_map`) gets no row. Torch ops only, no host sync (scatter_add instead
    of bincount, whose CUDA version reads the max back; the dropped slots are written to one spare row)."""
    flat = topk_ids.reshape(-1).to(torch.int64)
    n = flat.numel()
    dev = flat.device
    flat = torch.where(flat < 0, experts, flat)  # non-local slots: a sentinel expert after the last
    counts = torch.zeros(experts + 1, dtype=torch.int64, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded[experts] = 0
    ends = torch.cumsum(padded, 0)
    order = torch.argsort(flat, stable=True)  # slots by expert, in slot order within one
    sorted_e = flat[order]
    rank = torch.arange(n, device=dev) - (torch.cumsum(counts, 0) - counts)[sorted_e]
    rows = max_padded_rows(n, experts, block_m)
    sorted_ids = torch.full((rows + 1,), n, dtype=torch.int32, device=dev)
    dest = torch.where(sorted_e == experts, rows, (ends - padded)[sorted_e] + rank)
    sorted_ids[dest] = order.to(torch.int32)
    starts = torch.arange(0, rows, block_m, device=dev)
    block_expert = torch.searchsorted(ends[:experts], starts, right=True).to(torch.int32)  # E once past the last
    return sorted_ids[:rows], block_expert


# ---------------------------------------------------------------------------------------------------------------
# Kernel


@triton.jit
def _moe_gemm_kernel(
    a_ptr, w_ptr, as_ptr, ws_ptr, c_ptr, cs_ptr, sorted_ptr, bexp_ptr, tw_ptr,
    N, K, SLOTS, ROWS, E, A_DIV,
    stride_am, stride_ak, stride_we, stride_wn, stride_wk,
    stride_asm, stride_ask, stride_wse, stride_wsn, stride_wsk,
    stride_cm, stride_cn, stride_csm,
    GATED: tl.constexpr, MUL_WEIGHT: tl.constexpr, FP8_IN: tl.constexpr, FP8_OUT: tl.constexpr,
    ROUND_FIRST: tl.constexpr, ACC_PROMOTE: tl.constexpr,  # fp8: gemm_fp8's accumulation mode (None: fast on sm90)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # c[slot, n] for the BLOCK_M sorted slots of one expert: a[slot // A_DIV] @ w[e, n].T (GATED: silu(gate) * up,
    # the up rows N below the gate rows). Grouped launch order (GROUP_M blocks of M share their weight tiles in L2).
    pid = tl.program_id(axis=0)
    num_m = ROWS // BLOCK_M
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    e = tl.load(bexp_ptr + pid_m).to(tl.int64)
    if e < E:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        slot = tl.load(sorted_ptr + offs_m).to(tl.int64)
        m_mask = slot < SLOTS
        a_row = slot // A_DIV
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + a_row[:, None] * stride_am + offs_k[None, :] * stride_ak
        w_ptrs = w_ptr + e * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk  # [BK, BN]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            k_mask = (k + offs_k) < K
            a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            if GATED:
                bu = tl.load(w_ptrs + N * stride_wn, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            if FP8_IN:
                # BLOCK_K divides 128: this K tile lies in one scale group.
                kb = k // 128
                a_s = tl.load(as_ptr + a_row * stride_asm + kb * stride_ask, mask=m_mask, other=0.0)
                ws_base = ws_ptr + e * stride_wse + kb * stride_wsk
                w_s = tl.load(ws_base + (offs_n // 128) * stride_wsn, mask=n_mask, other=0.0)
                acc += tl.dot(a, b, max_num_imprecise_acc=ACC_PROMOTE) * a_s[:, None] * w_s[None, :]
                if GATED:
                    wu_s = tl.load(ws_base + ((N + offs_n) // 128) * stride_wsn, mask=n_mask, other=0.0)
                    acc_u += tl.dot(a, bu, max_num_imprecise_acc=ACC_PROMOTE) * a_s[:, None] * wu_s[None, :]
            else:
                acc = tl.dot(a, b, acc)
                if GATED:
                    acc_u = tl.dot(a, bu, acc_u)
            a_ptrs += BLOCK_K * stride_ak
            w_ptrs += BLOCK_K * stride_wk
        if GATED:
            acc = acc * tl.sigmoid(acc) * acc_u
        if MUL_WEIGHT:
            acc = acc * tl.load(tw_ptr + slot, mask=m_mask, other=0.0)[:, None]
        c_ptrs = c_ptr + slot[:, None] * stride_cm + offs_n[None, :] * stride_cn
        c_mask = m_mask[:, None] & n_mask[None, :]
        if FP8_OUT:
            # BLOCK_N = 128 and tiles start on a multiple of 128: one scale per slot per tile (masked columns are 0).
            s = tl.maximum(tl.max(tl.abs(acc), axis=1), 1e-12) / 448.0
            q = tl.minimum(tl.maximum(acc / s[:, None], -448.0), 448.0)
            tl.store(c_ptrs, _to_e4m3(q, ROUND_FIRST), mask=c_mask)
            tl.store(cs_ptr + slot * stride_csm + pid_n, s, mask=m_mask)
        else:
            tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


def default_config(slots: int, experts: int, fp8: bool) -> dict:
    """Block sizes by vLLM's default rule (fused_moe.get_default_config), the interpreter's smallest tiles."""
    if INTERPRET:
        return {"BLOCK_M": 16, "BLOCK_N": 128 if fp8 else 32, "BLOCK_K": 32, "GROUP_M": 1, "num_warps": 4,
                "num_stages": 1}
    if fp8:
        return {"BLOCK_M": 16 if slots <= experts else 64, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 32,
                "num_warps": 4, "num_stages": 3}
    if slots <= experts:
        return {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 1, "num_warps": 4, "num_stages": 3}
    return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 3}


# Per-device tuned block sizes: configs/tuned/<device>.json (benchmarks/tune_moe.py writes them on the device), a
# "moe" list of {experts, hidden, inter, dtype, slots, config}; a call takes the entry of its shape and dtype whose
# slot count (T * k) is nearest on a log scale. Without a file (or an entry) the default rule holds.
# configs/ lies beside kernels/ both in a checkout and in the wheel (tokenfleet/configs, tokenfleet/kernels).
TUNED_DIR = Path(__file__).resolve().parent.parent / "configs" / "tuned"
CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")


def device_slug(device) -> str:
    """The tuned file's name for `device`: its CUDA name in lower case, words joined by '-' ("nvidia-h200")."""
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


@functools.lru_cache(maxsize=8)
def _tuned_entries(path: Path) -> tuple:
    if not path.is_file():
        return ()
    try:
        entries = json.loads(path.read_text())["moe"]
        return tuple((e["experts"], e["hidden"], e["inter"], e["dtype"], e["slots"],
                      {k: int(e["config"][k]) for k in CONFIG_KEYS}) for e in entries)
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: moe: not a tuned-config file ({err!r})") from None


def tuned_config(slots: int, experts: int, hidden: int, inter: int, dtype: str, device) -> tuple[dict, str] | None:
    """(config, file) from the device's tuned file for this shape and dtype ("bf16", "fp16", "fp32", "fp8"), the
    entry nearest in slots; None without one."""
    path = TUNED_DIR / f"{device_slug(device)}.json"
    near = [(abs(math.log(max(slots, 1) / max(e[4], 1))), e[5]) for e in _tuned_entries(path)
            if e[:4] == (experts, hidden, inter, dtype)]
    if not near:
        return None
    return dict(min(near, key=lambda x: x[0])[1]), f"configs/tuned/{path.name}"


def dtype_name(w13: torch.Tensor) -> str:
    return {FP8: "fp8", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[w13.dtype]


def _check(hidden, topk_ids, topk_weights, w13, w2, w13_scale, w2_scale, expert_map=None) -> bool:
    fp8 = w13.dtype == FP8
    if expert_map is not None and (expert_map.dim() != 1 or expert_map.dtype not in (torch.int32, torch.int64)
                                   or expert_map.device != hidden.device):
        raise ValueError(f"moe: expert_map must be int32 [E_global] (local id or -1) on {hidden.device}, got "
                         f"{expert_map.dtype} {tuple(expert_map.shape)} on {expert_map.device}")
    if hidden.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"moe: hidden states must be fp16, bf16 or fp32, got {hidden.dtype}")
    if hidden.dim() != 2 or w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"moe: need hidden [T, D], w13 [E, 2I, D], w2 [E, D, I], got {tuple(hidden.shape)}, "
                         f"{tuple(w13.shape)}, {tuple(w2.shape)}")
    t, d = hidden.shape
    e, two_i, _ = w13.shape
    if two_i % 2 or tuple(w13.shape) != (e, two_i, d) or tuple(w2.shape) != (e, d, two_i // 2):
        raise ValueError(f"moe: w13 {tuple(w13.shape)} and w2 {tuple(w2.shape)} do not fit hidden "
                         f"{tuple(hidden.shape)}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != t or topk_weights.shape != topk_ids.shape:
        raise ValueError(f"moe: need topk_ids and topk_weights [T, k], got {tuple(topk_ids.shape)} and "
                         f"{tuple(topk_weights.shape)}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"moe: topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if fp8:
        if w2.dtype != FP8 or hidden.dtype != torch.bfloat16:
            raise ValueError("moe: fp8 experts need both w13 and w2 in e4m3 and bf16 hidden states")
        i = two_i // 2
        want = {"w13_scale": (w13_scale, (e, triton.cdiv(two_i, SCALE_BLOCK), triton.cdiv(d, SCALE_BLOCK))),
                "w2_scale": (w2_scale, (e, triton.cdiv(d, SCALE_BLOCK), triton.cdiv(i, SCALE_BLOCK)))}
        for name, (sc, shape) in want.items():
            if sc is None or tuple(sc.shape) != shape:
                raise ValueError(f"moe: e4m3 experts need {name} {list(shape)} (per 128x128 block), got "
                                 f"{None if sc is None else tuple(sc.shape)}")
    else:
        if w13.dtype != hidden.dtype or w2.dtype != hidden.dtype:
            raise ValueError(f"moe: weights must be in the hidden states' dtype {hidden.dtype} (or e4m3), got "
                             f"{w13.dtype} and {w2.dtype}")
        if w13_scale is not None or w2_scale is not None:
            raise ValueError("moe: scales apply to e4m3 experts only")
    for x in (topk_ids, topk_weights, w13, w2):
        if x.device != hidden.device:
            raise ValueError(f"moe: inputs on different devices: {hidden.device} and {x.device}")
    return fp8


def moe(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w13: torch.Tensor,
        w2: torch.Tensor, w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
        expert_map: torch.Tensor | None = None, *, config: dict | None = None) -> torch.Tensor:
    """The routed experts of one MoE layer: hidden [T, D], topk_ids [T, k] (int32/int64, ids in [0, E)),
    topk_weights [T, k] (multiplied in fp32), w13 [E, 2I, D], w2 [E, D, I] in hidden's dtype, or e4m3 with
    w13_scale / w2_scale per 128x128 block (hidden bf16) -> out [T, D] in hidden's dtype. An expert-parallel slice
    passes `expert_map` (vLLM's: int32 [E_global], the local expert of each global id or -1): topk_ids are then
    global, w13/w2 hold the E local experts, and slots routed elsewhere add nothing. `config` overrides the block
    sizes (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages; fp8 needs BLOCK_N 128, BLOCK_K | 128)."""
    fp8 = _check(hidden, topk_ids, topk_weights, w13, w2, w13_scale, w2_scale, expert_map)
    if expert_map is not None:
        topk_ids = expert_map[topk_ids.long()]
    t, d = hidden.shape
    e, two_i, _ = w13.shape
    i = two_i // 2
    k = topk_ids.shape[1]
    out = torch.empty((t, d), dtype=hidden.dtype, device=hidden.device)
    slots = t * k
    if slots == 0 or d == 0:
        return out.zero_()
    if config is None and not INTERPRET:
        tuned = tuned_config(slots, e, d, i, dtype_name(w13), hidden.device)
        config = tuned[0] if tuned else None
    cfg = dict(config or default_config(slots, e, fp8))
    if fp8 and (cfg["BLOCK_N"] != SCALE_BLOCK or SCALE_BLOCK % cfg["BLOCK_K"]):
        raise ValueError(f"moe: e4m3 experts need BLOCK_N 128 and BLOCK_K dividing 128, got {cfg}")
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    launch = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": cfg["BLOCK_K"], "GROUP_M": cfg["GROUP_M"],
              "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    sorted_ids, block_expert = align_tokens(topk_ids, e, bm)
    rows = sorted_ids.numel()
    tw = topk_weights.reshape(-1).to(torch.float32).contiguous()
    if hidden.stride(-1) != 1:
        hidden = hidden.contiguous()
    dummy = tw
    if fp8:
        a, a_s = quantize_fp8(hidden)  # e4m3 [T, D], fp32 [T, ceil(D/128)]
        h = torch.empty((slots, i), dtype=FP8, device=hidden.device)
        h_s = torch.empty((slots, triton.cdiv(i, SCALE_BLOCK)), dtype=torch.float32, device=hidden.device)
    else:
        a, a_s = hidden, dummy
        h = torch.empty((slots, i), dtype=hidden.dtype, device=hidden.device)
        h_s = dummy

    def scale_strides(s):
        return (s.stride(0), s.stride(1), s.stride(2)) if fp8 else (0, 0, 0)

    acc_promote = None if FAST_ACCUM else ACC_PROMOTE_K  # the same accumulation as gemm_fp8 and its baseline

    _moe_gemm_kernel[(rows // bm * triton.cdiv(i, bn),)](
        a, w13, a_s, w13_scale if fp8 else dummy, h, h_s, sorted_ids, block_expert, tw,
        i, d, slots, rows, e, k,
        a.stride(0), a.stride(1), w13.stride(0), w13.stride(1), w13.stride(2),
        a_s.stride(0) if fp8 else 0, a_s.stride(1) if fp8 else 0, *scale_strides(w13_scale),
        h.stride(0), h.stride(1), h_s.stride(0) if fp8 else 0,
        GATED=True, MUL_WEIGHT=False, FP8_IN=fp8, FP8_OUT=fp8, ROUND_FIRST=INTERPRET, ACC_PROMOTE=acc_promote, **launch,
    )
    # Slots routed to other ranks get no row: their y rows stay zero (written nowhere else).
    y = (torch.empty if expert_map is None else torch.zeros)((slots, d), dtype=hidden.dtype, device=hidden.device)
    _moe_gemm_kernel[(rows // bm * triton.cdiv(d, bn),)](
        h, w2, h_s, w2_scale if fp8 else dummy, y, dummy, sorted_ids, block_expert, tw,
        d, i, slots, rows, e, 1,
        h.stride(0), h.stride(1), w2.stride(0), w2.stride(1), w2.stride(2),
        h_s.stride(0) if fp8 else 0, h_s.stride(1) if fp8 else 0, *scale_strides(w2_scale),
        y.stride(0), y.stride(1), 0,
        GATED=False, MUL_WEIGHT=True, FP8_IN=fp8, FP8_OUT=False, ROUND_FIRST=INTERPRET, ACC_PROMOTE=acc_promote,
        **launch,
    )
    return torch.sum(y.view(t, k, d), dim=1, out=out)


# ---------------------------------------------------------------------------------------------------------------
# Reference and baselines


def _dequant_expert(w: torch.Tensor, scale: torch.Tensor | None, compute: torch.dtype) -> torch.Tensor:
    if scale is None:
        return w.to(compute)
    n, kk = w.shape
    return w.to(compute) * _expand(scale, n, kk, SCALE_BLOCK).to(compute)


def moe_ref(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w13: torch.Tensor,
            w2: torch.Tensor, w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
            expert_map: torch.Tensor | None = None) -> torch.Tensor:
    """Per expert in >= fp32, the definition: fp8 quantizes x per token per 128 channels and h per slot per 128
    channels exactly as the kernel does (quantize_fp8_ref), with dequantized block-scaled weights. Slots whose
    expert_map entry is -1 add nothing."""
    if expert_map is not None:
        topk_ids = expert_map.to(topk_ids.device)[topk_ids.long()]
    compute = torch.promote_types(hidden.dtype, torch.float32)
    t, d = hidden.shape
    k = topk_ids.shape[1]
    fp8 = w13_scale is not None
    if fp8:
        xq, xs = quantize_fp8_ref(hidden)
        x = xq.to(compute) * _expand(xs, t, d, 1).to(compute)
    else:
        x = hidden.to(compute)
    flat = topk_ids.reshape(-1).long()
    y = torch.zeros((t * k, d), dtype=compute, device=hidden.device)
    for e in [x for x in torch.unique(flat).tolist() if x >= 0]:
        slots = (flat == e).nonzero().reshape(-1)
        xe = x[slots // k]
        gu = xe @ _dequant_expert(w13[e], w13_scale[e] if fp8 else None, compute).T
        i = gu.shape[1] // 2
        h = F.silu(gu[:, :i]) * gu[:, i:]
        if fp8:
            hq, hs = quantize_fp8_ref(h.float())
            h = hq.to(compute) * _expand(hs, h.shape[0], i, 1).to(compute)
        y[slots] = (h @ _dequant_expert(w2[e], w2_scale[e] if fp8 else None, compute).T) \
            * topk_weights.reshape(-1)[slots].to(compute)[:, None]
    return y.view(t, k, d).sum(1).to(hidden.dtype)


def _grouped_mm():
    fn = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    if fn is None:
        raise RuntimeError("moe: this torch has neither F.grouped_mm nor torch._grouped_mm")
    return fn


def moe_baseline(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w13: torch.Tensor,
                 w2: torch.Tensor, w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
                 expert_map: torch.Tensor | None = None) -> torch.Tensor:
    """torch's grouped GEMM as transformers' `grouped_mm` experts path runs it: slots sorted by expert, offsets from
    a histogram, two grouped GEMMs (all E experts passed, the offsets select the touched ones), weights applied,
    index_add back to tokens. No host sync. An expert_map's non-local slots sort last as expert E, outside the
    offsets, and are zeroed before the index_add (transformers' expert-parallel sentinel). torch's kernel wants
    16-byte row strides (it raises on odd widths); e4m3 experts: torch has no grouped GEMM with block scales."""
    if w13_scale is not None:
        raise RuntimeError("moe: torch has no grouped GEMM with 128x128 block scales (e4m3 experts)")
    gmm = _grouped_mm()
    t, d = hidden.shape
    k = topk_ids.shape[1]
    e = w13.shape[0]
    flat = topk_ids.reshape(-1)
    if expert_map is not None:
        flat = expert_map[flat.long()]
        flat = torch.where(flat < 0, e, flat)
    ids_sorted, perm = torch.sort(flat)
    tok = perm // k
    x = hidden[tok]
    hist_in = ids_sorted.float() if hidden.device.type == "cpu" else ids_sorted.int()  # as transformers
    offs = torch.cumsum(torch.histc(hist_in, bins=e, min=0, max=e - 1), dim=0, dtype=torch.int32)
    gu = gmm(x, w13.transpose(-2, -1), offs=offs)
    gate, up = gu.chunk(2, dim=-1)
    y = gmm(F.silu(gate) * up, w2.transpose(-2, -1), offs=offs)
    y = y * topk_weights.reshape(-1)[perm, None]
    if expert_map is not None:
        y = y.masked_fill((ids_sorted >= e)[:, None], 0.0)  # rows past the offsets: never written by grouped_mm
    return torch.zeros_like(hidden).index_add_(0, tok, y.to(hidden.dtype))


def moe_loop(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w13: torch.Tensor,
             w2: torch.Tensor, w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
             expert_map: torch.Tensor | None = None) -> torch.Tensor:
    """transformers' eager experts loop (DeepseekV3Experts / Qwen3MoeExperts.forward): one_hot mask, the experts hit
    (nonzero: a host sync), per expert two F.linear (e4m3: torch._scaled_mm with block scales, CUDA sm90+) and an
    index_add."""
    e = w13.shape[0]
    out = torch.zeros_like(hidden)
    ids = topk_ids.long()
    if expert_map is not None:  # transformers' sentinel: non-local slots as expert E, skipped
        ids = expert_map[ids].long()
        ids = torch.where(ids < 0, e, ids)
    mask = F.one_hot(ids, num_classes=e + 1).permute(2, 1, 0)  # [E + 1, k, T]
    hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    for idx in hit:
        ex = int(idx[0])
        if ex == e:
            continue
        pos, tok = torch.where(mask[ex])
        x = hidden[tok]
        if w13_scale is not None:
            gu = gemm_fp8_baseline(x, w13[ex], w13_scale[ex])
        else:
            gu = F.linear(x, w13[ex])
        gate, up = gu.chunk(2, dim=-1)
        h = F.silu(gate) * up
        y = gemm_fp8_baseline(h, w2[ex], w2_scale[ex]) if w2_scale is not None else F.linear(h, w2[ex])
        out.index_add_(0, tok, (y * topk_weights[tok, pos, None]).to(out.dtype))
    return out


BASELINES = {"loop": moe_loop}  # extra vendor paths, each its own backend (the harness's kernels part)


# ---------------------------------------------------------------------------------------------------------------
# Shapes, counts, inputs


def model_shapes(cfg, tokens=(), batch=(), context=()) -> list[dict]:
    """The routed experts of an MoE `cfg` (ModelConfig with `moe`) for each token count (the suite case adds the
    routings, uniform by default); none for a dense model."""
    if cfg.moe is None:
        return []
    m = cfg.moe
    return [{"tokens": t, "hidden": cfg.hidden_size, "inter": m.moe_intermediate_size, "experts": m.num_experts,
             "topk": m.experts_per_token, "source": f"{cfg.id}.experts"} for t in tokens]


MODEL_GRID = ("tokens",)
SHAPE_FIELDS = ("tokens", "hidden", "inter", "experts", "topk")  # sizes make_inputs reads (+ routing, ep, ep_rank)


def parse_routing(routing: str) -> float | None:
    """"uniform" -> None; "zipf:<s>" -> s (> 0): expert popularity proportional to 1 / rank^s; "replay:<label>" ->
    None (the popularity is the shape's `routing_hist`)."""
    if routing == "uniform" or (routing.startswith("replay:") and len(routing) > len("replay:")):
        return None
    name, _, s = routing.partition(":")
    try:
        value = float(s)
    except ValueError:
        value = -1.0
    if name != "zipf" or not value > 0:
        raise ValueError(f"moe: routing must be 'uniform' or 'zipf:<exponent > 0>', or 'replay:<file>', got "
                         f"{routing!r}")
    return value


def _ep(shape: dict) -> tuple[int, int]:
    """(ranks, this rank) of an expert-parallel slice: shape `ep` (default 1: every expert here), `ep_rank` (0)."""
    p, r = shape.get("ep", 1), shape.get("ep_rank", 0)
    if shape["experts"] % p or not 0 <= r < p:
        raise ValueError(f"moe: ep {p} must divide {shape['experts']} experts, 0 <= ep_rank {r} < ep")
    return p, r


def expected_touched(shape: dict) -> float:
    """Experts (of this rank's E/ep) a uniform routing of `tokens` touches on average: E/ep (1 - (1 - k/E)^T)
    (each token picks k of E distinct, independently)."""
    e, k, t = shape["experts"], shape["topk"], shape["tokens"]
    return e / _ep(shape)[0] * (1 - (1 - k / e) ** t)


def _touched(shape: dict) -> float:
    return shape["experts_touched"] if "experts_touched" in shape else expected_touched(shape)


def _slots(shape: dict) -> float:
    """(token, slot) pairs this rank computes: the draw's when tokens_per_expert is given, else T*k/ep."""
    if "tokens_per_expert" in shape:
        return sum(shape["tokens_per_expert"])
    return shape["tokens"] * shape["topk"] / _ep(shape)[0]


def flops(shape: dict) -> int:
    # Per (token, slot) computed here: gate and up (2 * 2 * D * I), down (2 * I * D), silu*up (~5 I).
    d, i = shape["hidden"], shape["inter"]
    return int(_slots(shape) * (6 * d * i + 5 * i))


def bytes_moved(shape: dict, dtype: torch.dtype) -> int:
    """Weights of the experts the batch touches (the point's drawn routing when `experts_touched` is given, else the
    uniform expectation), activations in and out, the computed slots' intermediate written and read, ids and
    weights."""
    t, k, d, i = shape["tokens"], shape["topk"], shape["hidden"], shape["inter"]
    fp8 = dtype == FP8
    w_es = 1 if fp8 else dtype.itemsize
    a_es = 2 if fp8 else dtype.itemsize
    weights = _touched(shape) * 3 * d * i * w_es
    if fp8:
        weights += _touched(shape) * 4 * (triton.cdiv(2 * i, 128) * triton.cdiv(d, 128)
                                          + triton.cdiv(d, 128) * triton.cdiv(i, 128))
    acts = 2 * t * d * a_es + _slots(shape) * (2 * i * (1 if fp8 else a_es) + 2 * d * a_es)  # h and y round trips
    return int(weights + acts + t * k * 8)


def make_inputs(shape: dict, dtype: torch.dtype, device, seed: int) -> tuple:
    """(hidden, topk_ids int32, topk_weights fp32, w13, w2[, w13_scale, w2_scale][, expert_map]). dtype fp8: bf16
    hidden states, e4m3 experts with 128x128 block scales. `ep: p` (and `ep_rank`) makes one rank's slice of an
    expert-parallel pool: E/p experts held, the routing over all E, an expert_map (scales None when not fp8). The
    routing is drawn on the host from the seed (the same experts on every device): each token picks k distinct
    experts, uniformly or by Zipf popularity (successive sampling without replacement, Gumbel top-k over
    log-popularity; expert ranks in a seeded random order); its weights are a softmax of random logits over its k
    (renormalized, as Qwen3-MoE's router gives them)."""
    t, d, i, e, k = shape["tokens"], shape["hidden"], shape["inter"], shape["experts"], shape["topk"]
    if not 1 <= k <= e:
        raise ValueError(f"moe: topk {k} outside 1..{e} experts")
    p, r = _ep(shape)
    routing = shape.get("routing", "uniform")
    s = parse_routing(routing)
    host = torch.Generator().manual_seed(seed)
    keys = torch.rand((t, e), generator=host).clamp_min_(1e-20)
    if routing.startswith("replay:"):  # the file's popularity: Gumbel top-k over ln p (never chosen: half a pair)
        hist = torch.tensor(shape["routing_hist"], dtype=torch.float64)
        if hist.shape != (e,) or not hist.sum() > 0:
            raise ValueError(f"moe: routing_hist needs {e} counts, not all 0")
        logp = (torch.where(hist > 0, hist, torch.full_like(hist, 0.5)) / hist.sum()).log()
        ids = (-torch.log(-torch.log(keys.double())) + logp[None, :]).topk(k, dim=-1).indices
    elif s is None:
        ids = keys.topk(k, dim=-1).indices
    else:
        rank = torch.randperm(e, generator=host).to(torch.float64) + 1.0
        gumbel = -torch.log(-torch.log(keys.double()))
        ids = (gumbel - s * torch.log(rank)[None, :]).topk(k, dim=-1).indices
    weights = torch.softmax(torch.randn((t, k), generator=host), dim=-1)
    topk_ids = ids.to(device=device, dtype=torch.int32)
    topk_weights = weights.to(device)
    g = torch.Generator(device=device).manual_seed(seed)
    act = torch.bfloat16 if dtype == FP8 else dtype
    hidden = torch.randn((t, d), generator=g, device=device, dtype=act)
    held = e // p  # an EP slice holds experts [r * E/p, (r + 1) * E/p); the routing stays over all E
    if dtype != FP8:
        # Scaled so h and out stay O(1): w13 ~ N(0, 1/D), w2 ~ N(0, 1/I).
        w13 = torch.randn((held, 2 * i, d), generator=g, device=device, dtype=dtype).mul_(d ** -0.5)
        w2 = torch.randn((held, d, i), generator=g, device=device, dtype=dtype).mul_(i ** -0.5)
        args = (hidden, topk_ids, topk_weights, w13, w2)
    else:
        w13, w13_s = _fp8_experts((held, 2 * i, d), g, device)
        w2, w2_s = _fp8_experts((held, d, i), g, device)
        args = (hidden, topk_ids, topk_weights, w13, w2, w13_s, w2_s)
    if p == 1:
        return args
    expert_map = torch.full((e,), -1, dtype=torch.int32, device=device)
    expert_map[r * held:(r + 1) * held] = torch.arange(held, dtype=torch.int32, device=device)
    return (*args, *(None, None)[:7 - len(args)], expert_map)


def _fp8_experts(size: tuple, g: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 experts [E, N, K] and their 128x128 block scales, one expert's fp32 draw at a time."""
    e, n, kk = size
    q = torch.empty(size, dtype=FP8, device=device)
    sc = torch.empty((e, triton.cdiv(n, SCALE_BLOCK), triton.cdiv(kk, SCALE_BLOCK)), dtype=torch.float32,
                     device=device)
    for x in range(e):
        q[x], sc[x] = quantize_weight_fp8(torch.randn((n, kk), generator=g, device=device).mul_(kk ** -0.5))
    return q, sc


def point_fields(shape: dict, inputs: tuple) -> dict:
    """What the point's routing produced: experts touched and tokens (slots) per expert, of the experts held."""
    held = inputs[3].shape[0]
    ids = inputs[1].reshape(-1).long().cpu()
    if len(inputs) == 8:  # an EP slice: the held experts' slots, by local id
        ids = inputs[7].cpu().long()[ids]
        ids = ids[ids >= 0]
    counts = torch.bincount(ids, minlength=held).tolist()
    out = {"experts_touched": sum(c > 0 for c in counts), "tokens_per_expert": counts}
    hidden, w13 = inputs[0], inputs[3]
    tuned = None if INTERPRET else tuned_config(inputs[1].numel(), w13.shape[0], hidden.shape[1], w13.shape[1] // 2,
                                                dtype_name(w13), hidden.device)
    if tuned:
        out["tuned_config"] = tuned[1]  # the Triton point ran the device's tuned block sizes
    return out


def tolerance(dtype: torch.dtype) -> float:
    # As gemm: output rounding dominates (fp16 half-ulp 4.9e-4, bf16 3.9e-3; fp32 dots as tf32 on sm80+); the k
    # slot outputs are rounded to the dtype before their sum. fp8: kernel and reference quantize x and h
    # identically (a rounding flip moves one element by one e4m3 step, rarely), bf16 output as gemm_fp8.
    return {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 2e-3, FP8: 1.6e-2}.get(dtype, 1e-6)

