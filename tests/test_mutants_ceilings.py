"""Oracles for tokenfleet.measure.parts.ceilings without timing anything (`make mutate`'s survivors): the
copy-ceiling comparison, the end-of-run re-probe's choice of jobs and the drift flag, on fixed numbers worked out by
hand; each probe's GB/s and TFLOP/s as known work over a fake clock; what each probe times (the drawn data, from the
run's seed, in its dtype and layout) and its correctness checks at their limits, on crafted data with a known error
(exact in binary: 1/200 is the double nearest 5e-3)."""

import json
from types import SimpleNamespace

import pytest
import torch
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

    def __init__(self, medians_ms, on_gpu=False, datasheet=None, l2_bytes=2**18, copy_gbps=None, seed=7, calls=1):
        self.medians, self.on_gpu, self.datasheet, self.calls = list(medians_ms), on_gpu, datasheet, []
        self.device, self.ceilings = SimpleNamespace(l2_bytes=l2_bytes), {"copy_gbps": copy_gbps}
        self.seed, self.n_calls, self.returned = seed, calls, []  # `calls` of the probe per measure, their results

    def measure(self, fn, **kw):
        self.returned += [fn() for _ in range(self.n_calls)]
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
    assert jobs[2].run(ctx)["flops"] == 2 * 32**3  # the suite's spec in each matmul job


def test_sizes_in_the_key_are_ints_when_whole():
    """A whole number of MiB is keyed as an int (the point's key is JSON: 1, never 1.0), a fraction as it is."""
    ctx = FakeClock([])
    assert json.dumps(part.copy_job(SPEC, ctx).key) == '{"kind": "ceiling", "op": "copy", "dtype": "fp32", "mb": 1}'
    assert json.dumps(part.read_job(SPEC, ctx).key) == '{"kind": "ceiling", "op": "read", "dtype": "fp32", "mb": 2}'
    half = part.Spec(**{**SPEC.model_dump(), "copy_mb": 1.5})
    assert part.copy_job(half, ctx).key["mb"] == 1.5
    assert part.read_job(SPEC, ctx).label == "ceiling read"
    assert part.matvec_job(SPEC, "fp32", ctx).label == "ceiling matvec fp32"


def test_randn_draws_in_fp32_from_the_generator_given():
    """Drawn in fp32 then cast, whatever torch's default dtype; the same generator seed gives the same draw."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        x = part._randn((256,), torch.float64, "cpu", torch.Generator().manual_seed(3))
    finally:
        torch.set_default_dtype(default)
    assert x.dtype == torch.float64 and torch.equal(x, x.float().double())  # every value an fp32 one
    want = torch.randn((256,), generator=torch.Generator().manual_seed(3), dtype=torch.float32).half()
    assert torch.equal(part._randn((256,), torch.float16, "cpu", torch.Generator().manual_seed(3)), want)


def test_randn_draws_on_the_device_given():
    assert part._randn((2, 2), torch.float16, "meta", None).device.type == "meta"  # a device no default reaches


def test_fp8_matmul_scales_on_the_operands_device_and_accumulates_as_the_gemm_points(monkeypatch):
    """torch._scaled_mm with unit scales on the operands' device, bf16 out, use_fast_accum = gemm_fp8's FAST_ACCUM
    (set True here: the probe follows the constant, not _scaled_mm's default)."""
    calls = []
    monkeypatch.setattr(torch, "_scaled_mm", lambda a, b, **kw: calls.append((a, b, kw)) or "product")
    monkeypatch.setattr(part, "FAST_ACCUM", True)
    a, rhs = (torch.empty(4, 4, device="meta", dtype=torch.float8_e4m3fn) for _ in range(2))
    assert part._fp8_matmul(a, rhs)() == "product"
    ((got_a, got_b, kw),) = calls
    assert got_a is a and got_b is rhs and set(kw) == {"scale_a", "scale_b", "out_dtype", "use_fast_accum"}
    assert kw["out_dtype"] == torch.bfloat16 and kw["use_fast_accum"] is True
    for scale in (kw["scale_a"], kw["scale_b"]):
        assert scale.device.type == "meta" and scale.shape == () and scale.dtype == torch.float32


def test_probes_draw_the_same_data_from_the_same_run_seed():
    """Every probe's data come from the run's seed: the same seed, the same data (what the timed call returns);
    another seed, other data."""
    def returned(job_of, seed):
        ctx = FakeClock([1.0, 1.0], seed=seed)
        job_of(ctx).run(ctx)
        return ctx.returned

    jobs = {"copy": lambda c: part.copy_job(SPEC, c), "read": lambda c: part.read_job(SPEC, c),
            "matmul": lambda c: part.matmul_job(SPEC, "fp32", 32, "nn"),
            "matvec": lambda c: part.matvec_job(SPEC, "fp32", c)}
    for name, job_of in jobs.items():
        first, again, other = (returned(job_of, seed) for seed in (7, 7, 8))
        assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True)), name
        assert not torch.equal(first[0], other[0]), name


