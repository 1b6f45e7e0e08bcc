"""Fleet capacity against demand: Σ_g N_g·daily_g, coverage, GPUs needed, power, and the demand growth fit.

Demand is a mix of (model, workload) classes. Each class is routed to the GPU types that can serve it
(`tokenfleet.capacity.routing`: the largest multiple of the mix the fleet serves, each type's time split over the
classes it can hold), so a GPU that cannot hold a model never counts against that model's demand. A row's
`tokens_per_s_per_gpu` is its own rate on the classes it can serve (harmonic mean by share: time per token adds
up, rates do not); its `tokens_per_day` is what the routing gives it; classes it cannot hold are `unservable`.
"""

from __future__ import annotations

import datetime as dt
import functools
import math
from pathlib import Path

import numpy as np
from tokenfleet.capacity.config import Demand, DemandPoint, Fleet, Workload, load_demand, load_fleet
from tokenfleet.capacity.deployment import load_deployment
from tokenfleet.capacity.pools import project_deployment
from tokenfleet.capacity.project import (
    SECONDS_PER_DAY,
    _model,
    _workload,
    auto_tp,
    check_tp,
    efficiency_from_runs,
    project,
    read_runs,
)
from tokenfleet.capacity.routing import route
from tokenfleet.config import ConfigError, known_names, resolve, shown_path
from tokenfleet.results import Run

REPORTED, PRIMARY = "china-reported", "china-nda"  # coverage is always shown against both (DESIGN.md)
# The columns of a capacity table, in the order every view prints them.
CAPACITY_COLUMNS = ["gpu", "count", "tp", "tokens_per_s_per_gpu", "tokens_per_day", "capacity_over_demand",
                    "coverage",
                    "coverage_vs_china_reported", "coverage_vs_china_nda", "gpus_needed_alone", "power_mw",
                    "energy_mwh_per_day", "joules_per_token", "source", "unservable", "ttft_missed", "tpot_missed"]

DAYS_PER_MONTH = 365.25 / 12


# ---- demand -----------------------------------------------------------------------------------------------
def fixed_demand(tokens_per_day: float) -> Demand:
    if not tokens_per_day > 0:
        raise ConfigError("--demand-tokens-per-day", None, f"must be positive, got {tokens_per_day}")
    return Demand(id="custom", description="given on the command line", metric="tokens_per_day", kind="primary",
                  counts="unknown", counts_note="given on the command line",
                  why_differs="a figure given on the command line",
                  points=[DemandPoint(date=dt.date.today(), tokens_per_day=tokens_per_day,
                                      statement="--demand-tokens-per-day", source="command line")])


def growth_fit(d: Demand) -> dict | None:
    """Least-squares line through ln(tokens/day) against date: a = ln value at day 0, b per day."""
    if len(d.points) < 2:
        return None
    t = np.array([p.date.toordinal() for p in d.points], dtype=float)
    y = np.log([p.tokens_per_day for p in d.points])
    b, a = np.polyfit(t, y, 1)
    return {"per_day": float(b), "intercept": float(a),
            "growth_per_month": math.expm1(b * DAYS_PER_MONTH),
            "doubling_months": math.log(2) / (float(b) * DAYS_PER_MONTH) if b > 0 else None,
            "from": f"log-linear fit of {len(d.points)} points {d.points[0].date} .. {d.points[-1].date}"}


def outgrows(fit: dict | None, capacity_per_day: float, peak_factor: float) -> dt.date | None:
    """The date the fitted demand·peak_factor reaches `capacity_per_day` (in the past when already exceeded)."""
    if not fit or fit["per_day"] <= 0 or capacity_per_day <= 0:
        return None
    t = (math.log(capacity_per_day / peak_factor) - fit["intercept"]) / fit["per_day"]
    try:
        return dt.date.fromordinal(int(round(t)))
    except (ValueError, OverflowError):
        return None


def coverage(tokens_per_day: float, d: Demand, pf: float, reported: Demand, primary: Demand) -> dict:
    """The one coverage function: tokens/day against the scenario (raw and × peak factor) and both China figures."""
    return {"capacity_over_demand": tokens_per_day / d.latest.tokens_per_day,
            "coverage": tokens_per_day / (d.latest.tokens_per_day * pf),
            "coverage_vs_china_reported": tokens_per_day / (reported.latest.tokens_per_day * pf),
            "coverage_vs_china_nda": tokens_per_day / (primary.latest.tokens_per_day * pf)}


