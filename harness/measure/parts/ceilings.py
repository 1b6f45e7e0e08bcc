"""Ceilings: what this device can do, measured at the start of every run and again at its end.

Copy bandwidth (bytes read + written), read-only bandwidth (a sum over a tensor), matmul rate per dtype (the best of
a few sizes and layouts), and a matrix-vector bandwidth (the shape of a decode step). Every bandwidth probe touches
at least CACHE_MULTIPLE x the cache the device reports (its L2; a CPU's last-level cache) per call, so it reads
memory, not a cache: the copy's tensors grow to that, the read's tensor too, and the mat-vec rotates over copies of
its weight, as a decode step reads each layer's weights once. A read-only or mat-vec rate above the copy ceiling by
more than COPY_MARGIN is flagged: `noisy`, with a `note` naming the ratio. On a CPU the fp8 matmul is checked at
FP8_CPU_CHECK_SIZE and not timed (CPU_FP8_NOTE).

Probes are sustained — on a GPU >= 1 s of warm-up and >= 1 s of samples, because a short probe lands in a power-cap
transient — with clocks, power and clock-event reasons polled during the probe and stored with its point. At the
end of the run the best probe of each ceiling runs again (`phase: end`); `drift` compares the two and flags a change
beyond DRIFT_LIMIT.
"""

from __future__ import annotations

import itertools
import math
from typing import Literal

import torch
from pydantic import Field, PositiveInt
from tokenfleet import results
from tokenfleet.config import Strict
from tokenfleet.dtypes import dtype_bytes, to_dtype
from tokenfleet.kernels.gemm_fp8 import ACCUMULATION, FAST_ACCUM
from tokenfleet.measure.context import CPU_FP8_NOTE, Job, RunContext
from tokenfleet.measure.timing import DEFAULT_L2_BYTES

GPU_SUSTAIN_S = 1.0  # warm-up and sampling time of a GPU probe, each, unless the suite says otherwise
DRIFT_LIMIT = 0.05  # start and end ceilings further apart than this are flagged in the manifest and summary
CACHE_MULTIPLE = 8  # a bandwidth probe's bytes per call against the L2 (LLC on a CPU): each call reads from memory
# A read-only or mat-vec rate above the copy ceiling by more than COPY_MARGIN is `noisy` with a note: not ok, and
# said in the point and the summary, but still a ceiling. Up to 1.5x is memory's own: a CPU copy reads each
# destination line for ownership before writing it and does not count it (3 bytes moved per 2 counted), and pays
# write turnarounds (the 2-core AMD EPYC: read 0.5% and 4.4% above copy in the reference run, 1.41x in a run of this
# code, both probes 8x its 32 MiB LLC). Beyond it, a neighbour's load between two probes (1.66x in a loaded test run,
# tens of times on probes of a few MB under heavier load) or a cache (Sapphire Rapids: a 64 MB mat-vec inside its LLC,
# 2.2x). No ratio tells those two apart, so none discards the probe: the sizing above keeps probes out of the cache.
COPY_MARGIN = 0.5
FP8_CPU_CHECK_SIZE = 64  # the fp8 matmul's correctness check on a CPU, where it is not timed
MAX_SAMPLES = 1_000_000  # probes are bounded by time, not by count (the point keeps at most 200 of them)
READ_REDUCTIONS = ("sum", "amax")  # the read-only probe times each; the faster is the ceiling

Dtype = Literal["fp32", "bf16", "fp16"]  # the dtypes torch times here (tokenfleet.dtypes.to_dtype)


class MatvecSpec(Strict):
    n: int = Field(gt=0)
    k: int = Field(gt=0)
    dtypes: list[Dtype] = Field(min_length=1)


