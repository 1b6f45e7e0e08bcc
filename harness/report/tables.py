"""Derived tables of a run folder (pandas): `points.csv`, one CSV per kind, and `summary.md`.

Every row is labelled with every field of its job key (`shape`: the key fields the table has no column for), and
the backend ratios pair each row with the row of the same key on the other backend, one to one: `vs_torch` =
torch's time / this row's time, `vs_compile` = compile's time / this row's time (> 1: this row is faster).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from tokenfleet.files import atomic_write
from tokenfleet.output import markdown_table
from tokenfleet.results import MEASURED_FIELDS, USABLE, load_run

SHAPE_FIELDS = ("m", "n", "k", "rows", "hidden", "tokens", "batch", "seq", "prompt_len", "context", "q_heads",
                "kv_heads", "head_dim", "mb", "tp", "layers")
NAME_FIELDS = ("kind", "op", "model", "backend", "dtype")
BASELINES = ("torch", "compile")  # the backends every other backend's rows are paired with

COLUMNS = {
    "ceiling": ["op", "dtype", "shape", "status", "value", "unit", "datasheet_value", "datasheet_ratio", "median_ms",
                "spread", "sm_clock_mhz", "power_w", "clock_events"],
    "kernel": ["op", "backend", "dtype", "shape", "status", "median_ms", "launch_us", "tflops", "gbps", "mfu", "mbu",
               "mbu_read", "mfu_datasheet", "mbu_datasheet", "vs_torch", "vs_compile"],
    "prefill": ["model", "backend", "dtype", "tp", "batch", "prompt_len", "shape", "status", "ttft_ms",
                "tokens_per_s", "tflops", "mfu", "mfu_datasheet", "comm_fraction", "scaled_from_layers", "vs_torch",
                "vs_compile"],
    "decode": ["model", "backend", "dtype", "tp", "batch", "context", "shape", "status", "tpot_ms", "tokens_per_s",
               "tokens_per_s_per_seq", "gbps", "mbu_read", "mbu", "mbu_matvec", "mbu_datasheet", "cuda_graph",
               "comm_fraction", "scaled_from_layers", "vs_torch", "vs_compile"],
    "collective": ["op", "dtype", "world_size", "bytes", "shape", "status", "median_ms", "algbw_gbps", "busbw_gbps",
                   "cuda_graph"],
}
TITLES = {"ceiling": "Ceilings (measured)", "kernel": "Kernels", "prefill": "Prefill", "decode": "Decode",
          "collective": "Collectives (nccl-tests' algbw and busbw)"}


def key_fields(p: dict) -> dict:
    """The fields of a point's job key (everything that is not a measurement), in the point's order."""
    return {k: v for k, v in p.items() if k not in MEASURED_FIELDS}


def shape_of(p: dict, shown: tuple | list = ()) -> str:
    """Every key field of `p` except its name and the ones a table shows in their own columns: two rows of one table
    never carry the same label unless they are the same job."""
    skip = set(NAME_FIELDS) | set(shown)
    return " ".join(f"{k}={v}" for k, v in key_fields(p).items() if k not in skip and v is not None)


def pair_key(p: dict) -> str:
    """A point's job key without its backend and `source` (which models' shapes it stands for, a label): the rows of
    one job on different backends share it."""
    return json.dumps({k: v for k, v in key_fields(p).items() if k not in ("backend", "source")}, sort_keys=True,
                      default=str)


def backend_ratios(points: list[dict]) -> dict[str, list]:
    """vs_<baseline> for each point: the baseline backend's median time over this point's, both usable, same key."""
    by_key: dict[tuple[str, str], dict] = {}
    for p in points:
        if p.get("backend") in BASELINES and p.get("status") in USABLE and p.get("median_ms"):
            by_key[(p["backend"], pair_key(p))] = p
    out: dict[str, list] = {f"vs_{b}": [] for b in BASELINES}
    for p in points:
        k = pair_key(p)
        for b in BASELINES:
            base = by_key.get((b, k))
            ok = (base is not None and p.get("backend") not in (None, b) and p.get("status") in USABLE
                  and p.get("median_ms"))
            out[f"vs_{b}"].append(float(base["median_ms"] / p["median_ms"]) if ok else None)
    return out


def _telemetry_columns(points: list[dict]) -> dict[str, list]:
    """The polled clocks, power and clock events of a probe (min of the SM clock: the dip is what matters)."""
    def get(p, name, stat):
        t = p.get("telemetry") or {}
        v = t.get(name)
        return v.get(stat) if isinstance(v, dict) else None

    return {"sm_clock_mhz": [get(p, "sm_clock_mhz", "min") for p in points],
            "power_w": [get(p, "power_w", "max") for p in points],
            "clock_events": [",".join((p.get("telemetry") or {}).get("clock_event_reasons") or []) or None
                             for p in points]}


def points_frame(points: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(points)
    if df.empty:
        return df
    df["shape"] = [shape_of(p, COLUMNS.get(p.get("kind"), ())) for p in points]
    for c in SHAPE_FIELDS + ("scaled_from_layers", "n_samples"):
        # Shape columns hold ints with gaps (other kinds): nullable Int64 prints 256, not 256.0.
        if c in df and pd.api.types.is_numeric_dtype(df[c]) and (df[c].dropna() % 1 == 0).all():
            df[c] = df[c].astype("Int64")
    if "backend" in df:
        for name, values in backend_ratios(points).items():
            df[name] = pd.Series(values, index=df.index, dtype=object)
    if "telemetry" in df:
        for name, values in _telemetry_columns(points).items():
            df[name] = pd.Series(values, index=df.index, dtype=object)
    return df


def kind_table(df: pd.DataFrame, kind: str, extra: tuple[str, ...] = ()) -> pd.DataFrame:
    if df.empty or "kind" not in df:
        return pd.DataFrame()
    sub = df[df["kind"] == kind]
    cols = [c for c in [*COLUMNS[kind], *extra]
            if c in sub.columns and not (c.startswith("vs_") and sub[c].isna().all())]
    return sub[cols].reset_index(drop=True)


def failed_table(df: pd.DataFrame) -> pd.DataFrame:
    if df.empty:
        return df
    bad = df[~df["status"].isin(["ok"])]
    cols = [c for c in ("kind", "op", "model", "backend", "dtype", "shape", "batch", "context", "prompt_len",
                        "status", "ceiling_ratio", "error", "note") if c in bad.columns]
    return bad[cols].reset_index(drop=True)


def fold_skipped(table: pd.DataFrame, drop: tuple[str, ...] = ()) -> tuple[pd.DataFrame, list[str]]:
    """Skipped rows out of a table, folded into one line per reason naming each op (or model) and backend with its
    count of shapes: a Triton op under the interpreter is skipped at every shape for one reason, which a row per
    shape only repeats."""
    if table.empty or "status" not in table:
        return table.drop(columns=list(drop), errors="ignore"), []
    skip = table["status"] == "skipped"
    sub = table[skip]

    def col(c: str) -> pd.Series:
        return sub[c] if c in sub else pd.Series([None] * len(sub), index=sub.index, dtype=object)

    name = col("op").where(col("op").notna(), col("model"))
    what = (name.fillna("").astype(str) + " " + col("backend").fillna("").astype(str)).str.strip()
    why = col("note").fillna("no reason recorded").astype(str)
    lines = []
    for reason in dict.fromkeys(why):  # in table order
        counts = what[why == reason].value_counts(sort=False)
        lines.append(f"skipped ({reason}): " + ", ".join(f"{w} ×{n}" for w, n in counts.items()))
    return table[~skip].drop(columns=list(drop), errors="ignore").reset_index(drop=True), lines


def drift_lines(manifest: dict) -> list[str]:
    """The end-of-run ceilings against the start's (manifest `ceiling_drift`), flagged beyond its limit."""
    d = manifest.get("ceiling_drift")
    if not d or not d.get("ratios"):
        return []
    rows = [{"ceiling": k, "end/start": round(r, 4), "flag": "DRIFT" if k in d.get("flagged", []) else ""}
            for k, r in d["ratios"].items()]
    head = (f"**{len(d['flagged'])} ceiling(s) moved more than {d['limit']:.0%} between start and end: points "
            "measured under a different device state.**" if d.get("flagged") else
            f"Every ceiling held within {d['limit']:.0%} from start to end of the run.")
    return ["## Ceiling drift (end of run / start)", "", head, "", markdown_table(pd.DataFrame(rows)), ""]