def outgrown_state(cover: float, on: dt.date | None, today: dt.date | None = None) -> str:
    """Where demand × peak factor stands against the fleet: `already` above it at the latest dated demand
    (coverage `cover` < 1), above it `by today` at the fitted growth, `later` (on the fitted date), or `never`."""
    if cover < 1:
        return "already"
    if on is None:
        return "never"
    return "by today" if on <= (today or dt.date.today()) else "later"


def outgrown_statement(cover: float, on: dt.date | None, today: dt.date | None = None) -> str:
    """The state as one sentence (the summary's `demand_outgrows_fleet`)."""
    return {"already": "already: the latest dated demand × peak factor is above the fleet"
                       + (f" (fitted crossing {on})" if on else ""),
            "by today": f"by today: at the fitted growth, demand × peak factor passed the fleet on {on}",
            "later": f"on {on}, at the fitted growth",
            "never": "not at the fitted growth (no fit, or demand not growing)"}[outgrown_state(cover, on, today)]


def demand_of(name: str | Demand | None, tokens_per_day: float | None = None) -> Demand:
    if tokens_per_day is not None:
        return fixed_demand(tokens_per_day)
    if isinstance(name, Demand):
        return name
    return load_demand(name or REPORTED)


# ---- fleet ------------------------------------------------------------------------------------------------
NO_LIMIT_MS = 1e9  # --offline: no TTFT/TPOT limit (MLPerf Offline, trtllm-bench at infinite request rate)


def by_path(name: str, fleet_path: Path | str | None) -> str:
    """A fleet's reference to a file by path: relative to the fleet file's folder when it is not found as given."""
    p = Path(name)
    if p.suffix not in (".yaml", ".yml") or p.is_file() or fleet_path is None:
        return name
    near = Path(fleet_path).parent / p  # an absolute p stays p
    return str(near) if near.is_file() else name


def check_refs(fleet: Fleet, path: Path | str | None) -> Fleet:
    """Every gpu/model/workload/deployment a fleet names exists (names, or files by path: relative to the fleet file);
    otherwise ConfigError naming the fleet file and field. Returns the fleet with those paths resolved."""
    fleet = fleet.model_copy(update={
        "workloads": [w.model_copy(update={"workload": by_path(w.workload, path)}) for w in fleet.workloads],
        "deployments": [d.model_copy(update={"deployment": by_path(d.deployment, path)}) for d in fleet.deployments]})
    for i, d in enumerate(fleet.deployments):
        if d.model not in {m.model for m in fleet.models}:
            raise ConfigError(path, f"deployments.{i}.model", f"{d.model!r} is not one of the fleet's models")
        try:
            load_deployment(d.deployment)
        except ConfigError as e:
            raise ConfigError(path, f"deployments.{i}.deployment", str(e)) from None
    for key, kind, items in (("gpus", "hardware", [g.gpu for g in fleet.gpus]),
                             ("models", "models", [m.model for m in fleet.models]),
                             ("workloads", "workloads", [w.workload for w in fleet.workloads])):
        known = known_names(kind)
        for i, name in enumerate(items):
            if name not in known and not (kind == "workloads" and Path(name).is_file()):
                attr = {"gpus": "gpu", "models": "model", "workloads": "workload"}[key]
                raise ConfigError(path, f"{key}.{i}.{attr}", f"unknown {attr} {name!r}; known: {', '.join(known)}")
    for i, g in enumerate(fleet.gpus):
        for ms in fleet.models if g.tp else []:
            check_tp(_model(ms.model), g.tp, path, f"gpus.{i}.tp")
    return fleet


def fleet_of(fleet: str | Fleet) -> tuple[Fleet, str | None]:
    if isinstance(fleet, Fleet):
        return fleet, None
    path = resolve("fleets", fleet)
    f = check_refs(load_fleet(str(path)), path)
    return f, str(path)


def deployment_for(fleet: Fleet, model: str, gpu: str) -> str | None:
    """The deployment the fleet names for `model` on `gpu` (None: a tensor-parallel replica)."""
    return next((d.deployment for d in fleet.deployments if d.model == model and (d.gpus is None or gpu in d.gpus)),
                None)


def workload_of(name: str, offline: bool = False) -> Workload:
    w = _workload(name)
    return w.model_copy(update={"tpot_ms": NO_LIMIT_MS, "ttft_ms": NO_LIMIT_MS}) if offline else w


