"""README/docs numbers against the committed files they cite (`docs/claims.yaml`, `scripts/check_claims.py`): every
claim holds today, and a tampered doc or a tampered result file fails the check."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("check_claims", ROOT / "scripts" / "check_claims.py")
cc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cc)
CLAIMS = cc.load_claims(ROOT / "docs" / "claims.yaml")


def test_every_claim_holds():
    assert cc.check(CLAIMS, ROOT) == []
    assert cc.main(["--root", str(ROOT)]) == 0


def test_claims_cover_the_numbers_the_issue_names():
    files = {c["file"] for c in CLAIMS}
    assert "results/validation/ratios.json" in files  # the validation count
    assert any(f.startswith("results/reference/cpu-amd-epyc-2core-2026-12-04/") for f in files)  # headline, CPU
    assert any(f.startswith("results/reference/h200-2026-11-28/") for f in files)  # the H200 numbers
    assert "README.md" in {c["doc"] for c in CLAIMS}


def _copy(tmp_path: Path) -> Path:
    """The docs and every file a claim cites, copied to a scratch root."""
    for rel in {c["doc"] for c in CLAIMS} | {c["file"] for c in CLAIMS} | {"docs/claims.yaml"}:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, tmp_path / rel)
    return tmp_path


def test_the_copy_passes_then_a_changed_number_in_the_readme_fails(tmp_path):
    root = _copy(tmp_path)
    assert cc.check(CLAIMS, root) == []
    readme = root / "README.md"
    text = readme.read_text(encoding="utf-8")
    assert text.count("**47 of 49 rows") == 1
    readme.write_text(text.replace("**47 of 49 rows", "**48 of 49 rows"), encoding="utf-8")
    errs = cc.check(CLAIMS, root)  # the doc changed, the claims did not: their text is gone
    assert errs and all("README.md" in e and "text not found" in e for e in errs)
    assert cc.main(["--root", str(root)]) == 1
    # the doc and its claims changed together, the file did not: the number is not the file's
    edited = [{**c, "text": c["text"].replace("**47 of 49 rows", "**48 of 49 rows")} for c in CLAIMS]
    errs = cc.check(edited, root)
    assert len(errs) == 1 and "ratios.json gives '47 of'" in errs[0]


def test_a_changed_result_file_fails_the_claim_that_cites_it(tmp_path):
    root = _copy(tmp_path)
    f = root / "results" / "validation" / "ratios.json"
    data = json.loads(f.read_text(encoding="utf-8"))
    data["summary"]["within_20pct"] -= 1  # the count README states no longer matches the file
    f.write_text(json.dumps(data), encoding="utf-8")
    errs = cc.check(CLAIMS, root)
    assert errs and all("ratios.json gives" in e for e in errs)


def test_a_changed_point_fails_the_h200_claim(tmp_path):
    root = _copy(tmp_path)
    h200 = [c for c in CLAIMS if c["file"].endswith("points.jsonl") and "h200" in c["file"]]
    assert h200
    f = root / h200[0]["file"]
    lines = f.read_text(encoding="utf-8").splitlines()
    out = []
    for line in lines:
        p = json.loads(line)
        if all(p.get(k) == v for k, v in h200[0]["where"].items()):
            p[h200[0]["field"]] *= 1.1
        out.append(json.dumps(p))
    f.write_text("\n".join(out) + "\n", encoding="utf-8")
    assert any(h200[0]["text"][:40] in e for e in cc.check(CLAIMS, root))


def test_bad_claims_file_is_one_line_exit_2(tmp_path, capsys):
    bad = tmp_path / "claims.yaml"
    bad.write_text("claims:\n  - {doc: README.md, text: x, file: y, colour: red}\n", encoding="utf-8")
    assert cc.main(["--root", str(ROOT), "--claims", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "claims.0" in err and "colour" in err


@pytest.mark.parametrize("where, n", [({"a": 1}, 2), ({"a": 3}, 0)])
def test_where_needs_exactly_one_record(where, n):
    with pytest.raises(LookupError, match=f"{n} records"):
        cc._pick([{"a": 1}, {"a": 1, "b": 2}, {"a": 2}], where)


def _flat_doc(name: str) -> str:
    return cc._flat((ROOT / name).read_text(encoding="utf-8"))


def test_llama70b_long_output_range_is_the_files():
    """README's '1.08–1.35 on H200 and 1.16–1.37 on H100 TP2': the min and max over those rows of the ratio file."""
    rows = json.loads((ROOT / "results/validation/ratios.json").read_text(encoding="utf-8"))["rows"]
    for gpu, label in (("h200", "on H200"), ("h100-sxm", "on H100 TP2")):
        r = [x["ratio"] for x in rows if x["source"] == "trtllm" and x["model"] == "llama-3.1-70b" and x["gpu"] == gpu
             and x["output_len"] in (2000, 2048)]
        assert len(r) == 5 and f"{min(r):.2f}–{max(r):.2f} {label}" in _flat_doc("README.md")