@pytest.fixture
def drawn(monkeypatch):
    """part._randn recorded: each call's arguments and the tensor it drew."""
    calls = []
    real = part._randn

    def spy(shape, dtype, device, gen):
        x = real(shape, dtype, device, gen)
        calls.append({"shape": shape, "dtype": dtype, "device": device, "gen": gen, "x": x})
        return x

    monkeypatch.setattr(part, "_randn", spy)
    return calls


@pytest.mark.parametrize("layout", ["nn", "nt"])
def test_matmul_probe_times_the_checked_product_into_one_output(drawn, layout):
    """The timed call is a @ b (nn) or a @ b.T (nt) of the drawn fp16 matrices, written into one output buffer
    (the same tensor every call); at 80 the check compares the first 64 rows."""
    ctx = FakeClock([2.0], calls=2)
    out = part.matmul_job(SPEC, "fp16", 80, layout).run(ctx)
    assert [(d["shape"], d["dtype"], d["device"]) for d in drawn] == [((80, 80), torch.float16, "cpu")] * 2
    assert all(isinstance(d["gen"], torch.Generator) for d in drawn)
    a, b = (d["x"] for d in drawn)
    rhs = b.T if layout == "nt" else b
    first, second = ctx.returned
    assert first is second and first.dtype == torch.float16
    want = a.double() @ rhs.double()
    # 5x the error measured on 2026-12-05 (2.1e-4: fp16's output rounding), far below a wrong layout's (~1.4)
    assert float((first.double() - want).norm() / want.norm()) < 1e-3
    assert "status" not in out and out["flops"] == 2 * 80**3 and out["rel_error"] < 1e-3


def crafted(monkeypatch, *tensors):
    """part._randn returning the given tensors in turn (cast to the dtype asked for), checking each call's shape."""
    left = list(tensors)

    def fake(shape, dtype, device, gen):
        x = left.pop(0)
        assert tuple(x.shape) == tuple(shape) and isinstance(gen, torch.Generator)
        return x.to(dtype)

    monkeypatch.setattr(part, "_randn", fake)


def skewed_matmul(monkeypatch, extra):
    """`@` adding `extra` at [0, 1] of every result but an fp64 one (the reference): a product off by a known error."""
    real = torch.Tensor.__matmul__

    def matmul(x, y):
        r = real(x, y)
        if r.dtype != torch.float64:
            r = r.clone()
            r[0, 1] += extra
        return r

    monkeypatch.setattr(torch.Tensor, "__matmul__", matmul)


A200, EYE2 = torch.tensor([[200.0, 0.0], [0.0, 0.0]]), torch.eye(2)  # a @ eye: [[200, 0], [0, 0]], norm 200


