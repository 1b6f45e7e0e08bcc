"""One way to print results in every verb: `--format table|json|csv|md`."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Literal

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

Format = Literal["table", "json", "csv", "md"]
FORMATS = ("table", "json", "csv", "md")


def cell(v: Any) -> str:
    """The number format every view prints: empty for a missing value (None, NaN, <NA>), integers whole (with
    thousands separators from 10,000: counts of GPUs), floats to about three significant figures."""
    if v is None or v is pd.NA or v is pd.NaT or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}" if abs(v) >= 10_000 else str(int(v))
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if v == 0:
            return "0"
        a = abs(v)
        if a >= 1e6 or a < 1e-3:
            return f"{v:.3g}"
        return f"{v:,.3f}".rstrip("0").rstrip(".") if a < 100 else f"{v:,.1f}"
    return str(v)


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "isoformat"):
        return o.isoformat()
    return str(o)


def finite(obj: Any) -> Any:
    """`obj` with every non-finite float as None: JSON has no infinity or NaN, and a limit of inf (`project --tpot-ms
    inf`: no limit) is written as null, its "none"."""
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def to_json(obj: Any) -> str:
    return json.dumps(finite(obj), indent=2, default=_json_default, allow_nan=False)


def frame(rows: list[dict] | pd.DataFrame, columns: list[str] | None = None) -> pd.DataFrame:
    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)
    if columns:
        df = df[[c for c in columns if c in df.columns]]
    return tidy(df)


def tidy(df: pd.DataFrame) -> pd.DataFrame:
    """Whole-number float columns back to integers: a column is float only because some rows have no value there
    (the total row's GPUs needed, other kinds' batch), and a count prints as 317,609, not 3.18e+05."""
    out = df.copy()
    for c in out.columns:
        col = out[c]
        if col.dtype.kind == "f" and col.notna().any() and (col.dropna() % 1 == 0).all() \
                and (col.dropna().abs() < 2**53).all():
            out[c] = col.astype("Int64")
    return out


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table (no `tabulate` dependency)."""
    if not len(df):
        return "_(no rows)_"
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v).replace("|", "\\|") for v in rec) + " |" for rec in df.itertuples(index=False)]
    return "\n".join(lines)


def render(rows: list[dict] | pd.DataFrame, fmt: Format, title: str | None = None,
           columns: list[str] | None = None) -> str:
    """Rows as text in one of FORMATS. `json` keeps every field; the others show `columns` (default: all)."""
    if fmt == "json":
        data = rows.to_dict("records") if isinstance(rows, pd.DataFrame) else rows
        return to_json(data)
    df = frame(rows, columns)
    if fmt == "csv":
        return df.to_csv(index=False)
    if fmt == "md":
        head = f"### {title}\n\n" if title else ""
        return head + markdown_table(df) + "\n"
    table = Table(title=title, show_lines=False)
    cells = [[cell(v) for v in rec] for rec in df.itertuples(index=False)]
    width = 0
    for i, c in enumerate(df.columns):
        # A header wraps only between words (`_` read as a space), and neither it nor a cell splits a word: the
        # column is at least as wide as its longest word (up to 30 characters: a longer one is folded).
        head = str(c).replace("_", " ")
        words = [len(w) for w in head.split()] + [min(len(w), 30) for r in cells for w in r[i].split()]
        wmin = max(words + [1])
        width += wmin + 3
        table.add_column(head, overflow="fold", min_width=wmin)
    for r in cells:
        table.add_row(*r)
    # At least 120 wide, and wider until rich no longer crops a row (when it shrinks columns it can give one less
    # than its minimum and cut the last ones off): a row that is whole ends with its border.
    w = max(120, width + 1)
    while True:
        console = Console(width=w, record=True, file=open(os.devnull, "w"))
        console.print(table)
        text = console.export_text()
        if all(line.rstrip().endswith(("┓", "┃", "┩", "│", "┘")) for line in text.splitlines()[1 if title else 0:]
               if line.strip()) or w > 2000:
            return text
        w += 10


def emit(rows: list[dict] | pd.DataFrame, fmt: Format, title: str | None = None,
         columns: list[str] | None = None) -> None:
    print(render(rows, fmt, title, columns), end="" if fmt in ("csv", "md") else "\n")
