"""Mutation results, one file per module, and the report over all of them.

    python scripts/mutation_report.py --stage .mutate [--note TEXT]   # a run's modules -> results/mutation/modules/
    python scripts/mutation_report.py                                 # only rebuild report.md and summary.json

A `scripts/mutate.sh` run leaves mutmut 3's .meta files under STAGE/mutants (and, after
`scripts/mutation_recheck.py`, the survivors the oracle tests killed in STAGE/recheck.json). Each module it mutated
gets results/mutation/modules/<module>.json (e.g. capacity.routing.json): the module's source hash, the command,
date, commit, machine and seconds of the run, the count of each verdict, every survivor with its diff, and the
survivors the recheck killed with the killing test. A mutant no selected test reaches (`no tests`) is listed with the
survivors: it too needs a test or a review. Runs of different modules (different machines, sessions or
worktrees) thus never touch each other's files.

Reviewed survivors are in results/mutation/equivalent/<module>.yaml: the module's sha256 when reviewed and a list of
{id, kind, why}; kind `equivalent` (it cannot change behaviour) or `gpu-only` (a real change a CPU cannot show: left
for the GPU checks). Mutant ids (`module.xǁClassǁmethod__mutmut_N`, mutmut's names) are stable only while the
module's source is unchanged, so a review counts only when its hash is the run's, and a run counts only when its
hash is the module's source now (else the report marks it `stale`).

report.md and summary.json are rebuilt from every module file each time."""

from __future__ import annotations

import argparse
import ast
import difflib
import hashlib
import json
import os
import platform
import subprocess
from collections import Counter
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import yaml
from tokenfleet.provenance import git_sha

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "results" / "mutation"
# mutmut 3.8's exit codes (mutmut/stats.py status_by_exit_code)
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", 36: "timeout",
          -24: "timeout", 24: "timeout", 152: "timeout", 255: "timeout", 37: "caught by type check",
          -11: "segfault", -9: "segfault", None: "not checked"}
VERDICTS = ("killed", "timeout", "segfault", "survived", "no tests", "suspicious", "not checked")


def status(code: int | None) -> str:
    return STATUS.get(code, "suspicious")


def module_key(path: str) -> str:
    """tokenfleet/capacity/routing.py or harness/capacity/routing.py -> capacity.routing"""
    return path.split("/", 1)[1].removesuffix(".py").replace("/", ".")


def source_sha(key: str) -> str:
    return hashlib.sha256((ROOT / "harness" / (key.replace(".", "/") + ".py")).read_bytes()).hexdigest()


def mutant_diffs(mutated: Path) -> dict[str, str]:
    """Each mutant's function against the original, from the mutated file mutmut wrote (`x…__mutmut_N` beside
    `x…__mutmut_orig`)."""
    src = mutated.read_text()
    lines = src.splitlines(keepends=True)  # a function's text by its line span (get_source_segment re-splits the
    funcs = {}                             # whole file on every call: minutes for a module of 1000 mutants)
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and "__mutmut_" in node.name:
            funcs[node.name] = "".join(lines[node.lineno - 1:node.end_lineno])
    out = {}
    for name, text in funcs.items():
        base, _, n = name.rpartition("__mutmut_")
        if n == "orig" or base + "__mutmut_orig" not in funcs:
            continue
        orig = funcs[base + "__mutmut_orig"].replace(base + "__mutmut_orig", base).splitlines()
        diff = difflib.unified_diff(orig, text.replace(name, base).splitlines(), lineterm="", n=0)
        out[name] = "\n".join(line for line in diff if not line.startswith(("---", "+++", "@@")))
    return out


def write_modules(stage: Path, note: str) -> None:
    """results/mutation/modules/<module>.json for each module the run in `stage` mutated."""
    run = json.loads((stage / "run.json").read_text())  # mutate.sh: the modules and the test selection
    seconds = json.loads((stage / "seconds.json").read_text()) if (stage / "seconds.json").is_file() else {}
    recheck = json.loads((stage / "recheck.json").read_text()) if (stage / "recheck.json").is_file() else {}
    commit = git_sha(ROOT)[:7]
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "harness", "tests"], capture_output=True,
                           text=True, cwd=ROOT).stdout.strip()
    (OUT / "modules").mkdir(parents=True, exist_ok=True)
    for mod in run["modules"]:
        key = module_key(mod)
        meta = json.loads((stage / "mutants" / (mod + ".meta")).read_text())
        codes = meta["exit_code_by_key"]
        diffs = mutant_diffs(stage / "mutants" / mod)
        staged = hashlib.sha256((stage / mod).read_bytes()).hexdigest()
        record = {
            "module": "harness/" + mod.removeprefix("tokenfleet/"),
            "sha256": staged,
            "command": f"MUTATE_TESTS='{' '.join(run['tests'])}' "
                       f"make mutate MODULES='{mod.removeprefix('tokenfleet/')}'",
            "tool": "mutmut " + metadata.version("mutmut"),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": commit + (" (+ uncommitted changes in harness/ or tests/)" if dirty else ""),
            "machine": f"{platform.node()}: {os.cpu_count()} CPUs (shared), {platform.machine()}, "
                       f"Python {platform.python_version()}",
            "seconds": {"mutants": round(sum(meta.get("durations_by_key", {}).values())), **seconds},
            "note": note,
            "counts": {v: n for v, n in Counter(status(c) for c in codes.values()).items()},
            "survivors": {k: diffs.get(k.rpartition(".")[2], "(diff not found)")
                          for k in sorted(codes) if status(codes[k]) in ("survived", "no tests")},
            "killed by the oracles' recheck": {k: recheck[k]["by"] for k in sorted(codes)
                                               if recheck.get(k, {}).get("result") == "killed"},
        }
        (OUT / "modules" / f"{key}.json").write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")


