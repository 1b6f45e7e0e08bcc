"""Ceilings: what this device can do, measured at the start of every run and again at its end.

Copy bandwidth (bytes read + written), read-only bandwidth (a sum over a tensor >= 8x the L2, or the CPU's
last-level cache), matmul rate per dtype (the best of a few sizes and layouts), and a matrix-vector bandwidth (the
shape of a decode step). Probes are sustained — on a GPU >= 1 s of warm-up and >= 1 s of samples, because a
short probe lands in a power-cap transient — with clocks, power and clock-event reasons polled during the probe
and stored with its point. At the end of the run the best probe of each ceiling runs again (`phase: end`);
`drift` compares the two and flags a change beyond DRIFT_LIMIT.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, PositiveInt
from tokenfleet import results
from tokenfleet.config import Strict
from tokenfleet.dtypes import dtype_bytes, to_dtype
from tokenfleet.kernels.gemm_fp8 import ACCUMULATION, FAST_ACCUM
from tokenfleet.measure.context import Job, RunContext
from tokenfleet.measure.timing import DEFAULT_L2_BYTES

GPU_SUSTAIN_S = 1.0  # warm-up and sampling time of a GPU probe, each, unless the suite says otherwise
DRIFT_LIMIT = 0.05  # start and end ceilings further apart than this are flagged in the manifest and summary
READ_L2_MULTIPLE = 8  # the read probe's tensor against the L2 (LLC on a CPU): a sum over it reads from memory
MAX_SAMPLES = 1_000_000  # probes are bounded by time, not by count (the point keeps at most 200 of them)
READ_REDUCTIONS = ("sum", "amax")  # the read-only probe times each; the faster is the ceiling

Dtype = Literal["fp32", "bf16", "fp16"]  # the dtypes torch times here (tokenfleet.dtypes.to_dtype)


class MatvecSpec(Strict):
    n: int = Field(gt=0)
    k: int = Field(gt=0)
    dtypes: list[Dtype] = Field(min_length=1)


class Spec(Strict):
    copy_mb: float = Field(gt=0, description="size of the tensor copied (read + written counts twice)")
    read_mb: float | None = Field(None, gt=0, description=f"tensor summed by the read-only probe; default "
                                  f"{READ_L2_MULTIPLE}x the L2/LLC, at least copy_mb")
    matmul: dict[Dtype | Literal["fp8"], PositiveInt | list[PositiveInt]] = Field(
        description="dtype -> size N (or sizes) of NxNxN matmuls; the best size and layout is the ceiling (fp8: "
                    "e4m3 through torch._scaled_mm, bf16 out, nt only)")
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


def copy_job(spec: Spec) -> Job:
    def run(ctx: RunContext) -> dict:
        n = int(spec.copy_mb * 2**20) // 4
        gen = torch.Generator(device=ctx.torch_device).manual_seed(ctx.seed)
        src = torch.rand(n, generator=gen, device=ctx.torch_device)
        dst = torch.empty_like(src)
        timed = _probe(ctx, spec, lambda: dst.copy_(src))
        if not torch.equal(dst, src):
            return {"status": "incorrect", "error": "copy produced different bytes"}
        return _bandwidth(ctx, timed, 2 * n * 4)

    return Job({"kind": "ceiling", "op": "copy", "dtype": "fp32", "mb": _mb(spec.copy_mb)}, run, "ceiling copy")


def read_mb(spec: Spec, ctx: RunContext) -> float:
    if spec.read_mb is not None:
        return spec.read_mb
    l2 = ctx.device.l2_bytes or DEFAULT_L2_BYTES
    return max(float(READ_L2_MULTIPLE * l2 // 2**20), spec.copy_mb)


def read_job(spec: Spec, ctx: RunContext) -> Job:
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
        return {**_bandwidth(ctx, probes[best], n * 4), "reduction": best, "reductions_gbps": rates}

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


def matvec_job(spec: Spec, dtype: str) -> Job:
    n, k = spec.matvec.n, spec.matvec.k

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
        # No L2 flush: the weight matrix is far larger than any L2, as a decode step's weights are.
        timed = _probe(ctx, spec, lambda: torch.nn.functional.linear(x, w))
        return {**_bandwidth(ctx, timed, (n * k + k + n) * dtype_bytes(dtype)), "flops": 2 * n * k, "rel_error": err}

    return Job({"kind": "ceiling", "op": "matvec", "dtype": dtype, "m": 1, "n": n, "k": k}, run,
               f"ceiling matvec {dtype}")


def plan(spec: Spec, ctx: RunContext) -> list[Job]:
    jobs = [copy_job(spec), read_job(spec, ctx)]
    for dt, sizes in spec.matmul.items():
        for size in ([sizes] if isinstance(sizes, int) else sizes):
            layouts = ["nt"] if dt == "fp8" else spec.matmul_layouts  # cuBLASLt's fp8 takes only nt
            jobs += [matmul_job(spec, dt, size, layout) for layout in layouts]
    jobs += [matvec_job(spec, dt) for dt in spec.matvec.dtypes]
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