class Spec(Strict):
    copy_mb: float = Field(gt=0, description=f"size of the tensor copied (read + written counts twice); grown to "
                           f"{CACHE_MULTIPLE // 2}x the L2/LLC where that is larger (source and destination: "
                           f"{CACHE_MULTIPLE}x)")
    read_mb: float | None = Field(None, gt=0, description=f"tensor summed by the read-only probe, at least; grown "
                                  f"to {CACHE_MULTIPLE}x the L2/LLC and to the copy's size where those are larger")
    matmul: dict[Dtype | Literal["fp8"], PositiveInt | list[PositiveInt]] = Field(
        description="dtype -> size N (or sizes) of NxNxN matmuls; the best size and layout is the ceiling (fp8: "
                    "e4m3 through torch._scaled_mm, bf16 out, nt only; on a CPU checked at "
                    f"{FP8_CPU_CHECK_SIZE}, not timed)")
    matmul_layouts: list[Literal["nn", "nt"]] = Field(["nn", "nt"], min_length=1,
                                                      description="nn: a @ b; nt: a @ b.T (F.linear's layout)")
    matvec: MatvecSpec
    end_probe: bool = Field(True, description="probe the ceilings again at the end of the run; drift above 5% is "
                            "flagged in the manifest and summary")
    allow_tf32: bool = Field(False, description="fp32 matmul as tf32 on GPU; off: fp32 is compared to the fp32 peak")
    warmup_s: float | None = Field(None, ge=0, description=f"warm-up per probe; default {GPU_SUSTAIN_S} s on a GPU, "
                                   "the suite's timing on a CPU")
    min_time_s: float | None = Field(None, gt=0, description=f"samples per probe; default {GPU_SUSTAIN_S} s on a "
                                     "GPU, the suite's timing on a CPU")


def _randn(shape, dtype, device, gen):
    return torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)


def _probe(ctx: RunContext, spec: Spec, fn) -> dict:
    """Time `fn` sustained, polling telemetry throughout; the timing fields plus the polled `telemetry`."""
    kw = {"max_samples": MAX_SAMPLES}
    for name in ("warmup_s", "min_time_s"):
        value = getattr(spec, name)
        if value is not None:
            kw[name] = value
        elif ctx.on_gpu:
            kw[name] = GPU_SUSTAIN_S
    with ctx.poll() as poller:
        t = ctx.measure(fn, **kw)
    out = t.to_dict()
    tel = poller.summary()
    if tel is not None:
        out["telemetry"] = tel
    return out


def _gbps(moved: int, timed: dict) -> float:
    return moved / (timed["median_ms"] / 1e3) / 1e9


def _bandwidth(ctx: RunContext, timed: dict, moved: int) -> dict:
    gbps = _gbps(moved, timed)
    sheet = ctx.datasheet.memory_bandwidth_gbps if ctx.datasheet else None
    return {**timed, "bytes": moved, "value": gbps, "unit": "GB/s", "datasheet_value": sheet,
            "datasheet_ratio": gbps / sheet if sheet else None}


def _mb(x: float) -> float | int:
    return int(x) if float(x).is_integer() else x


def cache_bytes(ctx: RunContext) -> int:
    """The cache a bandwidth probe must exceed: the L2 the device reports (a CPU's last-level cache), else a default
    larger than any current GPU's."""
    return ctx.device.l2_bytes or DEFAULT_L2_BYTES


def _vs_copy(ctx: RunContext, out: dict, copied: dict) -> dict:
    """A read-only or mat-vec rate against the copy ceiling (`ceiling_ratio`, kept either way): the copy probed in the
    same plan (`copied`: the start's, or the end's for the end-of-run re-probe), else this run's. Beyond COPY_MARGIN
    `noisy` with a `note` that names the ratio and the cache the probe was sized from."""
    copy = copied.get("gbps") or ctx.ceilings.get("copy_gbps")
    if not copy or not out.get("value"):
        return out
    ratio = out["value"] / copy
    out = {**out, "ceiling_ratio": ratio, "ceiling_name": "copy_gbps"}
    if ratio > 1 + COPY_MARGIN:
        out.update(status="noisy", note=(
            f"{ratio:.2f}x the copy ceiling ({copy:.1f} GB/s): a cache's rate if the cache reported "
            f"({cache_bytes(ctx) / 2**20:.0f} MiB; this probe {CACHE_MULTIPLE}x it) is smaller than the real one, "
            "else load that moved between the probes"))
    return out


