"""Two runs side by side: each point of B against the same point of A, as ratios B/A with both sides' noise.

Points match on their identity (`tokenfleet.results.point_key`: kind, op or model, backend, dtype and shape; the run
id, device and every measurement are left out), so runs from different devices compare too, labelled as such.
A change is claimed only when it is outside the noise: where both points kept their samples, from a seeded
bootstrap interval of the ratio of medians (scipy.stats.bootstrap; `faster` when the interval lies below 1, `slower`
above; --fail-over gates on the interval's lower end clearing the threshold); for older runs without samples, when the
ratio is further from 1 than the noisier side's spread (p80-p20)/median.

A point's samples see the noise within its own few tenths of a second, not what moves between runs (a shared VM's
memory bus, its clocks, another process's placement: small CPU kernel points up to 1.60x apart, their samples tight,
between quiet runs of one commit on the 2-core development VM, 2026-12-04; results/compare/). Each run measures that
of itself: its ceilings probed at its start and again at its end (`ceiling_drift`, per ceiling: `drifts`), a drift
taken as how far the run's numbers may sit from the machine's usual; the two runs' bounds compound into a point's
between-run noise floor ((1 + fa)(1 + fb) - 1; `noise_floor` and `floor_from` in its row). Which drift (FLOOR_RULES,
`--floor`): by default (`largest`) each run's largest, for every point; under `ceiling` the drift of the ceiling the
point is judged against (its `ceiling_name` in both runs: copy, read, matmul.DT or matvec.DT; a ceiling probe: its
own), each run's largest for a point without one or whose ceiling a run did not re-probe. On the 2-core VM the copy
and read probes drifted 35-48% within quiet runs while the matmul probes drifted under 6%, so `ceiling` judges a
matmul-bound point within about ±7%; but small kernel points moved up to 1.57x between two quiet runs whose ceilings
drifted under 10% (2026-12-05), which is why it is not the default. A whole interval beyond 1 but inside
[1/(1+floor), 1+floor] is `same`, said so in the point's note with the floor's source; the header lists each floor
the points used and --fail-over warns for the classes of points whose floor is wider than its threshold. Runs without
a usable re-probe (older runs, suites without ceilings) are judged on their samples alone, and the header says so.

A busy or different machine moves every time, so where both runs carry the ceiling a point is judged against (its
`ceiling_name`: copy, read, matmul or matvec of its dtype), the point is judged on its efficiency, each run's point
against its own run's ceiling: the time ratio times the ceilings' ratio B/A (`rel_ratio`, its interval widened by
the two ceilings' own noise), with the raw time ratio and its verdict beside (`time_ratio`, `changed_raw`); a change
is claimed (and gated) only where both judgments agree, since each alone moves with the machine or the probe. A ceiling
that differs between the runs beyond its noise and by more than MACHINE_LIMIT is reported: the machines differed.

On a CPU each point carries the machine's speed around it (`load.speed_us`, `load.speed_during_us`:
tokenfleet.measure.load's speed probe, slowed when the host gives another guest a share of our cores; on the 2-vCPU
VM a state that lasts seconds to minutes while the guest sees nothing:
results/compare/cpu-amd-epyc-2core-2026-12-05-speed.md). Two points whose probes read more than SPEED_LIMIT apart
were measured on machines that differed for them: where they still differ beyond their noise floor they are
`machine` (`speed_ratio` B/A beside), not judged and not gated, and the summary and --fail-over say how many; where
they agree they are `same` as usual.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import stats
from tokenfleet.config import ConfigError
from tokenfleet.measure.load import SPEED_LIMIT, speed_reading
from tokenfleet.results import USABLE, Run, flat_ceilings, load_run, manifest_json, resolve_run

THROUGHPUT = ("tokens_per_s", "tflops", "gbps", "value")  # first one both sides have; all are higher-is-better
NAME_FIELDS = ("kind", "op", "model", "backend", "dtype")
KIND_ORDER = {"ceiling": 0, "kernel": 1, "prefill": 2, "decode": 3}
COLUMNS = ["kind", "name", "backend", "dtype", "shape", "status_a", "status_b", "median_ms_a", "median_ms_b",
           "time_ratio", "ratio_lo", "ratio_hi", "changed_raw", "rel_ratio", "rel_lo", "rel_hi", "throughput_ratio",
           "spread_a", "spread_b", "noise_floor", "floor_from", "speed_ratio", "changed", "method", "note"]
RESAMPLES = 2000  # bootstrap resamples per point pair
CONFIDENCE = 0.95  # of the interval on the ratio of medians
MIN_SAMPLES = 5  # fewer kept samples on either side: the spread rule instead
SEED = 0  # the same two runs always give the same intervals
FLOOR_NOTE = "within this machine's between-run noise"  # a point judged `same` because of the noise floor
LARGEST = "largest"  # `floor_from` of a point judged with each run's largest drift (no ceiling of its own)
MACHINE = "machine"  # `changed` of a pair measured at CPU speeds further apart than SPEED_LIMIT: not judged
# Ceilings further apart than this (and beyond their noise): the machines differed. The same limit as a ceiling's
# drift within one run (tokenfleet.measure.parts.ceilings.DRIFT_LIMIT; tests/test_compare.py holds them equal).
MACHINE_LIMIT = 0.05
# How a point's between-run floor is chosen. `largest` (the default): each run's largest ceiling drift, for every
# point. `ceiling`: the drift of the ceiling the point is judged against. Two quiet ci-cpu runs of one commit on the
# 2-core VM (2026-12-05, results/compare/cpu-amd-epyc-2core-2026-12-05-floors.md): the matmul ceilings drifted 2-5%
# while small gemm and moe points moved 1.26-1.57x with tight samples, so under `ceiling` the pair failed
# --fail-over 10 on four points of one commit; a ceiling's drift does not bound a small kernel's between-run noise
# there. `ceiling` is for machines whose points move with their ceilings (to be shown on a GPU).
FLOOR_RULES = ("largest", "ceiling")


@dataclass
class Comparison:
    a: Run
    b: Run
    rows: list[dict] = field(default_factory=list)
    ceilings: dict[str, dict] = field(default_factory=dict)  # name -> ratio B/A, its interval, differed
    floor: float = 0.0  # the largest between-run noise floor: both runs' largest drifts, compounded
    floors: dict[str, float | None] = field(default_factory=dict)  # "A"/"B" -> each run's largest (None: not measured)
    drifts: dict[str, dict[str, float]] = field(default_factory=dict)  # "A"/"B" -> each ceiling's drift in that run
    floor_rule: str = "largest"  # FLOOR_RULES: each run's largest drift for every point, or the point's own ceiling's

    def floor_of(self, name: str | None) -> tuple[float, str]:
        """The floor of a point judged against ceiling `name` (None: none), and where it came from (`point_floor`);
        under the `largest` rule every point takes each run's largest drift."""
        return point_floor(name if self.floor_rule == "ceiling" else None, self.drifts["A"], self.drifts["B"])

    def floor_classes(self) -> dict[str, float]:
        """Each floor the judged points used ({ceiling name or LARGEST: floor}), largest first."""
        got = {r["floor_from"]: r["noise_floor"] for r in self.rows if r["floor_from"] is not None}
        return dict(sorted(got.items(), key=lambda kv: (-kv[1], kv[0])))

    def blind(self, pct: float) -> dict[str, float]:
        """The floors wider than `pct` percent among the points --fail-over gates (not ceilings): a slowdown of
        those points under their floor cannot be told from the machine's noise."""
        got = {r["floor_from"]: r["noise_floor"] for r in self.rows
               if r["floor_from"] is not None and r["kind"] != "ceiling" and r["noise_floor"] * 100 > pct}
        return dict(sorted(got.items(), key=lambda kv: (-kv[1], kv[0])))

    @property
    def machines_differed(self) -> list[str]:
        """The ceilings that differ beyond their noise and by more than MACHINE_LIMIT, as 'name xRATIO'."""
        return [f"{k} x{c['ratio']:.3f}" for k, c in self.ceilings.items() if c["differed"]]

    @property
    def cross_device(self) -> bool:
        return self.a.device != self.b.device

    @property
    def unjudged(self) -> list[dict]:
        """The pairs measured at CPU speeds more than SPEED_LIMIT apart that moved beyond their floor (`machine`)."""
        return [r for r in self.rows if r["changed"] == MACHINE]

    def header(self) -> str:
        line = f"A: {self.a.run_id} ({self.a.device})  vs  B: {self.b.run_id} ({self.b.device}); ratios are B/A"
        if self.cross_device:
            line += "\ncross-device comparison: the ratios compare devices, not code changes"
        if self.machines_differed:
            line += ("\nthe machines differed: ceilings B/A " + ", ".join(self.machines_differed) + " beyond their "
                     "noise; a change is claimed where a point's raw time and its time against its own run's "
                     "ceiling (rel_ratio) agree")
        if self.unjudged:
            line += "\n" + speed_text(self.unjudged)
        return line + "\n" + floor_text(self.floors, self.floor, self.floor_classes(), self.floor_rule)

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for r in self.rows:
            counts[r["changed"]] = counts.get(r["changed"], 0) + 1
        text = "compared: " + (", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "no points")
        rel = sum(r.get("rel_ratio") is not None for r in self.rows)
        if rel:
            text += f" ({rel} judged against each run's own ceilings)"
        floored: dict[str, int] = {}
        for r in self.rows:
            if r["note"] and r["note"].startswith(FLOOR_NOTE):
                floored[r["floor_from"]] = floored.get(r["floor_from"], 0) + 1
        if floored:
            per = ", ".join(f"{floored[k]} by {floor_label(k)} ±{f:.0%}" for k, f in self.floor_classes().items()
                            if k in floored)
            text += f"; {sum(floored.values())} same only within this machine's between-run noise ({per})"
        if self.machines_differed:
            text += "; the machines differed: " + ", ".join(self.machines_differed)
        if self.unjudged:
            text += f"; {len(self.unjudged)} not judged: the CPU ran at different speeds for them (`{MACHINE}`)"
        return text

    def regressions(self, pct: float) -> list[dict]:
        """Points slower beyond their noise by more than `pct` percent (with samples: the interval's lower end is
        above 1 + pct/100; against each run's own ceiling where both carry it), points ok in A that fail in B, and
        points either run measured on a shared machine (`contended`: unjudged, so not passed).
        A slower ceiling is the machine, not the code: it is reported (`machines_differed`), not gated."""
        def over(r):
            rel = r.get("rel_ratio") is not None
            if r.get("method") == "bootstrap":  # both judgments clear the threshold (see _relative)
                slow = min(r["rel_lo"], r["ratio_lo"]) if rel else r["ratio_lo"]
            else:
                slow = min(r["rel_ratio"], r["time_ratio"]) if rel else r["time_ratio"]
            return slow is not None and (slow - 1) * 100 > pct

        return [r for r in self.rows if r["changed"] in ("failed", "contended")
                or (r["changed"] == "slower" and r["kind"] != "ceiling" and over(r))]


def _median_ratio(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.median(b, axis=axis) / np.median(a, axis=axis)


def median_ratio_interval(a: list[float], b: list[float], resamples: int = RESAMPLES,
                          confidence: float = CONFIDENCE, seed: int = SEED) -> tuple[float, float]:
    """A percentile bootstrap interval of median(b) / median(a), the two sample sets resampled independently with
    replacement (scipy.stats.bootstrap, seeded: the same samples give the same interval; vectorized, as scipy infers
    from the statistic's `axis`)."""
    res = stats.bootstrap((np.asarray(a), np.asarray(b)), _median_ratio, n_resamples=resamples,
                          confidence_level=confidence, method="percentile", random_state=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def drifts(manifest: dict) -> dict[str, float]:
    """The between-run noise a run measured of its machine, per ceiling: each ceiling's move between the run's start
    and its end-of-run re-probe (`ceiling_drift.ratios`, end/start), as a relative change (ratio r: max(r, 1/r) - 1).
    Empty where the run has no usable re-probe (an older run, a suite without ceilings or without the re-probe, a run
    cut short, re-probes all `contended`)."""
    ratios = ((manifest.get("ceiling_drift") or {}).get("ratios") or {}).items()
    return {k: max(r, 1 / r) - 1 for k, r in ratios
            if isinstance(r, (int, float)) and r > 0 and math.isfinite(r) and math.isfinite(1 / r)}


def noise_floor(manifest: dict) -> float | None:
    """A run's largest ceiling drift (`drifts`): the floor of its points that have no ceiling of their own. None
    where the run has no usable re-probe."""
    return max(drifts(manifest).values(), default=None)


def point_floor(name: str | None, da: dict[str, float], db: dict[str, float]) -> tuple[float, str]:
    """The floor of a point judged against ceiling `name` (a burst ceiling: its sustained probe, the one re-probed),
    from A's drifts `da` and B's `db`: that ceiling's own drift in each run, compounded (`combined_floor`), and
    `name` as where it came from. Where the point has no ceiling, or a run that re-probed did not re-probe that one,
    each run's largest drift (LARGEST): conservative. A run without an estimate (empty) adds nothing."""
    name = name and name.removeprefix("burst_")
    own = bool(name) and all(name in d for d in (da, db) if d)
    fa, fb = ((d[name] if own else max(d.values())) if d else None for d in (da, db))
    return combined_floor(fa, fb), (name if own else LARGEST)


def floor_name(a: dict, b: dict) -> str | None:
    """The ceiling a pair of points is judged against: a timed point's `ceiling_name` where both runs agree on it;
    a ceiling probe's own (copy_gbps, read_gbps, matvec_gbps.DT, matmul_tflops.DT); else None."""
    if a.get("kind") == "ceiling":
        op, dtype = a.get("op"), a.get("dtype")
        return {"copy": "copy_gbps", "read": "read_gbps", "matvec": f"matvec_gbps.{dtype}",
                "matmul": f"matmul_tflops.{dtype}"}.get(op)
    name = a.get("ceiling_name")
    return name if name == b.get("ceiling_name") else None


def floor_label(name: str) -> str:
    """How a floor's source is named to a reader: a ceiling's drift, or each run's largest."""
    return "each run's largest drift" if name == LARGEST else name


def speed_of(p: dict) -> float | None:
    """A point's speed-probe reading in us (tokenfleet.measure.load.speed_reading), or None where it has none."""
    return speed_reading(p.get("load") or {})


def speed_text(rows: list[dict]) -> str:
    """The line on pairs not judged because the CPU ran at different speeds for them (`machine`)."""
    apart = [max(r["speed_ratio"], 1 / r["speed_ratio"]) for r in rows]
    return (f"{len(rows)} point(s) not judged (`{MACHINE}`): measured while the CPU ran at speeds x{min(apart):.2f}.."
            f"x{max(apart):.2f} apart in the two runs (the speed probe; limit x{1 + SPEED_LIMIT:.2f}), another guest "
            "sharing the cores in one of them; measure them again to judge them")


def combined_floor(fa: float | None, fb: float | None) -> float:
    """The floor of a ratio B/A: A's numbers may be off by a factor 1 + fa (its own drift), B's by 1 + fb, so their
    ratio by (1 + fa)(1 + fb), as bounds on a quotient compound. A run without an estimate adds nothing."""
    return min((1 + (fa or 0.0)) * (1 + (fb or 0.0)) - 1, sys.float_info.max)  # finite: JSON has no inf


def floor_text(floors: dict[str, float | None], floor: float, classes: dict[str, float] | None = None,
               rule: str = "ceiling") -> str:
    """The header's line on the between-run noise floors under `rule` (FLOOR_RULES): each floor the points used
    (`classes`: a ceiling's own drift in each run, compounded, or each run's largest), what each run measured at
    most, or that one did not."""
    missing = [k for k, f in floors.items() if f is None]
    if len(missing) == len(floors):
        return ("no between-run noise estimate (neither run has a usable end-of-run ceiling re-probe): changes "
                "judged on the points' own samples only")
    said = ", ".join(f"{k} ±{f:.1%}" for k, f in floors.items() if f is not None)
    per = "; ".join(f"{floor_label(k)} ±{f:.1%}" for k, f in (classes or {}).items())
    how = ("of every point: each run's largest ceiling drift (a ceiling's move start to end), compounded; --floor "
           "largest" if rule == LARGEST else "by the ceiling each point is judged against (its drift start to end "
           "in each run, compounded; --floor ceiling")
    line = (f"between-run noise floors {how}): {per or 'no point judged'}; a change inside its point's floor is "
            f"`same` (each run's largest drift: {said}; compounded ±{floor:.1%})")
    if missing:  # one of the two runs (both: the line above)
        line += f"; {missing[0]} carries no estimate (no usable end-of-run re-probe)"
    return line


def _samples(p: dict) -> list[float] | None:
    """The point's kept samples, scaled to its median where a part derived the median from them (a model point
    timed on some layers and scaled to all keeps the samples of the layers it ran)."""
    s = p.get("samples_ms")
    if not (isinstance(s, list) and len(s) >= MIN_SAMPLES and all(x and x > 0 for x in s)):
        return None
    med, want = float(np.median(s)), p.get("median_ms")
    return [x * want / med for x in s] if want and abs(want / med - 1) > 1e-3 else s


def _spread(p: dict) -> float | None:
    if p.get("status") not in USABLE:
        return None  # a failed point has no timing, hence no noise
    if p.get("spread") is not None:
        return float(p["spread"])
    if p.get("p20_ms") is not None and p.get("p80_ms") is not None and p.get("median_ms"):
        return (p["p80_ms"] - p["p20_ms"]) / p["median_ms"]
    return 0.0  # no samples recorded: any difference counts


def _ident(key: str) -> dict:
    ident = json.loads(key)
    shape = " ".join(f"{k}={v}" for k, v in ident.items() if k not in NAME_FIELDS)
    return {"kind": ident.get("kind"), "name": ident.get("op") or ident.get("model"), "backend": ident.get("backend"),
            "dtype": ident.get("dtype"), "shape": shape}


def _verdict(lo: float, hi: float, floor: float = 0.0) -> str:
    """`slower` when the whole interval lies above 1 + floor, `faster` when below 1 / (1 + floor), else `same`."""
    return "faster" if hi * (1 + floor) < 1 else "slower" if lo > 1 + floor else "same"


def _ceiling_point(run: Run, name: str) -> dict | None:
    """The point that set a run's ceiling `name` (copy_gbps, read_gbps, matvec_gbps.DT, matmul_tflops.DT): the
    best usable start probe of that op and dtype."""
    op, _, dtype = name.partition(".")
    op = op.split("_")[0]
    cands = [p for p in run.usable("ceiling") if p.get("op") == op and p.get("phase") is None
             and (not dtype or p.get("dtype") == dtype) and p.get("value")]
    return max(cands, key=lambda p: p["value"]) if cands else None


def ceiling_ratios(a: Run, b: Run) -> dict[str, dict]:
    """Each ceiling both runs measured: its ratio B/A, an interval from the two probes' samples (bootstrap of their
    relative spreads; else +- the larger spread), and whether it differed beyond that and by > MACHINE_LIMIT."""
    ca, cb = flat_ceilings(a.ceilings), flat_ceilings(b.ceilings)
    out = {}
    for name in (k for k in ca if k in cb):
        ratio = cb[name] / ca[name]
        pa, pb = _ceiling_point(a, name), _ceiling_point(b, name)
        sa, sb = (_samples(pa), _samples(pb)) if pa and pb else (None, None)
        if sa and sb:  # the time-ratio interval of each probe about its own median, as a throughput interval
            lo_t, hi_t = median_ratio_interval([x / np.median(sa) for x in sa], [x / np.median(sb) for x in sb])
            lo, hi = ratio / hi_t, ratio / lo_t
        else:
            noise = max((_spread(p) or 0.0) for p in (pa, pb)) if pa and pb else 0.0
            lo, hi = ratio * (1 - noise), ratio * (1 + noise)
        differed = (lo > 1 or hi < 1) and abs(ratio - 1) > MACHINE_LIMIT
        out[name] = {"ratio": ratio, "lo": lo, "hi": hi, "differed": differed}
    return out


def _relative(row: dict, a: dict, b: dict, ceilings: dict[str, dict]) -> None:
    """A timed point against each run's own ceiling: time ratio x ceiling ratio B/A (>1: B used less of its
    machine) as `rel_ratio`, its interval (`rel_lo`, `rel_hi`) the product of the two intervals."""
    name = a.get("ceiling_name")
    c = ceilings.get(name) if name and name == b.get("ceiling_name") and a.get("kind") != "ceiling" else None
    if c is None or row["time_ratio"] is None:
        return
    row["rel_ratio"] = row["time_ratio"] * c["ratio"]
    if row["method"] == "bootstrap":
        row["rel_lo"], row["rel_hi"] = row["ratio_lo"] * c["lo"], row["ratio_hi"] * c["hi"]
    else:
        noise = max(row["spread_a"], row["spread_b"]) + (c["hi"] - c["lo"]) / 2 / c["ratio"]
        row["rel_lo"], row["rel_hi"] = row["rel_ratio"] - noise, row["rel_ratio"] + noise


def judge(row: dict, lo: float, hi: float, floor: float) -> tuple[str, str]:
    """(changed, changed_raw) of a timed pair: the raw interval [lo, hi] on B/A judged beyond the noise floor
    (`_verdict`), and where the row carries one, the interval against each run's own ceiling too."""
    raw = _verdict(lo, hi, floor)
    if row.get("rel_lo") is None:
        return raw, raw
    rel = _verdict(row["rel_lo"], row["rel_hi"], floor)
    # A change is claimed only where the raw time and the time against each run's own ceiling agree: a busy or
    # different machine moves the raw time alone (its ceilings moved with it), a ceiling probe's own noise moves the
    # relative ratio alone (two runs on one quiet 2-core VM, 2026-12-04: copy and read ceilings 1.44x apart, every
    # point's raw time within its noise).
    return (rel if rel == raw else "same"), raw


def _pair(key: str, a: dict | None, b: dict | None, ceilings: dict[str, dict], floor_of) -> dict:
    """One row: point `key` of A (`a`) and of B (`b`) judged; `floor_of(ceiling name)` gives its floor."""
    row = {**_ident(key), "status_a": a and a.get("status"), "status_b": b and b.get("status"),
           "median_ms_a": a and a.get("median_ms"), "median_ms_b": b and b.get("median_ms"),
           "time_ratio": None, "throughput_ratio": None, "throughput_field": None,
           "spread_a": a and _spread(a), "spread_b": b and _spread(b), "changed": None, "note": None,
           "ratio_lo": None, "ratio_hi": None, "method": None, "changed_raw": None, "rel_ratio": None,
           "rel_lo": None, "rel_hi": None, "noise_floor": None, "floor_from": None, "speed_ratio": None}
    if a is None or b is None:
        row["changed"] = "only_b" if a is None else "only_a"
        return row
    a_ok, b_ok = a.get("status") in USABLE, b.get("status") in USABLE
    if not (a_ok and b_ok):
        # A point measured on a shared machine has no number to judge: `contended`, and the gate fails on it as on a
        # failure (a busy machine must not pass for a regression-free one); --resume measures it again.
        row["changed"] = ("contended" if "contended" in (a.get("status"), b.get("status")) and
                          {a.get("status"), b.get("status")} <= USABLE | {"contended"} else "failed" if a_ok else "n/a")
        row["note"] = "; ".join(f"{s}: {p.get('status')} {p.get('error') or ''}".strip()
                                for s, p in (("A", a), ("B", b)) if p.get("status") not in USABLE)
        return row
    ta, tb = a.get("median_ms"), b.get("median_ms")
    if ta and tb:
        row["time_ratio"] = tb / ta
    for f in THROUGHPUT:
        if a.get(f) and b.get(f):
            row["throughput_ratio"], row["throughput_field"] = b[f] / a[f], f
            break
    # Slower means more time; points without a time (some ceilings) fall back to 1/throughput.
    ratio = row["time_ratio"] or (1 / row["throughput_ratio"] if row["throughput_ratio"] else None)
    sa, sb = _samples(a), _samples(b)
    if ratio is None:
        row["changed"] = row["changed_raw"] = "n/a"
        row["note"] = "no time or throughput on both sides"
        return row
    if sa and sb:
        lo, hi = median_ratio_interval(sa, sb)
        row.update(ratio_lo=lo, ratio_hi=hi, method="bootstrap")
    else:  # beyond the noisier side's spread
        noise = max(row["spread_a"], row["spread_b"])
        lo, hi, row["method"] = ratio - noise, ratio + noise, "spread"
    _relative(row, a, b, ceilings)
    floor, row["floor_from"] = floor_of(floor_name(a, b))
    row["noise_floor"] = floor
    row["changed"], row["changed_raw"] = judge(row, lo, hi, floor)
    va, vb = speed_of(a), speed_of(b)
    if va and vb:
        row["speed_ratio"] = vb / va
        if max(vb / va, va / vb) > 1 + SPEED_LIMIT and row["changed"] != "same":
            row["note"] = (f"not judged: {row['changed']} x{lo:.3f}..x{hi:.3f}, but the CPU ran x{vb / va:.2f} as "
                           f"slow in B as in A around it (speed probe {va:.1f} us in A, {vb:.1f} us in B)")
            row["changed"] = MACHINE
            return row
    if row["changed"] == "same" and judge(row, lo, hi, 0.0)[0] != "same":
        rel = f"; against each run's own ceiling x{row['rel_lo']:.3f}..x{row['rel_hi']:.3f}" if row["rel_lo"] else ""
        row["note"] = (f"{FLOOR_NOTE} of ±{floor:.0%} from {floor_label(row['floor_from'])} (B/A x{lo:.3f}.."
                       f"x{hi:.3f}{rel})")
    return row


def compare(run_a: str | Path, run_b: str | Path, floor_rule: str = "largest") -> Comparison:
    if floor_rule not in FLOOR_RULES:
        raise ConfigError("--floor", None, f"unknown rule {floor_rule!r}; known: {', '.join(FLOOR_RULES)}")
    da, db = resolve_run(run_a), resolve_run(run_b)
    # Each manifest read as JSON first, A's before B's (a problem names its own file), the versions compared before
    # either is read as this build's schema: one of them may be a schema this build does not know.
    va, vb = (manifest_json(d).get("schema_version") for d in (da, db))
    if va != vb:  # refuse before reading either: one of them is a schema this build may not know
        raise ConfigError(db / "manifest.json", "schema_version",
                          f"{vb!r} differs from {va!r} of run A ({da}): runs of different schema versions are not "
                          "comparable")
    cmp = Comparison(load_run(da), load_run(db), floor_rule=floor_rule)
    cmp.ceilings = ceiling_ratios(cmp.a, cmp.b)
    cmp.floors = {"A": noise_floor(cmp.a.manifest), "B": noise_floor(cmp.b.manifest)}
    cmp.drifts = {"A": drifts(cmp.a.manifest), "B": drifts(cmp.b.manifest)}
    cmp.floor = combined_floor(cmp.floors["A"], cmp.floors["B"])
    pa, pb = cmp.a.by_key(), cmp.b.by_key()
    keys = list(pa) + [k for k in pb if k not in pa]
    rows = [_pair(k, pa.get(k), pb.get(k), cmp.ceilings, cmp.floor_of) for k in keys]
    for r in rows:
        r["cross_device"] = cmp.cross_device
    cmp.rows = sorted(rows, key=lambda r: (r["changed"] in ("only_a", "only_b"), KIND_ORDER.get(r["kind"], 9),
                                           str(r["name"]), str(r["backend"]), str(r["dtype"])))
    return cmp
