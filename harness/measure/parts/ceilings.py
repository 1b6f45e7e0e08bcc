"""Ceilings: what this device can do, measured at the start of every run.

Copy bandwidth (bytes read + written), matmul rate per dtype, and a matrix-vector bandwidth (the shape of a
decode step: every weight byte read once for one token). Each is a point with the datasheet figure beside it.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, PositiveInt

from harness.config import Strict
from harness.dtypes import dtype_bytes, to_dtype
from harness.measure.context import Job, RunContext

Dtype = Literal["fp32", "bf16", "fp16"]  # the dtypes torch times here (harness.dtypes.to_dtype)


class MatvecSpec(Strict):
    n: int = Field(gt=0)
    k: int = Field(gt=0)
    dtypes: list[Dtype] = Field(min_length=1)


class Spec(Strict):
    copy_mb: float = Field(gt=0, description="size of the tensor copied (read + written counts twice)")
    matmul: dict[Dtype, PositiveInt] = Field(description="dtype -> square size N of an NxNxN matmul")
    matvec: MatvecSpec
    allow_tf32: bool = Field(False, description="fp32 matmul as tf32 on GPU; off: fp32 is compared to the fp32 peak")


def _randn(shape, dtype, device, gen):
    return torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)


def copy_job(spec: Spec) -> Job:
    def run(ctx: RunContext) -> dict:
        n = int(spec.copy_mb * 2**20) // 4
        gen = torch.Generator(device=ctx.torch_device).manual_seed(ctx.seed)
        src = torch.rand(n, generator=gen, device=ctx.torch_device)
        dst = torch.empty_like(src)
        t = ctx.measure(lambda: dst.copy_(src))
        if not torch.equal(dst, src):
            return {"status": "incorrect", "error": "copy produced different bytes"}
        moved = 2 * n * 4
        gbps = moved / (t.median_ms / 1e3) / 1e9
        sheet = ctx.datasheet.memory_bandwidth_gbps if ctx.datasheet else None
        return {**t.to_dict(), "bytes": moved, "value": gbps, "unit": "GB/s", "datasheet_value": sheet,
                "datasheet_ratio": gbps / sheet if sheet else None}

    mb = int(spec.copy_mb) if float(spec.copy_mb).is_integer() else spec.copy_mb
    return Job({"kind": "ceiling", "op": "copy", "dtype": "fp32", "mb": mb}, run, "ceiling copy")


def matmul_job(dtype: str, size: int, allow_tf32: bool) -> Job:
    def run(ctx: RunContext) -> dict:
        dt = to_dtype(dtype)
        gen = torch.Generator(device=ctx.torch_device).manual_seed(ctx.seed + 1)
        a = _randn((size, size), dt, ctx.torch_device, gen)
        b = _randn((size, size), dt, ctx.torch_device, gen)
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
        try:
            out = a @ b
            probe = (a[:64].double() @ b.double())
            err = float((out[:64].double() - probe).norm() / probe.norm())
            if err > (0.02 if dtype != "fp32" else 5e-3):
                return {"status": "incorrect", "error": f"matmul relative error {err:.2e}", "rel_error": err}
            t = ctx.measure(lambda: torch.matmul(a, b, out=out))
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev
        flops = 2 * size**3
        tflops = flops / (t.median_ms / 1e3) / 1e12
        peak_key = "tf32" if (dtype == "fp32" and allow_tf32 and ctx.on_gpu) else dtype
        sheet = ctx.datasheet.peak_tflops.get(peak_key) if ctx.datasheet else None
        return {**t.to_dict(), "flops": flops, "value": tflops, "unit": "TFLOP/s", "datasheet_value": sheet,
                "datasheet_ratio": tflops / sheet if sheet else None, "rel_error": err}

    return Job({"kind": "ceiling", "op": "matmul", "dtype": dtype, "m": size, "n": size, "k": size}, run,
               f"ceiling matmul {dtype}")


def matvec_job(dtype: str, n: int, k: int) -> Job:
    def run(ctx: RunContext) -> dict:
        dt = to_dtype(dtype)
        gen = torch.Generator(device=ctx.torch_device).manual_seed(ctx.seed + 2)
        w = _randn((n, k), dt, ctx.torch_device, gen) / k**0.5
        x = _randn((1, k), dt, ctx.torch_device, gen)
        out = torch.nn.functional.linear(x, w)
        ref = x.double() @ w.double().T
        err = float((out.double() - ref).norm() / ref.norm())
        if err > 0.02:
            return {"status": "incorrect", "error": f"matvec relative error {err:.2e}", "rel_error": err}
        # No L2 flush: the weight matrix is far larger than any L2, as a decode step's weights are.
        t = ctx.measure(lambda: torch.nn.functional.linear(x, w))
        moved = (n * k + k + n) * dtype_bytes(dtype)
        gbps = moved / (t.median_ms / 1e3) / 1e9
        sheet = ctx.datasheet.memory_bandwidth_gbps if ctx.datasheet else None
        return {**t.to_dict(), "bytes": moved, "flops": 2 * n * k, "value": gbps, "unit": "GB/s",
                "datasheet_value": sheet, "datasheet_ratio": gbps / sheet if sheet else None, "rel_error": err}

    return Job({"kind": "ceiling", "op": "matvec", "dtype": dtype, "m": 1, "n": n, "k": k}, run,
               f"ceiling matvec {dtype}")


def plan(spec: Spec, ctx: RunContext) -> list[Job]:
    jobs = [copy_job(spec)]
    jobs += [matmul_job(dt, size, spec.allow_tf32) for dt, size in spec.matmul.items()]
    jobs += [matvec_job(dt, spec.matvec.n, spec.matvec.k) for dt in spec.matvec.dtypes]
    return jobs