def copy_mb(spec: Spec, ctx: RunContext) -> float | int:
    """The copy's tensor: the suite's size, grown so that source and destination together are CACHE_MULTIPLE x the
    cache."""
    return _mb(max(float(spec.copy_mb), float(math.ceil(CACHE_MULTIPLE / 2 * cache_bytes(ctx) / 2**20))))


def copy_job(spec: Spec, ctx: RunContext, copied: dict | None = None) -> Job:
    """The copy probe; its rate also goes into `copied`, which the plan's read and mat-vec probes compare against."""
    mb = copy_mb(spec, ctx)
    copied = {} if copied is None else copied

    def run(ctx: RunContext) -> dict:
        n = int(mb * 2**20) // 4
        gen = torch.Generator(device=ctx.torch_device).manual_seed(ctx.seed)
        src = torch.rand(n, generator=gen, device=ctx.torch_device)
        dst = torch.empty_like(src)
        timed = _probe(ctx, spec, lambda: dst.copy_(src))
        if not torch.equal(dst, src):
            return {"status": "incorrect", "error": "copy produced different bytes"}
        out = _bandwidth(ctx, timed, 2 * n * 4)
        copied["gbps"] = out["value"]
        return out

    return Job({"kind": "ceiling", "op": "copy", "dtype": "fp32", "mb": mb}, run, "ceiling copy")


def read_mb(spec: Spec, ctx: RunContext) -> float:
    """The read probe's tensor: CACHE_MULTIPLE x the cache, at least the copy's size and the suite's read_mb."""
    floor = max(float(copy_mb(spec, ctx)), spec.read_mb or 0.0)
    return max(float(math.ceil(CACHE_MULTIPLE * cache_bytes(ctx) / 2**20)), floor)


def read_job(spec: Spec, ctx: RunContext, copied: dict | None = None) -> Job:
    """Read-only bandwidth: a reduction over a tensor far beyond the L2, so every byte comes from memory once per
    call; the faster of a sum and a max (on the 2-core CPU the max read 10-15% faster than torch's sum), both rates
    kept in `reductions_gbps`."""
    mb = _mb(read_mb(spec, ctx))

    def run(ctx: RunContext) -> dict:
        n = int(mb * 2**20) // 4
        gen = torch.Generator(device=ctx.torch_device).manual_seed(ctx.seed + 3)
        x = torch.rand(n, generator=gen, device=ctx.torch_device)
        got, want = float(x.sum()), float(x.sum(dtype=torch.float64))
        if not abs(got - want) <= 1e-3 * abs(want):
            return {"status": "incorrect", "error": f"sum {got} differs from {want}"}
        if not torch.equal(x.amax(), x.max()):
            return {"status": "incorrect", "error": "amax differs from max"}
        probes = {r: _probe(ctx, spec, getattr(x, r)) for r in READ_REDUCTIONS}
        best = min(probes, key=lambda r: probes[r]["median_ms"])
        rates = {r: _gbps(n * 4, t) for r, t in probes.items()}
        out = {**_bandwidth(ctx, probes[best], n * 4), "reduction": best, "reductions_gbps": rates}
        return _vs_copy(ctx, out, copied or {})

    return Job({"kind": "ceiling", "op": "read", "dtype": "fp32", "mb": mb}, run, "ceiling read")


def _fp8_matmul(a: torch.Tensor, rhs: torch.Tensor):
    # e4m3 a [N, N] @ rhs through torch._scaled_mm (cuBLASLt): rhs column-major (the nt layout, the only one
    # cuBLASLt's fp8 takes), unit scales, bf16 out, accumulating as the gemm_fp8 points do (FAST_ACCUM). No out= on
    # every build: each call allocates (cached).
    one = torch.ones((), device=a.device)
    return lambda: torch._scaled_mm(a, rhs, scale_a=one, scale_b=one, out_dtype=torch.bfloat16,
                                    use_fast_accum=FAST_ACCUM)


