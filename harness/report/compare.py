"""Two runs side by side: each point of B against the same point of A, as ratios B/A with both sides' noise.

Points match on their identity (`harness.results.point_key`: kind, op or model, backend, dtype and shape; the run
id, device and every measurement are left out), so runs from different devices compare too, labelled as such.
A change counts only when it is larger than the noisier side's spread (p80-p20)/median: within the noise two
timings are the same measurement.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from harness.config import ConfigError
from harness.results import USABLE, Run, load_run, resolve_run

THROUGHPUT = ("tokens_per_s", "tflops", "gbps", "value")  # first one both sides have; all are higher-is-better
NAME_FIELDS = ("kind", "op", "model", "backend", "dtype")
KIND_ORDER = {"ceiling": 0, "kernel": 1, "prefill": 2, "decode": 3}
COLUMNS = ["kind", "name", "backend", "dtype", "shape", "status_a", "status_b", "median_ms_a", "median_ms_b",
           "time_ratio", "throughput_ratio", "spread_a", "spread_b", "changed", "note"]


@dataclass
class Comparison:
    a: Run
    b: Run
    rows: list[dict] = field(default_factory=list)

    @property
    def cross_device(self) -> bool:
        return self.a.device != self.b.device

    def header(self) -> str:
        line = f"A: {self.a.run_id} ({self.a.device})  vs  B: {self.b.run_id} ({self.b.device}); ratios are B/A"
        if self.cross_device:
            line += "\ncross-device comparison: the ratios compare devices, not code changes"
        return line

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for r in self.rows:
            counts[r["changed"]] = counts.get(r["changed"], 0) + 1
        return "compared: " + (", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "no points")

    def regressions(self, pct: float) -> list[dict]:
        """Points slower beyond their noise by more than `pct` percent, and points ok in A that fail in B."""
        return [r for r in self.rows if r["changed"] == "failed"
                or (r["changed"] == "slower" and (r["time_ratio"] - 1) * 100 > pct)]


def _schema_version(run_dir: Path):
    try:
        return json.loads((run_dir / "manifest.json").read_text()).get("schema_version")
    except (OSError, ValueError, AttributeError):
        return None  # read_run names the real problem




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


def _pair(key: str, a: dict | None, b: dict | None) -> dict:
    row = {**_ident(key), "status_a": a and a.get("status"), "status_b": b and b.get("status"),
           "median_ms_a": a and a.get("median_ms"), "median_ms_b": b and b.get("median_ms"),
           "time_ratio": None, "throughput_ratio": None, "throughput_field": None,
           "spread_a": a and _spread(a), "spread_b": b and _spread(b), "changed": None, "note": None}
    if a is None or b is None:
        row["changed"] = "only_b" if a is None else "only_a"
        return row
    a_ok, b_ok = a.get("status") in USABLE, b.get("status") in USABLE
    if not (a_ok and b_ok):
        row["changed"] = "failed" if a_ok else "n/a"
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
    noise = max(row["spread_a"], row["spread_b"])
    if ratio is None:
        row["changed"], row["note"] = "n/a", "no time or throughput on both sides"
    elif abs(ratio - 1) <= noise:
        row["changed"] = "same"
    else:
        row["changed"] = "faster" if ratio < 1 else "slower"
    return row


def compare(run_a: str | Path, run_b: str | Path) -> Comparison:
    da, db = resolve_run(run_a), resolve_run(run_b)
    va, vb = _schema_version(da), _schema_version(db)
    if va != vb:  # refuse before reading either: one of them is a schema this build may not know
        raise ConfigError(db / "manifest.json", "schema_version",
                          f"{vb!r} differs from {va!r} of run A ({da}): runs of different schema versions are not "
                          "comparable")
    cmp = Comparison(load_run(da), load_run(db))
    pa, pb = cmp.a.by_key(), cmp.b.by_key()
    keys = list(pa) + [k for k in pb if k not in pa]
    rows = [_pair(k, pa.get(k), pb.get(k)) for k in keys]
    for r in rows:
        r["cross_device"] = cmp.cross_device
    cmp.rows = sorted(rows, key=lambda r: (r["changed"] in ("only_a", "only_b"), KIND_ORDER.get(r["kind"], 9),
                                           str(r["name"]), str(r["backend"]), str(r["dtype"])))
    return cmp
