"""The headline (tokenfleet.capacity.headline): its arithmetic against capacity_table's rows, and `make run`'s steps on
the CPU (bench a tiny suite, report, capacity --quiet) with the printed figures checked against --format json."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from conftest import TINY_CEILINGS_SUITE
from tokenfleet.capacity.fleet import capacity_table, outgrown_state
from tokenfleet.capacity.headline import headline, headline_lines, tokens


@pytest.fixture(scope="module")
def mix() -> tuple[list[dict], dict, dict]:
    rows, summary = capacity_table("china-2026-mix")
    return rows, summary, headline(rows, summary)


def test_both_demands_and_their_coverage(mix):
    rows, s, h = mix
    reported, primary = h["demands"]
    assert (reported["tokens_per_day"], primary["tokens_per_day"]) == (14e12, 140e12)
    assert reported["coverage"] == pytest.approx(s["coverage_vs_china_reported"])
    assert primary["coverage"] == pytest.approx(s["coverage_vs_china_nda"])
    assert primary["coverage"] == pytest.approx(reported["coverage"] / 10)
    assert h["capacity_tokens_per_day"] == rows[-1]["tokens_per_day"] and h["gpus"] == rows[-1]["count"]


def test_gpus_needed_meet_the_peak_demand_and_no_more(mix):
    rows, _, h = mix
    per_gpu = {r["gpu"]: r["tokens_per_day_per_gpu"] for r in rows if r["gpu"] != "total"}  # routed share
    alone = {r["gpu"]: r["alone_tokens_per_s_per_gpu"] * 86_400 * h["utilization"] for r in rows if r["gpu"] != "total"}
    for d in h["demands"]:
        need = d["peak_tokens_per_day"]
        for gpu, n in d["gpus_needed_alone"].items():  # one type alone: enough, and one fewer is not
            assert n * alone[gpu] >= need * (1 - 1e-12) and need > (n - 1) * alone[gpu]
        served = sum(n * per_gpu[g] for g, n in d["gpus_needed_mix_by_type"].items())
        assert served >= need  # the fleet's own mix scaled up: rounding up per type never falls short
        assert served - need <= sum(per_gpu.values())
        assert d["gpus_needed_mix"] == sum(d["gpus_needed_mix_by_type"].values())
        assert d["gpus_needed_mix"] == pytest.approx(h["gpus"] * d["mix_scale"], abs=len(per_gpu))
    # the chosen demand (china-reported, the default) agrees with the table's own column
    assert h["demands"][0]["gpus_needed_alone"] == {r["gpu"]: r["gpus_needed_alone"] for r in rows[:-1]}


def test_outgrown_is_one_state():
    import datetime as dt

    today = dt.date(2026, 11, 28)
    assert outgrown_state(0.5, dt.date(2025, 1, 1), today) == "already"
    assert outgrown_state(1.5, dt.date(2026, 6, 1), today) == "by today"
    assert outgrown_state(1.5, dt.date(2027, 6, 1), today) == "later"
    assert outgrown_state(1.5, None, today) == "never"


def test_sources_and_device_note(mix):
    _, _, h = mix
    assert set(h["sources"]) >= {"measured", "calibrated", "projected"}
    assert sorted(sum(h["sources"].values(), [])) == sorted(h["demands"][0]["gpus_needed_alone"])
    assert "no run given" in h["measured_on"]["note"]
    text = "\n".join(headline_lines(h))
    assert "14T/day" in text and "140T/day" in text and "万亿" in text and len(headline_lines(h)) <= 12


def test_make_run_steps_on_the_cpu(tmp_path: Path):
    """bench (tiny suite) -> report -> capacity --quiet, as `make run` chains them; every figure the headline prints
    is the JSON's."""
    from tokenfleet.cli.main import app
    from typer.testing import CliRunner

    def cli(*args: str) -> str:  # in-process: one torch start-up for the four steps
        r = CliRunner().invoke(app, list(args))
        assert r.exit_code == 0, r.output
        return r.stdout

    suite = tmp_path / "tiny.yaml"
    suite.write_text(TINY_CEILINGS_SUITE.format(id="tiny"))
    run = tmp_path / "run"
    assert cli("bench", "--suite", str(suite), "--out", str(run), "--quiet").strip() == f"run folder: {run}"
    cli("report", str(run), "--fleet", "china-2026-mix")
    assert "<h2>Headline" in (run / "report.html").read_text()
    text = cli("capacity", "--fleet", "china-2026-mix", "--run", str(run), "--quiet")
    h = json.loads(cli("capacity", "--fleet", "china-2026-mix", "--run", str(run), "--quiet", "--format", "json")
                   )["headline"]
    lines = text.splitlines()
    assert lines[-1] == f"run folder: {run}" and "┃" not in text  # the headline, no table
    assert lines[0].startswith(f"china-2026-mix: {h['gpus']:,} GPUs serve {tokens(h['capacity_tokens_per_day'])}")
    assert "cpu" in lines[1] and "no GPU efficiencies" in lines[2]
    for d in h["demands"]:
        row = next(line for line in lines if line.strip().startswith(f"{d['label']} {tokens(d['tokens_per_day'])}"))
        coverage, needed = re.search(r"/day\s+(\S+)\s+([\d,]+) \(", row).groups()
        assert float(coverage) == pytest.approx(d["coverage"], rel=5e-3)
        assert int(needed.replace(",", "")) == d["gpus_needed_mix"]
        assert (f"on {d['outgrows_fleet_on']}" if d["outgrown"] == "later" else d["outgrown"]) in row
    assert "do not depend on the fleet's counts" in text
    alone = " ".join(lines)
    for gpu, n in h["demands"][1]["gpus_needed_alone"].items():
        assert f"{gpu} {h['demands'][0]['gpus_needed_alone'][gpu]:,} / {n:,}" in alone
    assert math.isclose(h["demands"][1]["coverage"] * 10, h["demands"][0]["coverage"])
