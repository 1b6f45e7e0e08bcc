"""Runs a suite on the device `tokenfleet.measure.device` picked, one point per job, in `measure.plan`'s order
(ceilings first, then decode, prefill, kernels), then the ceilings again (their drift between start and end goes
into the manifest).

A job's failure is a row with its status (`oom`, `error`, `incorrect`, `above_ceiling`; `contended`: measured while
other work used the machine, `measure.load`), never a crash and never dropped.
A point is identified by its job's key. With `resume`, the run's own suite (from its manifest) is planned again and
only the jobs without a final point (`results.FINAL`: ok, skipped) are measured; their new points replace the old.
The run folder has one writer: `results.RunWriter` holds its lock until the run (and `after`) is done.
"""

from __future__ import annotations

import gc
import platform
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
from tokenfleet import provenance, results
from tokenfleet.config import ConfigError
from tokenfleet.files import WriteError
from tokenfleet.hardware import Hardware, load_hardware
from tokenfleet.measure import load
from tokenfleet.measure.context import Job, RunContext
from tokenfleet.measure.device import DeviceInfo, detect, telemetry
from tokenfleet.measure.parts import ceilings as ceilings_part
from tokenfleet.measure.plan import ordered_jobs
from tokenfleet.measure.suite import Suite, load_suite, suite_from_dict
from tokenfleet.measure.timing import between_samples


def _failure(exc: BaseException) -> dict:
    oom = isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()
    msg = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:500]
    if oom and torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"status": "oom" if oom else "error", "error": msg}


def _meter(ctx: RunContext) -> load.Meter:
    return load.meter(ctx.device.kind, torch.cuda.current_device() if ctx.on_gpu else None)


def execute(job: Job, ctx: RunContext, retry: bool = False) -> dict:
    """Run one job into a point: key + measurements + derived rates + status. Never raises for job errors.
    `retry`: a point measured on a slowed CPU (`measure.load`: its speed probe read beyond SPEED_LIMIT) is measured
    again once the probe reads fast, within the run's retry budget; its `load` says how often (`retries`), and its
    `elapsed_s` counts every attempt. (Not in a run on several ranks: their jobs run in lockstep.)"""
    t0 = time.perf_counter()
    watch = _meter(ctx)
    point = _execute_once(job, ctx, watch)
    tries = 0
    while retry and tries < load.SPEED_RETRIES and slowed(point) and watch.may_retry():
        again = watch.again(lambda: _execute_once(job, ctx, watch))
        if again is None:  # still slow: measured again at the end of the run, if the CPU is fast by then
            break
        point, tries = again, tries + 1
    if tries:
        point["load"] = {**point["load"], "retries": tries}
    point["elapsed_s"] = round(time.perf_counter() - t0, 3)
    return point


def slowed(point: dict, fastest: float | None = None) -> bool:
    """Whether a point was measured on a CPU slowed beyond SPEED_LIMIT (against `fastest`, default the fastest
    reading the run had when it was measured)."""
    r = load.slowdown(point.get("load") or {}, fastest)
    return r is not None and r > 1 + load.SPEED_LIMIT


def _execute_once(job: Job, ctx: RunContext, watch: load.Meter) -> dict:
    watch.begin()
    try:
        with between_samples(watch.during):
            measured = job.run(ctx) or {}
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001 - a failure is a row, not a crash
        measured = _failure(e)
    point = {**job.key, "device": ctx.device.name, **measured}
    status = point.get("status")
    if status is None:
        status = "noisy" if point.get("noisy") else "ok"
    point["status"] = status
    if point.get("median_ms") and status in results.USABLE:
        derived = ctx.metrics(point.get("flops"), point.get("bytes"), point["median_ms"], job.key.get("dtype", ""))
        point = ctx.judge({**derived, **point})  # above its measured ceiling: `above_ceiling`, not usable
    point.update(energy_rates(point))
    point = load.judge(point, watch.end(), results.USABLE)  # measured beside other work: `contended`, not usable
    if ctx.on_gpu and status in results.USABLE and "telemetry" not in point:
        # Read just after the samples (probes poll during theirs): a clock event here explains a slow point.
        point["telemetry"] = telemetry(torch.cuda.current_device())
    return results.clean_floats(point)


def energy_rates(point: dict) -> dict:
    """From the energy counter over a point's samples: the mean board power then (`power_w_measured`, beside the
    polled `telemetry`) and, for a model point, joules per token (that power over its tokens/s: a layer-scaled
    point's power is its built layers', its tokens/s the full depth's)."""
    joules, seconds = point.get("energy_j"), point.get("energy_s")
    if not (isinstance(joules, (int, float)) and isinstance(seconds, (int, float)) and joules > 0 and seconds > 0):
        return {}
    power = joules / seconds
    out = {"power_w_measured": power}
    if point.get("kind") in ("decode", "prefill") and point.get("tokens_per_s"):
        out["joules_per_token"] = power / point["tokens_per_s"]
    return out


