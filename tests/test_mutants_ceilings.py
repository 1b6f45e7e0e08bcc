"""Oracles for tokenfleet.measure.parts.ceilings' arithmetic without timing anything (`make mutate`'s survivors): the
copy-ceiling comparison, the end-of-run re-probe's choice of jobs and the drift flag, on fixed numbers worked out by
hand. (The bandwidth and TFLOP/s of a timed probe: tests/test_ceilings.py.)"""

from types import SimpleNamespace

from tokenfleet.measure.parts import ceilings as part

SPEC = part.Spec(copy_mb=1, read_mb=2, matmul={"fp32": 32}, matmul_layouts=["nn", "nt"],
                 matvec={"n": 64, "k": 64, "dtypes": ["fp32"]})


def fake_ctx(copy_gbps=None, l2_bytes=2**20):
    """What the comparison and the plan read of a run context: the device's cache and the run's ceilings."""
    return SimpleNamespace(device=SimpleNamespace(l2_bytes=l2_bytes), ceilings={"copy_gbps": copy_gbps})


def test_vs_copy_ratio_margin_and_note():
    ctx = fake_ctx(copy_gbps=20.0)
    # the plan's own copy (10 GB/s) wins over the run's (20): 16 / 10 = 1.6 > 1 + 0.5
    high = part._vs_copy(ctx, {"value": 16.0, "status": "ok"}, {"gbps": 10.0})
    assert high == {"value": 16.0, "status": "noisy", "ceiling_ratio": 1.6, "ceiling_name": "copy_gbps",
                    "note": "1.60x the copy ceiling (10.0 GB/s): a cache's rate if the cache reported (1 MiB; this "
                            "probe 8x it) is smaller than the real one, else load that moved between the probes"}
    # exactly at the margin (15 / 10 = 1.5) and below it: kept as it is, the ratio recorded
    assert part._vs_copy(ctx, {"value": 15.0, "status": "ok"}, {"gbps": 10.0}) == \
        {"value": 15.0, "status": "ok", "ceiling_ratio": 1.5, "ceiling_name": "copy_gbps"}
    assert part._vs_copy(ctx, {"value": 4.0}, {"gbps": 10.0}) == \
        {"value": 4.0, "ceiling_ratio": 0.4, "ceiling_name": "copy_gbps"}
    # no copy in the plan: the run's ceiling, 16 / 20 = 0.8
    assert part._vs_copy(ctx, {"value": 16.0}, {})["ceiling_ratio"] == 0.8
    # nothing to compare with, or no rate: unchanged
    assert part._vs_copy(fake_ctx(), {"value": 16.0}, {}) == {"value": 16.0}
    assert part._vs_copy(ctx, {"status": "incorrect"}, {"gbps": 10.0}) == {"status": "incorrect"}


def _point(job, value, **kw):
    return {**{k: v for k, v in job.key.items()}, "status": "ok", "value": value, **kw}


def test_end_jobs_reprobe_the_best_start_probe_of_each_ceiling():
    ctx = fake_ctx()
    jobs = {(j.key["op"], j.key.get("layout")): j for j in part.plan(SPEC, ctx)}
    copy, read, nn, nt, mv = (jobs[k] for k in (("copy", None), ("read", None), ("matmul", "nn"),
                                                 ("matmul", "nt"), ("matvec", None)))
    points = [
        _point(copy, 10.0),
        {**_point(copy, 99.0), "mb": 999, "phase": "end"},  # an end-of-run point: never the start's best
        _point(read, 12.0, status="incorrect"),  # not usable: no re-probe of the read
        _point(nn, 5.0), _point(nt, 5.0),  # a tie: the first stays the best
        _point(mv, 0.0),  # no rate: no re-probe
        {"kind": "decode", "op": "matvec", "dtype": "fp32", "status": "ok", "value": 50.0},  # not a ceiling
    ]
    out = part.end_jobs(SPEC, ctx, points)
    assert [(j.key["op"], j.key.get("layout")) for j in out] == [("copy", None), ("matmul", "nn")]
    for j, start in zip(out, (copy, nn), strict=True):
        assert j.key == {**start.key, "phase": "end"}
        assert j.label == f"{start.label} (end)"
        assert callable(j.run)


