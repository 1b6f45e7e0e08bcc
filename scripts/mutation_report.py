"""Summarise a `scripts/mutate.sh` run (mutmut 3's .meta files under STAGE/mutants) into results/mutation/:
summary.json (per module: killed, survived, timeout, no tests, score; the command, date, commit, machine) and
report.md (the same as a table, then every surviving mutant as a diff, marked when results/mutation/equivalent.yaml
gives a reviewer's reason: `equivalent` (it cannot change behaviour) or `gpu-only` (a real change that a CPU cannot
show: left for the GPU checks)). Mutant ids (`module.xǁClassǁmethod__mutmut_N`, mutmut's
names) are stable while the module's source is unchanged; a changed module needs its equivalents reviewed again."""

from __future__ import annotations

import argparse
import ast
import difflib
import json
import os
import platform
import subprocess
from collections import Counter
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "results" / "mutation"
# mutmut 3.8's exit codes (mutmut/stats.py status_by_exit_code)
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", 36: "timeout",
          -24: "timeout", 24: "timeout", 152: "timeout", 255: "timeout", 37: "caught by type check",
          -11: "segfault", -9: "segfault", None: "not checked"}


def status(code: int | None) -> str:
    return STATUS.get(code, "suspicious")


def mutant_diffs(mutated: Path) -> dict[str, str]:
    """Each mutant's function against the original, from the mutated file mutmut wrote (`x…__mutmut_N` beside
    `x…__mutmut_orig`)."""
    src = mutated.read_text()
    funcs = {}
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and "__mutmut_" in node.name:
            funcs[node.name] = ast.get_source_segment(src, node)
    out = {}
    for name, text in funcs.items():
        base, _, n = name.rpartition("__mutmut_")
        if n == "orig" or base + "__mutmut_orig" not in funcs:
            continue
        orig = funcs[base + "__mutmut_orig"].replace(base + "__mutmut_orig", base).splitlines()
        diff = difflib.unified_diff(orig, text.replace(name, base).splitlines(), lineterm="", n=0)
        out[name] = "\n".join(line for line in diff if not line.startswith(("---", "+++", "@@")))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", type=Path, required=True)
    ap.add_argument("--seconds", type=int, required=True)
    ap.add_argument("--modules", nargs="+", required=True, help="tokenfleet/<path>.py as mutated")
    ap.add_argument("--note", default="", help="how the run went (interrupted, resumed, rechecked), for the report")
    a = ap.parse_args()
    reviewed = yaml.safe_load((OUT / "equivalent.yaml").read_text()) if (OUT / "equivalent.yaml").is_file() else []
    equivalent = {e["id"]: f"{e.get('kind', 'equivalent')}: {e['why']}" for e in reviewed or []}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "harness", "tests"], capture_output=True,
                           text=True, cwd=ROOT).stdout.strip()
    recheck_file = OUT / "recheck.json"
    recheck = json.loads(recheck_file.read_text()) if recheck_file.is_file() else {}
    modules, survivors, rechecked = {}, [], []
    for mod in a.modules:
        meta = json.loads((a.stage / "mutants" / (mod + ".meta")).read_text())
        codes = meta["exit_code_by_key"]
        counts = Counter(status(c) for c in codes.values())
        diffs = mutant_diffs(a.stage / "mutants" / mod)
        surv = sorted(k for k, c in codes.items() if status(c) == "survived")
        eq = [k for k in surv if k in equivalent]
        killed = counts["killed"] + counts["timeout"] + counts["segfault"]
        tested = killed + counts["survived"] + counts["suspicious"]
        modules["harness/" + mod.removeprefix("tokenfleet/")] = {
            "mutants": len(codes), **{k: counts[k] for k in ("killed", "survived", "timeout", "no tests",
                                                             "suspicious", "not checked")},
            "equivalent": sum(1 for k in eq if equivalent[k].startswith("equivalent")),
            "gpu-only": sum(1 for k in eq if equivalent[k].startswith("gpu-only")),
            "unreviewed survivors": len(surv) - len(eq),
            "killed by the oracles' recheck": sum(1 for k in codes if recheck.get(k, {}).get("result") == "killed"),
            "score": round(killed / tested, 4) if tested else None,
            "score excluding equivalents": round(killed / (tested - len(eq)), 4) if tested - len(eq) else None,
            "seconds": round(sum(meta.get("durations_by_key", {}).values())),
        }
        rechecked += [(k, recheck[k]["by"]) for k in sorted(codes) if recheck.get(k, {}).get("result") == "killed"]
        survivors += [(k, diffs.get(k.rpartition(".")[2], "(diff not found)"), equivalent.get(k)) for k in surv]
    summary = {
        "command": "make mutate" + (f" MODULES='{' '.join(m.removeprefix('tokenfleet/') for m in a.modules)}'"),
        "tool": "mutmut " + metadata.version("mutmut"),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit.stdout.strip() + (" (+ uncommitted changes in harness/ or tests/)" if dirty else ""),
        "machine": f"{platform.node()}: {os.cpu_count()} CPUs (shared), {platform.machine()}, "
                   f"Python {platform.python_version()}, 1 worker, nice 10",
        "wall_seconds": a.seconds,
        "note": a.note,
        "modules": modules,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    lines = [f"# Mutation testing: `{summary['command']}`", "",
             f"{summary['tool']}, {summary['date']}, commit {summary['commit']}, {summary['machine']}; "
             f"{a.seconds} s wall. Score = (killed + timeout) / mutants that ran tests; `no tests`: no test in the "
             "selection (scripts/mutate.sh TESTS) reaches the function.", "", *([a.note, ""] if a.note else []),
             "| module | mutants | killed | timeout | survived | equivalent | gpu-only | unreviewed | no tests | "
             "not checked | score |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m, s in modules.items():
        lines.append(f"| {m} | {s['mutants']} | {s['killed']} | {s['timeout']} | {s['survived']} | "
                     f"{s['equivalent']} | {s['gpu-only']} | {s['unreviewed survivors']} | {s['no tests']} | "
                     f"{s['not checked']} | {s['score']} |")
    lines += ["", "## Survivors of the first pass killed by the oracle tests (scripts/mutation_recheck.py)", "",
              "| mutant | killed by |", "|---|---|"] + [f"| `{k}` | `{t}` |" for k, t in rechecked]
    lines += ["", "## Surviving mutants", ""]
    for k, diff, why in survivors:
        lines += [f"### `{k}`" + (f" ({why.split(':')[0]})" if why else " (unreviewed)"), "",
                  "```diff", diff, "```", ""]
        if why:
            lines += [f"Reviewed, {why}", ""]
    (OUT / "report.md").write_text("\n".join(lines))
    print("\n".join(lines[:6 + len(modules)]))


if __name__ == "__main__":
    main()
