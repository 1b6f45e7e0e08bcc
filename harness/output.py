"""One way to print results in every verb: `--format table|json|csv|md`."""

from __future__ import annotations

import json
import math
from typing import Any, Literal

import pandas as pd
from rich.console import Console
from rich.table import Table

Format = Literal["table", "json", "csv", "md"]
FORMATS = ("table", "json", "csv", "md")


def _cell(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
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


def to_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=_json_default, allow_nan=False)


def frame(rows: list[dict] | pd.DataFrame, columns: list[str] | None = None) -> pd.DataFrame:
    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)
    if columns:
        df = df[[c for c in columns if c in df.columns]]
    return df


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table (no `tabulate` dependency)."""
    if not len(df):
        return "_(no rows)_"
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(_cell(v).replace("|", "\\|") for v in rec) + " |" for rec in df.itertuples(index=False)]
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
    for c in df.columns:
        table.add_column(str(c), overflow="fold")
    for rec in df.itertuples(index=False):
        table.add_row(*(_cell(v) for v in rec))
    console = Console(width=max(120, 14 * len(df.columns)), record=True, file=open("/dev/null", "w"))
    console.print(table)
    return console.export_text()


def emit(rows: list[dict] | pd.DataFrame, fmt: Format, title: str | None = None,
         columns: list[str] | None = None) -> None:
    print(render(rows, fmt, title, columns), end="" if fmt in ("csv", "md") else "\n")