def test_drift_flags_beyond_the_limit_only():
    start = {"copy_gbps": 8.0, "read_gbps": 8.0, "matvec_gbps": {}, "matmul_tflops": {"fp32": 2.0, "bf16": 4.0}}
    end = {"copy_gbps": 8.5, "read_gbps": 7.0, "matvec_gbps": {}, "matmul_tflops": {"fp32": 2.0}}
    d = part.drift(start, end, limit=0.0625)
    # 8.5 / 8 = 1.0625: exactly the limit, not beyond; 7 / 8 = 0.875 is; bf16 was not measured at the end
    assert d == {"limit": 0.0625, "ratios": {"copy_gbps": 1.0625, "read_gbps": 0.875, "matmul_tflops.fp32": 1.0},
                 "flagged": ["read_gbps"]}
    assert part.drift(start, end)["flagged"] == ["copy_gbps", "read_gbps"]  # the default limit, 5%


class FakeClock:
    """A run context whose `measure` calls the probe once and reports the next of `medians_ms` (known work over a
    known time), recording the timing arguments; its poller reports a fixed telemetry."""

    torch_device, seed = "cpu", 7

    def __init__(self, medians_ms, on_gpu=False, datasheet=None, l2_bytes=2**18, copy_gbps=None):
        self.medians, self.on_gpu, self.datasheet, self.calls = list(medians_ms), on_gpu, datasheet, []
        self.device, self.ceilings = SimpleNamespace(l2_bytes=l2_bytes), {"copy_gbps": copy_gbps}

    def measure(self, fn, **kw):
        fn()
        self.calls.append(kw)
        ms = self.medians.pop(0)
        return SimpleNamespace(to_dict=lambda: {"median_ms": ms})

    def poll(self):
        ctx = self

        class Poller:
            def __enter__(self):
                return SimpleNamespace(summary=lambda: {"power_w": 100.0} if ctx.on_gpu else None)

            def __exit__(self, *exc):
                return False

        return Poller()


SHEET = SimpleNamespace(memory_bandwidth_gbps=2.097152, peak_tflops={"fp32": 1.6384e-5, "tf32": 6.5536e-5},
                        has_fp8=True)


def test_copy_probe_bytes_and_rate_over_a_fake_clock():
    ctx = FakeClock([2.0], datasheet=SHEET)
    copied = {}
    job = part.copy_job(SPEC, ctx, copied)
    assert job.key == {"kind": "ceiling", "op": "copy", "dtype": "fp32", "mb": 1} and job.label == "ceiling copy"
    out = job.run(ctx)
    # 1 MiB of fp32 read and written: 2 · 2^20 bytes in 2 ms = 1.048576 GB/s; half the 2.097152 GB/s datasheet
    assert out == {"median_ms": 2.0, "bytes": 2 * 2**20, "value": 2 * 2**20 / 2e-3 / 1e9, "unit": "GB/s",
                   "datasheet_value": 2.097152, "datasheet_ratio": 0.5}
    assert copied == {"gbps": 1.048576}
    assert ctx.calls == [{"max_samples": part.MAX_SAMPLES}]  # a CPU probe: the suite's timing
    grown = FakeClock([1.0], l2_bytes=2**20)  # source and destination 8x a 1 MiB cache: 4 MiB copied each way
    assert part.copy_job(SPEC, grown).key["mb"] == 4
    assert part.copy_job(SPEC, grown).run(grown)["bytes"] == 8 * 2**20


def test_read_probe_takes_the_faster_reduction():
    ctx = FakeClock([4.0, 2.0], copy_gbps=0.524288)  # sum 4 ms, amax 2 ms
    job = part.read_job(SPEC, ctx)
    assert job.key["mb"] == 2  # the suite's read_mb; 8 x 256 KiB = 2 MiB too
    out = job.run(ctx)
    # 2 MiB read once per call: 2^21 bytes in 2 ms = 1.048576 GB/s (the sum's 4 ms: 0.524288), 2x the copy
    assert out["bytes"] == 2**21 and out["reduction"] == "amax" and out["median_ms"] == 2.0
    assert out["value"] == 1.048576 and out["reductions_gbps"] == {"sum": 0.524288, "amax": 1.048576}
    assert out["ceiling_ratio"] == 2.0 and out["status"] == "noisy"


def test_matvec_probe_bytes_flops_and_copies():
    ctx = FakeClock([2.0])
    job = part.matvec_job(SPEC, "fp32", ctx)
    # a 64x64 fp32 weight is 16 KiB: 8 x 256 KiB needs 128 copies
    assert job.key == {"kind": "ceiling", "op": "matvec", "dtype": "fp32", "m": 1, "n": 64, "k": 64, "copies": 128}
    out = job.run(ctx)
    # weight 64·64, x 64 and y 64 fp32 values: 16896 bytes in 2 ms; 2·64·64 FLOPs
    assert out["bytes"] == 16896 and out["value"] == 16896 / 2e-3 / 1e9 and out["flops"] == 8192
    assert out["rel_error"] < 1e-6 and "status" not in out
    assert part.matvec_copies(part.Spec(**{**SPEC.model_dump(), "matvec": {"n": 4096, "k": 4096,
                                                                            "dtypes": ["fp32"]}}), "fp32", ctx) == 1


