"""The one dtype map: a dtype name's bytes per element, and its torch dtype."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokenfleet.config import ConfigError

if TYPE_CHECKING:
    import torch

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1}
# Names of torch's dtypes, looked up when asked: the capacity verbs read sizes here and never load torch.
# fp8 is e4m3 (weights, activations and KV; bf16 around it).
TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp8": "float8_e4m3fn",
                "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a dtype name; an unknown name is a user error naming the known ones."""
    if dtype not in DTYPE_BYTES:
        raise ConfigError("--dtype", None, f"unknown dtype {dtype!r}; known: {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


def to_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """fp32 | bf16 | fp16 | fp8 (e4m3; or torch's long names, or a torch dtype) -> the torch dtype."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return getattr(torch, TORCH_DTYPES[dtype])
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(TORCH_DTYPES)}") from None
