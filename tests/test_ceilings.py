"""Ceilings that hold: the read-only probe, matmul as the best of its shapes, telemetry polled during a probe, points
above their ceiling, the end-of-run re-probe and its drift in the manifest and summary."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tokenfleet import results
from tokenfleet.config import ConfigError
from tokenfleet.dtypes import dtype_bytes
from tokenfleet.measure.context import RunContext
from tokenfleet.measure.device import Poller, detect
from tokenfleet.measure.parts import ceilings as part
from tokenfleet.measure.runner import Job, execute, run_suite
from tokenfleet.measure.suite import Suite, SuiteFile, TimingSpec, load_suite
from tokenfleet.report.tables import write_tables

SPEC = part.Spec(copy_mb=4, read_mb=8, matmul={"fp32": [32, 64]}, matvec={"n": 64, "k": 64, "dtypes": ["fp32"]})


@pytest.fixture
def ctx() -> RunContext:
    file = SuiteFile(id="t", description="t", noise_limit=10.0,
                     timing=TimingSpec(min_samples=3, min_time_s=0.005, warmup_s=0.0, max_samples=10))
    # A 256 KiB "cache": the probes keep SPEC's small sizes whatever this machine's cache (they grow beyond it).
    return RunContext(device=replace(detect("cpu"), l2_bytes=256 << 10), suite=Suite(file, {}, "t"), datasheet=None)


def test_read_only_probe_runs_and_is_recorded(ctx):
    job = part.read_job(SPEC, ctx)
    assert job.key == {"kind": "ceiling", "op": "read", "dtype": "fp32", "mb": 8}
    p = execute(job, ctx)
    assert p["status"] in results.USABLE, p.get("error")
    assert p["value"] > 0 and p["unit"] == "GB/s" and p["bytes"] == 8 * 2**20
    assert 3 <= len(p["samples_ms"]) <= 200 and p["n_samples"] >= 3
    # the faster of its two reductions is the value; both rates kept
    assert set(p["reductions_gbps"]) == {"sum", "amax"} and p["reduction"] in p["reductions_gbps"]
    assert p["value"] == pytest.approx(max(p["reductions_gbps"].values()))
    ctx.record_ceiling(p)
    assert ctx.ceilings["read_gbps"] == p["value"]


def test_read_default_is_8x_the_cache(ctx):
    spec = part.Spec(copy_mb=4, matmul={"fp32": 32}, matvec={"n": 64, "k": 64, "dtypes": ["fp32"]})
    for cache_mb in (1, 32):  # 8x the cache, at least the copy's size (4 MB)
        sized = replace(ctx, device=replace(ctx.device, l2_bytes=cache_mb << 20))
        assert part.read_mb(spec, sized) == max(8 * cache_mb, 4)
        assert part.read_mb(spec.model_copy(update={"read_mb": 1000}), sized) == 1000  # the suite's, when larger


@pytest.mark.parametrize("cache_mb", [32, 105, 320, 1152])  # this AMD EPYC's L3; Xeons' LLCs; a 3D V-Cache EPYC's
def test_no_bandwidth_probe_fits_in_the_reported_cache(ctx, cache_mb, monkeypatch):
    """ci-cpu's probes planned on a CPU that reports a large last-level cache (TOKENFLEET_CACHE_BYTES, as detect
    reads it): every bandwidth probe's bytes per call exceed it CACHE_MULTIPLE times (the copy's source and
    destination, the read's tensor, the mat-vec's rotated weights). Planned only: the keys say what each probe would
    allocate."""
    monkeypatch.setenv("TOKENFLEET_CACHE_BYTES", str(cache_mb << 20))
    big = replace(ctx, device=detect("cpu"))
    assert big.device.l2_bytes == cache_mb << 20
    spec = load_suite("ci-cpu").parts["ceilings"]
    need = part.CACHE_MULTIPLE * (cache_mb << 20)
    keys = {(j.key["op"], j.key["dtype"]): j.key for j in part.plan(spec, big)}
    assert 2 * keys["copy", "fp32"]["mb"] * 2**20 >= need  # read + written
    assert keys["read", "fp32"]["mb"] * 2**20 >= need
    for dt in spec.matvec.dtypes:
        k = keys["matvec", dt]
        weight = k["n"] * k["k"] * dtype_bytes(dt)
        assert k["copies"] * weight >= need and (k["copies"] - 1) * weight < need  # enough copies, no more
    assert keys["copy", "fp32"]["mb"] == max(spec.copy_mb, cache_mb * part.CACHE_MULTIPLE // 2)


def test_cache_size_override_is_checked(monkeypatch):
    for bad in ("32M", "-1", "0"):
        monkeypatch.setenv("TOKENFLEET_CACHE_BYTES", bad)
        with pytest.raises(ConfigError, match="TOKENFLEET_CACHE_BYTES: .* is not a size in bytes"):
            detect("cpu")


def test_matvec_rotates_over_weights_beyond_the_cache(ctx, monkeypatch):
    small = replace(ctx, device=replace(ctx.device, l2_bytes=16 << 10))  # a 16 KiB "cache": 64x64 fp32 is 16 KiB
    job = part.matvec_job(SPEC, "fp32", small)
    assert job.key["copies"] == part.CACHE_MULTIPLE
    read = []
    linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda x, w: read.append(w.data_ptr()) or linear(x, w))
    p = execute(job, small)
    assert p["status"] in results.USABLE and p["copies"] == part.CACHE_MULTIPLE
    assert len(set(read)) == part.CACHE_MULTIPLE  # every copy read, each at its own address
    assert all(a != b for a, b in zip(read[1:], read[2:], strict=False))  # never the same weight twice in a row


def test_bandwidth_ceiling_above_the_copy_is_flagged(ctx):
    """A read-only or mat-vec rate above the copy ceiling by more than COPY_MARGIN is flagged: `noisy` (not ok) with
    a note naming the ratio (the summary lists it); below it, usable as before with the ratio kept."""
    def against(copy_gbps: float) -> list[dict]:
        at = replace(ctx, ceilings={**results.empty_ceilings(), "copy_gbps": copy_gbps})
        return [execute(job, at) for job in (part.read_job(SPEC, at), part.matvec_job(SPEC, "fp32", at))]

    for p in against(1e-3):  # any real rate is far above it
        assert p["status"] == "noisy" and p["ceiling_name"] == "copy_gbps", p
        assert p["ceiling_ratio"] > 1 + part.COPY_MARGIN and "x the copy ceiling" in p["note"]
    read, matvec = against(1e6)
    assert read["status"] in results.USABLE and read["ceiling_ratio"] < 1 and "note" not in read
    # The margin, on fixed rates against a 10 GB/s copy: 1.41x (a DRAM read on the 2-core AMD EPYC) passes as it is;
    # 2.22x (Sapphire Rapids' 64 MB mat-vec inside its LLC) is flagged, and its point says `ok` no more.
    at = replace(ctx, ceilings={**results.empty_ceilings(), "copy_gbps": 10.0})
    assert part._vs_copy(at, {"value": 14.1}, {}) == {"value": 14.1, "ceiling_ratio": 1.41, "ceiling_name": "copy_gbps"}
    high = part._vs_copy(at, {"value": 22.2, "status": "ok"}, {})
    assert high["status"] == "noisy" and high["note"].startswith("2.22x the copy ceiling (10.0 GB/s)")
    # The copy probed in the same plan wins over the run's (start) ceiling: the end-of-run re-probe compares its read
    # with the end's copy, not with a start copy a loaded machine may have measured at half the speed.
    assert part._vs_copy(at, {"value": 22.2}, {"gbps": 20.0})["ceiling_ratio"] == pytest.approx(1.11)
    stale = replace(ctx, ceilings={**results.empty_ceilings(), "copy_gbps": 1e-3})
    copy, read = (j for j in part.plan(SPEC, stale) if j.key["op"] in ("copy", "read"))
    c = execute(copy, stale)
    r = execute(read, stale)
    assert r["ceiling_ratio"] == pytest.approx(r["value"] / c["value"])  # against the plan's own copy


def test_matmul_ceiling_is_the_best_shape_and_layout(ctx):
    jobs = [j for j in part.plan(SPEC, ctx) if j.key["op"] == "matmul"]
    assert [(j.key["m"], j.key["layout"]) for j in jobs] == [(32, "nn"), (32, "nt"), (64, "nn"), (64, "nt")]
    c = results.empty_ceilings()
    for v in (3.0, 5.0, 4.0):
        results.add_ceiling(c, {"kind": "ceiling", "op": "matmul", "dtype": "bf16", "status": "ok", "value": v})
    assert c["matmul_tflops"]["bf16"] == 5.0
    p = execute(jobs[1], ctx)  # nt: a @ b.T, checked against fp64 before it is timed
    assert p["status"] in results.USABLE and p["rel_error"] < 1e-5 and p["layout"] == "nt"


def test_probe_stores_polled_telemetry(ctx, monkeypatch):
    clocks = iter([1980, 1755, 1980, 1515] + [1980] * 10_000)

    def read():
        return {"sm_clock_mhz": next(clocks), "power_w": 700.0, "clock_event_reasons": ["SwPowerCap"]}

    monkeypatch.setattr(RunContext, "poll", lambda self: Poller(read, interval_s=0.001))
    p = execute(part.copy_job(SPEC, ctx), ctx)
    tel = p["telemetry"]
    assert tel["polls"] >= 1 and tel["clock_event_reasons"] == ["SwPowerCap"]
    assert tel["sm_clock_mhz"]["min"] <= tel["sm_clock_mhz"]["median"] <= tel["sm_clock_mhz"]["max"] == 1980


def test_poller_summarizes_and_survives_errors():
    calls = {"n": 0}

    def read():
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("NVML hiccup")
        return {"sm_clock_mhz": 1000 + calls["n"], "temperature_c": 60, "clock_event_reasons": ["GpuIdle"]}

    with Poller(read, interval_s=0.001) as p:
        time.sleep(0.05)
    s = p.summary()
    assert s["polls"] == calls["n"] - 1 >= 2 and "NVML hiccup" in s["error"]
    assert s["sm_clock_mhz"]["min"] == 1001 and s["temperature_c"]["max"] == 60
    with Poller(None) as empty:
        pass
    assert empty.summary() is None  # a CPU: nothing polled, nothing stored


def test_point_above_its_ceiling_is_not_usable(ctx):
    ctx.ceilings = {"copy_gbps": 100.0, "read_gbps": 120.0, "matvec_gbps": {"fp32": 90.0},
                    "matmul_tflops": {"fp32": 1.0}}
    # 1.2e9 bytes in 8 ms = 150 GB/s: 1.25x the larger bandwidth ceiling (read-only)
    fast = Job({"kind": "kernel", "op": "gemm", "backend": "torch", "dtype": "fp32", "m": 1},
               lambda c: {"median_ms": 8.0, "bytes": 1.2e9, "flops": 1e9, "noisy": False})
    p = execute(fast, ctx)
    assert p["status"] == "above_ceiling" and "above_ceiling" not in results.USABLE
    assert p["ceiling_ratio"] == pytest.approx(1.25) and p["ceiling_name"] == "read_gbps"
    assert "1.250x the measured read_gbps" in p["error"]
    assert p["mbu"] == pytest.approx(1.5) and p["mbu_read"] == pytest.approx(1.25)
    # Within 3% of the ceiling: a measurement, ok.
    near = Job(fast.key, lambda c: {"median_ms": 8.0, "bytes": 1.2e9 * 1.02 / 1.25, "noisy": False})
    q = execute(near, ctx)
    assert q["status"] == "ok" and q["ceiling_ratio"] == pytest.approx(1.02)
    # Above the matmul ceiling: 2e12 FLOP in 1 s = 2 TFLOP/s against 1.
    hot = Job(fast.key, lambda c: {"median_ms": 1000.0, "flops": 2e12, "noisy": True})
    r = execute(hot, ctx)
    assert r["status"] == "above_ceiling" and r["ceiling_name"] == "matmul_tflops.fp32"
    # Capacity and tables read usable points only.
    assert not results.usable(p) and not results.usable(r)


def test_end_jobs_reprobe_the_winners(ctx):
    start = [
        {"kind": "ceiling", "op": "copy", "dtype": "fp32", "mb": 4, "status": "ok", "value": 10.0},
        {"kind": "ceiling", "op": "matmul", "dtype": "fp32", "m": 32, "n": 32, "k": 32, "layout": "nn",
         "status": "ok", "value": 1.0},
        {"kind": "ceiling", "op": "matmul", "dtype": "fp32", "m": 64, "n": 64, "k": 64, "layout": "nt",
         "status": "ok", "value": 2.0},
        {"kind": "ceiling", "op": "read", "dtype": "fp32", "mb": 8, "status": "error", "error": "x"},
    ]
    jobs = part.end_jobs(SPEC, ctx, start)
    keys = [j.key for j in jobs]
    assert all(k["phase"] == "end" for k in keys)
    assert [(k["op"], k.get("m"), k.get("layout")) for k in keys] == [("copy", None, None), ("matmul", 64, "nt")]


def test_drift_flags_beyond_five_percent():
    start = {"copy_gbps": 100.0, "read_gbps": 120.0, "matvec_gbps": {"bf16": 90.0}, "matmul_tflops": {"bf16": 700.0}}
    end = {"copy_gbps": 99.0, "read_gbps": 120.0, "matvec_gbps": {}, "matmul_tflops": {"bf16": 780.0}}
    d = part.drift(start, end)
    assert d["ratios"] == pytest.approx({"copy_gbps": 0.99, "read_gbps": 1.0, "matmul_tflops.bf16": 780 / 700})
    assert d["flagged"] == ["matmul_tflops.bf16"] and d["limit"] == 0.05
    # End-phase points fold only into the end ceilings, never into the start's.
    pts = [{"kind": "ceiling", "op": "copy", "phase": "end", "status": "ok", "value": 50.0}]
    assert part.end_ceilings(pts)["copy_gbps"] == 50.0
    c = results.empty_ceilings()
    results.add_ceiling(c, pts[0])
    assert c["copy_gbps"] is None


def test_drift_in_manifest_and_summary(tmp_path: Path):
    w = results.RunWriter(tmp_path / "run", {
        "run_id": "d", "suite": "t", "command": "test",
        "ceiling_drift": part.drift({"copy_gbps": 100.0}, {"copy_gbps": 90.0})})
    w.append({"kind": "ceiling", "op": "copy", "dtype": "fp32", "mb": 4, "status": "ok", "value": 100.0})
    w.close()
    text = write_tables(tmp_path / "run").read_text()
    assert "## Ceiling drift" in text and "| copy_gbps | 0.9 | DRIFT |" in text and "moved more than 5%" in text


def test_run_reprobes_at_the_end(tmp_path: Path, tiny_suite: Path):
    run = run_suite(str(tiny_suite), out=tmp_path / "r", progress=False)
    manifest, points = results.read_run(run)
    end = [p for p in points if p.get("phase") == "end"]
    start = [p for p in points if p["kind"] == "ceiling" and p.get("phase") is None]
    assert {p["op"] for p in end} == {p["op"] for p in start if results.usable(p)}
    assert len([p for p in end if p["op"] == "matmul"]) == len({p["dtype"] for p in start if p["op"] == "matmul"})
    assert manifest["ceilings"]["read_gbps"] > 0 and manifest["ceilings_end"]["copy_gbps"] > 0
    d = manifest["ceiling_drift"]
    assert set(d["ratios"]) >= {"copy_gbps", "read_gbps", "matmul_tflops.fp32"}
    assert all(r > 0 for r in d["ratios"].values())
    assert json.loads(json.dumps(d)) == d


def test_rates_are_known_work_over_a_fake_clock(ctx, monkeypatch):
    """Every probe's GB/s and TFLOP/s from work counted here over a clock that moves STEP per reading (each sample is
    one reading to the next: exactly STEP): an oracle for the unit conversions (ms to s, bytes to GB, FLOP to
    TFLOP), which a rate compared only with itself never checks."""
    from tokenfleet.measure import timing

    step_ns = 2_500_000  # 2.5 ms per sample
    clock = {"ns": 0}

    def now() -> int:
        clock["ns"] += step_ns
        return clock["ns"]

    monkeypatch.setattr(timing, "_now_ns", now)
    s = step_ns / 1e9
    copy = part.copy_job(SPEC, ctx).run(ctx)  # 4 MiB read + 4 MiB written
    assert copy["median_ms"] == 2.5 and copy["unit"] == "GB/s"
    assert copy["value"] == pytest.approx(2 * 4 * 2**20 / s / 1e9, rel=1e-12)  # 3.3554432 GB/s
    read = part.read_job(SPEC, ctx).run(ctx)  # 8 MiB read
    assert read["value"] == pytest.approx(8 * 2**20 / s / 1e9, rel=1e-12)
    assert read["reductions_gbps"] == pytest.approx({"sum": 8 * 2**20 / s / 1e9, "amax": 8 * 2**20 / s / 1e9})
    mv = part.matvec_job(SPEC, "fp32", ctx).run(ctx)  # a 64x64 fp32 weight, x of 64, y of 64
    assert mv["value"] == pytest.approx((64 * 64 + 64 + 64) * 4 / s / 1e9, rel=1e-12)
    assert mv["flops"] == 2 * 64 * 64
    mm = part.matmul_job(SPEC, "fp32", 64, "nt").run(ctx)
    assert mm["unit"] == "TFLOP/s" and mm["flops"] == 2 * 64**3
    assert mm["value"] == pytest.approx(2 * 64**3 / s / 1e12, rel=1e-12)  # 2.097152e-4 TFLOP/s
