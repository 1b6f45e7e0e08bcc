"""A run's plan: a suite's jobs in the order they run, duplicates dropped, each with a time estimate.

Order by value, so a run cut short keeps what matters most: the ceilings every later point is reported against (and
the collectives' curves), then the decode grid (the headline: tokens/s and MBU per batch and context; tensor-parallel
points next), then prefill, then the kernel points.
Within a part, jobs that differ only by backend run side by side (in the part's own order of first appearance),
so a cut leaves whole comparisons. Jobs whose keys agree but for `source` (gemm shapes two models share) run once,
the sources joined.

The estimate (`estimate_s`) is a documented cost model per kind and backend, not a measurement: each point pays
a fixed cost (inputs, correctness check, warm-up, samples), kernel points pay for drawing their inputs once per
point and, per backend, for the check's fp64 sums over its outputs (on a CPU; a GPU does both in place), and model
points pay once per model for building and checking it and once per new shape for autotuning or recompiling (`Cost`).
The GPU constants come from the H200 run of 2026-11-28 (results/reference/h200-2026-11-28, its points'
`elapsed_s`); the CPU ones from the CPU reference runs (results/reference/cpu-amd-epyc-2core-*).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import torch
from tokenfleet.dtypes import to_dtype
from tokenfleet.kernels import REGISTRY
from tokenfleet.measure.context import Job, RunContext
from tokenfleet.measure.device import DeviceInfo, detect
from tokenfleet.measure.parts.ceilings import GPU_SUSTAIN_S, READ_REDUCTIONS
from tokenfleet.measure.parts.kernels import CPU_CHECK_ONLY
from tokenfleet.measure.suite import Suite, part_api

# Collectives are the interconnect's ceilings; tp holds the tensor-parallel decode and prefill points.
PART_ORDER = ("ceilings", "collectives", "decode", "tp", "prefill", "kernels")  # parts not named here run last
KIND_ORDER = ("ceiling", "collective", "decode", "prefill", "kernel")  # within a part (tp: decode, then prefill)
READ_PROBES = len(READ_REDUCTIONS)  # the read-only ceiling times each of its reductions
PROCESS_START_S = {"cuda": 15.0, "cpu": 5.0}  # python, torch, CUDA context, NVML, suite validation


@dataclass(frozen=True)
class Cost:
    """Seconds a point takes: `point` always, `first` once per (model, dtype) on a backend (weights built, the backend
    checked, its kernels compiled and autotuned at the check's shapes), `new_shape` once per new batch (decode) or
    prompt length (prefill) on a backend (new autotune keys, or a recompile)."""

    point: float
    first: float = 0.0
    new_shape: float = 0.0


# (kind, backend) -> Cost; backend None is the fallback for a backend not listed. From the H200 run's elapsed_s:
# - ceilings took 0.1-0.5 s as short probes; sustained ones (>= 1 s warm-up and >= 1 s of samples) take ~3 s: the
#   probe's warm-up and samples (the suite's `ceilings.warmup_s`/`min_time_s`, GPU_SUSTAIN_S each by default, see
#   `probe_s`) plus CEILING_OVERHEAD_S for its tensors and check;
# - kernels: a least-squares fit over its 96 kernel points against the elements of each point's inputs and of its
#   outputs: triton 0.93 s, torch 0.14 s (autotune hides in the correctness call), + inputs / 1.15-1.19e8 (drawn on
#   the host then, per backend: attention_decode batch 32 x 32k took 18 s) + outputs / 0.94-0.98e8 (the check's host
#   copies then; see INPUT_ELEMENTS_PER_S);
# - decode triton: the first point 37 s (weights built, the triton check autotuning every kernel, then its own batch),
#   a new batch 9.2-10.2 s (new M buckets), another context 0.6-1.4 s; torch, after triton, 0.8-1.4 s;
# - prefill triton: 18 s for the first length, 5.7-7.4 s for the next; torch, after triton, 0.8-3.9 s.
# UNMEASURED (no GPU run has timed them; the next `make gpu-check` refits them from its points' elapsed_s): every
# `compile` cost — decode and prefill assumed like gpt-fast's torch.compile of a decode step (tens of seconds, then
# a recompile per new shape; the decode block takes the KV cache's length as a dynamic dimension (decoder.py,
# forward_decode), so a new context is not a new shape for it (checked on the CPU: no graph for a second context); a
# new batch is), and a kernel's compile of one op ~3 s —, and fp8 points, costed as their bf16 twins.
CEILING_OVERHEAD_S = 1.0
GPU_COSTS = {
    ("ceiling", None): Cost(CEILING_OVERHEAD_S + 2 * GPU_SUSTAIN_S),
    ("kernel", "triton"): Cost(0.93),
    ("kernel", "torch"): Cost(0.15),
    ("kernel", "compile"): Cost(3.0),  # unmeasured
    ("kernel", None): Cost(3.0),
    ("decode", "triton"): Cost(1.5, first=26.0, new_shape=9.0),
    ("decode", "torch"): Cost(1.2, first=1.0),
    ("decode", "compile"): Cost(2.0, first=30.0, new_shape=10.0),  # unmeasured
    ("decode", None): Cost(2.0, first=30.0, new_shape=10.0),
    ("prefill", "triton"): Cost(6.0, first=12.0),
    ("prefill", "torch"): Cost(2.5, first=1.0),
    ("prefill", "compile"): Cost(6.0, first=30.0, new_shape=10.0),  # unmeasured
    ("prefill", None): Cost(6.0, first=30.0, new_shape=10.0),
}
UNMEASURED = frozenset({("kernel", "compile"), ("decode", "compile"), ("prefill", "compile")})
# CPU (2 cores, ci-cpu suite): ceilings 0.15-0.3 s as 0.1 + 0.2 s probes, 0.6-0.7 s as ci-cpu's 0.2 + 0.4 s now (the
# read-only ceiling is two probes: READ_PROBES), kernel torch 0.25-0.55 s, decode torch 9.9 s first then
# 1.7-6 s, prefill torch 7.9-10 s; triton points are `skipped` at once. The fp8 matmul ceiling and the CPU_CHECK_ONLY
# kernel points (gemm_fp8) are a check at a small shape, not timed: CPU_CHECK_S. A kernel point's flush before each
# sample counts in its sample count (timing.py), so its cost does not grow with the cache's size.
CPU_CHECK_S = 0.1
# The CPU model-point constants were fitted on qwen3-0.6b in fp32 (2.4 GB of weights). A smaller model's points cost
# that share of them (its samples and its build read fewer bytes), at least CPU_SIZE_FLOOR; torch.compile's `first`
# (Inductor compiling the graph) does not shrink with the weights and is kept whole. ci-cpu, 2026-12-04 (AMD EPYC,
# 2 cores): tiny-qwen3-moe / tiny-deepseek-v3 torch points 0.4-0.7 s against qwen3-0.6b's 5.9-6.3 s; compile 4.6 s.
CPU_REF_MODEL = "qwen3-0.6b"  # in fp32
CPU_SIZE_FLOOR = 0.1
CPU_COSTS = {
    ("ceiling", None): Cost(0.7),
    ("kernel", "triton"): Cost(0.0),
    ("kernel", None): Cost(0.5),
    ("decode", "triton"): Cost(0.0),
    ("decode", None): Cost(3.5, first=6.0),
    ("prefill", "triton"): Cost(0.0),
    ("prefill", None): Cost(9.0, first=2.0),
}
# Kernel points, per element (fp32 bytes_moved / 4, split as `_kernel_elements` does): inputs are drawn once per point
# (its backends share them) on its device: on a CPU at the host's rate (the H200 host's fit); on a GPU counted as
# free (a device draw writes at memory speed; not yet measured: refit from the next GPU run's elapsed_s). Outputs,
# per backend, on a CPU: the check's fp64 sums over output and reference (kernels.rel_error), at the rate the H200
# run fitted to its host copies (the nearest host rate measured; not refitted). On a GPU they are free too: since
# that run rel_error sums on the device (no host copy) and the reference runs once per point. An assumption until
# the next GPU run refits the kernel costs (the fixed costs above were fitted beside the copies' term).
INPUT_ELEMENTS_PER_S = 1.15e8
OUTPUT_ELEMENTS_PER_S = 9.6e7


def ordered_parts(suite: Suite) -> list[str]:
    known = [p for p in PART_ORDER if p in suite.parts]
    return known + [p for p in suite.parts if p not in PART_ORDER]


def identity(key: dict, drop: tuple[str, ...] = ("source",)) -> str:
    return json.dumps({k: v for k, v in key.items() if k not in drop}, sort_keys=True, default=str)


def dedupe(jobs: list[Job]) -> list[Job]:
    """One job per key, `source` aside: the first stays, its key naming every source (`a.qkv, b.qkv`)."""
    first: dict[str, Job] = {}
    sources: dict[str, list] = {}
    for job in jobs:
        ident = identity(job.key)
        first.setdefault(ident, job)
        src = job.key.get("source")
        if src is not None and src not in sources.setdefault(ident, []):
            sources[ident].append(src)
    out = []
    for ident, job in first.items():
        names = sources.get(ident) or []
        if len(names) > 1:
            job = Job({**job.key, "source": ", ".join(map(str, names))}, job.run, job.label)
        out.append(job)
    return out


def side_by_side(jobs: list[Job]) -> list[Job]:
    """Jobs by kind (KIND_ORDER), and those that differ only by backend next to each other, in order of first
    appearance."""
    groups: dict[str, list[Job]] = {}
    for job in jobs:
        groups.setdefault(identity(job.key, ("source", "backend")), []).append(job)
    ordered = [job for group in groups.values() for job in group]
    rank = {k: i for i, k in enumerate(KIND_ORDER)}
    return sorted(ordered, key=lambda j: rank.get(j.key.get("kind"), len(rank)))  # stable


def planned(suite: Suite, ctx: RunContext) -> list[tuple[str, Job]]:
    """Every job of the suite with the part that plans it, in run order (see the module's docstring)."""
    jobs: list[Job] = []
    part_of: dict[str, str] = {}
    for name in ordered_parts(suite):
        _, plan = part_api(name)
        for job in side_by_side(plan(suite.parts[name], ctx)):
            part_of.setdefault(identity(job.key), name)
            jobs.append(job)
    return [(part_of[identity(job.key)], job) for job in dedupe(jobs)]


def ordered_jobs(suite: Suite, ctx: RunContext) -> list[Job]:
    return [job for _, job in planned(suite, ctx)]


def _kernel_elements(key: dict) -> tuple[int, int]:
    """(input, output) elements of a kernel point: its inputs drawn as fake tensors (shapes only, no memory), its
    outputs the rest of its fp32 bytes_moved / 4."""
    return _elements(identity(key, ("kind", "backend", "source")))


@functools.lru_cache(maxsize=4096)
def _elements(point: str) -> tuple[int, int]:
    shape = json.loads(point)
    entry, dtype = REGISTRY.get(shape.pop("op", None)), shape.pop("dtype", None)
    try:
        total = entry.bytes_moved(shape, torch.float32) // 4 if entry else 0
    except (KeyError, TypeError, ValueError):
        return 0, 0
    from torch._subclasses.fake_tensor import FakeTensorMode  # here: only a plan's estimate needs it

    try:
        with FakeTensorMode():
            args = entry.make_inputs(shape, to_dtype(dtype), "cpu", 0)
        inputs = sum(a.numel() for a in args if isinstance(a, torch.Tensor))
    except Exception:  # noqa: BLE001 - an estimate never stops a plan: count it all as output
        inputs = 0
    return min(inputs, total), max(total - inputs, 0)


def probe_s(suite: Suite | None, device_kind: str) -> float:
    """Seconds one ceiling probe takes: on a GPU its warm-up and samples as the suite sets them (GPU_SUSTAIN_S each
    by default) plus CEILING_OVERHEAD_S; on a CPU the fitted constant (it follows the suite's timing)."""
    if device_kind != "cuda":
        return CPU_COSTS[("ceiling", None)].point
    spec = suite.parts.get("ceilings") if suite is not None else None
    sustain = [GPU_SUSTAIN_S if v is None else v for v in (getattr(spec, "warmup_s", None),
                                                            getattr(spec, "min_time_s", None))]
    return CEILING_OVERHEAD_S + sum(sustain)


def estimate_s(jobs: list[Job], device_kind: str, suite: Suite | None = None) -> list[float]:
    """Seconds each job is expected to take on a device of `device_kind`, in plan order (see `Cost`; `suite` sets
    the ceiling probes' length, `probe_s`)."""
    costs = GPU_COSTS if device_kind == "cuda" else CPU_COSTS
    seen: set = set()
    out = []
    for job in jobs:
        k = job.key
        kind, backend = k.get("kind"), k.get("backend")
        cost = costs.get((kind, backend)) or costs.get((kind, None)) or Cost(1.0)
        if kind == "ceiling":
            cost = Cost(probe_s(suite, device_kind))
        s = cost.point * (READ_PROBES if kind == "ceiling" and k.get("op") == "read" else 1)
        if kind == "kernel" and backend == "triton" and device_kind != "cuda":
            pass  # skipped at once: no inputs drawn
        elif device_kind != "cuda" and _cpu_check_only(k):
            s = CPU_CHECK_S  # checked at a small shape, not timed: no draw at the suite's shape
        elif kind == "kernel":
            inputs, outputs = _kernel_elements(k)
            point = identity(k, ("backend", "source"))  # the draw its backends share
            if device_kind != "cuda" and point not in seen:
                s += inputs / INPUT_ELEMENTS_PER_S
            seen.add(point)
            if device_kind != "cuda":  # a GPU's check sums on the device: no host copy
                s += outputs / OUTPUT_ELEMENTS_PER_S
        if kind in ("decode", "prefill"):
            model = (kind, k.get("model"), k.get("dtype"), backend, k.get("tp"), k.get("layers"))
            shape = (*model, k.get("batch"), k.get("prompt_len"))  # decode: a new batch; prefill: a new length
            first = cost.first if model not in seen else 0.0
            if device_kind != "cuda":
                size = _cpu_size(k)
                s *= size
                first *= 1.0 if backend == "compile" else size
            s += first + (cost.new_shape if shape not in seen else 0.0)
            seen.update((model, shape))
        out.append(s)
    return out


def _cpu_size(key: dict) -> float:
    """A CPU model point's share of the fitted constants: its weight bytes (the layers built) over qwen3-0.6b fp32's."""
    from tokenfleet.model.spec import load_model_config

    try:
        cfg = load_model_config(key.get("model"))
    except Exception:  # noqa: BLE001 - an unknown model fails at its point, not in the plan
        return 1.0
    share = (key.get("layers") or cfg.num_layers) / cfg.num_layers
    wb = cfg.weight_bytes(4 if key.get("dtype") == "fp32" else 2) * share
    return min(1.0, max(CPU_SIZE_FLOOR, wb / load_model_config(CPU_REF_MODEL).weight_bytes(4)))


def _cpu_check_only(key: dict) -> bool:
    """A point a CPU checks at a small shape and does not time: the fp8 matmul ceiling, a CPU_CHECK_ONLY kernel."""
    if key.get("kind") == "ceiling":
        return key.get("op") == "matmul" and key.get("dtype") == "fp8"
    return key.get("kind") == "kernel" and key.get("op") in CPU_CHECK_ONLY


def planning_context(suite: Suite, device: str | None = None) -> RunContext:
    """A context to plan `suite` in, measuring nothing: the device asked for (`--device`), else the suite's, else the
    one present. A device that is not here is a stand-in (the plan is what it would run there)."""
    want = device or (suite.file.device if suite.file.device != "any" else None)
    present = "cuda" if torch.cuda.is_available() else "cpu"
    if want in (None, present):
        info = detect(want)
    else:
        info = DeviceInfo(kind=want, name=f"{want} (not present: planned only)", memory_bytes=None, compute_units=None,
                          threads=None, torch_version=torch.__version__, triton_version=None, cuda_version=None)
    return RunContext(device=info, suite=suite, datasheet=None)


def plan_rows(suite: Suite, ctx: RunContext) -> list[dict]:
    """The plan as rows: order, part, what, estimated seconds and the running total (process start included)."""
    pairs = planned(suite, ctx)
    total = PROCESS_START_S.get(ctx.device.kind, 5.0)
    rows = []
    for i, ((part, job), s) in enumerate(zip(pairs, estimate_s([j for _, j in pairs], ctx.device.kind, suite),
                                             strict=True), 1):
        total += round(s, 1)  # the running total adds what each row shows, as the part totals do
        rows.append({"n": i, "part": part, "kind": job.key.get("kind"), "job": job.label or identity(job.key),
                     "est_s": round(s, 1), "total_s": round(total, 1)})
    probe = probe_s(suite, ctx.device.kind)
    for what in end_probes(suite, ctx.device.kind):  # the winning probe of each ceiling again, after everything else
        s = probe * (READ_PROBES if what == "read" else 1)
        total += s
        rows.append({"n": len(rows) + 1, "part": "ceilings (end)", "kind": "ceiling", "job": what,
                     "est_s": round(s, 1), "total_s": round(total, 1)})
    return rows


def end_probes(suite: Suite, device_kind: str = "cuda") -> list[str]:
    """The ceilings the end-of-run re-probe measures again (one probe each: the start's best size and layout); not
    the fp8 matmul on a CPU, which is checked there, not timed."""
    spec = suite.parts.get("ceilings")
    if spec is None or not spec.end_probe:
        return []
    matmul = [dt for dt in spec.matmul if device_kind == "cuda" or dt != "fp8"]
    return ["copy", "read"] + [f"matmul {dt}" for dt in matmul] + [f"matvec {dt}" for dt in spec.matvec.dtypes]


def part_totals(rows: list[dict], device_kind: str) -> list[dict]:
    """Estimated seconds per part in run order, process start first, and the whole."""
    start = PROCESS_START_S.get(device_kind, 5.0)
    out = [{"part": "start", "jobs": 0, "est_s": start}]
    for r in rows:
        if out[-1]["part"] != r["part"]:
            out.append({"part": r["part"], "jobs": 0, "est_s": 0.0})
        out[-1]["jobs"] += 1
        out[-1]["est_s"] += r["est_s"]
    out.append({"part": "total", "jobs": len(rows), "est_s": sum(p["est_s"] for p in out)})
    return [{**p, "est_s": round(p["est_s"], 1)} for p in out]