def test_h200_triton_grid_cells_are_the_runs():
    """README: the H200 Triton decode grid is 'batch 1 and 8 at 1k and 4k context, 32 and 128 at 4k'."""
    cells = set()
    for part in ("quick", "followup"):
        for line in (ROOT / f"results/reference/h200-2026-11-28/{part}/run/points.jsonl").read_text().splitlines():
            p = json.loads(line)
            if p.get("kind") == "decode" and p.get("backend") == "triton" and p.get("status") == "ok":
                cells.add((p["batch"], p["context"]))
    assert cells == {(1, 1024), (1, 4096), (8, 1024), (8, 4096), (32, 4096), (128, 4096)}
    assert "exact at its measured cells: batch 1 and 8 at 1k and 4k context, 32 and 128 at 4k" in _flat_doc("README.md")


def test_node_plan_table_is_todays_plan():
    """README's node plan table: `tokenfleet bench --suite node --plan`'s part totals (a code estimate, so recomputed
    here rather than committed as a file)."""
    from tokenfleet.measure.plan import part_totals, plan_rows, planning_context
    from tokenfleet.measure.suite import load_suite

    suite = load_suite("node")
    ctx = planning_context(suite)
    totals = part_totals(plan_rows(suite, ctx), ctx.device.kind)
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    table = text[text.index("| part | jobs | est. s |"):].split("\n\n")[0]
    lines = table.splitlines()[2:]
    assert len(lines) == len(totals)
    names = {t["part"] for t in totals}
    for t in totals:
        row = [ln for ln in lines if (cell := ln.split(" | ")[0][2:]) == t["part"]
               or (cell.startswith(f"{t['part']} (") and cell not in names)]
        assert len(row) == 1 and row[0].endswith(f"| {t['jobs']} | {t['est_s']:g} |"), (t, row)


def test_cpu_run_time_and_drift_are_the_manifests():
    """README: 'the bench took 65 s (the manifest's created → finished)' and start probes '26–30% below' the end's."""
    import datetime as dt

    m = json.loads((ROOT / "results/reference/cpu-amd-epyc-2core-2026-12-04/manifest.json").read_text())
    took = dt.datetime.fromisoformat(m["finished"]) - dt.datetime.fromisoformat(m["created"])
    below = sorted(1 - m["ceilings"][k] / m["ceilings_end"][k] for k in ("copy_gbps", "read_gbps"))
    doc = _flat_doc("README.md")
    assert f"bench took {took.total_seconds():.0f} s (the manifest's `created` → `finished`)" in doc
    assert f"bandwidth {below[0]:.0%}–{below[1]:.0%} below its end probes".replace("%–", "–") in doc


@pytest.mark.parametrize("name", ["project-llama-3.1-8b-h200-chat", "project-deepseek-v3-day6"])
def test_readme_results_still_what_their_command_gives(name, monkeypatch):
    """results/readme/ holds the outputs README quotes (scripts/readme_results.py); the project examples are rerun
    here (a second each) and must give the committed numbers within 3%, or the file (and README) is stale."""
    from conftest import invoke_cli

    committed = json.loads((ROOT / "results" / "readme" / f"{name}.json").read_text(encoding="utf-8"))
    monkeypatch.chdir(ROOT)  # the command's --run paths are the repository's
    res = invoke_cli(*committed["command"].split()[1:])
    assert res.exit_code == 0, res.stderr
    now = json.loads(res.stdout)
    for k in ("batch", "tpot_ms", "ttft_ms", "total_tokens_per_s_per_gpu", "output_tokens_per_s_per_gpu"):
        assert now[k] == pytest.approx(committed["output"][k], rel=0.03), k


def test_readme_headline_block_is_the_committed_headline():
    """README's opening screen is `results/reference/cpu-amd-epyc-2core-2026-12-04/headline.txt`, line for line."""
    head = (ROOT / "results/reference/cpu-amd-epyc-2core-2026-12-04/headline.txt").read_text(encoding="utf-8")
    assert f"```\n{head.rstrip()}\n```" in (ROOT / "README.md").read_text(encoding="utf-8")


def test_a_missing_doc_or_file_is_a_failing_claim_not_a_crash(tmp_path):
    claims = [{"doc": "nope.md", "text": "x", "file": "a.json", "key": "k"},
              {"doc": "README.md", "text": "tokenfleet", "file": "missing.json", "key": "k"}]
    (tmp_path / "README.md").write_text("# tokenfleet\n", encoding="utf-8")
    errs = cc.check(claims, tmp_path)
    assert len(errs) == 2 and "cannot read nope.md" in errs[0] and "cannot read missing.json" in errs[1]
