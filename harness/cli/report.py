"""`tokenfleet report` and `tokenfleet compare`: a run as a report, two runs side by side."""

from pathlib import Path
from typing import Annotated

import typer
from tokenfleet.cli.common import FormatOpt, app, check_finite, check_format, user_errors
from tokenfleet.output import emit, to_json


@app.command()
@user_errors
def report(
    run: Annotated[str, typer.Argument(metavar="RUN", help="run folder, or a run id under results/runs/")],
    fleet: Annotated[list[str] | None, typer.Option(
        "--fleet", metavar="FLEET",
        help="fleet name or YAML (configs/fleets/), repeatable; without it: no headline or capacity section")
    ] = None,
    demand: Annotated[str | None, typer.Option(
        "--demand", metavar="SCENARIO", help="demand scenario (configs/demand/), default china-reported")] = None,
    html: Annotated[Path | None, typer.Option("--html", metavar="FILE", help="HTML file (default: RUN/report.html)")
                    ] = None,
    md: Annotated[Path | None, typer.Option("--md", metavar="FILE",
                                            help="markdown file, PNGs beside it (default: RUN/report.md)")] = None,
) -> None:
    """A run as one self-contained HTML report (plots embedded, no JavaScript) and a markdown twin; prints the two
    paths (no --format: the report is the output)."""
    from tokenfleet.report.document import write

    html_path, md_path = write(run, fleet or [], demand, html, md)
    typer.echo(str(html_path))
    typer.echo(str(md_path))

@app.command()
@user_errors
def compare(
    run_a: Annotated[str, typer.Argument(metavar="RUN_A", help="baseline run (folder or run id)")],
    run_b: Annotated[str, typer.Argument(metavar="RUN_B", help="run compared against it")],
    fail_over: Annotated[float | None, typer.Option(
        "--fail-over", help="exit 1 when a point failed, or slowed by more than PCT percent beyond its noise (by "
                            "the interval on B/A where the runs kept their samples)", metavar="PCT", min=0)] = None,
    floor: Annotated[str, typer.Option(
        "--floor", help="between-run noise floor of each point: `largest` (each run's largest ceiling drift, start to "
                        "end) or `ceiling` (the drift of the ceiling the point is judged against; tighter, but on a "
                        "shared CPU VM small kernels move more than their ceilings)")] = "largest",
    fmt: FormatOpt = "table",
) -> None:
    """Ratios B/A of median time and throughput per matching point, with each side's noise."""
    from tokenfleet.report.compare import COLUMNS, compare, floor_label, speed_text

    check_format(fmt)
    check_finite({"--fail-over": fail_over})
    cmp = compare(run_a, run_b, floor)
    # Machine formats keep stdout parseable: the header and summary go to stderr there.
    to_err = fmt in ("json", "csv")
    typer.echo(cmp.header(), err=to_err)
    if fmt == "json":
        print(to_json({"a": cmp.a.run_id, "b": cmp.b.run_id, "device_a": cmp.a.device, "device_b": cmp.b.device,
                       "cross_device": cmp.cross_device, "ceilings": cmp.ceilings,
                       "machines_differed": cmp.machines_differed, "noise_floor": cmp.floor,
                       "noise_floors": cmp.floors, "noise_floors_by_ceiling": cmp.floor_classes(),
                       "ceiling_drifts": cmp.drifts, "rows": cmp.rows}))
    elif fmt == "csv":
        emit(cmp.rows, fmt, columns=COLUMNS + ["throughput_field", "cross_device"])
    else:
        both = [r for r in cmp.rows if r["changed"] not in ("only_a", "only_b")]
        one = [r for r in cmp.rows if r["changed"] in ("only_a", "only_b")]
        emit(both, fmt, "Matched points (B/A)", COLUMNS)
        if one:
            emit(one, fmt, "Points in one run only", ["changed", "kind", "name", "backend", "dtype", "shape",
                                                      "status_a", "status_b"])
    typer.echo(cmp.summary(), err=to_err)
    if fail_over is not None:
        blind = cmp.blind(fail_over)
        if blind:
            which = ", ".join(f"{floor_label(k)} ±{f:.0%}" for k, f in blind.items())
            typer.echo(f"--fail-over {fail_over:g}% is inside these runs' between-run noise for the points judged "
                       f"by {which}: a slowdown of those points under their floor cannot be told from the machine's "
                       "noise here", err=True)
        if cmp.unjudged:
            typer.echo(f"--fail-over {fail_over:g}%: {speed_text(cmp.unjudged)}", err=True)
        bad = cmp.regressions(fail_over)
        for r in bad:
            typer.echo(f"regression: {point_name(r)}: {regression_text(r)}", err=True)
        if bad:
            typer.echo(f"{len(bad)} point(s) regressed beyond --fail-over {fail_over:g}%", err=True)
            raise typer.Exit(1)


def point_name(r: dict) -> str:
    """kind, op or model, backend, dtype, shape: the fields a point has (never `None` for a missing one)."""
    return " ".join(str(r[k]) for k in ("kind", "name", "backend", "dtype", "shape") if r.get(k) not in (None, ""))


def _interval(r: dict) -> tuple[float, float] | None:
    """The interval on the time ratio B/A when the comparison computed one (from both runs' samples)."""
    lo, hi = r.get("ratio_lo"), r.get("ratio_hi")
    return (float(lo), float(hi)) if lo is not None and hi is not None else None


def regression_text(r: dict) -> str:
    from tokenfleet.report.compare import floor_label

    if r["changed"] == "contended":
        return f"not judged: measured on a shared machine ({r['note']}); --resume that run on a quiet machine"
    if r["changed"] != "slower":
        return f"failed ({r['note']})"
    floor = (f"; beyond the between-run noise of ±{r['noise_floor']:.0%} from {floor_label(r['floor_from'])}"
             if r.get("noise_floor") else "")
    if r.get("rel_ratio") is not None:
        return (f"slower x{r['rel_ratio']:.3f} against each run's own ceiling (interval x{r['rel_lo']:.3f}.."
                f"x{r['rel_hi']:.3f}; raw time x{r['time_ratio']:.3f}{floor})")
    ci = _interval(r)
    if ci:
        return f"slower x{r['time_ratio']:.3f} (interval x{ci[0]:.3f}..x{ci[1]:.3f} on B/A{floor})"
    return f"slower x{r['time_ratio']:.3f} (noise {max(r['spread_a'] or 0, r['spread_b'] or 0):.1%}{floor})"
