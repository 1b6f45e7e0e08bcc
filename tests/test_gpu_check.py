"""`make gpu-check`'s own logic on the CPU (scripts/gpu_check.sh with a fake suite and small limits): the time split
(tests cut at their limit, the suite given what the total leaves), the value order, the partial run kept and
tabled, the one-screen headline (tokenfleet.report.screen), a second check into the same folder measuring anew; the
default test order (what never ran on a GPU first); and the run's provenance (git commit, version)."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO
from tokenfleet import provenance, results
from tokenfleet.report.screen import screen

# Slow points (>= 1 s of samples each), more of them than the suite's share of the budget holds even on an idle
# machine (96 torch decode points), and a share large enough for a busy one to measure some.
FAKE_SUITE = """
id: fake
description: a suite longer than its budget
timing: {min_samples: 2, min_time_s: 1.0, warmup_s: 0.0, max_samples: 100000}
noise_limit: 10
kernels:
  cases:
    - {op: silu_mul, dtypes: [fp32], backends: [torch], shapes: [{rows: 4, n: 64}, {rows: 8, n: 64}]}
decode: {models: [tiny], dtypes: [fp32], backends: [torch, triton], batch: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],
         context: [8, 16, 32, 64, 128, 256, 384, 512]}  # tiny: 512 positions (suites refuse more)
ceilings: {copy_mb: 1, matmul: {fp32: 64}, matvec: {n: 64, k: 64, dtypes: [fp32]}}
"""

# The whole check's budget: the set-up (2 s idle, 10-15 s on a loaded 2-core machine), the fake tests cut at 3 s, and
# the rest for the suite: a few seconds of Python start-up, then ceilings and decode points until the cut.
TOTAL_S = 30

SLOW_TESTS = """
import time

def test_quick():
    assert True

def test_slow():
    time.sleep(120)
