"""A run folder as one report: tables (pandas) and plots (matplotlib), as self-contained HTML and as markdown.

The HTML embeds its plots as base64 PNG and uses no JavaScript, so it reads offline and in mail attachments; the
markdown twin writes the PNGs beside itself for terminals and pull requests. Both come from the same `Report`,
so they never disagree. The capacity section comes from tokenfleet.capacity.fleet (fleet against demand, with this
run's measured efficiencies) and is left out with a note when no fleet is given or that module is not available.
"""

from __future__ import annotations

import base64
import html
import numbers
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from tokenfleet import results
from tokenfleet.capacity.fleet import CAPACITY_COLUMNS, capacity_table, growth_fit, load_demand
from tokenfleet.capacity.headline import headline, headline_lines
from tokenfleet.capacity.project import read_runs
from tokenfleet.files import atomic_write, ensure_dir
from tokenfleet.output import cell, markdown_table, tidy  # cell: the number format every verb prints
from tokenfleet.report import plots
from tokenfleet.report.tables import TITLES, failed_table, fold_skipped, kind_table, points_frame
from tokenfleet.results import read_run, resolve_run


@dataclass
class Section:
    title: str
    tables: list[tuple[str | None, pd.DataFrame]] = field(default_factory=list)  # (subtitle, table)
    notes: list[str] = field(default_factory=list)
    plot: tuple[str, bytes] | None = None  # (file stem, PNG bytes)
    text: list[str] = field(default_factory=list)  # preformatted lines (the headline, as the terminal prints it)


@dataclass
class Report:
    title: str
    lines: list[str]  # one-line facts under the title
    sections: list[Section]


# --- tables --------------------------------------------------------------------------------------------------


def environment_table(manifest: dict) -> pd.DataFrame:
    env = manifest.get("environment") or {}
    dev = env.get("device") or {}
    rows = [("run_id", manifest.get("run_id")), ("suite", manifest.get("suite")),
            ("created", manifest.get("created")), ("finished", manifest.get("finished")),
            ("command", manifest.get("command")), ("tokenfleet", manifest.get("tokenfleet_version")),
            ("git_sha", manifest.get("git_sha"))]
    rows += [(f"device.{k}", v) for k, v in dev.items() if k != "nvml" and v not in (None, "", {})]
    rows += [(f"nvml.{k}", v) for k, v in (dev.get("nvml") or {}).items()]
    rows += [(k, env.get(k)) for k in ("python", "platform") if env.get(k)]
    sheet = env.get("datasheet")
    if isinstance(sheet, dict):  # the runner stores the whole datasheet: show the figures MFU/MBU are against
        rows += [("datasheet", sheet.get("id")),
                 ("datasheet.memory_bandwidth_gbps", sheet.get("memory_bandwidth_gbps"))]
        rows += [(f"datasheet.peak_tflops.{k}", v) for k, v in (sheet.get("peak_tflops") or {}).items()]
    elif sheet:
        rows.append(("datasheet", sheet))
    return pd.DataFrame([{"field": k, "value": v} for k, v in rows if v is not None])


def grid(df: pd.DataFrame, kind: str) -> list[tuple[str, pd.DataFrame]]:
    """tokens/s over the kind's grid (prefill: batch x prompt_len; decode: batch x context), one per model/dtype/
    backend. Failed cells show their status, so a hole in the grid is explained where it is."""
    cols = {"prefill": ("batch", "prompt_len"), "decode": ("batch", "context")}[kind]
    sub = df[df["kind"] == kind] if not df.empty and "kind" in df else pd.DataFrame()
    if sub.empty or any(c not in sub for c in cols) or "tokens_per_s" not in sub:
        return []
    out = []
    keys = [c for c in ("model", "dtype", "backend") if c in sub]
    for name, g in sub.groupby(keys, dropna=False):
        text = [cell(t) if s in results.USABLE else s for t, s in zip(g["tokens_per_s"], g["status"], strict=True)]
        g = g.assign(cell=text).astype({c: "int64" for c in cols if g[c].notna().all()})
        piv = g.pivot_table(index=cols[0], columns=cols[1], values="cell", aggfunc="last")
        piv.columns = [f"{cols[1]}={c}" for c in piv.columns]
        name = name if isinstance(name, tuple) else (name,)
        out.append((f"tokens/s: {' '.join(map(str, name))} (rows: {cols[0]})", piv.reset_index()))
    return out