def matmul_job(spec: Spec, dtype: str, size: int, layout: str) -> Job:
    def run(ctx: RunContext) -> dict:
        if dtype == "fp8" and ctx.datasheet and not ctx.datasheet.has_fp8:
            return {"status": "skipped", "note": ctx.datasheet.fp8_refusal()}
        if dtype == "fp8" and not ctx.on_gpu:
            return _fp8_cpu_check(ctx, layout)
        dt = to_dtype(dtype)
        gen = torch.Generator(device=ctx.torch_device).manual_seed(ctx.seed + 1)
        a = _randn((size, size), dt, ctx.torch_device, gen)
        b = _randn((size, size), dt, ctx.torch_device, gen)
        rhs = b.T if layout == "nt" else b  # nt: b holds [n, k] and is read transposed, as F.linear's weight
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = spec.allow_tf32
        try:
            mm = _fp8_matmul(a, rhs) if dtype == "fp8" else None
            out = mm() if mm else a @ rhs
            probe = (a[:64].double() @ rhs.double())
            err = float((out[:64].double() - probe).norm() / probe.norm())
            if not err <= (0.02 if dtype != "fp32" else 5e-3):  # also catches NaN
                return {"status": "incorrect", "error": f"matmul relative error {err:.2e}", "rel_error": err}
            timed = _probe(ctx, spec, mm or (lambda: torch.matmul(a, rhs, out=out)))
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev
        flops = 2 * size**3
        tflops = flops / (timed["median_ms"] / 1e3) / 1e12
        peak_key = "tf32" if (dtype == "fp32" and spec.allow_tf32 and ctx.on_gpu) else dtype
        sheet = ctx.datasheet.peak_tflops.get(peak_key) if ctx.datasheet else None
        return {**timed, "flops": flops, "value": tflops, "unit": "TFLOP/s", "datasheet_value": sheet,
                "datasheet_ratio": tflops / sheet if sheet else None, "rel_error": err,
                **({"fp8_accum": ACCUMULATION} if dtype == "fp8" else {})}

    key = {"kind": "ceiling", "op": "matmul", "dtype": dtype, "m": size, "n": size, "k": size, "layout": layout}
    return Job(key, run, f"ceiling matmul {dtype} {size} {layout}")


def _fp8_cpu_check(ctx: RunContext, layout: str) -> dict:
    """On a CPU: the fp8 matmul checked against fp64 at FP8_CPU_CHECK_SIZE, not timed (CPU_FP8_NOTE)."""
    size = FP8_CPU_CHECK_SIZE
    gen = torch.Generator(device=ctx.torch_device).manual_seed(ctx.seed + 1)
    a, b = (_randn((size, size), to_dtype("fp8"), ctx.torch_device, gen) for _ in range(2))
    rhs = b.T if layout == "nt" else b
    out, probe = _fp8_matmul(a, rhs)(), a.double() @ rhs.double()
    err = float((out.double() - probe).norm() / probe.norm())
    if not err <= 0.02:  # also catches NaN
        return {"status": "incorrect", "error": f"matmul relative error {err:.2e} at {size}", "rel_error": err,
                "fp8_accum": ACCUMULATION}
    note = f"{CPU_FP8_NOTE}; checked against fp64 at {size}x{size}x{size}"
    return {"status": "skipped", "note": note, "rel_error": err, "fp8_accum": ACCUMULATION}


def matvec_copies(spec: Spec, dtype: str, ctx: RunContext) -> int:
    """Weights the mat-vec rotates over: together at least CACHE_MULTIPLE x the cache, so each call's weight was
    evicted by the calls between (a decode step reads each layer's weights once)."""
    weight = spec.matvec.n * spec.matvec.k * dtype_bytes(dtype)
    return max(1, math.ceil(CACHE_MULTIPLE * cache_bytes(ctx) / weight))


