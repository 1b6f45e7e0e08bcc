"""`tokenfleet env` and `tokenfleet bench`: describe this device, measure it into a run folder."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from tokenfleet.cli.common import DeviceOpt, EnvFormatOpt, FormatOpt, app, check_format, user_errors
from tokenfleet.config import ConfigError
from tokenfleet.output import emit, to_json


@app.command()
@user_errors
def env(ceilings: Annotated[bool, typer.Option("--ceilings", help="also measure this device's ceilings")] = False,
        fmt: EnvFormatOpt = "table", device: DeviceOpt = None) -> None:
    """Describe this device (NVML on NVIDIA) and, with --ceilings, measure what it can do."""
    from tokenfleet.measure.device import detect

    check_format(fmt, ("table", "json", "md"))
    info = detect(device)
    out: dict = {"device": info.to_dict()}
    if ceilings:
        out["ceilings"] = measure_ceilings(info)
    if fmt == "json":
        print(to_json(out))
        return
    emit([{"field": k, "value": v} for k, v in info.to_dict().items() if k != "nvml"], fmt, "Device")
    if info.nvml:
        emit([{"field": k, "value": v} for k, v in info.nvml.items()], fmt, "NVML")
    if ceilings:
        emit(out["ceilings"]["points"], fmt, "Ceilings",
             ["op", "dtype", "status", "value", "unit", "datasheet_value", "datasheet_ratio"])


def measure_ceilings(info) -> dict:
    """The default suite's ceilings on this device, without writing a run folder."""
    from tokenfleet.hardware import load_hardware
    from tokenfleet.measure.parts.ceilings import plan
    from tokenfleet.measure.runner import RunContext, default_suite, execute
    from tokenfleet.measure.suite import load_suite

    suite = load_suite(default_suite(info.kind))
    ctx = RunContext(device=info, suite=suite, datasheet=load_hardware(info.datasheet) if info.datasheet else None)
    points = []
    for job in plan(suite.parts["ceilings"], ctx):
        p = execute(job, ctx)
        ctx.record_ceiling(p)
        points.append(p)
    return {**ctx.ceilings, "points": points}


def print_plan(suite_name: str | None, device: str | None, fmt: str, resume: str | None = None) -> None:
    """The suite's jobs in run order with estimated seconds each, then per part and in all (no device work). With
    `resume`, the resumed run's own suite (from its manifest, as `bench --resume` measures it)."""
    from tokenfleet.measure.device import pick
    from tokenfleet.measure.plan import part_totals, plan_rows, planning_context
    from tokenfleet.measure.runner import default_suite, suite_of_run
    from tokenfleet.measure.suite import load_suite
    from tokenfleet.results import FINAL, read_manifest, read_points, resolve_run

    note = None
    if resume:
        run_dir = resolve_run(resume)
        suite = suite_of_run(run_dir, read_manifest(run_dir), suite_name)
        final = sum(p.get("status") in FINAL for p in read_points(run_dir)) \
            if (run_dir / "points.jsonl").exists() else 0
        note = (f"resuming {run_dir}: {final} point(s) there are final and are not measured again; the plan below "
                "is the run's whole suite")
    else:
        suite = load_suite(suite_name or default_suite(pick(device)))
    ctx = planning_context(suite, device)
    rows = plan_rows(suite, ctx)
    parts = part_totals(rows, ctx.device.kind)
    if fmt == "json":
        print(to_json({"suite": suite.id, "device": ctx.device.kind, "jobs": rows, "parts": parts,
                       **({"resume": str(run_dir), "final_points": final} if resume else {})}))
        return
    emit(rows, fmt, f"Plan: suite {suite.id} on {ctx.device.name} (estimates, tokenfleet.measure.plan)")
    emit(parts, fmt, "Estimated seconds per part")
    if note:
        typer.echo(f"note: {note}", err=fmt == "csv")


