"""Validation as data: `results/validation/ratios.json` (written by `python -m tokenfleet.capacity.validate --write`)
holds one row per row of `configs/validation/published.yaml`, every row the cited TensorRT-LLM page gives for the
model/GPU/TP columns the table covers, and each row's ratio recomputed today stays within 3% of its committed value:
a regression guard apart from the ±20% goal, which the file reports (summary.within_20pct of summary.rows)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenfleet.capacity.validate import GOAL, load_published, markdown, ratio_file, validation_rows

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = json.loads((ROOT / "results" / "validation" / "ratios.json").read_text(encoding="utf-8"))
PIN = 0.03  # a row's ratio may move this much (relative) before its committed value must be rewritten


def _key(x: dict) -> tuple:
    return (x["source"], x["model"], x["gpu"], str(x["tp"]), x["input_len"], x["output_len"], x["metric"])


@pytest.fixture(scope="module")
def rows_today():
    return validation_rows([str(ROOT / r) for r in COMMITTED["runs"]])


@pytest.fixture(scope="module")
def today(rows_today):
    return ratio_file(rows_today, validation_rows(kv_dtype="bf16"), COMMITTED["runs"])


def test_readme_table_is_the_commands(rows_today):
    """README's validation table is `python -m tokenfleet.capacity.validate --run ...`'s, as it prints it today."""
    assert markdown(rows_today) in (ROOT / "README.md").read_text(encoding="utf-8")


def test_file_holds_every_published_row_once():
    pub = load_published()
    keys = [_key(x) for x in COMMITTED["rows"]]
    assert len(keys) == len(set(keys)) == len(pub.rows) == COMMITTED["summary"]["rows"]
    assert COMMITTED["command"].startswith("python -m tokenfleet.capacity.validate --write")
    assert COMMITTED["date"] and COMMITTED["commit"] and COMMITTED["runs"]
    assert all("calibrated_ratio" in x for x in COMMITTED["rows"])


def test_trtllm_rows_are_every_row_of_the_four_columns():
    """perf-overview.md @ 00f37686 gives ten ISL/OSL pairs for each column: Llama 3.1 8B H200 TP1, H100 TP1; Llama
    3.3 70B H200 TP1, H100 TP2 (FP8). All 40 are in the file; no other trtllm column is."""
    pairs = {(128, 128), (128, 2048), (128, 4096), (500, 2000), (1000, 1000), (1000, 2000), (2048, 128), (2048, 2048),
             (5000, 500), (20000, 2000)}
    cols = {("llama-3.1-8b", "h200", 1), ("llama-3.1-8b", "h100-sxm", 1), ("llama-3.1-70b", "h200", 1),
            ("llama-3.1-70b", "h100-sxm", 2)}
    rows = [x for x in COMMITTED["rows"] if x["source"] == "trtllm"]
    assert len(rows) == 40
    for c in cols:
        got = {(x["input_len"], x["output_len"]) for x in rows if (x["model"], x["gpu"], x["tp"]) == c}
        assert got == pairs, c
    assert {(x["model"], x["gpu"], x["tp"]) for x in rows} == cols and {x["dtype"] for x in rows} == {"fp8"}


def test_moe_rows_kept_with_their_marking():
    moe = [x for x in COMMITTED["rows"] if x["source"].startswith(("deepseek", "sglang"))]
    assert len(moe) == 7
    missed = [x for x in moe if x["expected_miss"]]
    assert [(x["source"], x["metric"]) for x in missed] == [("deepseek-day6", "prefill_input")]


def test_every_ratio_pinned_within_3pct_of_the_committed_file(today):
    now = {_key(x): x for x in today["rows"]}
    assert set(now) == {_key(x) for x in COMMITTED["rows"]}
    moved = [f"{k}: {x['ratio']:.4f} committed, {now[k]['ratio']:.4f} now" for k, x in
             ((_key(x), x) for x in COMMITTED["rows"]) if abs(now[k]["ratio"] / x["ratio"] - 1) > PIN]
    assert not moved, "rewrite results/validation/ratios.json if the change is meant:\n" + "\n".join(moved)
    for x in COMMITTED["rows"]:
        for k in ("ratio_kv_bf16", "calibrated_ratio"):
            if k in x:
                assert now[_key(x)][k] == pytest.approx(x[k], rel=PIN), (k, x)


def test_goal_and_marks_agree_with_the_file(today):
    """The file's flags are its ratios' (not typed in); which rows miss ±20% is what is committed; every row outside
    its own tolerance is marked expected_miss and every marked row still misses."""
    for x in COMMITTED["rows"]:
        assert x["within_20pct"] == (1 - GOAL <= x["ratio"] <= 1 + GOAL)
        assert x["within_tolerance"] == (1 - x["tolerance"] <= x["ratio"] <= 1 + x["tolerance"])
        assert x["within_tolerance"] != x["expected_miss"], x
    s = COMMITTED["summary"]
    assert s["within_20pct"] == sum(x["within_20pct"] for x in COMMITTED["rows"])
    assert s["within_20pct"] == today["summary"]["within_20pct"]
    assert s["outside_20pct"] == today["summary"]["outside_20pct"]
    assert s["ratio_min"] == min(x["ratio"] for x in COMMITTED["rows"])
    assert s["ratio_max"] == max(x["ratio"] for x in COMMITTED["rows"])


def test_ratio_is_projected_over_published_per_gpu():
    for x in COMMITTED["rows"]:
        assert x["ratio"] == pytest.approx(x["projected_per_gpu"] / x["published_per_gpu"], rel=1e-3)
    pub = {(r.source, r.model, r.gpu, str(r.tp if not r.deployment else r.deployment), r.input_len, r.output_len,
            r.metric): r for r in load_published().rows}
    for x in COMMITTED["rows"]:
        r = pub[_key(x)]
        assert x["published_per_gpu"] == pytest.approx(r.published / (r.published_gpus or r.tp))
