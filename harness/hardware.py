"""Accelerator datasheets (`configs/hardware/*.yaml`) and the mapping from a detected device name to one."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from tokenfleet.config import ConfigError, Strict, config_dir, load_all, load_named


class Interconnect(Strict):
    type: str
    per_direction_gbps: float | None = Field(None, gt=0, description="scale-up bandwidth, one direction, GB/s")


class Hardware(Strict):
    id: str
    name: str
    vendor: Literal["nvidia", "amd", "huawei", "cpu", "other"]
    match: list[str] = Field(default_factory=list, description="substrings of detected device names")
    # Memory names its unit. HBM capacities are binary: an "80 GB" H100 reports 85,520,809,984 B (79.6 GiB) to NVML,
    # a "141 GB" H200 150,754,820,096 B (140.4 GiB): give `memory_gib` (2^30 B) for those, `memory_gb` (1e9 B)
    # only where a source states decimal bytes. `memory_bytes` converts, once; everything else uses bytes.
    memory_gib: float | None = Field(None, gt=0, description="device memory, GiB (2^30 bytes)")
    memory_gb: float | None = Field(None, gt=0, description="device memory, GB (1e9 bytes)")
    memory_bandwidth_gbps: float = Field(gt=0, description="HBM/GDDR bandwidth, GB/s")
    peak_tflops: dict[Literal["fp32", "tf32", "bf16", "fp16", "fp8", "int8"], float] = Field(
        description="DENSE peak (no 2:4 sparsity), TFLOP/s (TOP/s for int8)"
    )
    fp8_tensor_cores: bool | None = Field(
        None, description="matrix units that multiply e4m3 (Hopper, Ada, Blackwell, CDNA3); false refuses fp8 "
        "points and projections; unset: true exactly when peak_tflops has fp8")
    tdp_w: float | None = Field(None, gt=0)
    l2_mb: float | None = Field(None, gt=0)
    interconnect: Interconnect | None = None
    sources: dict[str, str | list[str]] = Field(description="field name -> where the figure comes from")
    unverified: list[str] = Field(default_factory=list, description="fields only third-party sources or memory back")
    discrepancies: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _every_figure_sourced(self) -> Hardware:
        if (self.memory_gib is None) == (self.memory_gb is None):
            raise ValueError("give exactly one of memory_gib (2^30 bytes) and memory_gb (1e9 bytes)")
        needed = {"memory_gib" if self.memory_gib is not None else "memory_gb", "memory_bandwidth_gbps", "peak_tflops"}
        needed |= {f for f in ("tdp_w", "interconnect", "fp8_tensor_cores") if getattr(self, f) is not None}
        missing = sorted(needed - set(self.sources))
        if missing:
            raise ValueError(f"no source given for {', '.join(missing)}")
        for k, v in self.peak_tflops.items():
            if v <= 0:
                raise ValueError(f"peak_tflops.{k} must be positive")
        if self.fp8_tensor_cores is not None and self.fp8_tensor_cores != ("fp8" in self.peak_tflops):
            raise ValueError("fp8_tensor_cores and peak_tflops.fp8 disagree: give an fp8 peak exactly when true")
        return self

    def peak(self, dtype: str) -> float | None:
        """Dense peak FLOP/s for a dtype (fp32 matmuls on GPU may run as tf32: the caller says which)."""
        v = self.peak_tflops.get(dtype)
        return v * 1e12 if v else None

    @property
    def has_fp8(self) -> bool:
        return self.fp8_tensor_cores if self.fp8_tensor_cores is not None else "fp8" in self.peak_tflops

    def check_fp8(self) -> None:
        """Raise the one-line ConfigError that refuses fp8 on a device without FP8 tensor cores (exit 2)."""
        if self.has_fp8:
            return
        field, why = ("fp8_tensor_cores", "false") if self.fp8_tensor_cores is False else ("peak_tflops.fp8", "absent")
        src = self.sources.get("fp8_tensor_cores")
        raise ConfigError(config_dir("hardware") / f"{self.id}.yaml", field,
                          f"{why}{f' ({src})' if isinstance(src, str) else ''}: {self.id} has no FP8 tensor cores; "
                          "fp8 is refused, not projected from an invented peak")

    def fp8_refusal(self) -> str | None:
        """None where this device multiplies fp8; else the line `check_fp8` raises."""
        try:
            self.check_fp8()
        except ConfigError as e:
            return str(e)
        return None

    @property
    def bandwidth_bytes_per_s(self) -> float:
        return self.memory_bandwidth_gbps * 1e9

    @property
    def memory_bytes(self) -> float:
        """Device memory in bytes: the one conversion from the datasheet's unit."""
        return self.memory_gib * 2**30 if self.memory_gib is not None else self.memory_gb * 1e9


def load_hardware(name: str) -> Hardware:
    return load_named("hardware", name, Hardware)


def all_hardware() -> dict[str, Hardware]:
    return load_all("hardware", Hardware)


def match_device(device_name: str) -> Hardware | None:
    """The datasheet whose `match` substrings best fit a detected name (longest match wins), or None."""
    best, best_len = None, 0
    lowered = device_name.lower()
    for hw in all_hardware().values():
        for pat in hw.match:
            if pat.lower() in lowered and len(pat) > best_len:
                best, best_len = hw, len(pat)
    return best
