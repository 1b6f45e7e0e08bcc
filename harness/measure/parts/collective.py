"""Collective ceilings (`kind: collective`): all-reduce, all-gather and (when a suite lists it) all-to-all across the
run's ranks, over message sizes.

Sizes: powers of two from `min_bytes` to `max_bytes` (as nccl-tests sweeps them), plus the sizes a model's tensor
parallelism sends: decode-sized batch × hidden × dtype bytes and prefill-sized tokens × hidden × dtype bytes; for
all-to-all, a MoE model's expert-parallel dispatch/combine: those tokens × top-k × hidden × dtype bytes per rank.
Reported with nccl-tests' definitions: `bytes` is the whole buffer (for all-gather, the gathered output; for
all-to-all, what one rank sends, a 1/n share to each rank), algbw = bytes / time, busbw = algbw · 2(n−1)/n for
all-reduce and algbw · (n−1)/n for all-gather and all-to-all (what each link carries, comparable to the link's
bandwidth). The smallest message's time is the latency floor
(`collective_curve(...).floor_ms`).

Checked before timed: small integers (exact in every dtype) all-reduced to the known sum and gathered to the known
ranks' values, all-to-all's shares landing on the rank they were sent to. On GPU, `graph_iters` collectives back
to back in one CUDA graph per sample (a Python launch costs more than a small collective), time per collective =
sample / graph_iters; on CPU, one collective per sample.
The timed all-reduce is in place, so values grow each call (to inf in time): its time does not depend on them.
In a one-process run the points are `skipped`.
"""

from __future__ import annotations

import bisect
import math
from typing import Literal

import torch
import torch.distributed as dist
from pydantic import Field, PositiveInt
from tokenfleet import results
from tokenfleet.config import Strict
from tokenfleet.dtypes import dtype_bytes, to_dtype
from tokenfleet.measure import distributed as D
from tokenfleet.measure.context import Job, RunContext
from tokenfleet.model.spec import load_model_config

OPS = ("all_reduce", "all_gather")  # the default; all_to_all (expert-parallel dispatch/combine) when listed
BUS_FACTOR = {"all_reduce": lambda n: 2 * (n - 1) / n, "all_gather": lambda n: (n - 1) / n,
              "all_to_all": lambda n: (n - 1) / n}  # nccl-tests


class Spec(Strict):
    ops: list[Literal["all_reduce", "all_gather", "all_to_all"]] = Field(default_factory=lambda: list(OPS),
                                                                         min_length=1)
    dtypes: list[Literal["bf16", "fp16", "fp32"]] = Field(default_factory=lambda: ["bf16"], min_length=1)
    min_bytes: PositiveInt = Field(8, description="smallest message of the power-of-two sweep (the latency floor)")
    max_bytes: PositiveInt = Field(64 << 20, description="largest message of the sweep")
    models: list[str] = Field(default_factory=list, description="add these models' TP message sizes")
    batch: list[PositiveInt] = Field(default_factory=lambda: [1, 8, 64], description="decode: batch × hidden")
    tokens: list[PositiveInt] = Field(default_factory=lambda: [2048], description="prefill: tokens × hidden")
    graph_iters: PositiveInt = Field(20, description="GPU: collectives per CUDA-graph replay")


def sizes(spec: Spec, dtype: str, op: str = "all_reduce") -> list[int]:
    """The sweep's sizes and the models' decode/prefill activation sizes, in bytes (all-to-all: a MoE model's
    dispatch of those tokens' top-k copies, `ModelConfig.alltoall_bytes`)."""
    out = set()
    b = spec.min_bytes
    while b <= spec.max_bytes:
        out.add(b)
        b *= 2
    for name in spec.models:
        m = load_model_config(name)
        for n in [*spec.batch, *spec.tokens]:
            out.add(int(m.alltoall_bytes(n, dtype_bytes(dtype))) if op == "all_to_all" and m.moe
                    else n * m.hidden_size * dtype_bytes(dtype))
    return sorted(out)


def _elements(op: str, nbytes: int, elem: int, world: int) -> int:
    """Elements of the whole buffer, rounded up so every rank's share is whole (all-gather: a multiple of world)."""
    unit = world if op in ("all_gather", "all_to_all") else 1
    return max(1, math.ceil(nbytes / elem / unit)) * unit


