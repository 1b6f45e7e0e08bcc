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
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

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


@functools.cache
def load_ops(backend: str) -> Ops:
    """The ops of a backend (see the module docstring)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
    from tokenfleet.kernels import REGISTRY
    from tokenfleet.kernels.rope import rope_rotate

    if backend in ("triton", "reference"):
        return Ops(**{op: getattr(REGISTRY[op], backend) for op in OPS}, rotary=_kernel_angles)
    vendor = {op: REGISTRY[op].baseline for op in OPS}
    # The rope baseline computes cos/sin and rotates; a model computes cos/sin once (rotary) and rotates per layer.
    vendor["rope"] = rope_rotate
    if backend == "compile":
        return Ops(**{**vendor, "gemm": compiled_gemm}, rotary=_table_angles, compiled=True)
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