"""


@pytest.fixture(scope="module")
def gpu_check(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_check")
    (tmp / "fake.yaml").write_text(FAKE_SUITE)
    (tmp / "test_fake.py").write_text(SLOW_TESTS)
    out = tmp / "out"
    env = {**os.environ, "OUT_DIR": str(out), "PYTHON": sys.executable, "GPU_CHECK_DEVICE": "cpu",
           "GPU_CHECK_SUITE": str(tmp / "fake.yaml"), "GPU_CHECK_TESTS": str(tmp / "test_fake.py"),
           "GPU_CHECK_TOTAL_S": str(TOTAL_S), "GPU_CHECK_TESTS_S": "3", "GPU_CHECK_RESERVE_S": "0",
           "GPU_CHECK_CACHE": str(tmp / "cache"), "TRITON_INTERPRET": "1", "COLUMNS": "200",
           # The fake tests need no plugins; loading them on a busy machine can outlast the tests' share.
           "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                          timeout=180, cwd=REPO)
    return proc, _check_dir(proc, out), env


def _check_dir(proc, out: Path) -> Path:
    """The folder this check wrote (its last line names its run: CHECK/run)."""
    last = proc.stdout.strip().splitlines()[-1]
    check = Path(last.rsplit("run in ", 1)[1]).parent
    assert check.parent == out and check.name.startswith("check-"), last
    return check


def test_time_split_cuts_tests_then_gives_the_suite_the_rest(gpu_check):
    proc, out, _ = gpu_check
    last = proc.stdout.strip().splitlines()[-1]
    assert "tests rc=124" in last and "bench rc=124" in last, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode != 0
    spent = int(last.split("bench rc=124, ")[1].split(" s")[0])
    assert spent <= TOTAL_S + 30, last  # the total, plus the grace a killed process gets and the tables after it
    log = (out / "tests.log").read_text()
    assert "slowest" in log and "durations" in log  # --durations=15 reaches the log even when cut
    lines = log.splitlines()
    assert lines[0] == ".", lines[:3]  # test_quick's one dot; test_slow cut before its outcome (no F, no second dot)
    # pytest's summary, when it reached the log before the kill: exactly one test passed, none failed
    outcomes = [ln for ln in lines if re.search(r"\d+ (passed|failed|error)", ln)]
    assert all(re.fullmatch(r"=*\s*1 passed in [\d.]+s\s*=*", ln) for ln in outcomes), outcomes


def test_suite_runs_in_plan_order_and_a_cut_run_is_tabled(gpu_check):
    proc, out, _ = gpu_check
    run = out / "run"
    assert (run / "manifest.json").is_file() and (run / "summary.md").is_file(), proc.stdout[-3000:]
    points = [json.loads(line) for line in (run / "points.jsonl").read_text().splitlines() if line.strip()]
    lines = (out / "plan.csv").read_text().splitlines()  # the jobs' table, then the per-part totals
    plan = [r for r in csv.DictReader(lines) if (r.get("n") or "").isdigit()]
    assert points and len(points) < len(plan), "the fake suite must be cut, with something measured"
    assert [p["kind"] for p in points] == [row["kind"] for row in plan[:len(points)]]
    assert points[0]["kind"] == "ceiling" and "kernel" not in [p["kind"] for p in points]
    assert (out / "gpu-check.tar.gz").is_file() and (out / "env.txt").is_file()
    shown = (out / "headline.md").read_text()
    assert f"after {len(points)} of {len(plan)} planned points" in shown
    assert shown in proc.stdout  # printed last, for the README


def test_a_second_check_into_the_same_folder_measures_anew(gpu_check, tmp_path):
    # Issue 23: the second check exited 2 at once ("run folder already has points") and printed the first one's
    # headline as its own. Now each check has its own folder; this one (a suite that finishes) shows its own run.
    proc1, first, env = gpu_check
    (tmp_path / "small.yaml").write_text(FAKE_SUITE.replace("id: fake", "id: small").split("kernels:")[0]
                                         + "ceilings: {copy_mb: 1, matmul: {fp32: 64}, matmul_layouts: [nt], "
                                           "matvec: {n: 64, k: 64, dtypes: [fp32]}, end_probe: false}\n")
    (tmp_path / "test_quick.py").write_text("def test_quick():\n    assert True\n")
    env = {**env, "GPU_CHECK_SUITE": str(tmp_path / "small.yaml"), "GPU_CHECK_TESTS": str(tmp_path / "test_quick.py"),
           "GPU_CHECK_TOTAL_S": "120"}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                          timeout=180, cwd=REPO)
    second = _check_dir(proc, first.parent)
    assert second != first and (first / "run" / "points.jsonl").is_file()  # the first check's run is untouched
    assert "bench rc=0" in proc.stdout.strip().splitlines()[-1], proc.stdout[-3000:] + proc.stderr[-3000:]
    points = results.read_points(second / "run")
    assert [p["kind"] for p in points] == ["ceiling"] * 4 and all(p["status"] in results.USABLE for p in points)
    run_id = results.read_manifest(second / "run")["run_id"]
    assert run_id != results.read_manifest(first / "run")["run_id"]
    shown = (second / "headline.md").read_text()
    assert "Partial" not in shown and shown in proc.stdout and shown not in proc1.stdout


def test_default_tests_run_what_never_ran_on_a_gpu_first():
    text = (REPO / "scripts" / "gpu_check.sh").read_text()
    files = re.search(r"GPU_CHECK_TESTS:-([^}]*)}", text).group(1).split()
    assert files[:3] == ["tests/test_fp8.py", "tests/test_timing.py", "tests/test_kernels_compile.py"]
    assert files[-1] == "tests/test_model.py" and all((REPO / f).is_file() for f in files)
    assert re.search(r"SUITE=\$\{GPU_CHECK_SUITE:-gpu-check}", text)


def test_headline_of_a_fake_run_tolerates_missing_kinds(tmp_path):
    run = tmp_path / "run"
    manifest = {"run_id": "r1", "suite": "s", "created": "2026-11-28T00:00:00+00:00", "git_sha": "unknown",
                "tokenfleet_version": "0.1.0", "environment": {"device": {"name": "Fake GPU", "kind": "cuda"}}}
    w = results.RunWriter(run, manifest)
    common = {"dtype": "bf16", "status": "ok", "device": "Fake GPU"}
    # A probe's telemetry is polled ({min, median, max} of each number), a point's one reading.
    polled = {"sm_clock_mhz": {"min": 1500.0, "median": 1900.0, "max": 1980.0}, "clock_event_reasons": ["SwPowerCap"]}
    w.append({"kind": "ceiling", "op": "copy", "value": 1000.0, "unit": "GB/s", "telemetry": polled, **common})
    for backend, ms in (("triton", 5.0), ("torch", 10.0)):
        for batch in (1, 64):
            w.append({"kind": "decode", "model": "m", "backend": backend, "batch": batch, "context": 4096,
                      "tokens_per_s": batch * 1000 / ms / (1 if batch == 1 else 2), "mbu": 0.5,
                      "telemetry": {"sm_clock_mhz": 1700}, **common})
    for backend, ms in (("triton", 1.0), ("torch", 2.0), ("compile", 0.5)):
        for m in (1, 16):
            w.append({"kind": "kernel", "op": "gemm", "backend": backend, "m": m, "n": 8, "k": 8, "median_ms": ms,
                      **common})
    w.append({"kind": "kernel", "op": "rope", "backend": "triton", "tokens": 8, "status": "error", "error": "x"})
    w.close()
    text = screen(run, "Partial: cut short.")
    assert "Fake GPU" in text and "**Partial: cut short.**" in text
    assert "SM clock 1500.0-1980.0 MHz" in text and "SwPowerCap" in text  # polled and single readings together
    assert "| m | triton | bf16 | 4096 |" in text  # batch 1 rows
    assert "| m | triton | bf16 | 64 | 4096 | 6,400.0 |" in text  # the best tokens/s per backend
    assert "| m | torch | bf16 | 64 | 4096 | 3,200.0 |" in text
    assert "2.00 (2.00-2.00, n=2)" in text and "0.50 (0.50-0.50, n=2)" in text  # vs vendor, vs compile
    assert "1 without a number" in text
    assert text.count("_(none measured)_") == 1  # prefill


def test_git_sha_only_for_this_projects_repository(tmp_path):
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    assert provenance.git_sha() == (head or "unknown")  # a clone: its commit; a tree without .git: unknown
    # A tree exported without .git inside another repository: that repository's commit is not ours.
    outer = tmp_path / "outer"
    export = outer / "export"
    shutil.copytree(REPO / "harness", export / "tokenfleet", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", export / "pyproject.toml")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(outer)]
    subprocess.run(["git", "init", "-q", str(outer)], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "outer"], check=True)
    code = "from tokenfleet import provenance as r; print(r.git_sha(), r.version())"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=export,
                          env={**os.environ, "PYTHONPATH": str(export)})
    assert proc.returncode == 0, proc.stderr
    got_sha, got_version = proc.stdout.split()
    assert got_sha == "unknown"
    assert got_version == provenance.version() != "0+unknown"  # the package version, always


def test_git_sha_without_git_is_unknown(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no git executable
    assert provenance.git_sha() == "unknown"
    assert provenance.git_sha(Path(tmp_path)) == "unknown"
