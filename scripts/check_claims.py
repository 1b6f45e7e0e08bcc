"""Check README/docs numbers against the committed files they cite (`docs/claims.yaml`).

Each claim names a markdown file (`doc`), a piece of its text (`text`, which must appear there verbatim, whitespace
runs and line breaks counting as one space), a committed file (`file`) and where its value is:
- `key`: a dotted path into a JSON file (`summary.within_20pct`, `rows.0.ratio`; integers index lists);
- `where` (with `key` naming a list, or alone for a JSONL file such as `points.jsonl`): the one record whose fields
  equal these values, then `field` in it (dotted too);
- `format`: how the value is written in the text (a Python format spec, default `{}`), after `scale` (default 1);
  the formatted value must appear inside `text`;
- `literal` instead, for a text file: that string must appear both in the file and inside `text`.
A claim that fails prints one line naming the doc, the claim's text and why; exit 1 if any fail, 2 on a bad claims
file.

    python scripts/check_claims.py [--root DIR] [--claims FILE]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
FIELDS = {"doc", "text", "file", "key", "where", "field", "format", "scale", "literal", "why"}


def _flat(s: str) -> str:
    return re.sub(r"\s+", " ", s)


def _dig(obj, path: str | None):
    for part in (path.split(".") if path else []):
        obj = obj[int(part)] if isinstance(obj, list) else obj[part]
    return obj


def _pick(records: list, where: dict) -> dict:
    hits = [r for r in records if isinstance(r, dict) and all(r.get(k) == v for k, v in where.items())]
    if len(hits) != 1:
        raise LookupError(f"{len(hits)} records match {where} (need exactly 1)")
    return hits[0]


def value_of(c: dict, root: Path):
    """The value a claim cites, read from its file."""
    path = root / c["file"]
    if "literal" in c:
        if c["literal"] not in path.read_text(encoding="utf-8"):
            raise LookupError(f"{c['literal']!r} not in {c['file']}")
        return c["literal"]
    if path.suffix == ".jsonl":
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        records = _dig(json.loads(path.read_text(encoding="utf-8")), c.get("key"))
    if "where" in c:
        return _dig(_pick(records, c["where"]), c.get("field"))
    return records


def check(claims: list[dict], root: Path) -> list[str]:
    """One line per failing claim; an empty list when every claim holds."""
    errors, docs = [], {}
    for c in claims:
        where = f"{c['doc']}: claim {c['text'][:60]!r}"
        if c["doc"] not in docs:
            try:
                docs[c["doc"]] = _flat((root / c["doc"]).read_text(encoding="utf-8"))
            except OSError as e:
                docs[c["doc"]] = ""
                errors.append(f"{where}: cannot read {c['doc']}: {e}")
                continue
        if _flat(c["text"]) not in docs[c["doc"]]:
            errors.append(f"{where}: text not found in {c['doc']} (the doc changed: update the claim or the doc)")
            continue
        try:
            v = value_of(c, root)
            shown = v if "literal" in c else c.get("format", "{}").format(v * c["scale"] if "scale" in c else v)
        except (OSError, LookupError, KeyError, IndexError, ValueError, TypeError, json.JSONDecodeError) as e:
            errors.append(f"{where}: cannot read {c['file']}: {type(e).__name__}: {e}")
            continue
        if str(shown) not in _flat(c["text"]):
            errors.append(f"{where}: {c['file']} gives {shown!r}, not in the text")
    return errors


def load_claims(path: Path) -> list[dict]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    claims = data.get("claims") if isinstance(data, dict) else None
    if not isinstance(claims, list):
        raise ValueError(f"{path}: field claims: a list of claims expected")
    for i, c in enumerate(claims):
        bad = set(c) - FIELDS if isinstance(c, dict) else {"(not a mapping)"}
        missing = {"doc", "text", "file"} - set(c) if isinstance(c, dict) else set()
        if bad or missing:
            raise ValueError(f"{path}: field claims.{i}: unknown {sorted(bad)} / missing {sorted(missing)}")
    return claims


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=ROOT)
    ap.add_argument("--claims", type=Path, default=None, help="default: ROOT/docs/claims.yaml")
    a = ap.parse_args(argv)
    try:
        claims = load_claims(a.claims or a.root / "docs" / "claims.yaml")
    except (OSError, ValueError, yaml.YAMLError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    errors = check(claims, a.root)
    for e in errors:
        print(e, file=sys.stderr)
    print(f"{len(claims) - len(errors)} of {len(claims)} claims hold")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