def write_tables(run_dir: str | Path) -> Path:
    """Write points.csv, <kind>.csv and summary.md into the run folder; return the summary's path."""
    run = load_run(Path(run_dir))  # the last record of each job key (a resumed run may hold a retry)
    run_dir, manifest = run.path, run.manifest
    df = points_frame(run.points)
    if not df.empty:
        drop = [c for c in ("telemetry", "samples_ms") if c in df.columns]
        atomic_write(run_dir / "points.csv", df.drop(columns=drop).to_csv(index=False))
    dev = manifest.get("environment", {}).get("device", {})
    lines = [f"# Run {manifest.get('run_id')}", "",
             f"- device: {dev.get('name')} ({dev.get('kind')}), datasheet: {dev.get('datasheet')}",
             f"- suite: {manifest.get('suite')}, command: `{manifest.get('command')}`",
             f"- created: {manifest.get('created')}, git: {manifest.get('git_sha')}", ""]
    for kind, title in TITLES.items():
        t = kind_table(df, kind)
        if len(t):
            atomic_write(run_dir / f"{kind}.csv", t.to_csv(index=False))
            lines += [f"## {title}", "", markdown_table(t), ""]
        if kind == "ceiling":
            lines += drift_lines(manifest)
    bad = failed_table(df)
    if len(bad):
        lines += ["## Points not ok", "", markdown_table(bad), ""]
    out = run_dir / "summary.md"
    atomic_write(out, "\n".join(lines))
    return out