# --- capacity ------------------------------------------------------------------------------------------------


# Moved out of the capacity table into a detail table, so coverage and GPUs needed stay on screen.
CAPACITY_DETAIL = ["gpu", "tp", "unservable", "ttft_missed", "tpot_missed", "extrapolated", "count_source"]


def capacity_sections(fleets: list[str], demand: str | None, run_dir: Path) -> tuple[Section, Section]:
    """The headline (per fleet) and the capacity section: fleet capacity against demand from tokenfleet.capacity.fleet
    (this run feeding its measured efficiencies), with the plot of demand and its growth fit against each fleet."""
    head = Section("Headline: how much of 14T and 140T tokens/day, and what it would take")
    sec = Section("Capacity against demand")
    if not fleets:
        head.notes.append("left out: no fleet given (`tokenfleet report RUN --fleet china-2026-mix`)")
        sec.notes.append("left out: no fleet given (`tokenfleet report RUN --fleet h100-node`)")
        return head, sec
    runs = read_runs([run_dir])
    lines, summaries, details = [], [], []
    for f in fleets:
        rows, summary = capacity_table(f, demand, runs)
        head.text += headline_lines(headline(rows, summary, runs)) + [""]
        cols = [c for c in CAPACITY_COLUMNS if any(c in r for r in rows) and c not in CAPACITY_DETAIL[1:]]
        sec.tables.append((f"fleet {summary['fleet']} against {summary['demand']} "
                           f"({summary['demand_tokens_per_day']:.3g} tokens/day on {summary['demand_date']})",
                           pd.DataFrame(rows)[cols]))
        per_type = pd.DataFrame([r for r in rows if r["gpu"] != "total"])
        details.append((f"fleet {summary['fleet']}: tensor parallelism per model, classes not served, SLOs "
                        "missed, where each count comes from",
                        per_type[[c for c in CAPACITY_DETAIL if c in per_type]]))
        summaries.append(summary)
        when = ("demand already above it" if summary["coverage"] < 1 else
                f"outgrown {summary['outgrows_fleet_on']}" if summary["outgrows_fleet_on"] else "")
        label = f"{summary['fleet']} ({when}, peak factor {summary['peak_factor']:g})" if when else summary["fleet"]
        lines.append(plots.FleetLine(label, float(summary["capacity_tokens_per_day"])))
    sec.tables += details
    sec.tables.append(("summary", summary_table(summaries)))
    sec.notes.append(f"why the scenarios differ: {summaries[0]['why_differs']}")
    # The chosen scenario and its pair: the reported (English coverage) and primary figures differ tenfold.
    first = load_demand(summaries[0]["demand"])
    scenarios = [first] + ([load_demand(first.pair)] if first.pair else [])
    series = [plots.DemandSeries(f"{d.id} ({d.kind})", [p.date for p in d.points], [p.tokens_per_day for p in d.points],
                                 [p.unverified for p in d.points], growth_fit(d)) for d in scenarios]
    fig, note = plots.capacity_vs_demand(series, lines)
    sec.plot = ("capacity", plots.png_bytes(fig))
    sec.notes += [note] if note else []
    return head, sec


def summary_table(summaries: list[dict]) -> pd.DataFrame:
    """One column per fleet: the scalar fields of capacity_table's summary, efficiency and assumptions flattened."""
    cols = {}
    for s in summaries:
        flat = {k: v for k, v in s.items() if not isinstance(v, dict)}
        flat.update({f"efficiency.{k}": v for k, v in (s.get("efficiency") or {}).items()})
        flat.update({f"assumption.{k}": v for k, v in (s.get("assumptions") or {}).items()})
        flat.pop("why_differs", None)  # long, the same for every fleet: shown once as a note
        cols[s["fleet"]] = flat
    df = pd.DataFrame(cols)
    return df.rename_axis("field").reset_index()


