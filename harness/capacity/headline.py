"""The planner's answer in a few lines: how much of the reported 14T and the primary 140T tokens/day a fleet serves,
and what it would take, built from `fleet.capacity_table`'s rows and summary (no new model, only arithmetic on them).

`headline()` returns a dict (every figure the text shows, for `--format json`); `headline_lines()` the text that
`tokenfleet capacity` and `make run` print. GPUs needed for a demand D at peak factor pf:
  of one type alone:             ceil(D·pf / (alone_tokens_per_s_per_gpu · 86,400 · utilization))
  of the fleet's own mix scaled: ceil(count_g · D·pf / capacity) per type (the same proportions, scaled up or down;
                                 the routed capacity is linear in the counts, so the scaled mix serves D·pf)
"""

from __future__ import annotations

import datetime as dt
import math
import textwrap

from tokenfleet.capacity.fleet import outgrown_state, outgrown_statement
from tokenfleet.capacity.project import SECONDS_PER_DAY
from tokenfleet.results import Run

SOURCES = ("measured", "calibrated", "projected")  # what a row's figure rests on, most direct first


def _per_type(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["gpu"] != "total"]


def _demand(rows: list[dict], s: dict, key: str, label: str, today: dt.date | None) -> dict:
    """One demand figure against the fleet: coverage, GPUs needed (alone per type; the mix scaled), outgrow date."""
    pf, cap = s["peak_factor"], s["capacity_tokens_per_day"]
    demand = s[f"{key}_tokens_per_day"]
    need = demand * pf
    scale = need / cap if cap else None
    per_type = _per_type(rows)
    mix = {r["gpu"]: math.ceil(r["count"] * scale) for r in per_type} if scale else {}
    on = s.get(f"outgrows_fleet_on_{key}")
    on = dt.date.fromisoformat(on) if isinstance(on, str) else on
    return {
        "demand": key.replace("_", "-"), "label": label, "tokens_per_day": demand,
        "peak_tokens_per_day": need, "coverage": cap / need, "capacity_over_demand": cap / demand,
        "mix_scale": scale, "gpus_needed_mix": sum(mix.values()) if mix else None, "gpus_needed_mix_by_type": mix,
        "gpus_needed_alone": {r["gpu"]: (math.ceil(need / a) if (a := _alone_per_day(r, s)) else None)
                              for r in per_type},
        "outgrows_fleet_on": on, "outgrown": outgrown_state(cap / need, on, today),
        "demand_outgrows_fleet": outgrown_statement(cap / need, on, today),
    }


def _alone_per_day(row: dict, s: dict) -> float | None:
    """Tokens/day one GPU of this type serves on its own (the classes it can hold), not its routed share."""
    alone = row.get("alone_tokens_per_s_per_gpu")
    if alone is None:
        return row.get("tokens_per_day_per_gpu")
    return alone * SECONDS_PER_DAY * s["utilization"]


def _measured_on(runs: list[Run] | None, efficiency: dict) -> dict:
    devices = [{"run": r.run_id, "device": r.device,
                "kind": ((r.manifest.get("environment") or {}).get("device") or {}).get("kind"),
                "datasheet": r.hardware_id} for r in runs or []]
    if not devices:
        note = "no run given: GPU figures are projected with default efficiencies"
    elif all(d["kind"] == "cpu" or not d["datasheet"] for d in devices):
        note = "a CPU run gives no GPU efficiencies: GPU figures are projected with default efficiencies"
    else:
        note = f"GPU efficiencies from {efficiency.get('from')}"
    return {"runs": devices, "note": note}


def headline(rows: list[dict], summary: dict, runs: list[Run] | None = None, today: dt.date | None = None) -> dict:
    """The headline of one capacity_table result; `runs` are the runs it was fed (for what this device measured)."""
    s = summary
    per_type = _per_type(rows)
    sources = {k: [r["gpu"] for r in per_type if r.get("source") == k] for k in SOURCES}
    sources.update({k: [r["gpu"] for r in per_type if r.get("source") == k]
                    for k in {r.get("source") for r in per_type} - set(SOURCES) if k})
    eff = s.get("efficiency") or {}
    return {
        "fleet": s["fleet"], "gpus": sum(r["count"] for r in per_type),
        "capacity_tokens_per_day": s["capacity_tokens_per_day"],
        "capacity_low_tokens_per_day": s.get("capacity_low_tokens_per_day"),
        "capacity_high_tokens_per_day": s.get("capacity_high_tokens_per_day"),
        "gpus_low": s.get("gpus_low"), "gpus_high": s.get("gpus_high"),
        "counts_with_range": s.get("counts_with_range") or [],
        "counts_placeholder": [r["gpu"] for r in per_type if str(r.get("count_source")).startswith("assumption")],
        "utilization": s["utilization"], "peak_factor": s["peak_factor"],
        "measured_on": _measured_on(runs, eff),
        "efficiency": {"compute": eff.get("compute"), "memory": eff.get("memory"), "from": eff.get("from")},
        # per type: what its step times rest on (measured, calibrated, family default, global default) and its e_c, e_m
        "efficiencies": {r["gpu"]: {"kind": r.get("efficiency_source"), "compute": r.get("e_c"),
                                    "memory": r.get("e_m")} for r in per_type},
        "demands": [_demand(rows, s, "china_reported", "reported", today),
                    _demand(rows, s, "china_nda", "primary", today)],
        "sources": sources,
    }


