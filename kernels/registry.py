"""Kernel ops: one file per op (Triton kernel, launcher, torch reference, vendor baseline, FLOP and byte counts, and
the shapes a model's layer gives the op).

`REGISTRY[name]` gives a `KernelOp`, so the harness loops over ops without special cases:

    op = REGISTRY["gemm"]
    args = op.make_inputs({"m": 128, "n": 4096, "k": 4096}, torch.bfloat16, "cuda", seed=0)
    err = rel_error(op.outputs(op.triton(*args))[0], op.outputs(op.reference(*args))[0])
    assert err <= op.tolerance(torch.bfloat16)

This package (`tokenfleet.kernels`) never imports the rest of `tokenfleet` (the harness/ folder). The package's
`__init__` re-exports `REGISTRY`, `KernelOp` and `rel_error` from here.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

# Each op module imports Triton through kernels._triton, which picks the interpreter on a CPU-only box.
from tokenfleet.kernels import (
    attention_decode,
    attention_mla,
    attention_prefill,
    gemm,
    gemm_fp8,
    moe,
    rmsnorm,
    rope,
    router,
    silu_mul,
)


@dataclass(frozen=True)
class KernelOp:
    name: str
    triton: Callable[..., Any]  # Triton launcher: triton(*make_inputs(...))
    reference: Callable[..., Any]  # torch reference with the same arguments
    baseline: Callable[..., Any]  # the vendor path in the input dtype, as a torch model runs it (F.linear, SDPA, ...)
    make_inputs: Callable[[dict, torch.dtype, Any, int], tuple]  # (shape, dtype, device, seed) -> args
    flops: Callable[[dict], int]  # floating-point operations of one call
    bytes_moved: Callable[[dict, torch.dtype], int]  # minimum bytes: inputs read once, outputs written once
    tolerance: Callable[[torch.dtype], float]  # max rel_error vs a float64 reference
    model_shapes: Callable[..., list[dict]]  # (cfg, tokens=, batch=, context=) -> the shapes a model's layer gives
    model_grid: tuple[str, ...]  # which of tokens / batch / context model_shapes needs
    shape_fields: tuple[str, ...]  # the sizes a literal shape must give make_inputs
    # Further vendor paths, each its own backend (moe: "loop", transformers' per-expert loop beside grouped GEMM).
    baselines: dict[str, Callable[..., Any]] = field(default_factory=dict)
    # (shape, inputs) -> fields the point records about its drawn inputs (moe: experts touched, tokens per expert);
    # flops and bytes_moved see them too (moe counts the slots computed and the touched experts' weights).
    point_fields: Callable[[dict, tuple], dict] | None = None

    @staticmethod
    def outputs(result: Any) -> tuple[torch.Tensor, ...]:
        """A result as a tuple of tensors, whether the op returns one tensor or several."""
        if isinstance(result, torch.Tensor):
            return (result,)
        return tuple(result)


def _op(name: str, module: Any) -> KernelOp:
    return KernelOp(
        name=name,
        triton=getattr(module, name),
        reference=getattr(module, f"{name}_ref"),
        # Every op names its vendor path: the reference upcasts to fp32 and is the oracle, never a baseline.
        baseline=getattr(module, f"{name}_baseline"),
        make_inputs=module.make_inputs,
        flops=module.flops,
        bytes_moved=module.bytes_moved,
        tolerance=module.tolerance,
        model_shapes=module.model_shapes,
        model_grid=module.MODEL_GRID,
        shape_fields=module.SHAPE_FIELDS,
        baselines=dict(getattr(module, "BASELINES", {})),
        point_fields=getattr(module, "point_fields", None),
    )


REGISTRY: dict[str, KernelOp] = {
    name: _op(name, module)
    for name, module in [
        ("gemm", gemm),
        ("gemm_fp8", gemm_fp8),
        ("rmsnorm", rmsnorm),
        ("rope", rope),
        ("silu_mul", silu_mul),
        ("attention_prefill", attention_prefill),
        ("attention_decode", attention_decode),
        ("attention_mla", attention_mla),
        ("moe", moe),
        ("router", router),
    ]
}


# Elements per step of rel_error's sums: its fp64 temporaries stay at a few times 64 MiB whatever the output's size.
REL_ERROR_CHUNK = 1 << 23


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| (Frobenius), summed in float64 where `out` is (no host copy: a `ref` elsewhere is moved
    there a chunk at a time). NaN/inf anywhere gives inf. One host sync, for the two sums.

    float64 on a GPU too: a few passes over each chunk, memory-bound (an H200 does fp64 at ~1/2 of fp32's vector rate,
    far above what these reads need), so it costs about a millisecond per 1e8 elements where the host copy it replaces
    cost a second, and the value is the CPU's to rounding. Chunks of REL_ERROR_CHUNK elements bound the fp64
    temporaries (a whole large output in fp64 would be twice its fp32 size)."""
    if out.shape != ref.shape:
        raise ValueError(f"rel_error: shapes differ: {tuple(out.shape)} vs {tuple(ref.shape)}")
    o, r = out.detach().reshape(-1), ref.detach().reshape(-1)
    sums = torch.zeros(2, dtype=torch.float64, device=o.device)  # [||o - r||^2, ||r||^2]
    for i in range(0, o.numel(), REL_ERROR_CHUNK):
        oc = o[i:i + REL_ERROR_CHUNK].to(torch.float64)
        rc = r[i:i + REL_ERROR_CHUNK].to(device=o.device, dtype=torch.float64, copy=True)  # ours to overwrite
        sums[1] += torch.dot(rc, rc)
        rc.neg_().add_(oc)  # o - r in place: one chunk-sized temporary less
        sums[0] += torch.dot(rc, rc)
    num2, den2 = sums.tolist()  # the one host sync
    # NaN or inf in either tensor makes a sum NaN or inf (inf - inf is NaN): the check fails, as it must.
    if not (math.isfinite(num2) and math.isfinite(den2)):
        return float("inf")
    if den2 == 0.0:
        return 0.0 if num2 == 0.0 else float("inf")
    return math.sqrt(num2) / math.sqrt(den2)


__all__ = ["REGISTRY", "KernelOp", "rel_error"]