@app.command()
@user_errors
def bench(suite: Annotated[str | None, typer.Option("--suite", "-s", metavar="NAME|FILE",
                                                    help="suite name (configs/suites) or YAML path")] = None,
          out: Annotated[Path | None, typer.Option("--out", metavar="DIR", help="run folder to write")] = None,
          resume: Annotated[str | None, typer.Option("--resume", metavar="RUN", help="run id or folder to continue")
                            ] = None,
          fmt: FormatOpt = "table", device: DeviceOpt = None,
          quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar and no tables: only the run "
                                                                    "folder")] = False,
          nproc: Annotated[int | None, typer.Option(
              "--nproc", min=1, metavar="N", help="N ranks of this node through torchrun (one GPU each; gloo on CPU)")
          ] = None,
          plan: Annotated[bool, typer.Option("--plan", help="print the jobs in run order with time estimates; "
                                                           "measure nothing")] = False,
          ) -> None:
    """Benchmark this device with a suite (default: quick on a GPU, ci-cpu on a CPU) into a run folder."""
    from tokenfleet.measure.runner import run_suite
    from tokenfleet.report.tables import TITLES, kind_table, points_frame, write_tables
    from tokenfleet.results import read_run

    check_format(fmt)
    if resume and out:
        raise ConfigError("--out", None, "--out and --resume exclude each other (a resumed run keeps its folder)")
    if plan:
        print_plan(suite, device, fmt, resume)
        return
    from tokenfleet.measure.distributed import under_launcher

    progress = not quiet and sys.stderr.isatty()
    if under_launcher():  # one rank of a torchrun
        run_dir = _rank_run(suite, out, resume, device, progress)
        if run_dir is None:  # not rank 0: rank 0 writes and prints
            return
        write_tables(run_dir)  # points.csv, <kind>.csv, summary.md: derived from points.jsonl
    elif nproc and nproc > 1:
        _launch(nproc, suite, resume, device)
    else:  # the derived tables written under the run's lock, rewritten on resume
        run_dir = run_suite(suite, out=out, resume=resume, device=device, progress=progress, after=write_tables)
    _, points = read_run(run_dir)
    if quiet:
        typer.echo(f"run folder: {run_dir}")
        return
    if fmt == "json":
        print(to_json(points))
    elif fmt == "csv":  # one CSV: every point, the shape as one column (the per-kind CSVs are in the run folder)
        emit(points_frame(points).drop(columns=["telemetry"], errors="ignore"), fmt)
    else:
        df = points_frame(points)
        for kind, title in TITLES.items():
            t = kind_table(df, kind)
            if len(t):
                emit(t, fmt, title)
    typer.echo(f"run folder: {run_dir}", err=fmt != "table")


def _rank_run(suite, out, resume, device, progress) -> Path | None:
    """This rank's part of a run under torchrun: rank 0 returns the run folder, the others None."""
    from tokenfleet.measure import launch

    try:
        return launch.run_suite(suite, out, resume, device, progress)
    except launch.RunFailed as e:
        where = f"; `tokenfleet bench --resume {out or resume} --nproc N` continues it" if out or resume else ""
        typer.echo(f"error: run stopped: {e}{where}", err=True)
        raise typer.Exit(1) from None


def _launch(nproc: int, suite, resume, device) -> None:
    """`--nproc N`: this command on N ranks through torchrun; exits with its code. Bad input is caught here first
    (one line, exit 2), not once per rank."""
    import torch
    from tokenfleet.measure import launch
    from tokenfleet.measure.device import pick
    from tokenfleet.measure.suite import load_suite
    from tokenfleet.results import resolve_run

    if pick(device) == "cuda" and torch.cuda.device_count() < nproc:
        raise ConfigError("--nproc", None, f"{nproc} ranks need {nproc} GPUs (one each); torch sees "
                          f"{torch.cuda.device_count()} (--device cpu runs gloo ranks on the CPU)")
    if suite:
        load_suite(suite)
    if resume:
        resolve_run(resume)
    raise typer.Exit(launch.launch(nproc, _without_nproc(sys.argv[1:])))


def _without_nproc(args: list[str]) -> list[str]:
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out