def _check(op: str, buf: torch.Tensor, out: torch.Tensor | None, base: torch.Tensor, g: D.Group) -> str | None:
    """Run the collective once on rank-scaled small integers and compare exactly; None when right."""
    if op == "all_reduce":
        buf.copy_(base * (g.rank + 1))
        dist.all_reduce(buf)
        want = base * (g.world * (g.world + 1) // 2)
        got = buf
    elif op == "all_to_all":  # rank r sends share j of base·(r+1) to rank j: this rank gets its share from each
        buf.copy_(base * (g.rank + 1))
        dist.all_to_all_single(out, buf)
        mine = base.view(g.world, -1)[g.rank]
        want = torch.cat([mine * (r + 1) for r in range(g.world)])
        got = out
    else:
        buf.copy_(base * (g.rank + 1))
        _gather(out, buf)
        want = torch.cat([base * (r + 1) for r in range(g.world)])
        got = out
    bad = int((got != want).sum())
    return f"{op}: {bad} of {got.numel()} elements differ from the exact result" if bad else None


def _gather(out: torch.Tensor, inp: torch.Tensor) -> None:
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # torch < 2.13
    gather(out, inp)


def job(op: str, dtype: str, nbytes: int, graph_iters: int) -> Job:
    def run(ctx: RunContext) -> dict:
        g = D.current()
        if g is None or g.world < 2:
            return {"status": "skipped", "note": "one process: run with `tokenfleet bench --nproc N` (or torchrun)"}
        elem, dev, dt = dtype_bytes(dtype), ctx.torch_device, to_dtype(dtype)
        n = _elements(op, nbytes, elem, g.world)
        share = n // g.world if op == "all_gather" else n
        gen = torch.Generator(device=dev).manual_seed(ctx.seed + n)
        base = torch.randint(-4, 5, (share,), generator=gen, device=dev).to(dt)  # the same on every rank
        buf = torch.empty(share, dtype=dt, device=dev)
        out = torch.empty(n, dtype=dt, device=dev) if op in ("all_gather", "all_to_all") else None
        wrong = _check(op, buf, out, base, g)
        if wrong:
            return {"status": "incorrect", "error": wrong}

        def call():
            if op == "all_reduce":
                dist.all_reduce(buf)
            elif op == "all_to_all":
                dist.all_to_all_single(out, buf)
            else:
                _gather(out, buf)

        step, iters, note = call, 1, None
        if ctx.on_gpu:
            replay, why = D.agreed_graph(call, graph_iters)
            if replay is not None:
                step, iters = replay, graph_iters
            else:
                note = f"CUDA graph capture failed, timed eager: {why}"[:300]
        t = per_collective(D.lockstep_measure(ctx, step).to_dict(), iters)
        total = n * elem
        algbw = total / (t["median_ms"] / 1e3) / 1e9
        # gbps is algbw; the memory-bandwidth fractions the runner would derive from `bytes` mean nothing here.
        none = dict.fromkeys(("mbu", "mbu_matvec", "mbu_datasheet", "warning"))
        return {**t, **none, "bytes": total, "algbw_gbps": algbw, "busbw_gbps": algbw * BUS_FACTOR[op](g.world),
                "cuda_graph": step is not call, "graph_iters": iters, **({"note": note} if note else {})}

    g = D.current()
    key = {"kind": "collective", "op": op, "dtype": dtype, "size_bytes": nbytes, "world_size": D.world_size(),
           "backend": g.backend if g else None}
    return Job(key=key, run=run, label=f"collective {op} {dtype} {nbytes} B")


def per_collective(t: dict, iters: int) -> dict:
    """A replay's timing as one collective's: the quantiles and every kept sample divided by the collectives in it
    (compare's interval reads the samples beside the median)."""
    out = {**t, **{k: t[k] / iters for k in ("median_ms", "p20_ms", "p80_ms")}}
    if t.get("samples_ms"):
        out["samples_ms"] = [x / iters for x in t["samples_ms"]]
    return out


def plan(spec: Spec, ctx: RunContext) -> list[Job]:
    return [job(op, dt, b, spec.graph_iters) for op in spec.ops for dt in spec.dtypes for b in sizes(spec, dt, op)]


# ---------------------------------------------------------------------------------------------------------------
# For the capacity model: a run's measured curve


class CollectiveCurve:
    """Time of one collective by message size, from a run's `collective` points: log-log interpolation between
    measured sizes; below the smallest, its time (the latency floor); above the largest, that size's bandwidth."""

    def __init__(self, sizes_bytes: list[float], times_ms: list[float], op: str, world_size: int, dtype: str):
        self.sizes, self.times, self.op, self.world_size, self.dtype = sizes_bytes, times_ms, op, world_size, dtype
        self.floor_ms = times_ms[0]

    def __call__(self, nbytes: float) -> float:
        """Milliseconds for a message of nbytes (all-gather: the gathered output's size; all-to-all: what one rank
        sends)."""
        xs, ys = self.sizes, self.times
        if nbytes <= xs[0]:
            return ys[0]
        if nbytes >= xs[-1]:
            return ys[-1] * nbytes / xs[-1]
        i = bisect.bisect_right(xs, nbytes)
        x0, x1, y0, y1 = math.log(xs[i - 1]), math.log(xs[i]), math.log(ys[i - 1]), math.log(ys[i])
        return math.exp(y0 + (y1 - y0) * (math.log(nbytes) - x0) / (x1 - x0))

    def busbw_gbps(self, nbytes: float) -> float:
        return nbytes / (self(nbytes) / 1e3) / 1e9 * BUS_FACTOR[self.op](self.world_size)


def collective_curve(points: list[dict], op: str = "all_reduce", world_size: int | None = None,
                     dtype: str | None = None) -> CollectiveCurve | None:
    """The curve of `op` at `world_size` (default: the largest measured) and `dtype` (default: bf16 if measured,
    else any), from a run's points (usable ones: `ok` or `noisy`); None when the run has no such points."""
    pts = [p for p in points if p.get("kind") == "collective" and p.get("op") == op
           and p.get("status") in results.USABLE and p.get("median_ms") and p.get("bytes")]
    if world_size is None and pts:
        world_size = max(p["world_size"] for p in pts)
    pts = [p for p in pts if p.get("world_size") == world_size]
    if dtype is None and pts:
        dtype = "bf16" if any(p.get("dtype") == "bf16" for p in pts) else pts[0].get("dtype")
    pts = sorted((p for p in pts if p.get("dtype") == dtype), key=lambda p: p["bytes"])
    if not pts:
        return None
    by_size: dict[float, float] = {}
    for p in pts:  # one time per size (the fastest, were a size measured twice)
        by_size[p["bytes"]] = min(by_size.get(p["bytes"], math.inf), p["median_ms"])
    xs = sorted(by_size)
    return CollectiveCurve(xs, [by_size[x] for x in xs], op, world_size, dtype)
