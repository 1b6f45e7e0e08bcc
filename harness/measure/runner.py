"""Runs a suite on the device `harness.measure.device` picked: ceilings first, then each part's jobs, one point each.

A job's failure is a row with its status (`oom`, `error`, `incorrect`), never a crash and never dropped.
With `resume`, jobs whose point is already `ok` in the run folder are skipped.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

from harness import results
from harness.config import ConfigError
from harness.hardware import Hardware, load_hardware
from harness.measure.context import Job, RunContext
from harness.measure.device import DeviceInfo, detect, telemetry
from harness.measure.suite import Suite, load_suite, part_api, suite_from_dict


def _failure(exc: BaseException) -> dict:
    oom = isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()
    msg = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:500]
    if oom and torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"status": "oom" if oom else "error", "error": msg}


def execute(job: Job, ctx: RunContext) -> dict:
    """Run one job into a point: key + measurements + derived rates + status. Never raises for job errors."""
    t0 = time.perf_counter()
    try:
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
        point = {**derived, **point}
    if ctx.on_gpu and status in results.USABLE:
        # Read just after the samples: a power or thermal clock event here explains a slow point.
        point["telemetry"] = telemetry(torch.cuda.current_device())
    point["elapsed_s"] = round(time.perf_counter() - t0, 3)
    return results.clean_floats(point)


def default_suite(device_kind: str) -> str:
    return "quick" if device_kind == "cuda" else "ci-cpu"


def manifest_for(run_id: str, suite: Suite, info: DeviceInfo, datasheet: Hardware | None) -> dict:
    return {
        "run_id": run_id,
        "tokenfleet_version": results.version(),
        "git_sha": results.git_sha(),
        "command": results.command_line(),
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
    jobs: list[Job] = []
    for name, spec in suite.parts.items():
        _, plan = part_api(name)
        jobs.extend(plan(spec, ctx))
    return jobs


def run_suite(suite_name: str | None = None, out: str | Path | None = None, resume: str | Path | None = None,
              device: str | None = None, progress: bool = True, on_point: Callable[[dict], None] | None = None,
              group=None) -> Path:
    """Measure a suite into a run folder and return its path. `resume` continues an existing run folder.
    `group`: rank 0's `harness.measure.launch.Leader` in a run on several ranks (it runs the job loop)."""
    info = detect(device)
    datasheet = load_hardware(info.datasheet) if info.datasheet else None
    if resume is not None:
        run_dir = results.resolve_run(resume)
        manifest = results.read_manifest(run_dir)
        if suite_name:
            suite = load_suite(suite_name)
        elif isinstance(manifest.get("config"), dict):  # the suite exactly as the run resolved it
            suite = suite_from_dict(manifest["config"], str(run_dir / "manifest.json"))
        else:
            raise ConfigError(run_dir / "manifest.json", "config", "missing: cannot tell what the run measures")
        writer = results.RunWriter(run_dir, {"command": results.command_line()}, resume=True)
    else:
        suite = load_suite(suite_name or default_suite(info.kind))
        run_id = results.make_run_id(info.name, suite.id)
        run_dir = Path(out) if out else results.RUNS_ROOT / run_id
        writer = results.RunWriter(run_dir, manifest_for(run_id, suite, info, datasheet))
    if group is not None:
        group.prepare(suite, writer, info)
    ctx = RunContext(device=info, suite=suite, datasheet=datasheet)
    for p in writer.existing:
        ctx.record_ceiling(p)
    done = [p for p in writer.existing if p.get("status") == "ok"]
    try:
        jobs = plan_all(suite, ctx)
        (group.run_jobs if group is not None else _run_jobs)(jobs, ctx, writer, done, progress, on_point)
    finally:
        writer.manifest["ceilings"] = ctx.ceilings
        writer.manifest["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        writer.write_manifest()
        writer.close()
    _link_latest(run_dir)
    return run_dir


def _link_latest(run_dir: Path) -> None:
    """results/runs/latest -> the newest run under results/runs (what `make run`'s later steps read)."""
    run_dir = Path(run_dir).resolve()
    if run_dir.parent != results.RUNS_ROOT.resolve():
        return
    link = results.RUNS_ROOT / "latest"
    if link.is_symlink() or not link.exists():
        tmp = results.RUNS_ROOT / ".latest.tmp"
        if tmp.is_symlink():
            tmp.unlink()
        tmp.symlink_to(run_dir.name)
        tmp.replace(link)


def is_done(job: Job, done: list[dict]) -> bool:
    """A job is done when an `ok` point carries every field of its key with the same value."""
    key = {k: results.jsonable(v) for k, v in job.key.items()}
    return any(all(p.get(k) == v for k, v in key.items()) for p in done)


def _run_jobs(jobs: list[Job], ctx: RunContext, writer: results.RunWriter, done: list[dict], progress: bool,
              on_point: Callable[[dict], None] | None) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    todo = [j for j in jobs if not is_done(j, done)]
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  disable=not progress, transient=False) as bar:
        task = bar.add_task("measuring", total=len(todo))
        for job in todo:
            bar.update(task, description=f"{job.label or job.key.get('kind')}"[:60])
            point = execute(job, ctx)
            writer.append(point)
            if point["kind"] == "ceiling":
                ctx.record_ceiling(point)
            if on_point:
                on_point(point)
            bar.advance(task)
