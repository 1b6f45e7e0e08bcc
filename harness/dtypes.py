"""The one dtype map: a dtype name's bytes per element, and its torch dtype."""

from __future__ import annotations

import torch

from harness.config import ConfigError

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1}
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
                "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a dtype name; an unknown name is a user error naming the known ones."""
    if dtype not in DTYPE_BYTES:
        raise ConfigError("--dtype", None, f"unknown dtype {dtype!r}; known: {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


def to_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """fp32 | bf16 | fp16 (or torch's long names, or a torch dtype) -> the torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return TORCH_DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(TORCH_DTYPES)}") from None
