"""Import Triton so that `import tokenfleet.kernels` works on a machine without a GPU.

With no CUDA device, Triton kernels can only run under Triton's interpreter (numpy, one program
at a time; correctness only, never timed). The interpreter is chosen from the environment, so the
variable must be set before Triton is imported; `setdefault` keeps an explicit choice. This is the only
device-dependent line in `kernels/`: the harness alone decides where things run.
"""

import os
from contextlib import contextmanager

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

# Kernel files keep the autotune space to one config when interpreting: every config is a full
# (slow, numpy) run there, and timings from the interpreter mean nothing.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Floating dtypes every launcher accepts (tl.dot takes all three on sm80+; fp32 dots run as tf32 there).
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors on `device`, used to size split-K / split-KV grids.

    Under the interpreter there is no parallel hardware; a small number keeps grids (and test time) small
    while still exercising more than one split.
    """
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def smem_bytes(device: torch.device) -> int:
    """Shared memory one program may use on `device` (227 KiB on H100, 163 KiB on A100).

    Autotune spaces drop configs above it up front instead of compiling them only to hit OutOfResources.
    """
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "shared_memory_per_block_optin", 0) or 227 * 1024)
    return 227 * 1024


MAX_ROW_BLOCK = 65536  # elements one program can hold in registers


def row_settings(n: int, name: str = "kernel", max_block: int = MAX_ROW_BLOCK) -> tuple[int, int]:
    """BLOCK and num_warps for a program that holds a row (or a tile) of n elements in registers: the next power
    of two, and more warps as the block widens so that each thread keeps about 16 values live or fewer (the rule of
    Liger-Kernel's `calculate_settings`). The one place the row-wise ops (rmsnorm, rope, the decode reduction) pick
    these."""
    block = triton.next_power_of_2(n) if n > 0 else 0
    if block < 1 or block > max_block:
        raise ValueError(f"{name}: {n} elements per row outside 1..{max_block}")
    num_warps = 32 if block >= 32768 else 16 if block >= 8192 else 8 if block >= 2048 else 4
    return block, num_warps


def check_float(name: str, *tensors: torch.Tensor) -> None:
    """Raise ValueError unless all tensors share one supported floating dtype and one device."""
    dtype = tensors[0].dtype
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: dtype {dtype} not supported (use float16, bfloat16 or float32)")
    for t in tensors[1:]:
        if t.dtype != dtype:
            raise ValueError(f"{name}: all inputs must share one dtype, got {dtype} and {t.dtype}")
        if t.device != tensors[0].device:
            raise ValueError(f"{name}: inputs on different devices: {tensors[0].device} and {t.device}")


def check_out(name: str, out: torch.Tensor | None, shape: tuple, dtype: torch.dtype, device) -> None:
    """Validate a caller-supplied output buffer (contiguous, exact shape/dtype/device)."""
    if out is None:
        return
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != torch.device(device):
        raise ValueError(
            f"{name}: out must be {tuple(shape)} {dtype} on {device}, "
            f"got {tuple(out.shape)} {out.dtype} on {out.device}"
        )
    if not out.is_contiguous():
        raise ValueError(f"{name}: out must be contiguous")


# Autotuned kernels and the one config each runs inside `pinned_configs()` (registered by the kernel files).
_PINNED: list = []


def pin_config(kernel, config) -> None:
    """Register `config` as the one `kernel` (a triton.autotune object) runs inside `pinned_configs()`."""
    _PINNED.append((kernel, config))


@contextmanager
def pinned_configs():
    """Every registered autotuned kernel runs its pinned config, untuned, inside this block.

    For small-shape correctness tests on a GPU: with the whole space, each new autotune key compiles and times
    4-8 configs inside the correctness call (~130 test calls did so on an H200, most of a 240 s test budget).
    An autotuner holding one config runs it without timing (every Triton version). The whole space is still
    compiled and checked config by config in one test per op, and the harness checks the tuned kernel before it
    times it. Under the interpreter the space is already one config, so this changes nothing there.
    """
    saved = [(k, k.configs) for k, _ in _PINNED]
    try:
        for kernel, config in _PINNED:
            kernel.configs = [config]
        yield
    finally:
        for kernel, configs in saved:
            kernel.configs = configs


__all__ = ["FLOAT_DTYPES", "INTERPRET", "MAX_ROW_BLOCK", "check_float", "check_out", "num_sms", "pin_config",
           "pinned_configs", "row_settings", "smem_bytes", "tl", "triton"]