def default_suite(device_kind: str) -> str:
    return "quick" if device_kind == "cuda" else "ci-cpu"


def manifest_for(run_id: str, suite: Suite, info: DeviceInfo, datasheet: Hardware | None) -> dict:
    return {
        "run_id": run_id,
        "tokenfleet_version": provenance.version(),
        "git_sha": provenance.git_sha(),
        "command": provenance.command_line(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "suite": suite.id,
        "config": suite.resolved(),
        "environment": {
            "device": info.to_dict(),
            "datasheet": datasheet.model_dump() if datasheet else None,
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "ceilings": {},
    }


def plan_all(suite: Suite, ctx: RunContext) -> list[Job]:
    return ordered_jobs(suite, ctx)  # by value, duplicates dropped (tokenfleet.measure.plan)


def run_suite(suite_name: str | None = None, out: str | Path | None = None, resume: str | Path | None = None,
              device: str | None = None, progress: bool = True, on_point: Callable[[dict], None] | None = None,
              group=None, after: Callable[[Path], None] | None = None) -> Path:
    """Measure a suite into a run folder and return its path. `resume` continues an existing run folder with the
    suite its manifest records. `group`: rank 0's `tokenfleet.measure.launch.Leader` in a run on several ranks (it
    runs the job loop). `after(run_dir)` runs once every point is written, still holding the run's lock."""
    info = detect(device)
    datasheet = load_hardware(info.datasheet) if info.datasheet else None
    if resume is not None:
        run_dir = results.resolve_run(resume)
        manifest = results.read_manifest(run_dir)
        suite = suite_of_run(run_dir, manifest, suite_name)
        check_same_device(run_dir, manifest, info)
        writer = results.RunWriter(run_dir, {"command": provenance.command_line()}, resume=True)
    else:
        suite = load_suite(suite_name or default_suite(info.kind))
        run_id = results.make_run_id(info.name, suite.id)
        run_dir = Path(out) if out else results.RUNS_ROOT / run_id
        writer = results.RunWriter(run_dir, manifest_for(run_id, suite, info, datasheet))
    with writer:
        if group is not None:
            group.prepare(suite, writer, info)
        ctx = RunContext(device=info, suite=suite, datasheet=datasheet)
        for p in writer.points.values():
            ctx.record_ceiling(p)
        _meter(ctx).start_run()
        # What lives now (torch, Triton, Inductor: ~10^5-10^6 objects) leaves every later collection: the model
        # parts collect before each point to free device memory, and a full collection over them costs 0.2-0.5 s.
        gc.collect()
        gc.freeze()
        try:
            jobs = plan_all(suite, ctx)
            (group.run_jobs if group is not None else _run_jobs)(jobs, ctx, writer, writer.final_keys(), progress,
                                                                 on_point)
            if "ceilings" in suite.parts and suite.parts["ceilings"].end_probe and group is None:
                # The same probes again: did the device hold its ceilings through the run? (Not in a run on several
                # ranks: there the start probes ran on every rank in lockstep, and the other ranks have stopped.)
                end = ceilings_part.end_jobs(suite.parts["ceilings"], ctx, list(writer.points.values()))
                _run_jobs(end, ctx, writer, writer.final_keys(), progress, on_point)
                jobs = jobs + end
            if group is None:
                _rejudge(jobs, ctx, writer, on_point)
        except BaseException as e:
            said = _stop(writer, ctx, e)
            if said:
                raise said from None
            raise
        finally:
            gc.unfreeze()  # a caller that goes on (tests, a notebook) collects as before
        writer.finish(ceilings=ctx.ceilings, finished=_now(), **_drift(ctx.ceilings, list(writer.points.values())),
                      load=load.summary(list(writer.points.values()), _meter(ctx)),
                      **({"energy_counter": ctx.energy[1] or "nvmlDeviceGetTotalEnergyConsumption"} if ctx.energy
                         else {}))
        _link_latest(run_dir)
        if after:
            after(run_dir)
    return run_dir


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _drift(start: dict, points: list[dict]) -> dict:
    """The end-of-run ceilings and their drift from the start's, for the manifest (where the summary reads them)."""
    end = ceilings_part.end_ceilings(points)
    if not ceilings_part.flat(end):
        return {}
    return {"ceilings_end": end, "ceiling_drift": ceilings_part.drift(start, end)}


def _stop(writer: results.RunWriter, ctx: RunContext, e: BaseException) -> WriteError | None:
    """A run cut short (Ctrl-C, a full disk): keep what was measured, readable; for a write error, the one line
    that says what was kept and how to go on."""
    try:
        writer.finish(ceilings=ctx.ceilings, stopped=f"{_now()} {type(e).__name__}")
    except WriteError:
        pass  # the disk that stopped the run refuses this too: points.jsonl already holds every finished point
    if not isinstance(e, WriteError):
        return None
    return WriteError(e.file, e.field, f"{e.message}; the {len(writer.points)} point(s) measured so far are kept: free "
                      f"space, then `tokenfleet bench --resume {writer.dir}`")


def suite_of_run(run_dir: Path, manifest: dict, suite_name: str | None) -> Suite:
    """The suite a run measures, exactly as its manifest resolved it. `suite_name` beside it must be that suite."""
    path = run_dir / "manifest.json"
    if not isinstance(manifest.get("config"), dict):
        raise ConfigError(path, "config", "missing: cannot tell what the run measures")
    suite = suite_from_dict(manifest["config"], str(path))
    if suite_name:
        given = load_suite(suite_name)
        if results.jsonable(given.resolved()) != results.jsonable(suite.resolved()):
            raise ConfigError("--suite", None, f"{suite_name} is not the suite this run measures ({suite.id}, as "
                              f"recorded in {path}): --resume takes the suite from the run, drop --suite")
    return suite


def check_same_device(run_dir: Path, manifest: dict, info: DeviceInfo) -> None:
    """A run measures one device: resuming it on another would mix two devices under one manifest."""
    was = ((manifest.get("environment") or {}).get("device") or {}).get("name")
    if was and was != info.name:
        raise ConfigError(run_dir / "manifest.json", "environment.device.name",
                          f"this run measured {was!r}, this machine is {info.name!r}: resume it there, "
                          "or start a new run")


def _link_latest(run_dir: Path) -> None:
    """results/runs/latest -> the newest run under results/runs (what `make run`'s later steps read)."""
    run_dir = Path(run_dir).resolve()
    if run_dir.parent != results.RUNS_ROOT.resolve():
        return
    link = results.RUNS_ROOT / "latest"
    if link.is_symlink() or not link.exists():
        tmp = results.RUNS_ROOT / ".latest.tmp"
        try:
            if tmp.is_symlink():
                tmp.unlink()
            tmp.symlink_to(run_dir.name)
            tmp.replace(link)
        except OSError:
            pass  # a convenience only: the run itself is complete


def job_key(job: Job) -> str:
    """A job's identity, as `results.point_key` reads it back from the point it writes."""
    return results.point_key(results.jsonable(job.key))


def is_done(job: Job, final: set[str]) -> bool:
    """A job is done when the run holds a final point (`results.FINAL`) under its key: `final` is
    `RunWriter.final_keys()`."""
    return job_key(job) in final


def run_fastest(points: list[dict], watch: load.Meter) -> float | None:
    """The fastest speed reading of the run: this session's and any earlier one's (a resumed run), or None."""
    found = [v for p in points if isinstance(v := (p.get("load") or {}).get("speed_fastest_us"), (int, float))]
    found += [watch.fastest] if watch.fastest else []
    return min(found) if found else None


def _rejudge(jobs: list[Job], ctx: RunContext, writer: results.RunWriter,
             on_point: Callable[[dict], None] | None) -> None:
    """Every point judged again against the run's fastest speed reading (a run may start on a slowed CPU and learn
    only later how fast it is, or be slowed for a minute): one measured on a CPU slowed beyond SPEED_LIMIT (usable, or
    already `contended`) is measured again once the probe reads fast (within the retry budget), else kept as (or
    made) `contended`, its numbers beside the reason."""
    watch = _meter(ctx)
    fastest = run_fastest(list(writer.points.values()), watch)
    if fastest is None or not load.judging():
        return
    by_key = {job_key(j): j for j in jobs}
    slow = [k for k, p in writer.points.items()
            if p.get("status") in results.USABLE | {"contended"} and slowed(p, fastest)]
    for k in slow:
        if k in by_key and watch.may_retry():
            again = watch.again(lambda job=by_key[k]: execute(job, ctx, retry=True))
            if again is not None:
                _record(again, ctx, writer, on_point)
        p = writer.points[k]
        if p.get("status") in results.USABLE and slowed(p, fastest):
            rec = {**p["load"], "speed_fastest_us": round(fastest, 3)}
            writer.append(load.judge(p, {**rec, "contended": load.cpu_reasons(rec)}, results.USABLE))


def _record(point: dict, ctx: RunContext, writer: results.RunWriter, on_point: Callable[[dict], None] | None) -> None:
    writer.append(point)
    if point["kind"] == "ceiling":
        ctx.record_ceiling(point)
    if on_point:
        on_point(point)


def _run_jobs(jobs: list[Job], ctx: RunContext, writer: results.RunWriter, final: set[str], progress: bool,
              on_point: Callable[[dict], None] | None) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    todo = [j for j in jobs if not is_done(j, final)]
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  disable=not progress, transient=False) as bar:
        task = bar.add_task("measuring", total=len(todo))
        for job in todo:
            bar.update(task, description=f"{job.label or job.key.get('kind')}"[:60])
            _record(execute(job, ctx, retry=True), ctx, writer, on_point)
            bar.advance(task)
