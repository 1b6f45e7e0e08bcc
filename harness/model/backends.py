"""The backends a model runs on: the ops each one gives a layer (`load_ops`), and torch.compile as the `compile`
backend uses it (`compile_step`, with the first-call accounting that keeps compile time out of timed samples).

- `triton`: the Triton kernels of `kernels/`.
- `torch`: PyTorch eager as a user writes it, in the input dtype: each op's vendor path (`kernels.REGISTRY[op]
  .baseline`: F.linear, F.rms_norm, F.silu(g) * u, SDPA with a length mask for decode), RoPE's cos/sin computed once
  (a table indexed per step) and only the rotation per layer.
- `compile`: the ops of `torch`, run through torch.compile by the model (every layer block and the LM head), with one
  change on the CPU: a projection of a single row (decode at batch 1) is written as a multiply and a sum over K
  (`compiled_gemm`), which Inductor compiles into one vectorized reduction spread over the cores, where F.linear's
  MKL sgemv keeps to one core for a single row (2-core CI machine: 15-16 GB/s through F.linear, 21-25 GB/s as the
  reduction, on the decode projections of qwen3-0.6b).
- `reference`: the kernels' fp32-math references: the correctness oracle, never timed.

The MoE families add their ops (`tokenfleet.model.moe`): the routers (`route_softmax`, `route_sigmoid`), the routed
expert layer (`experts`), MLA decode in the absorbed form over the latent cache (`mla_decode`) and MLA prefill attention
(`mla_prefill`). torch: transformers' routers, its default grouped_mm experts (its eager loop where torch's grouped GEMM
does not take the dtype) and SDPA; compile: the same traced; reference: fp32 math. triton: the plug points below run
our Triton kernels: `triton_route_*` (kernels/router.py), `triton_experts` (kernels/moe.py), `triton_mla_decode`
(kernels/attention_mla.py). `triton_mla_prefill` stays on the torch path (attention_prefill takes one power-of-2 head
dim for q, k and v and the scale 1/sqrt(d); MLA's keys are nope+rope wide, 192 in DeepSeek-V3, its values 128) and
`TRITON_ON_TORCH` names it so a point says so. The softmax router under a routing skew runs `moe.route_softmax` (the
kernel's softmax scoring has no choice-only bias for the skew).
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from tokenfleet.model import moe

if TYPE_CHECKING:
    from tokenfleet.model.cache import Rotary

BACKENDS = ("triton", "torch", "compile", "reference")
TIMED_BACKENDS = ("triton", "torch", "compile")  # `reference` is the oracle the others are checked against
OPS = ("gemm", "rmsnorm", "rope", "silu_mul", "attention_prefill", "attention_decode")


@dataclass(frozen=True)
class Ops:
    """The six ops a layer needs, from one backend, and how the backend takes its RoPE angles."""

    gemm: Callable
    rmsnorm: Callable
    rope: Callable  # (q, k, *rotary(...)) -> (q, k)
    silu_mul: Callable
    attention_prefill: Callable
    attention_decode: Callable
    rotary: Callable  # (Rotary, positions [T], n positions covered) -> rope's trailing arguments, once per forward
    # (dtype, device, expert weight widths) -> the routed expert layer (x, w13, w2, ids, weights) -> [T, D], picked
    # once per model (outside any trace)
    experts: Callable = moe.torch_experts
    mla_decode: Callable = moe.mla_decode_torch  # (q_nope, q_rope, kv_cache, context_lens, wkv_b, scale) -> [B, H, v]
    mla_prefill: Callable = moe.mla_prefill_torch  # (q, k, v, scale) -> [B, H, S, v], causal
    route_softmax: Callable = moe.route_softmax  # (logits, k, norm, skew) -> (weights [T, k] fp32, ids [T, k])
    route_sigmoid: Callable = moe.route_sigmoid  # (logits, k, norm, bias, n_group, topk_group, scale, skew) -> same
    compiled: bool = False  # run prefill and the decode step through torch.compile


def _kernel_angles(rotary: Rotary, positions: torch.Tensor, n: int) -> tuple:
    return positions, rotary.theta  # the kernel computes its own cos/sin


def _table_angles(rotary: Rotary, positions: torch.Tensor, n: int) -> tuple:
    return rotary.cos_sin(positions, n)


def compiled_gemm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The `compile` backend's projection x [M, K] @ w[N, K]^T, traced by torch.compile, never run eagerly (eager,
    the CPU branch would materialize M·N·K products). GPU, or more than one row: F.linear, as the torch model.
    One row on the CPU: the products summed over K in fp32, the form Inductor turns into a parallel reduction."""
    if x.shape[0] == 1 and x.device.type == "cpu":
        return (x * w).sum(-1, dtype=torch.float32).to(x.dtype).unsqueeze(0)
    return torch.nn.functional.linear(x, w)


# --- plug points of the Triton MoE / MLA kernels (kernels/moe.py, kernels/router.py, kernels/attention_mla.py) -------
# The triton backend calls these. An op still on the torch path is named in TRITON_ON_TORCH, which a model point on
# the triton backend reports in its note; plugging a kernel in means calling it here and removing its name.
TRITON_ON_TORCH = ("MLA prefill attention",)


