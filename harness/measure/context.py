"""What a part's jobs see: `Job` (one point to measure) and `RunContext` (device, suite, ceilings, metrics).

The parts import this module, never the runner, so runner -> suite -> parts -> context has no loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from tokenfleet import results
from tokenfleet.hardware import Hardware
from tokenfleet.measure import timing
from tokenfleet.measure.device import DeviceInfo, Poller, energy_counter, nvml_poller

if TYPE_CHECKING:
    from tokenfleet.measure.suite import Suite

# Why Triton points are `skipped` on a CPU, in every part that has them.
CPU_TRITON_NOTE = "Triton's interpreter is a correctness tool, not a timing tool: CPU timings use the torch backend"
# Why fp8 matmuls (torch._scaled_mm) are checked at a small shape and not timed on a CPU (the ceiling and gemm_fp8).
CPU_FP8_NOTE = ("not timed on a CPU: torch._scaled_mm's e4m3 matmul has no fast CPU path on every CPU (a scalar one "
                "took 2.2 s at 512^3 on a Sapphire Rapids Xeon), and its rate is no GPU's")
# A point faster than this run's measured ceiling by more than this is `above_ceiling`: its byte or FLOP count, or
# the ceiling, is wrong (a cached read, a probe during a clock drop), so its number must not be used.
ABOVE_CEILING = 0.03


@dataclass
class Job:
    key: dict  # identity of the point: kind, op/model, backend, dtype and the shape parameters
    run: Callable[[RunContext], dict]  # returns measured fields (median_ms, flops, bytes, ...), maybe a status
    label: str = ""


@dataclass
class LastInputs:
    """The inputs of the most recent kernel point, kept for the next backends of that point (consecutive jobs in the
    plan), with the point's reference output once one backend has computed it: one entry, dropped before another is
    made, so a run holds one point's inputs and reference at most."""

    key: str | None = None
    value: Any = None
    ref: Any = None  # the reference output for `value` (None until `reference` computes it)

    def get(self, key: str, make: Callable[[], Any]) -> Any:
        if key != self.key:
            self.clear()  # first: the old inputs and reference are freed before the new ones are drawn
            self.value = make()
            self.key = key
        return self.value

    def reference(self, make: Callable[[], Any]) -> Any:
        """The current entry's reference output: `make()` on the first call after `get`, held until the entry goes."""
        if self.key is None:
            raise RuntimeError("LastInputs.reference: no inputs drawn (call get first)")
        if self.ref is None:
            self.ref = make()
        return self.ref

    def clear(self) -> None:
        self.key = self.value = self.ref = None