def reviews(key: str) -> tuple[str | None, dict[str, dict]]:
    """(the module's sha256 when reviewed, {mutant id: {kind, why}}) from results/mutation/equivalent/<key>.yaml"""
    f = OUT / "equivalent" / f"{key}.yaml"
    if not f.is_file():
        return None, {}
    data = yaml.safe_load(f.read_text()) or {}
    return data.get("sha256"), {e["id"]: e for e in data.get("mutants") or []}


def aggregate() -> dict:
    """report.md and summary.json over every module file; returns the summary."""
    modules, sections = {}, []
    for f in sorted((OUT / "modules").glob("*.json")):
        rec = json.loads(f.read_text())
        key = f.stem
        counts = Counter(rec["counts"])
        reviewed_sha, reviewed = reviews(key)
        valid = reviewed if reviewed_sha == rec["sha256"] else {}
        surv = rec["survivors"]
        eq = {k: valid[k] for k in surv if k in valid}
        killed = counts["killed"] + counts["timeout"] + counts["segfault"]
        tested = killed + counts["survived"] + counts["suspicious"]
        modules[rec["module"]] = {
            "mutants": sum(counts.values()), **{v: counts[v] for v in VERDICTS},
            "equivalent": sum(1 for e in eq.values() if e.get("kind", "equivalent") == "equivalent"),
            "gpu-only": sum(1 for e in eq.values() if e.get("kind") == "gpu-only"),
            "unreviewed survivors": len(surv) - len(eq),
            "killed by the oracles' recheck": len(rec["killed by the oracles' recheck"]),
            "score": round(killed / tested, 4) if tested else None,
            "score excluding equivalents": round(killed / (tested - len(eq)), 4) if tested - len(eq) else None,
            "stale": rec["sha256"] != source_sha(key),
            "reviews stale": bool(reviewed) and reviewed_sha != rec["sha256"],
            **{k: rec[k] for k in ("command", "date", "commit", "machine", "seconds", "tool")},
        }
        sec = [f"## {rec['module']}", "",
               f"`{rec['command']}`, {rec['tool']}, {rec['date']}, commit {rec['commit']}, {rec['machine']}; "
               f"seconds: {', '.join(f'{k} {v}' for k, v in rec['seconds'].items())}."
               + (" **Stale: the module changed since this run.**" if modules[rec["module"]]["stale"] else "")
               + (" **Its reviews were of another version of the module: review again.**"
                  if modules[rec["module"]]["reviews stale"] else ""), ""]
        if rec.get("note"):
            sec += [rec["note"], ""]
        if rec["killed by the oracles' recheck"]:
            sec += ["Survivors of mutmut's pass killed by the oracle tests (scripts/mutation_recheck.py):", "",
                    "| mutant | killed by |", "|---|---|"]
            sec += [f"| `{k}` | `{t}` |" for k, t in rec["killed by the oracles' recheck"].items()] + [""]
        for k, diff in surv.items():
            e = eq.get(k)
            sec += [f"### `{k}`" + (f" ({e.get('kind', 'equivalent')})" if e else " (unreviewed)"), "",
                    "```diff", diff, "```", ""]
            if e:
                sec += [f"Reviewed, {e.get('kind', 'equivalent')}: {e['why']}", ""]
        sections += sec
    total = Counter()
    for s in modules.values():
        total.update({k: s[k] for k in ("mutants", *VERDICTS, "equivalent", "gpu-only", "unreviewed survivors")})
    summary = {"how": "scripts/mutation_report.py over results/mutation/modules/*.json (one `make mutate` run per "
                      "module file; reviews in results/mutation/equivalent/)",
               "total": dict(total), "modules": modules}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    lines = ["# Mutation testing (`make mutate`)", "",
             "One run per module (its command, commit, date and machine under its heading). Score = (killed + "
             "timeout) / mutants that ran tests; `no tests`: no test in the run's selection reaches the function; "
             "`unreviewed`: survivors no reviewer has marked `equivalent` or `gpu-only` "
             "(results/mutation/equivalent/). `stale`: the module changed since its run.", "",
             "| module | mutants | killed | timeout | survived | equivalent | gpu-only | unreviewed | no tests | "
             "not checked | score | stale |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m, s in modules.items():
        lines.append(f"| {m} | {s['mutants']} | {s['killed']} | {s['timeout']} | {s['survived']} | "
                     f"{s['equivalent']} | {s['gpu-only']} | {s['unreviewed survivors']} | {s['no tests']} | "
                     f"{s['not checked']} | {s['score']} | {'yes' if s['stale'] else ''} |")
    t = total
    lines.append(f"| **all** | {t['mutants']} | {t['killed']} | {t['timeout']} | {t['survived']} | {t['equivalent']} | "
                 f"{t['gpu-only']} | {t['unreviewed survivors']} | {t['no tests']} | {t['not checked']} | | |")
    (OUT / "report.md").write_text("\n".join(lines + [""] + sections))
    print("\n".join(lines[4:]))
    return summary


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", type=Path, help="a mutate.sh staging folder: write its modules' files first")
    ap.add_argument("--note", default="", help="how the run went (interrupted, resumed, rechecked), for the report")
    a = ap.parse_args()
    if a.stage:
        write_modules(a.stage.resolve(), a.note)
    aggregate()


if __name__ == "__main__":
    main()