def classes_of(fleet: Fleet, workloads: list[tuple[str, float]] | None = None) -> list[tuple[str, str, float]]:
    """(model, workload, share of demand tokens) of every class of the fleet's mix."""
    wls = workloads or [(w.workload, w.share) for w in fleet.workloads]
    return [(ms.model, wl, ms.share * ws) for ms in fleet.models for wl, ws in wls]


def deployment_of(fleet: Fleet) -> dict:
    return dict(kv_dtype=fleet.kv_dtype, batch_cap=fleet.batch_cap, max_batched_tokens=fleet.max_batched_tokens)


def gpu_mix(gpu: str, fleet: Fleet, tp: int | None, runs: list[Run], dtype: str | None = None,
            workloads: list[tuple[str, float]] | None = None, offline: bool = False) -> dict:
    """One GPU type on every class of the mix: per-class results, and its own rate on the classes it can serve.
    A model the fleet names a deployment for is served as that deployment says (`pools.project_deployment`)."""
    dtypes = {ms.model: dtype or ms.dtype for ms in fleet.models}
    classes = []
    for model, wl, share in classes_of(fleet, workloads):
        w = workload_of(wl, offline)
        dep = deployment_for(fleet, model, gpu)
        if dep:
            r = project_deployment(model, gpu, w, dep, dtypes[model], runs=runs, weight_only_fp8=True,
                                   batch=fleet.batch_cap, max_batched_tokens=fleet.max_batched_tokens,
                                   kv_dtype=fleet.kv_dtype)
            classes.append((share, r))
            continue
        kw = dict(runs=runs, weight_only_fp8=True, **deployment_of(fleet))  # fleets: A100/910B serve fp8 weight-only
        r = project(model, gpu, w, dtypes[model], tp=tp, **kw) if tp else auto_tp(model, gpu, w, dtypes[model], **kw)
        classes.append((share, r))
    ok = [(s, r) for s, r in classes if r["fits"] and r["tokens_per_s_per_gpu"] > 0]
    share = sum(s for s, _ in ok)
    rate = share / sum(s / r["tokens_per_s_per_gpu"] for s, r in ok) if ok else 0.0
    sources = {r["source"] for _, r in ok}
    return {
        "rate": rate, "classes": classes,
        "unservable": sorted({f"{r['model']}/{r['workload']}" for s, r in classes if not r["fits"]}),
        "tp": ",".join(sorted({f"{r['model']}:{r['tp']}" for _, r in ok})),
        "source": sources.pop() if len(sources) == 1 else ("mixed" if sources else "projected"),
        "ttft_missed": sorted({f"{r['model']}/{r['workload']}" for _, r in ok if not r["ttft_ok"]}),
        "tpot_missed": sorted({f"{r['model']}/{r['workload']}" for _, r in ok if not r["tpot_ok"]}),
        "extrapolated": sorted({f"{r['model']}/{r['workload']}" for _, r in ok if r.get("extrapolated")}),
        "power_w": next((r["power_w_per_gpu"] for _, r in ok if r.get("power_w_per_gpu")), None),
        # what the classes' step times rest on (measured, calibrated, family default, global default)
        "efficiency_source": ", ".join(sorted({r["efficiency_source"] for _, r in ok if r.get("efficiency_source")})),
        "efficiency": next((r["efficiency"] for _, r in ok if r.get("efficiency")), None),
    }


def routed(mixes: list[dict], counts: list[int]) -> tuple[float, list[float], list[str]]:
    """Tokens/s of the demand mix the fleet serves, each GPU type's part of it, and the classes no GPU serves."""
    rates = np.array([[r["tokens_per_s_per_gpu"] if r["fits"] else 0.0 for _, r in mx["classes"]] for mx in mixes])
    names = [f"{r['model']}/{r['workload']}" for _, r in mixes[0]["classes"]]
    nobody = [n for n, col in zip(names, rates.T, strict=True) if not col.any()]
    # A class no GPU type can hold is named and left out of the mix (its demand is unserved, not zero-rated).
    shares = np.array([s if col.any() else 0.0 for (s, _), col in zip(mixes[0]["classes"], rates.T, strict=True)])
    if not shares.any():
        return 0.0, [0.0] * len(mixes), nobody
    lam, served = route(rates, np.array(counts, dtype=float), shares / shares.sum())
    return lam, list(served.sum(axis=1)), nobody