@pytest.mark.parametrize(("dtype", "extra", "ok"), [
    ("fp32", 1.0, True), ("fp32", 2.0, False),  # error 1/200 = 5e-3: the fp32 limit, still correct; 2/200 beyond
    ("fp16", 4.0, True), ("fp16", 8.0, False),  # 4/200 = 0.02: the limit of the other dtypes; 8/200 beyond
])
def test_matmul_relative_error_limits(monkeypatch, dtype, extra, ok):
    crafted(monkeypatch, A200, EYE2)
    skewed_matmul(monkeypatch, extra)
    out = part.matmul_job(SPEC, dtype, 2, "nn").run(FakeClock([2.0]))
    err = extra / 200
    if ok:
        assert "status" not in out and out["rel_error"] == err and out["flops"] == 16
    else:
        assert out == {"status": "incorrect", "error": f"matmul relative error {err:.2e}", "rel_error": err}


def test_fp8_matmul_timed_through_scaled_mm_on_a_gpu(drawn):
    """On a GPU the fp8 matmul is timed through torch._scaled_mm (bf16 out; here on the CPU, as a GPU context)."""
    ctx = FakeClock([2.0], on_gpu=True, datasheet=SimpleNamespace(**{**vars(SHEET), "peak_tflops": {"fp8": 2.0}}))
    out = part.matmul_job(SPEC, "fp8", 64, "nt").run(ctx)
    a, b = (d["x"] for d in drawn)
    assert a.dtype == b.dtype == torch.float8_e4m3fn
    (timed,) = ctx.returned
    want = a.double() @ b.double().T
    # 5x the error measured on 2026-12-05 (1.6e-3: the bf16 output's rounding)
    assert timed.dtype == torch.bfloat16 and float((timed.double() - want).norm() / want.norm()) < 8e-3
    assert out["fp8_accum"] == part.ACCUMULATION and out["rel_error"] < 8e-3 and "status" not in out
    assert out["value"] == 2 * 64**3 / 2e-3 / 1e12 and out["datasheet_value"] == 2.0
    assert "fp8_accum" not in part.matmul_job(SPEC, "fp16", 32, "nt").run(FakeClock([2.0], on_gpu=True))


def test_fp8_cpu_check_reads_b_in_its_layout(monkeypatch):
    """The CPU's fp8 check takes the job's layout (nt, cuBLASLt's only fp8 one: rhs column-major)."""
    seen = []
    real = part._fp8_matmul
    monkeypatch.setattr(part, "_fp8_matmul", lambda a, rhs: seen.append(rhs.stride()) or real(a, rhs))
    assert part.matmul_job(SPEC, "fp8", 64, "nt").run(FakeClock([], datasheet=SHEET))["status"] == "skipped"
    assert part._fp8_cpu_check(FakeClock([]), "nn")["status"] == "skipped"
    assert seen == [(1, 64), (64, 1)]
    # drawn from the run's seed: the same seed, the same draw and error; another seed, another
    errs = [part._fp8_cpu_check(FakeClock([], seed=s), "nt")["rel_error"] for s in (7, 7, 8)]
    assert errs[0] == errs[1] != errs[2]


@pytest.mark.parametrize(("extra", "ok"), [(0.02, True), (0.04, False)])  # a product of norm 1 off by `extra`
def test_fp8_cpu_check_relative_error_limit(monkeypatch, extra, ok):
    a = torch.zeros(64, 64)
    a[0, 0] = 1.0
    crafted(monkeypatch, a, torch.eye(64))

    def skewed(a, rhs):
        def mm():
            r = a.double() @ rhs.double()
            r[0, 1] += extra
            return r
        return mm

    monkeypatch.setattr(part, "_fp8_matmul", skewed)
    out = part._fp8_cpu_check(FakeClock([]), "nt")
    if ok:
        assert out["status"] == "skipped" and out["rel_error"] == 0.02
        assert out["note"] == f"{part.CPU_FP8_NOTE}; checked against fp64 at 64x64x64"
    else:
        assert out == {"status": "incorrect", "error": "matmul relative error 4.00e-02 at 64", "rel_error": 0.04,
                       "fp8_accum": part.ACCUMULATION}