@dataclass
class RunContext:
    device: DeviceInfo
    suite: Suite
    datasheet: Hardware | None
    ceilings: dict = field(default_factory=results.empty_ceilings)
    seed: int = 0
    inputs: LastInputs = field(default_factory=LastInputs)  # kernel inputs and reference shared by a point's backends
    # NVML's energy counter (device.energy_counter), opened on the first GPU measurement: (reader or None, why not)
    energy: tuple | None = field(default=None, repr=False)

    @property
    def torch_device(self) -> torch.device:
        return self.device.torch_device

    @property
    def on_gpu(self) -> bool:
        return self.device.kind == "cuda"

    def measure(self, fn: Callable[..., object], **overrides) -> timing.Timing:
        """`timing.measure` with this suite's settings; parts override per kind (flush_l2, cuda_graph, and `args`:
        a kernel's inputs, so that on a GPU its calls are timed inside a CUDA graph over rotated input copies)."""
        t = self.suite.file.timing
        kw = dict(device=self.torch_device, min_samples=t.min_samples, min_time_s=t.min_time_s,
                  warmup_s=t.warmup_s, max_samples=t.max_samples, noise_limit=self.suite.file.noise_limit,
                  l2_bytes=self.device.l2_bytes, energy=self.energy_reader())
        kw.update(overrides)
        return timing.measure(fn, **kw)

    def energy_reader(self) -> Callable[[], float] | None:
        """On a GPU, the energy counter every point's samples are metered with (joules beside the polled power);
        None on a CPU or where NVML has no counter (`energy[1]` says why)."""
        if self.torch_device.type != "cuda":
            return None
        if self.energy is None:
            self.energy = energy_counter(torch.cuda.current_device())
        return self.energy[0]

    def poll(self) -> Poller:
        """Telemetry polled while a probe runs (`with ctx.poll() as p: ...; p.summary()`); nothing on a CPU."""
        return nvml_poller(torch.cuda.current_device()) if self.on_gpu else Poller(None)

    def roof(self, name: str, dtype: str | None = None) -> tuple[float | None, str]:
        """The ceiling `name` (of `dtype` for matmul/matvec) a point's fractions are of, and which it is: like with
        like, the `burst` one — the probe's first moments (timing.BURST_S), as briefly as points are timed — where
        the probe kept it, else the `sustained` one (a GPU probe's >= 1 s)."""
        def get(key: str):
            v = self.ceilings.get(key)
            return (v or {}).get(dtype) if dtype is not None else v

        burst = get(f"burst_{name}")
        return (burst, "burst") if burst else (get(name), "sustained")

    def _top(self, name: str, dtype: str | None = None) -> tuple[float | None, str]:
        """The higher of the burst and sustained ceiling `name`, and its key (what no point may exceed)."""
        suffix = f".{dtype}" if dtype is not None else ""
        got = [(v, f"{k}{suffix}") for k in (name, f"burst_{name}")
               for v in [(self.ceilings.get(k) or {}).get(dtype) if dtype is not None else self.ceilings.get(k)]
               if v]
        return max(got) if got else (None, name + suffix)

    def metrics(self, flops: float | None, bytes_: float | None, median_ms: float | None, dtype: str) -> dict:
        """Rates and their fractions of this run's measured ceilings (`roof`: burst where measured, said in
        `ceiling_basis`) and of the datasheet.

        mbu: against the copy ceiling (bytes read + written); mbu_read: against the read-only ceiling, the one for
        read-dominated points (decode, mat-vec, decode attention); mbu_matvec: against the mat-vec probe."""
        out: dict = {}
        if not median_ms or median_ms <= 0:
            return out
        s = median_ms / 1e3
        bases = set()

        def frac(rate: float, name: str, unit: float, dt: str | None = None) -> float | None:
            value, basis = self.roof(name, dt)
            if value:
                bases.add(basis)
            return _ratio(rate, value, unit)

        if flops:
            rate = flops / s
            out["tflops"] = rate / 1e12
            out["mfu"] = frac(rate, "matmul_tflops", 1e12, dtype)
            peak = self.datasheet.peak(dtype) if self.datasheet else None
            out["mfu_datasheet"] = rate / peak if peak else None
        if bytes_:
            bw = bytes_ / s
            out["gbps"] = bw / 1e9
            out["mbu"] = frac(bw, "copy_gbps", 1e9)
            out["mbu_read"] = frac(bw, "read_gbps", 1e9)
            out["mbu_matvec"] = frac(bw, "matvec_gbps", 1e9, dtype)
            out["mbu_datasheet"] = bw / self.datasheet.bandwidth_bytes_per_s if self.datasheet else None
        if bases:
            out["ceiling_basis"] = "burst" if "burst" in bases else "sustained"
        return out

    def ceiling_ratio(self, point: dict) -> tuple[float | None, str | None]:
        """How far a point is up its measured roof: the larger of its FLOP rate over the matmul ceiling and its
        bandwidth over the larger bandwidth ceiling (read-only or copy), with that ceiling's name; each ceiling the
        higher of its burst and sustained values (a point above both is wrong, however long it was timed)."""
        best: tuple[float | None, str | None] = (None, None)
        dtype = point.get("dtype", "")
        mm, mm_name = self._top("matmul_tflops", dtype)
        if point.get("tflops") and mm:
            best = (point["tflops"] / mm, mm_name)
        bws = [bw for bw in (self._top("read_gbps"), self._top("copy_gbps")) if bw[0]]
        if point.get("gbps") and bws:
            v, name = max(bws)
            if best[0] is None or point["gbps"] / v > best[0]:
                best = (point["gbps"] / v, name)
        return best

    def judge(self, point: dict) -> dict:
        """A usable point above its ceiling by more than ABOVE_CEILING becomes `above_ceiling` (never ok, never in
        capacity), with the ratio and the ceiling it exceeds; ceilings themselves are not judged."""
        if point.get("kind") == "ceiling" or point.get("status") not in results.USABLE:
            return point
        ratio, name = self.ceiling_ratio(point)
        if ratio is None:
            return point
        point = {**point, "ceiling_ratio": ratio, "ceiling_name": name}
        if ratio > 1 + ABOVE_CEILING:
            point["status"] = "above_ceiling"
            point["error"] = (f"{ratio:.3f}x the measured {name}: a byte/FLOP count, a cached read or the ceiling "
                              "is wrong")
        return point

    def record_ceiling(self, point: dict) -> None:
        results.add_ceiling(self.ceilings, point)


def _ratio(rate: float, ceiling: float | None, unit: float) -> float | None:
    return rate / (ceiling * unit) if ceiling else None