def capacity_table(fleet: str | Fleet, demand: str | Demand | None = None,
                   runs: list[Run | str | Path] | None = None, utilization: float | None = None,
                   peak_factor: float | None = None,
                   demand_tokens_per_day: float | None = None, dtype: str | None = None,
                   workloads: list[tuple[str, float]] | None = None, offline: bool = False) -> tuple[list[dict], dict]:
    """Rows per accelerator type plus a `total` row, and a summary (demand, growth, coverage vs 14T and 140T).
    `dtype` and `workloads` override the fleet's (used by the sweep)."""
    f, path = fleet_of(fleet)
    u = f.utilization if utilization is None else utilization
    pf = f.peak_factor if peak_factor is None else peak_factor
    if not 0 < u <= 1:
        raise ConfigError(path or "--utilization", "utilization", f"must be in (0, 1], got {u}")
    if pf < 1:
        raise ConfigError(path or "--peak-factor", "peak_factor", f"must be ≥ 1, got {pf}")
    d = demand_of(demand, demand_tokens_per_day)
    reported, primary = load_demand(REPORTED), load_demand(PRIMARY)
    runs = read_runs(runs)
    eff = efficiency_from_runs(runs)
    need = d.latest.tokens_per_day * pf
    mixes = [gpu_mix(g.gpu, f, g.tp, runs, dtype, workloads, offline) for g in f.gpus]
    served_per_s, parts, nobody = routed(mixes, [g.count for g in f.gpus])
    # low / high: the same routing at each type's published low / high count (its count where none is published)
    span = {k: routed(mixes, [getattr(g.count_range, k) if g.count_range else g.count for g in f.gpus])[0]
            * SECONDS_PER_DAY * u for k in ("low", "high")}
    cov = functools.partial(coverage, d=d, pf=pf, reported=reported, primary=primary)
    rows = [_gpu_row(g, mix, part, f.pue, u, need, cov) for g, mix, part in zip(f.gpus, mixes, parts, strict=True)]
    cap = served_per_s * SECONDS_PER_DAY * u
    rows.append(_total_row(rows, sum(g.count for g in f.gpus), cap, nobody, cov))
    counted = [w for w, _ in workloads] if workloads else [w.workload for w in f.workloads]
    summary = {"fleet": f.id, **_summary(d, cap, u, pf, reported, primary, cov), "pue": f.pue,
               "counted_tokens": "; ".join(f"{w}: {_count_of(w)}" for w in counted),
               "efficiency": eff.to_dict(), "fleet_file": shown_path(path) if path else None,
               "assumptions": dict(f.assumptions),
               "deployments": {d.model: d.deployment for d in f.deployments}, "offline": offline,
               "capacity_low_tokens_per_day": span["low"], "capacity_high_tokens_per_day": span["high"],
               "counts_with_range": [g.gpu for g in f.gpus if g.count_range],
               "gpus_low": sum(g.count_range.low if g.count_range else g.count for g in f.gpus),
               "gpus_high": sum(g.count_range.high if g.count_range else g.count for g in f.gpus)}
    return rows, summary


def _gpu_row(g, mix: dict, part: float, pue: float, u: float, need: float, cov) -> dict:
    """One accelerator type's row: what routing gives it, what it would do alone, its power."""
    alone_gpu = mix["rate"] * SECONDS_PER_DAY * u  # one GPU of this type serving the classes it can hold
    daily = part * SECONDS_PER_DAY * u  # what routing gives this type, serving only classes it can hold
    rate = part / g.count if g.count else 0.0
    power = mix["power_w"]
    mw = g.count * power * pue / 1e6 if power else None
    return {
        "gpu": g.gpu, "count": g.count, "count_source": g.source or f"assumption: {g.reason}", "tp": mix["tp"],
        "count_low": g.count_range.low if g.count_range else None,
        "count_high": g.count_range.high if g.count_range else None,
        "tokens_per_s_per_gpu": rate, "tokens_per_day_per_gpu": rate * SECONDS_PER_DAY * u,
        "alone_tokens_per_s_per_gpu": mix["rate"], "tokens_per_day": daily, **cov(daily),
        "gpus_needed_alone": math.ceil(need / alone_gpu) if alone_gpu else None,
        "power_mw": mw, "energy_mwh_per_day": mw * 24 if mw is not None else None,
        # Board power at TDP all day (an upper bound) × PUE, per counted token.
        "joules_per_token": power * pue / (rate * u) if power and rate else None,
        "source": mix["source"], "efficiency_source": mix["efficiency_source"],
        "e_c": (mix["efficiency"] or {}).get("compute"), "e_m": (mix["efficiency"] or {}).get("memory"),
        "unservable": ", ".join(mix["unservable"]),
        "ttft_missed": ", ".join(mix["ttft_missed"]), "tpot_missed": ", ".join(mix["tpot_missed"]),
        "extrapolated": ", ".join(mix["extrapolated"]),  # measured classes taken beyond the run's grid
    }