def test_matmul_probe_flops_rate_and_peak():
    for layout in ("nn", "nt"):
        ctx = FakeClock([2.0], datasheet=SHEET)
        job = part.matmul_job(SPEC, "fp32", 32, layout)
        assert job.key == {"kind": "ceiling", "op": "matmul", "dtype": "fp32", "m": 32, "n": 32, "k": 32,
                           "layout": layout} and job.label == f"ceiling matmul fp32 32 {layout}"
        out = job.run(ctx)
        # 2·32^3 = 65536 FLOPs in 2 ms = 3.2768e-5 TFLOP/s, 2x the fp32 datasheet figure
        assert out["flops"] == 65536 and out["value"] == 65536 / 2e-3 / 1e12 and out["unit"] == "TFLOP/s"
        assert out["datasheet_value"] == 1.6384e-5 and out["datasheet_ratio"] == 2.0
        assert out["rel_error"] < 1e-6 and "fp8_accum" not in out and out["median_ms"] == 2.0
    # fp32 as tf32 on a GPU is compared with the tf32 peak (on a CPU with the fp32 one)
    tf32 = part.Spec(**{**SPEC.model_dump(), "allow_tf32": True})
    gpu = FakeClock([2.0], on_gpu=True, datasheet=SHEET)
    gpu.torch_device = "cpu"
    out = part.matmul_job(tf32, "fp32", 32, "nn").run(gpu)
    assert out["datasheet_value"] == 6.5536e-5 and out["telemetry"] == {"power_w": 100.0}
    assert gpu.calls == [{"max_samples": part.MAX_SAMPLES, "warmup_s": 1.0, "min_time_s": 1.0}]
    assert part.matmul_job(tf32, "fp32", 32, "nn").run(FakeClock([2.0], datasheet=SHEET))["datasheet_value"] == \
        1.6384e-5


def test_fp8_matmul_refused_or_checked_on_the_cpu():
    no_fp8 = SimpleNamespace(**{**vars(SHEET), "has_fp8": False, "fp8_refusal": lambda: "no FP8 tensor cores"})
    assert part.matmul_job(SPEC, "fp8", 64, "nt").run(FakeClock([], datasheet=no_fp8)) == \
        {"status": "skipped", "note": "no FP8 tensor cores"}
    out = part.matmul_job(SPEC, "fp8", 64, "nt").run(FakeClock([], datasheet=SHEET))
    assert out["status"] == "skipped" and out["note"].endswith("checked against fp64 at 64x64x64")
    assert out["rel_error"] <= 0.02 and out["fp8_accum"] == part.ACCUMULATION


def test_probe_timing_from_the_suite_else_gpu_defaults():
    timed = part.Spec(**{**SPEC.model_dump(), "warmup_s": 0.25, "min_time_s": 0.5})
    ctx = FakeClock([1.0], on_gpu=True)
    part._probe(ctx, timed, lambda: None)
    assert ctx.calls == [{"max_samples": part.MAX_SAMPLES, "warmup_s": 0.25, "min_time_s": 0.5}]
    half = part.Spec(**{**SPEC.model_dump(), "warmup_s": 0.25})
    ctx = FakeClock([1.0])
    part._probe(ctx, half, lambda: None)
    assert ctx.calls == [{"max_samples": part.MAX_SAMPLES, "warmup_s": 0.25}]


def test_plan_shares_the_copy_with_read_and_matvec():
    """The plan's read and mat-vec compare with the copy probed in the same plan (not the run's ceiling)."""
    ctx = FakeClock([2.0, 4.0, 2.0, 2.0, 2.0, 2.0], copy_gbps=1e-9)
    fp8 = part.Spec(**{**SPEC.model_dump(), "matmul": {"fp32": 32, "fp8": [64]}})
    jobs = part.plan(fp8, ctx)
    assert [(j.key["op"], j.key["dtype"], j.key.get("layout")) for j in jobs] == [
        ("copy", "fp32", None), ("read", "fp32", None), ("matmul", "fp32", "nn"), ("matmul", "fp32", "nt"),
        ("matmul", "fp8", "nt"), ("matvec", "fp32", None)]
    copy = jobs[0].run(ctx)
    read = jobs[1].run(ctx)
    assert read["ceiling_ratio"] == read["value"] / copy["value"] == 1.0  # 2^21 bytes in 2 ms, as the copy
    matvec = jobs[5].run(ctx)
    assert matvec["ceiling_ratio"] == matvec["value"] / copy["value"]
