"""`tokenfleet compare`: identical runs, a slowed point gated by --fail-over, cross-device labels, schema refusal."""

from __future__ import annotations

import json
from pathlib import Path

from harness.report.compare import compare
from tests.conftest import run_cli
from tests.test_report import make_run, synthetic_points


def _slow_one(points: list[dict], factor: float) -> list[dict]:
    """A copy of `points` with the torch gemm at m=4096 `factor` times slower (and its rates lower)."""
    out = [dict(p) for p in points]
    p = next(p for p in out if p.get("op") == "gemm" and p.get("backend") == "torch" and p.get("m") == 4096)
    for f in ("median_ms", "p20_ms", "p80_ms"):
        p[f] *= factor
    for f in ("tflops", "gbps"):
        p[f] /= factor
    return out


def test_identical_runs(tmp_path: Path):
    a = make_run(tmp_path / "a", synthetic_points(), run_id="a")
    b = make_run(tmp_path / "b", synthetic_points(), run_id="b")
    cmp = compare(a, b)
    timed = [r for r in cmp.rows if r["time_ratio"] is not None]
    assert len(timed) > 15
    assert all(r["time_ratio"] == 1 and r["changed"] == "same" for r in timed)
    assert all(r["throughput_ratio"] == 1 for r in timed if r["throughput_ratio"] is not None)
    assert not cmp.cross_device and not cmp.regressions(0)
    assert {r["changed"] for r in cmp.rows} <= {"same", "n/a"}  # failed on both sides: n/a, not a regression

    r = run_cli("compare", str(a), str(b), "--fail-over", "5", "--format", "json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["cross_device"] is False and len(data["rows"]) == len(cmp.rows)


def test_slowed_point_fails_over_threshold(tmp_path: Path):
    pts = synthetic_points()
    a = make_run(tmp_path / "a", pts, run_id="a")
    b = make_run(tmp_path / "b", _slow_one(pts, 1.5), run_id="b")
    rows = [r for r in compare(a, b).rows if r["changed"] != "same" and r["changed"] != "n/a"]
    assert len(rows) == 1 and rows[0]["changed"] == "slower" and rows[0]["name"] == "gemm"
    assert abs(rows[0]["time_ratio"] - 1.5) < 1e-9 and abs(rows[0]["throughput_ratio"] - 1 / 1.5) < 1e-9

    r = run_cli("compare", str(a), str(b), "--fail-over", "10")
    assert r.returncode == 1
    assert "regression: kernel gemm torch bf16" in r.stderr and "slower x1.500" in r.stderr
    assert run_cli("compare", str(a), str(b), "--fail-over", "60").returncode == 0  # 50% slower is under 60%
    assert run_cli("compare", str(a), str(b)).returncode == 0  # without --fail-over: a report, not a gate
    # A slowdown inside the noise (spread 4%) is "same", whatever --fail-over says.
    c = make_run(tmp_path / "c", _slow_one(pts, 1.03), run_id="c")
    assert run_cli("compare", str(a), str(c), "--fail-over", "1").returncode == 0


def test_cross_device_and_one_sided_points(tmp_path: Path):
    pts = synthetic_points()
    a = make_run(tmp_path / "a", pts, run_id="a")
    b_pts = [p for p in pts if p.get("op") != "rmsnorm"] + [
        {"kind": "kernel", "op": "silu_mul", "backend": "torch", "dtype": "bf16", "rows": 1, "n": 14336,
         "status": "ok", "median_ms": 0.01}]
    b = make_run(tmp_path / "b", b_pts, device="NVIDIA H200", run_id="b")
    cmp = compare(a, b)
    assert cmp.cross_device and all(r["cross_device"] for r in cmp.rows)
    assert {r["name"] for r in cmp.rows if r["changed"] == "only_a"} == {"rmsnorm"}
    assert [r["name"] for r in cmp.rows if r["changed"] == "only_b"] == ["silu_mul"]
    r = run_cli("compare", str(a), str(b), "--format", "md")
    assert r.returncode == 0, r.stderr
    assert "cross-device comparison" in r.stdout and "Points in one run only" in r.stdout


def test_different_schema_versions_refused(tmp_path: Path):
    a = make_run(tmp_path / "a", synthetic_points()[:3], run_id="a")
    b = make_run(tmp_path / "b", synthetic_points()[:3], run_id="b")
    m = json.loads((b / "manifest.json").read_text())
    m["schema_version"] = 2
    (b / "manifest.json").write_text(json.dumps(m))
    r = run_cli("compare", str(a), str(b))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "schema_version" in lines[0] and "not comparable" in lines[0], r.stderr
