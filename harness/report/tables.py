"""Derived tables of a run folder (pandas): `points.csv`, one CSV per kind, and `summary.md`."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from harness.files import atomic_write
from harness.output import markdown_table
from harness.results import USABLE, read_run

SHAPE_FIELDS = ("m", "n", "k", "rows", "hidden", "tokens", "batch", "seq", "prompt_len", "context", "q_heads",
                "kv_heads", "head_dim", "mb", "tp", "layers")

COLUMNS = {
    "ceiling": ["op", "dtype", "shape", "status", "value", "unit", "datasheet_value", "datasheet_ratio", "median_ms",
                "spread"],
    "kernel": ["op", "backend", "dtype", "shape", "status", "median_ms", "tflops", "gbps", "mfu", "mbu",
               "mfu_datasheet", "mbu_datasheet", "vs_torch"],
    "prefill": ["model", "backend", "dtype", "tp", "batch", "prompt_len", "status", "ttft_ms", "tokens_per_s",
                "tflops", "mfu", "mfu_datasheet", "comm_fraction", "scaled_from_layers"],
    "decode": ["model", "backend", "dtype", "tp", "batch", "context", "status", "tpot_ms", "tokens_per_s",
               "tokens_per_s_per_seq", "gbps", "mbu", "mbu_matvec", "mbu_datasheet", "cuda_graph", "comm_fraction",
               "scaled_from_layers"],
    "collective": ["op", "dtype", "world_size", "bytes", "status", "median_ms", "algbw_gbps", "busbw_gbps",
                   "cuda_graph"],
}
TITLES = {"ceiling": "Ceilings (measured)", "kernel": "Kernels", "prefill": "Prefill", "decode": "Decode",
          "collective": "Collectives (nccl-tests' algbw and busbw)"}


def shape_of(p: dict) -> str:
    return " ".join(f"{k}={p[k]}" for k in SHAPE_FIELDS if p.get(k) is not None and k not in ("batch",)
                    ) if p.get("kind") in ("kernel", "ceiling") else ""


def points_frame(points: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(points)
    if df.empty:
        return df
    df["shape"] = [shape_of(p) for p in points]
    for c in SHAPE_FIELDS + ("scaled_from_layers", "n_samples"):
        # Shape columns hold ints with gaps (other kinds): nullable Int64 prints 256, not 256.0.
        if c in df and pd.api.types.is_numeric_dtype(df[c]) and (df[c].dropna() % 1 == 0).all():
            df[c] = df[c].astype("Int64")
    if "tflops" in df and "backend" in df:
        df["vs_torch"] = _vs_torch(df)
    return df


def _vs_torch(df: pd.DataFrame) -> pd.Series:
    """Triton time over the torch (vendor) time of the same op, shape and dtype: >1 means Triton is faster."""
    out = pd.Series([None] * len(df), index=df.index, dtype=object)
    kern = df[df["kind"] == "kernel"]
    for (_op, _shape, _dtype), g in kern.groupby(["op", "shape", "dtype"]):
        t = g[(g["backend"] == "torch") & (g["status"].isin(USABLE))]["median_ms"]
        if len(t):
            for i in g[g["backend"] == "triton"].index:
                if pd.notna(df.at[i, "median_ms"]):
                    out[i] = float(t.iloc[0] / df.at[i, "median_ms"])
    return out


def kind_table(df: pd.DataFrame, kind: str, extra: tuple[str, ...] = ()) -> pd.DataFrame:
    if df.empty or "kind" not in df:
        return pd.DataFrame()
    sub = df[df["kind"] == kind]
    cols = [c for c in [*COLUMNS[kind], *extra] if c in sub.columns]
    return sub[cols].reset_index(drop=True)


def failed_table(df: pd.DataFrame) -> pd.DataFrame:
    if df.empty:
        return df
    bad = df[~df["status"].isin(["ok"])]
    cols = [c for c in ("kind", "op", "model", "backend", "dtype", "shape", "batch", "context", "prompt_len",
                        "status", "error", "note") if c in bad.columns]
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


def write_tables(run_dir: str | Path) -> Path:
    """Write points.csv, <kind>.csv and summary.md into the run folder; return the summary's path."""
    run_dir = Path(run_dir)
    manifest, points = read_run(run_dir)
    df = points_frame(points)
    if not df.empty:
        atomic_write(run_dir / "points.csv", df.drop(columns=[c for c in ("telemetry",) if c in df.columns]
                                                     ).to_csv(index=False))
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
    bad = failed_table(df)
    if len(bad):
        lines += ["## Points not ok", "", markdown_table(bad), ""]
    out = run_dir / "summary.md"
    atomic_write(out, "\n".join(lines))
    return out
