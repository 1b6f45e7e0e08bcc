"""The report's plots (matplotlib, PNG): roofline, throughput against interactivity, fleet capacity against demand.

Figures are built with `matplotlib.figure.Figure` directly, never pyplot: no global backend or figure state, so
the report works headless (Agg) and inside any other program. A plot with nothing to draw says so in the image
instead of failing, so the report always has the same sections.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from tokenfleet.results import USABLE

MARKERS = {"triton": "o", "torch": "s"}
SIZE = (9, 5.5)
DPI = 100


def png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return buf.getvalue()


def _empty(title: str, message: str) -> Figure:
    fig = Figure(figsize=SIZE)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=14, transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])
    return fig


def _ok(df: pd.DataFrame, kind: str, needed: Sequence[str]) -> pd.DataFrame:
    if df.empty or "kind" not in df or any(c not in df for c in needed):
        return pd.DataFrame()
    sub = df[(df["kind"] == kind) & df["status"].isin(USABLE)]
    return sub.dropna(subset=list(needed))


# --- roofline ------------------------------------------------------------------------------------------------


def roofline(df: pd.DataFrame, ceilings: dict, datasheet: dict | None) -> tuple[Figure, str | None]:
    """Kernel points at (flops/bytes, TFLOP/s) under this run's measured roofs and the datasheet's.

    Roof = min(bandwidth x intensity, matmul rate), one per dtype of the kernel points: measured (copy bandwidth,
    measured matmul rate) solid, datasheet dashed. Returns the figure and a note on what is missing, if anything.
    """
    title = "Roofline: kernels against measured and datasheet ceilings"
    k = _ok(df, "kernel", ["flops", "bytes", "median_ms"])
    if len(k):
        k = k[(k["flops"] > 0) & (k["bytes"] > 0) & (k["median_ms"] > 0)]
    if k.empty:
        return _empty(title, "no kernel points with FLOP and byte counts"), "no kernel points to place on the roofline"
    if "backend" not in k:
        k = k.assign(backend="?")
    ai = k["flops"] / k["bytes"]
    tflops = k["flops"] / (k["median_ms"] / 1e3) / 1e12
    fig = Figure(figsize=SIZE)
    ax = fig.add_subplot()
    ax.set_xscale("log")
    ax.set_yscale("log")
    lo, hi = float(ai.min()) / 3, float(ai.max()) * 3
    notes = []
    dtypes = sorted(k["dtype"].dropna().unique()) if "dtype" in k else []
    copy_gbps = ceilings.get("copy_gbps")
    sheet_bw = (datasheet or {}).get("memory_bandwidth_gbps")
    roofs = []
    for i, dt in enumerate(dtypes):
        color = f"C{i}"
        mm = (ceilings.get("matmul_tflops") or {}).get(dt)
        if copy_gbps and mm:
            roofs.append((copy_gbps, mm, "-", color, f"measured {dt}: {copy_gbps:,.0f} GB/s, {mm:,.1f} TFLOP/s"))
        elif copy_gbps or mm:
            notes.append(f"measured roof for {dt} incomplete (copy {copy_gbps}, matmul {mm})")
        peak = ((datasheet or {}).get("peak_tflops") or {}).get(dt)
        if sheet_bw and peak:
            roofs.append((sheet_bw, peak, "--", color, f"datasheet {dt}: {sheet_bw:,.0f} GB/s, {peak:,.1f} TFLOP/s"))
    if not datasheet:
        notes.append("no datasheet for this device: datasheet roof left out")
    for bw, peak, _, _, _ in roofs:
        ridge = peak * 1e3 / bw  # intensity where bandwidth x AI meets the compute roof
        lo, hi = min(lo, ridge / 3), max(hi, ridge * 3)
    x = np.logspace(math.log10(lo), math.log10(hi), 200)
    for bw, peak, style, color, label in roofs:
        ax.plot(x, np.minimum(bw * x / 1e3, peak), style, color=color, lw=1.5, label=label)  # GB/s x flop/B -> TF/s
    ops = sorted(k["op"].dropna().unique())
    for j, op in enumerate(ops):
        for backend, g in k[k["op"] == op].groupby(k["backend"].fillna("?")):
            sel = g.index
            ax.scatter(ai[sel], tflops[sel], marker=MARKERS.get(backend, "^"), color=f"C{(j + len(dtypes)) % 10}",
                       edgecolor="black", linewidths=0.4, s=36, label=f"{op} ({backend})", zorder=3)
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("TFLOP/s")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", ncols=2)
    return fig, "; ".join(notes) or None


# --- throughput against interactivity -------------------------------------------------------------------------


def throughput_interactivity(df: pd.DataFrame) -> tuple[Figure, str | None]:
    """Decode tokens/s per GPU against tokens/s per user, one curve per model/dtype/backend/context over batch.

    Larger batches buy throughput with interactivity; the knee of each curve is where a TPOT limit bites.
    """
    title = "Decode: throughput per GPU against tokens/s per user (labels: batch)"
    d = _ok(df, "decode", ["tokens_per_s", "batch"])
    if d.empty:
        return _empty(title, "no decode points"), "no decode points in this run"
    d = d.copy()
    per_seq = d["tokens_per_s"] / d["batch"]
    if "tokens_per_s_per_seq" in d:
        per_seq = d["tokens_per_s_per_seq"].fillna(per_seq)
    d["per_user"] = per_seq
    tp = d["tp"].fillna(1) if "tp" in d else 1  # a replica of tp GPUs: per-GPU throughput divides by tp
    d["per_gpu"] = d["tokens_per_s"] / tp
    groups = [c for c in ("model", "dtype", "backend", "context") if c in d]
    fig = Figure(figsize=SIZE)
    ax = fig.add_subplot()
    for i, (name, g) in enumerate(d.groupby(groups, dropna=False) if groups else [((), d)]):
        g = g.sort_values("batch")
        name = name if isinstance(name, tuple) else (name,)
        label = " ".join(f"{c}={v:g}" if c == "context" else str(v) for c, v in zip(groups, name, strict=True))
        ax.plot(g["per_user"], g["per_gpu"], "o-", color=f"C{i % 10}", label=label)
        for _, r in g.iterrows():
            ax.annotate(f"{int(r['batch'])}", (r["per_user"], r["per_gpu"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tokens/s per user (1000 / TPOT ms)")
    ax.set_ylabel("output tokens/s per GPU")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    return fig, None


# --- capacity against demand ----------------------------------------------------------------------------------


@dataclass
class DemandSeries:
    label: str
    dates: list[date]
    tokens_per_day: list[float]
    unverified: list[bool] = field(default_factory=list)
    fit: dict | None = None  # tokenfleet.capacity.fleet.growth_fit: ln(tokens/day) = intercept + per_day * ordinal


@dataclass
class FleetLine:
    label: str
    tokens_per_day: float


def capacity_vs_demand(demand: Sequence[DemandSeries], fleets: Sequence[FleetLine],
                       until: date | None = None) -> tuple[Figure, str | None]:
    """Dated demand points with their log-linear fit, and each fleet's daily capacity as a horizontal line."""
    title = "Fleet capacity against demand (tokens/day)"
    if not demand and not fleets:
        return _empty(title, "no fleet and no demand given"), "no fleet or demand to plot"
    fig = Figure(figsize=SIZE)
    ax = fig.add_subplot()
    ax.set_yscale("log")
    all_dates = [d for s in demand for d in s.dates]
    start = min(all_dates) if all_dates else date.today()
    end = until or (max(all_dates) + (max(all_dates) - start) / 2 if all_dates else date.today())
    for i, s in enumerate(demand):
        color = f"C{i}"
        unv = s.unverified or [False] * len(s.dates)
        ok = [(d, v) for d, v, u in zip(s.dates, s.tokens_per_day, unv, strict=True) if not u]
        bad = [(d, v) for d, v, u in zip(s.dates, s.tokens_per_day, unv, strict=True) if u]
        if ok:
            ax.scatter(*zip(*ok, strict=True), color=color, zorder=3, label=f"{s.label} (sourced)")
        if bad:
            ax.scatter(*zip(*bad, strict=True), color=color, marker="x", zorder=3, label=f"{s.label} (unverified)")
        if s.fit:
            xs = [date.fromordinal(int(o)) for o in np.linspace(min(s.dates).toordinal(), end.toordinal(), 100)]
            ys = np.exp(s.fit["intercept"] + s.fit["per_day"] * np.array([x.toordinal() for x in xs], dtype=float))
            growth = math.expm1(s.fit["per_day"] * 365.25 / 12)
            ax.plot(xs, ys, "--", color=color, lw=1, label=f"{s.label} fit: {growth:+.0%}/month")
    for j, f in enumerate(fleets):
        ax.axhline(f.tokens_per_day, color=f"C{(j + len(demand)) % 10}", lw=2,
                   label=f"{f.label}: {f.tokens_per_day:.3g} tokens/day")
    ax.set_xlabel("date")
    ax.set_ylabel("tokens per day")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.autofmt_xdate()
    return fig, None