# ---- text -------------------------------------------------------------------------------------------------
def tokens(x: float) -> str:
    """Tokens/day as a planner reads them: 39.1T (T = 10^12)."""
    return f"{x / 1e12:.3g}T" if x >= 1e11 else f"{x / 1e9:.3g}B" if x >= 1e8 else f"{x:,.0f}"


def _scale(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _count(n: int | None) -> str:
    return "n/a" if n is None else f"{n:,}"


def headline_lines(h: dict) -> list[str]:
    """The headline as printed (a few lines, before any table); every figure is also in `headline()`'s dict."""
    eff = h["efficiency"]
    out = [f"{h['fleet']}: {h['gpus']:,} GPUs serve {tokens(h['capacity_tokens_per_day'])} tokens/day "
           f"(T = 10^12 = 万亿; utilization {h['utilization']:g}, peak factor {h['peak_factor']:g})",
           *_device_lines(h["measured_on"]),
           *_count_lines(h),
           f"  {'demand × peak':<20}{'coverage':>9}  {'GPUs needed, this mix scaled':>30}  outgrows the fleet"]
    for d in h["demands"]:
        when = {"later": f"on {d['outgrows_fleet_on']}", "never": "not at the fitted growth"}.get(
            d["outgrown"], f"{d['outgrown']} (fitted crossing {d['outgrows_fleet_on'] or 'n/a'})")
        need = f"{_count(d['gpus_needed_mix'])} (×{_scale(d['mix_scale'])})" if d["mix_scale"] else "n/a"
        out.append(f"  {d['label'] + ' ' + tokens(d['tokens_per_day']) + '/day':<20}{d['coverage']:>9.3g}  "
                   f"{need:>30}  {when}")
    lab = " / ".join(tokens(d["tokens_per_day"]) for d in h["demands"])
    alone = [f"{g} {_count(a)} / {_count(b)}" for (g, a), b in
             zip(h["demands"][0]["gpus_needed_alone"].items(), h["demands"][1]["gpus_needed_alone"].values(),
                 strict=True)]
    out += _wrap(f"  one type alone for {lab}:", alone)
    out.append("  GPUs needed do not depend on the fleet's counts (one type alone: its rate per GPU only; the mix "
               "scaled: only their proportions)")
    src = "; ".join(f"{k}: {', '.join(v) or 'none'}" for k, v in h["sources"].items())
    effs = h.get("efficiencies")
    if not effs:  # a headline dict without per-type efficiencies: the summary's
        out.append(f"  figures: {src} (e_c {eff['compute']:.2f}, e_m {eff['memory']:.2f})")
        return out
    out.append(f"  figures: {src} (e_c/e_m {'; '.join(_efficiency_items(effs))})")
    return out


def _efficiency_items(effs: dict) -> list[str]:
    """Per kind of efficiency (global default, family default, calibrated, measured), its e_c/e_m: once where its
    types share them (`global default 0.50/0.70`), else per type (`family default ascend-910b 0.55/0.65, ...`)."""
    by_kind: dict[str, list] = {}
    for gpu, e in effs.items():
        by_kind.setdefault(e["kind"] or "none", []).append((gpu, e["compute"], e["memory"]))
    items = []
    for kind, gs in by_kind.items():
        vals = {(c, m) for _, c, m in gs}
        if len(vals) == 1 and None not in (one := next(iter(vals))) and kind == "global default":
            items.append(f"{kind} {one[0]:.2f}/{one[1]:.2f}")
        else:
            items.append(f"{kind} " + ", ".join(g if c is None else f"{g} {c:.2f}/{m:.2f}" for g, c, m in gs))
    return items


def _wrap(first: str, items: list[str], width: int = 110) -> list[str]:
    lines, cur = [], first
    for it in items:
        if len(cur) + len(it) + 2 > width and cur.strip():
            lines.append(cur + ";")
            cur = "    " + it
        else:
            cur = f"{cur} {it}" if cur.endswith(":") else f"{cur}; {it}" if cur.strip() else cur + it
    return lines + [cur]


def _count_lines(h: dict) -> list[str]:
    """Low / central / high capacity where counts carry published ranges; which counts are placeholders."""
    out = []
    if h.get("counts_with_range"):
        out.append(f"  counts low / central / high: {h['gpus_low']:,} / {h['gpus']:,} / {h['gpus_high']:,} GPUs serve "
                   f"{tokens(h['capacity_low_tokens_per_day'])} / {tokens(h['capacity_tokens_per_day'])} / "
                   f"{tokens(h['capacity_high_tokens_per_day'])} tokens/day (published ranges: "
                   f"{', '.join(h['counts_with_range'])})")
    if h.get("counts_placeholder"):
        out.append(f"  placeholder counts (no published estimate): {', '.join(h['counts_placeholder'])}")
    return out


def _device_lines(m: dict) -> list[str]:
    runs = ", ".join(f"{r['device']} ({r['kind']}, run {r['run']})" for r in m["runs"]) or "no run"
    return (textwrap.wrap(f"measured on: {runs}", 110, initial_indent="  ", subsequent_indent="    ")
            + textwrap.wrap(m["note"], 110, initial_indent="    ", subsequent_indent="    "))
