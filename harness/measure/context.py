"""What a part's jobs see: `Job` (one point to measure) and `RunContext` (device, suite, ceilings, metrics).

The parts import this module, never the runner, so runner -> suite -> parts -> context has no loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from harness import results
from harness.hardware import Hardware
from harness.measure import timing
from harness.measure.device import DeviceInfo

if TYPE_CHECKING:
    from harness.measure.suite import Suite

# Why Triton points are `skipped` on a CPU, in every part that has them.
CPU_TRITON_NOTE = "Triton's interpreter is a correctness tool, not a timing tool: CPU timings use the torch backend"


@dataclass
class Job:
    key: dict  # identity of the point: kind, op/model, backend, dtype and the shape parameters
    run: Callable[[RunContext], dict]  # returns measured fields (median_ms, flops, bytes, ...), maybe a status
    label: str = ""


@dataclass
class RunContext:
    device: DeviceInfo
    suite: Suite
    datasheet: Hardware | None
    ceilings: dict = field(default_factory=results.empty_ceilings)
    seed: int = 0

    @property
    def torch_device(self) -> torch.device:
        return self.device.torch_device

    @property
    def on_gpu(self) -> bool:
        return self.device.kind == "cuda"

    def measure(self, fn: Callable[[], object], **overrides) -> timing.Timing:
        """`timing.measure` with this suite's settings; parts override per kind (flush_l2, cuda_graph)."""
        t = self.suite.file.timing
        kw = dict(device=self.torch_device, min_samples=t.min_samples, min_time_s=t.min_time_s,
                  warmup_s=t.warmup_s, max_samples=t.max_samples, noise_limit=self.suite.file.noise_limit,
                  l2_bytes=self.device.l2_bytes)
        kw.update(overrides)
        return timing.measure(fn, **kw)

    def metrics(self, flops: float | None, bytes_: float | None, median_ms: float | None, dtype: str) -> dict:
        """Rates and their fractions of this run's measured ceilings and of the datasheet."""
        out: dict = {}
        if not median_ms or median_ms <= 0:
            return out
        s = median_ms / 1e3
        if flops:
            rate = flops / s
            out["tflops"] = rate / 1e12
            measured = self.ceilings["matmul_tflops"].get(dtype)
            out["mfu"] = rate / (measured * 1e12) if measured else None
            peak = self.datasheet.peak(dtype) if self.datasheet else None
            out["mfu_datasheet"] = rate / peak if peak else None
        if bytes_:
            bw = bytes_ / s
            out["gbps"] = bw / 1e9
            copy = self.ceilings["copy_gbps"]
            out["mbu"] = bw / (copy * 1e9) if copy else None
            mv = self.ceilings["matvec_gbps"].get(dtype)
            out["mbu_matvec"] = bw / (mv * 1e9) if mv else None
            out["mbu_datasheet"] = bw / self.datasheet.bandwidth_bytes_per_s if self.datasheet else None
            if out.get("mbu") and out["mbu"] > 1.0:
                out["warning"] = "MBU above 1 against the measured copy bandwidth: check the byte count or caching"
        return out

    def record_ceiling(self, point: dict) -> None:
        results.add_ceiling(self.ceilings, point)
