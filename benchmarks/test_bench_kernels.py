"""Micro-benchmarks of the kernel ops (a regression guard; the product's numbers come from the harness).

Torch backend: the op's vendor baseline (`REGISTRY[op].baseline`) on whatever device is present (CPU:
small/medium shapes, float32).
Triton backend: compiled kernels on a CUDA GPU in bfloat16 (skipped without one; interpreted Triton
timings mean nothing). Each op is checked against its reference before it is timed.

    make bench    # pytest benchmarks --benchmark-only --benchmark-json=...
"""

import pytest
import torch
from tokenfleet.kernels import REGISTRY, rel_error
from tokenfleet.kernels._triton import INTERPRET

HAS_GPU = torch.cuda.is_available() and not INTERPRET
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Medium shapes a 2-core CPU runs in milliseconds.
CPU_SHAPES = {
    "gemm": {"m": 256, "n": 1024, "k": 1024},
    "rmsnorm": {"rows": 1024, "hidden": 4096, "residual": True},
    "rope": {"tokens": 512, "q_heads": 32, "kv_heads": 8, "head_dim": 128},
    "silu_mul": {"rows": 512, "n": 4096},
    "attention_prefill": {"batch": 1, "q_heads": 8, "kv_heads": 2, "seq": 512, "head_dim": 64, "causal": True},
    "attention_decode": {"batch": 8, "q_heads": 32, "kv_heads": 8, "context": 1024, "head_dim": 128},
}

# Llama-3-8B-like shapes on a GPU.
GPU_SHAPES = {
    "gemm": {"m": 4096, "n": 4096, "k": 4096},
    "rmsnorm": {"rows": 4096, "hidden": 4096, "residual": True},
    "rope": {"tokens": 4096, "q_heads": 32, "kv_heads": 8, "head_dim": 128},
    "silu_mul": {"rows": 4096, "n": 14336},
    "attention_prefill": {"batch": 1, "q_heads": 32, "kv_heads": 8, "seq": 4096, "head_dim": 128, "causal": True},
    "attention_decode": {"batch": 32, "q_heads": 32, "kv_heads": 8, "context": 4096, "head_dim": 128},
}

PARAMS = [
    pytest.param(name, "torch", id=f"{name}-torch") for name in CPU_SHAPES
] + [
    pytest.param(name, "triton", id=f"{name}-triton",
                 marks=pytest.mark.skipif(not HAS_GPU, reason="Triton timings need a CUDA GPU"))
    for name in GPU_SHAPES
]


@pytest.mark.parametrize("name,backend", PARAMS)
def test_bench_kernel(benchmark, name, backend):
    op = REGISTRY[name]
    on_gpu = DEVICE == "cuda"
    shape = GPU_SHAPES[name] if on_gpu else CPU_SHAPES[name]
    dtype = torch.bfloat16 if on_gpu else torch.float32
    args = op.make_inputs(shape, dtype, DEVICE, seed=0)
    fn = op.triton if backend == "triton" else op.baseline

    # Correct before fast (on GPU this also compiles and autotunes outside the timed loop).
    refs = op.outputs(op.reference(*args))
    for out, ref in zip(op.outputs(fn(*args)), refs, strict=True):
        assert rel_error(out, ref) <= op.tolerance(dtype)

    def run():
        fn(*args)
        if on_gpu:
            torch.cuda.synchronize()

    benchmark.extra_info.update(
        shape=shape, dtype=str(dtype).removeprefix("torch."), backend=backend,
        flops=op.flops(shape), bytes=op.bytes_moved(shape, dtype),
    )
    benchmark(run)
