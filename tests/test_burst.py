"""Burst points against sustained ceilings (issue 23): points are timed briefly (0.05 s + 0.1 s), ceiling probes for
seconds; a probe keeps its burst rate (its warm-up's first timing.BURST_S), points' fractions are of the burst roof
and say so (`ceiling_basis`), and only a point above both roofs is `above_ceiling` (on the H200 cuBLAS points ran at
1.08x a probe taken in a power-cap transient)."""

from __future__ import annotations

import time

import pytest
import torch
from tokenfleet import results
from tokenfleet.measure import timing
from tokenfleet.measure.context import RunContext
from tokenfleet.measure.device import detect
from tokenfleet.measure.suite import Suite, SuiteFile


class BoostThenCap:
    """A clock and a call: 1 ms per call for the first 0.15 s (boost clocks), then 1.25 ms (the power cap)."""

    def __init__(self):
        self.s = 0.0

    def clock(self) -> float:
        return self.s

    def call(self) -> None:
        self.s += 1e-3 if self.s < timing.BURST_S else 1.25e-3


def test_a_probes_warmup_keeps_its_burst_rate(monkeypatch):
    gpu = BoostThenCap()
    monkeypatch.setattr(time, "perf_counter", gpu.clock)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    burst: list[float] = []
    per_call = timing._warm(gpu.call, 1.0, burst)
    assert per_call == pytest.approx(1.25e-3) and burst[0] == pytest.approx(1e-3, rel=0.1)
    short: list[float] = []
    timing._warm(gpu.call, 0.05, short)  # a point's warm-up: too short to hold a burst and a sustained rate
    assert short == []


def test_gpu_measure_reports_burst_ms_for_probes_only(monkeypatch):
    from test_timing import _fake_cuda

    _fake_cuda(monkeypatch)
    gpu = BoostThenCap()
    monkeypatch.setattr(time, "perf_counter", gpu.clock)  # the fake CUDA events read it too
    probe = timing.measure(gpu.call, device="cuda", warmup_s=1.0, min_time_s=0.1, min_samples=5, max_samples=10**6)
    assert probe.burst_ms == pytest.approx(1.0, rel=0.1) and probe.median_ms == pytest.approx(1.25)
    point = timing.measure(gpu.call, device="cuda", warmup_s=0.05, min_time_s=0.1, min_samples=5)
    assert point.burst_ms is None


def _ctx() -> RunContext:
    return RunContext(device=detect("cpu"), suite=Suite(SuiteFile(id="t", description="t"), {}, "t"),
                      datasheet=None)


def test_points_are_judged_against_the_roof_measured_as_they_are():
    ctx = _ctx()
    # A matmul probe: 600 TFLOP/s sustained (1.25 ms), 750 in its first 0.15 s (1 ms); a copy probe without burst.
    ctx.record_ceiling({"kind": "ceiling", "op": "matmul", "dtype": "bf16", "status": "ok", "value": 600.0,
                        "median_ms": 1.25, "burst_ms": 1.0})
    ctx.record_ceiling({"kind": "ceiling", "op": "copy", "dtype": "fp32", "status": "ok", "value": 4000.0,
                        "median_ms": 1.0})
    assert ctx.ceilings["burst_matmul_tflops"]["bf16"] == pytest.approx(750.0)
    assert ctx.roof("matmul_tflops", "bf16") == (pytest.approx(750.0), "burst")
    assert ctx.roof("copy_gbps") == (4000.0, "sustained")
    flops = 2 * 8192**3
    ms = flops / 650e12 * 1e3  # 650 TFLOP/s: above the sustained roof (1.08x), below the burst one
    m = ctx.metrics(flops, None, ms, "bf16")
    assert m["mfu"] == pytest.approx(650 / 750) and m["ceiling_basis"] == "burst"
    point = ctx.judge({"kind": "kernel", "dtype": "bf16", "status": "ok", **m})
    assert point["status"] == "ok" and point["ceiling_name"] == "burst_matmul_tflops.bf16"
    too_fast = ctx.judge({"kind": "kernel", "dtype": "bf16", "status": "ok", "tflops": 800.0})
    assert too_fast["status"] == "above_ceiling"  # above both roofs: a count or a cached read is wrong
    assert ctx.metrics(None, 1e9, 1.0, "bf16")["ceiling_basis"] == "sustained"  # the copy probe had no burst


def test_a_cpu_run_has_no_burst_ceilings():
    c = results.empty_ceilings()
    results.add_ceiling(c, {"kind": "ceiling", "op": "read", "dtype": "fp32", "status": "ok", "value": 20.0,
                            "median_ms": 3.0, "burst_ms": None})
    assert c["read_gbps"] == 20.0 and not any(k.startswith("burst_") for k in c)