def triton_route_softmax(logits, k: int, norm: bool, skew=None):
    """`moe.route_softmax` as the router kernel (fp32 weights, int32 ids, best first); under a routing `skew` (added
    to the choice only, which the kernel's softmax scoring has no term for) `moe.route_softmax` itself."""
    if skew is not None:
        return moe.route_softmax(logits, k, norm, skew)
    from tokenfleet.kernels.router import router

    return router(logits, None, k, scoring="softmax", renormalize=norm)


def triton_route_sigmoid(logits, k: int, norm: bool, bias, n_group: int, topk_group: int, scale: float, skew=None):
    """`moe.route_sigmoid` as the router kernel: the kernel's bias is added to the choice scores only, as
    e_score_correction_bias and the routing skew both are, so it takes their sum."""
    from tokenfleet.kernels.router import router

    if skew is not None:
        bias = skew if bias is None else bias + skew
    return router(logits, bias, k, n_group, topk_group, "sigmoid", norm, scale)


triton_experts = moe.experts_triton  # x [T, D], w13 [E, 2·I, D], w2 [E, D, I], ids / weights [T, k] -> [T, D]


def _fixed(fn: Callable) -> Callable:
    return lambda dtype, device, widths: fn


def triton_mla_decode(q_nope, q_rope, kv_cache, context_lens, wkv_b, scale: float):
    """Absorbed MLA decode (`moe.mla_decode_torch` for the shapes) over the latent cache [B, 1, S, r+rope] as the
    attention_mla kernel. W_UK [H, nope, r] and W_UV [H, v, r] are views of wkv_b (per head its nope key rows, then
    its value rows), no copy: the kernel reads them through their strides, rows of r contiguous as in a copy."""
    from tokenfleet.kernels.attention_mla import attention_mla

    h, nope = q_nope.shape[1], q_nope.shape[2]
    w = wkv_b.view(h, -1, wkv_b.shape[1])
    return attention_mla(q_nope, q_rope, kv_cache[:, 0], context_lens, w[:, :nope], w[:, nope:], scale)


def triton_mla_prefill(q, k, v, scale: float):
    """Causal MLA prefill attention on up-projected keys [B, H, S, nope+rope] and values [B, H, S, v]: the torch
    path (attention_prefill needs one power-of-2 head dim for q, k and v; see the module docstring)."""
    return moe.mla_prefill_torch(q, k, v, scale)


@functools.cache
def load_ops(backend: str) -> Ops:
    """The ops of a backend (see the module docstring)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
    from tokenfleet.kernels import REGISTRY
    from tokenfleet.kernels.rope import rope_rotate

    if backend == "triton":
        return Ops(**{op: REGISTRY[op].triton for op in OPS}, rotary=_kernel_angles, experts=_fixed(triton_experts),
                   mla_decode=triton_mla_decode, mla_prefill=triton_mla_prefill,
                   route_softmax=triton_route_softmax, route_sigmoid=triton_route_sigmoid)
    if backend == "reference":
        return Ops(**{op: REGISTRY[op].reference for op in OPS}, rotary=_kernel_angles,
                   experts=_fixed(moe.experts_reference), mla_decode=moe.mla_decode_reference,
                   mla_prefill=moe.mla_prefill_reference)
    vendor = {op: REGISTRY[op].baseline for op in OPS}
    # The rope baseline computes cos/sin and rotates; a model computes cos/sin once (rotary) and rotates per layer.
    vendor["rope"] = rope_rotate
    if backend == "compile":
        return Ops(**{**vendor, "gemm": compiled_gemm}, rotary=_table_angles,
                   experts=functools.partial(moe.torch_experts, compiled=True), compiled=True)
    return Ops(**vendor, rotary=_table_angles)


_COMPILE_LIMIT = 256  # compiled shapes per function before torch.compile would give up


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process (to tell a compile in a first call from one in the samples)."""
    utils = sys.modules.get("torch._dynamo.utils")  # not imported: nothing was compiled (and no import here)
    return int(utils.counters["stats"]["unique_graphs"]) if utils else 0


def first_call(fn: Callable[[], object], device: torch.device) -> tuple[object, dict]:
    """Run fn once: (its result, {"first_call_ms": wall time with the device synchronized, and "graphs_compiled" when
    torch.compile built graphs in it}). Compile and autotune happen in a shape's first call: its time is reported
    as first_call_ms and kept out of the samples."""
    before = compiled_graphs()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    info = {"first_call_ms": (time.perf_counter() - t0) * 1e3}
    if compiled_graphs() != before:
        info["graphs_compiled"] = compiled_graphs() - before
    return out, info


def compile_step(fn: Callable, device: torch.device) -> Callable:
    """`fn` under torch.compile as gpt-fast compiles its steps: one graph (fullgraph: a graph break is an error, not a
    silent fall back to eager), static shapes (every prefill length and decode batch/cache size compiled for itself;
    compile time lands in the first call, the timing's `first_call_ms`). Inductor writes Triton on a GPU (with
    gpt-fast's coordinate-descent tuning) and C++/OpenMP on the CPU. Past the recompile limit torch.compile would
    run eager without a word; here it raises."""
    import torch._dynamo

    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, _COMPILE_LIMIT)
    cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 4 * _COMPILE_LIMIT)
    cfg.fail_on_recompile_limit_hit = True
    options = {"coordinate_descent_tuning": True} if device.type == "cuda" else None
    return torch.compile(fn, fullgraph=True, dynamic=False, options=options)