def _total_row(rows: list[dict], count: int, cap: float, nobody: list[str], cov) -> dict:
    srcs = {r["source"] for r in rows}
    mws = [r["power_mw"] for r in rows if r["power_mw"] is not None]
    total_mw = sum(mws) if mws else None
    return {
        "gpu": "total", "count": count, "tokens_per_day": cap, **cov(cap),
        "power_mw": total_mw, "energy_mwh_per_day": total_mw * 24 if total_mw is not None else None,
        "joules_per_token": total_mw * 1e6 * SECONDS_PER_DAY / cap if total_mw and cap else None,
        "source": srcs.pop() if len(srcs) == 1 else "mixed", "unservable": ", ".join(nobody),
    }


def _summary(d: Demand, cap: float, u: float, pf: float, reported: Demand, primary: Demand, cov) -> dict:
    """Demand, its growth, coverage of it and of both China figures, and when each outgrows the fleet."""
    fit = growth_fit(d)
    return {
        "demand": d.id, "demand_tokens_per_day": d.latest.tokens_per_day,
        "demand_date": d.latest.date, "demand_counts": d.counts, "demand_counts_note": d.counts_note,
        "capacity_tokens_per_day": cap, "utilization": u, "peak_factor": pf,
        **{k: v for k, v in cov(cap).items() if k != "capacity_over_demand"},
        "china_reported_tokens_per_day": reported.latest.tokens_per_day,
        "china_nda_tokens_per_day": primary.latest.tokens_per_day,
        "why_differs": reported.why_differs if d.id in (REPORTED, PRIMARY, "custom") else d.why_differs,
        "growth_per_month": fit["growth_per_month"] if fit else None,
        "doubling_months": fit["doubling_months"] if fit else None,
        "growth_fit": fit["from"] if fit else "one point: no growth fit",
        "outgrows_fleet_on": outgrows(fit, cap, pf),
        "demand_outgrows_fleet": outgrown_statement(cap / (d.latest.tokens_per_day * pf), outgrows(fit, cap, pf)),
        "outgrows_fleet_on_china_nda": outgrows(growth_fit(primary), cap, pf),
        "outgrows_fleet_on_china_reported": outgrows(growth_fit(reported), cap, pf),
    }


def _count_of(workload: str) -> str:
    return _workload(workload).count


SWEEP_UTILIZATION = (0.3, 0.5, 0.7, 0.9, 1.0)


def sweep(fleet: str | Fleet, demand: str | Demand | None = None, runs: list[Run | str | Path] | None = None,
          peak_factor: float | None = None, demand_tokens_per_day: float | None = None) -> list[dict]:
    """Sensitivity of fleet capacity to utilization, workload (each alone) and dtype (all models in one dtype)."""
    f, _ = fleet_of(fleet)
    runs = read_runs(runs)  # once, not per case
    base = dict(demand=demand, runs=runs, peak_factor=peak_factor, demand_tokens_per_day=demand_tokens_per_day)
    cases = [("baseline", "fleet file", {})]
    cases += [("utilization", u, {"utilization": u}) for u in SWEEP_UTILIZATION]
    cases += [("workload", w.workload, {"workloads": [(w.workload, 1.0)]}) for w in f.workloads]
    cases += [("dtype", dt_, {"dtype": dt_}) for dt_ in ("bf16", "fp8")]
    rows = []
    for var, value, kw in cases:
        _, s = capacity_table(f, **base, **kw)
        rows.append({"variable": var, "value": value, "capacity_tokens_per_day": s["capacity_tokens_per_day"],
                     "coverage": s["coverage"], "coverage_vs_china_reported": s["coverage_vs_china_reported"],
                     "coverage_vs_china_nda": s["coverage_vs_china_nda"], "outgrows_fleet_on": s["outgrows_fleet_on"]})
    return rows