def matvec_job(spec: Spec, dtype: str, ctx: RunContext, copied: dict | None = None) -> Job:
    n, k = spec.matvec.n, spec.matvec.k
    copies = matvec_copies(spec, dtype, ctx)

    def run(ctx: RunContext) -> dict:
        dt = to_dtype(dtype)
        gen = torch.Generator(device=ctx.torch_device).manual_seed(ctx.seed + 2)
        w = _randn((n, k), dt, ctx.torch_device, gen) / k**0.5
        x = _randn((1, k), dt, ctx.torch_device, gen)
        out = torch.nn.functional.linear(x, w)
        ref = x.double() @ w.double().T
        err = float((out.double() - ref).norm() / ref.norm())
        if not err <= 0.02:  # also catches NaN
            return {"status": "incorrect", "error": f"matvec relative error {err:.2e}", "rel_error": err}
        weights = [w] + [w.clone() for _ in range(copies - 1)]  # copies of the checked weight, in fresh memory
        turn = itertools.cycle(weights)
        # No L2 flush: each call reads the next weight, the others' bytes (>= CACHE_MULTIPLE x the cache) between.
        timed = _probe(ctx, spec, lambda: torch.nn.functional.linear(x, next(turn)))
        moved = (n * k + k + n) * dtype_bytes(dtype)
        return _vs_copy(ctx, {**_bandwidth(ctx, timed, moved), "flops": 2 * n * k, "rel_error": err}, copied or {})

    return Job({"kind": "ceiling", "op": "matvec", "dtype": dtype, "m": 1, "n": n, "k": k, "copies": copies}, run,
               f"ceiling matvec {dtype}")


def plan(spec: Spec, ctx: RunContext) -> list[Job]:
    copied: dict = {}  # the copy's rate, for this plan's read and mat-vec (the end-of-run plan: the end's copy)
    jobs = [copy_job(spec, ctx, copied), read_job(spec, ctx, copied)]
    for dt, sizes in spec.matmul.items():
        for size in ([sizes] if isinstance(sizes, int) else sizes):
            layouts = ["nt"] if dt == "fp8" else spec.matmul_layouts  # cuBLASLt's fp8 takes only nt
            jobs += [matmul_job(spec, dt, size, layout) for layout in layouts]
    jobs += [matvec_job(spec, dt, ctx, copied) for dt in spec.matvec.dtypes]
    return jobs


def end_jobs(spec: Spec, ctx: RunContext, points: list[dict]) -> list[Job]:
    """The re-probe at the end of a run: the start probe that set each ceiling (for matmul, the best size and
    layout of each dtype), again, keyed `phase: end` so it neither replaces the start point nor folds into the
    ceilings the run's points were judged against."""
    best: dict[tuple, dict] = {}
    for p in points:
        if p.get("kind") == "ceiling" and p.get("phase") is None and results.usable(p) and p.get("value"):
            slot = (p.get("op"), p.get("dtype"))
            if slot not in best or p["value"] > best[slot]["value"]:
                best[slot] = p
    out = []
    for job in plan(spec, ctx):
        key = {k: results.jsonable(v) for k, v in job.key.items()}
        p = best.get((key["op"], key["dtype"]))
        if p is not None and all(p.get(k) == v for k, v in key.items()):
            out.append(Job({**job.key, "phase": "end"}, job.run, f"{job.label} (end)"))
    return out


def flat(ceilings: dict) -> dict[str, float]:
    """{'copy_gbps': v, 'read_gbps': v, 'matmul_tflops.bf16': v, ...}: every measured value under one name."""
    return results.flat_ceilings(ceilings)


def drift(start: dict, end: dict, limit: float = DRIFT_LIMIT) -> dict:
    """End over start for each ceiling measured both times; `flagged`: those that moved by more than `limit`."""
    s, e = flat(start), flat(end)
    ratios = {k: e[k] / s[k] for k in s if k in e}
    return {"limit": limit, "ratios": ratios, "flagged": sorted(k for k, r in ratios.items() if abs(r - 1) > limit)}


def end_ceilings(points: list[dict]) -> dict:
    """The ceilings of the end-of-run re-probe, folded as the start's are."""
    c = results.empty_ceilings()
    for p in points:
        results.add_ceiling(c, p, phase="end")
    return c