# --- the report ----------------------------------------------------------------------------------------------


def build(run: str | Path, fleets: list[str] | None = None, demand: str | None = None) -> Report:
    run_dir = resolve_run(run)
    manifest, points = read_run(run_dir)
    df = points_frame(points)
    ceilings = results.ceilings_of(manifest, points)
    sheet = (manifest.get("environment") or {}).get("datasheet")
    sheet = sheet if isinstance(sheet, dict) else None
    dev = (manifest.get("environment") or {}).get("device") or {}
    counts = df["status"].value_counts().to_dict() if not df.empty else {}
    lines = [f"device: {dev.get('name')} ({dev.get('kind')}); datasheet: {(sheet or {}).get('id') or 'none'}",
             f"points: {len(df)} ({', '.join(f'{k} {v}' for k, v in counts.items()) or 'none'})",
             f"report written {datetime.now(timezone.utc).isoformat(timespec='seconds')} from {run_dir}"]
    # The planner's answer first (headline, capacity), then the model (prefill, decode), then the kernels.
    head, cap = capacity_sections(list(fleets or []), demand, run_dir)
    secs = [head, cap]

    pre = Section(TITLES["prefill"], grid(df, "prefill") + [("all prefill points", kind_table(df, "prefill"))])
    secs.append(pre)
    dec = Section(TITLES["decode"], grid(df, "decode") + [("all decode points", kind_table(df, "decode"))])
    fig, note = plots.throughput_interactivity(df)
    dec.plot = ("decode", plots.png_bytes(fig))
    dec.notes += [note] if note else []
    secs.append(dec)

    kernels, skipped = fold_skipped(kind_table(df, "kernel", extra=("note",)), drop=("note",))
    kern = Section(TITLES["kernel"], [(None, kernels)], notes=skipped)
    kern.notes.append("mfu/mbu: against this run's measured ceilings; *_datasheet: against the datasheet; "
                      "vs_torch: torch (vendor baseline) time / Triton time, above 1 = Triton faster")
    fig, note = plots.roofline(df, ceilings, sheet)
    kern.plot = ("roofline", plots.png_bytes(fig))
    kern.notes += [note] if note else []
    secs.append(kern)

    ceil = Section(TITLES["ceiling"], [(None, kind_table(df, "ceiling"))])
    ceil.notes.append("value: measured on this run; datasheet_ratio = value / datasheet_value")
    secs.append(ceil)
    secs.append(Section("Device and environment", [(None, environment_table(manifest))]))

    failed, skipped = fold_skipped(failed_table(df))
    bad = Section("Points not ok", [(None, failed)], notes=skipped)
    if failed.empty and not skipped:
        bad.notes.append("every point is ok")
    secs.append(bad)
    return Report(f"tokenfleet report: {manifest.get('run_id')}", lines, secs)


# --- writers -------------------------------------------------------------------------------------------------

# The Chinese in the report (万亿 in the demand notes) renders with no CJK font installed: a subset of Droid Sans
# Fallback (Apache-2.0; scripts/subset_cjk_font.py) is embedded, used only for those code points.
FONT = Path(__file__).parent / "fonts" / "cjk-subset.woff"


def font_face() -> str:
    b64 = base64.b64encode(FONT.read_bytes()).decode()
    return ("@font-face { font-family: 'tokenfleet-cjk'; src: url(data:font/woff;base64," + b64 + ") format('woff');"
            " unicode-range: U+3000-9FFF, U+FF00-FFEF; }")