def test_copy_that_moved_nothing_is_incorrect(monkeypatch):
    ctx = FakeClock([2.0], calls=0)  # the probe never runs: the destination keeps what it held
    monkeypatch.setattr(torch, "empty_like", lambda x: torch.full_like(x, -1.0))
    copied = {}
    out = part.copy_job(SPEC, ctx, copied).run(ctx)
    assert out == {"status": "incorrect", "error": "copy produced different bytes"}
    assert copied == {}


class OffSum(torch.Tensor):
    """A reduction gone wrong: the fp32 sum says 5 where the fp64 sum says 4."""

    def sum(self, *args, dtype=None, **kw):
        return torch.tensor(5.0) if dtype is None else super().sum(*args, dtype=dtype, **kw)


class OffMax(torch.Tensor):
    def amax(self, *args, **kw):
        return super().amax(*args, **kw) + 1


@pytest.mark.parametrize(("data", "want"), [
    (torch.ones(4).as_subclass(OffSum), {"status": "incorrect", "error": "sum 5.0 differs from 4.0"}),
    (torch.ones(4).as_subclass(OffMax), {"status": "incorrect", "error": "amax differs from max"}),
    (torch.zeros(4), None),  # a sum of 0 equal to its fp64 sum: correct
])
def test_read_probe_checks_its_reductions(monkeypatch, data, want):
    monkeypatch.setattr(torch, "rand", lambda *a, **kw: data)
    out = part.read_job(SPEC, FakeClock([1.0, 2.0])).run(FakeClock([1.0, 2.0]))
    if want is None:
        assert out["reduction"] == "sum" and out["median_ms"] == 1.0  # sum 1 ms, amax 2 ms: the sum is the faster
    else:
        assert out == want


def eye_linear(monkeypatch, extra):
    """F.linear adding `extra` at [0, 1], recording the weights it read."""
    real, weights = torch.nn.functional.linear, []

    def linear(x, w):
        weights.append(w)
        r = real(x, w).clone()
        r[0, 1] += extra
        return r

    monkeypatch.setattr(torch.nn.functional, "linear", linear)
    return weights


MATVEC4 = part.Spec(**{**SPEC.model_dump(), "matvec": {"n": 4, "k": 4, "dtypes": ["fp16"]}})


@pytest.mark.parametrize(("extra", "ok"), [(1.0, True), (2.0, False)])  # 1/50 = 0.02: the limit; 2/50 beyond it
def test_matvec_relative_error_limit_and_weight_scale(monkeypatch, extra, ok):
    """The weight is the draw over sqrt(k) (2·I / 2 = I here); x [1, k] = [50, 0, 0, 0], y = [50, 0, 0, 0]."""
    crafted(monkeypatch, 2 * torch.eye(4), torch.tensor([[50.0, 0.0, 0.0, 0.0]]))
    weights = eye_linear(monkeypatch, extra)
    ctx = FakeClock([2.0], l2_bytes=64, calls=40)  # a 4x4 fp16 weight is 32 bytes: 16 copies make 8x 64 bytes
    job = part.matvec_job(MATVEC4, "fp16", ctx)
    out = job.run(ctx)
    assert weights[0].dtype == torch.float16 and torch.equal(weights[0], torch.eye(4, dtype=torch.float16))
    if ok:
        assert "status" not in out and out["rel_error"] == 0.02 and out["bytes"] == (16 + 4 + 4) * 2
        # the checked call, then 40 timed ones rotating over the 16 copies, each its own memory, none twice in a row
        assert len(weights) == 41 and all(torch.equal(w, weights[0]) for w in weights)
        assert job.key["copies"] == 16 == len({w.data_ptr() for w in weights[1:]})
        assert all(a.data_ptr() != b.data_ptr() for a, b in zip(weights[1:], weights[2:], strict=False))
    else:
        assert out == {"status": "incorrect", "error": "matvec relative error 4.00e-02", "rel_error": 0.04}
