"""Kernel ops: one file per op (Triton kernel, launcher, torch reference, vendor baseline, FLOP and byte counts, and
the shapes a model's layer gives the op).

`REGISTRY[name]` gives a `KernelOp`, so the harness loops over ops without special cases:

    op = REGISTRY["gemm"]
    args = op.make_inputs({"m": 128, "n": 4096, "k": 4096}, torch.bfloat16, "cuda", seed=0)
    err = rel_error(op.outputs(op.triton(*args))[0], op.outputs(op.reference(*args))[0])
    assert err <= op.tolerance(torch.bfloat16)

This package never imports `harness`.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

# Each op module imports Triton through kernels._triton, which picks the interpreter on a CPU-only box.
from kernels import attention_decode, attention_prefill, gemm, gemm_fp8, rmsnorm, rope, silu_mul


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
    ]
}


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| (Frobenius), computed in float64. NaN/inf anywhere gives inf."""
    if out.shape != ref.shape:
        raise ValueError(f"rel_error: shapes differ: {tuple(out.shape)} vs {tuple(ref.shape)}")
    o = out.detach().to(device="cpu", dtype=torch.float64)
    r = ref.detach().to(device="cpu", dtype=torch.float64)
    if not (torch.isfinite(o).all() and torch.isfinite(r).all()):
        return float("inf")
    num = torch.linalg.vector_norm(o - r).item()
    den = torch.linalg.vector_norm(r).item()
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den


__all__ = ["REGISTRY", "KernelOp", "rel_error"]