CSS = """
body { font-family: 'tokenfleet-cjk', system-ui, sans-serif; margin: 2em; color: #222; max-width: 1400px; }
pre.headline { font-family: 'tokenfleet-cjk', ui-monospace, monospace; font-size: 14px; background: #f6f8fa;
               border: 1px solid #ccc; padding: 0.8em; overflow-x: auto; }
.wide { overflow-x: auto; margin: 0.5em 0 1.5em; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; white-space: nowrap; }
th { background: #f0f0f0; text-align: left; } td.num { text-align: right; }
td.long { white-space: normal; min-width: 24em; max-width: 48em; }
.note { color: #555; font-size: 13px; } img { max-width: 100%; border: 1px solid #ddd; }
"""


def html_table(df: pd.DataFrame) -> str:
    """Numbers right-aligned and unbroken, text left-aligned; long text (error messages) may wrap."""
    if not len(df):
        return "<p><i>(no rows)</i></p>"
    esc = html.escape
    head = "".join(f"<th>{esc(str(c))}</th>" for c in df.columns)
    body = []
    for rec in df.itertuples(index=False):
        cells = []
        for v in rec:
            text = cell(v)
            cls = "num" if isinstance(v, numbers.Number) and not isinstance(v, (bool, np.bool_)) else (
                "long" if len(text) > 40 else "txt")
            cells.append(f'<td class="{cls}">{esc(text)}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<div class="wide"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def to_html(rep: Report) -> str:
    esc = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{esc(rep.title)}</title>",
           f"<style>{font_face()}{CSS}</style></head><body>", f"<h1>{esc(rep.title)}</h1>", "<ul>"]
    out += [f"<li>{esc(line)}</li>" for line in rep.lines]
    out.append("</ul>")
    for s in rep.sections:
        out.append(f"<h2>{esc(s.title)}</h2>")
        out += [f'<p class="note">{esc(n)}</p>' for n in s.notes]
        if s.text:
            out.append('<pre class="headline">' + esc("\n".join(s.text).rstrip()) + "</pre>")
        for sub, t in s.tables:
            if sub:
                out.append(f"<h3>{esc(sub)}</h3>")
            out.append(html_table(tidy(t)))
        if s.plot:
            b64 = base64.b64encode(s.plot[1]).decode()
            out.append(f'<p><img alt="{esc(s.title)} plot" src="data:image/png;base64,{b64}"></p>')
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def to_markdown(rep: Report, png_prefix: str) -> tuple[str, dict[str, bytes]]:
    """Markdown text and the PNG files it links to ({file name: bytes}), to be written beside it."""
    out = [f"# {rep.title}", ""] + [f"- {line}" for line in rep.lines] + [""]
    files = {}
    for s in rep.sections:
        out += [f"## {s.title}", ""]
        out += [f"_{n}_\n" for n in s.notes]
        if s.text:
            out += ["```", "\n".join(s.text).rstrip(), "```", ""]
        for sub, t in s.tables:
            if sub:
                out += [f"### {sub}", ""]
            out += [markdown_table(tidy(t)), ""]
        if s.plot:
            name = f"{png_prefix}-{s.plot[0]}.png"
            files[name] = s.plot[1]
            out += [f"![{s.title}]({name})", ""]
    return "\n".join(out), files


def write(run: str | Path, fleets: list[str] | None = None, demand: str | None = None,
          html_path: str | Path | None = None, md_path: str | Path | None = None) -> tuple[Path, Path]:
    """Write the HTML and markdown reports (default: report.html and report.md in the run folder)."""
    run_dir = resolve_run(run)
    rep = build(run_dir, fleets, demand)
    html_path = Path(html_path) if html_path else run_dir / "report.html"
    md_path = Path(md_path) if md_path else run_dir / "report.md"
    for p in (html_path, md_path):
        ensure_dir(p.parent)
    atomic_write(html_path, to_html(rep))  # each file whole or not at all, even on a full disk
    text, files = to_markdown(rep, md_path.stem)
    for name, data in files.items():
        atomic_write(md_path.parent / name, data)
    atomic_write(md_path, text)
    return html_path, md_path
