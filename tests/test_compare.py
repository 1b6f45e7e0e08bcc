"""`tokenfleet compare`: identical runs, a slowed point gated by --fail-over, cross-device labels, schema refusal.
The gate (exit 1) runs as a CI step would run it, in a subprocess; the other CLI calls invoke the app in-process."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import run_cli
from test_report import make_run, synthetic_points
from tokenfleet.cli.main import app
from tokenfleet.report.compare import FLOOR_NOTE, compare
from typer.testing import CliRunner


def cli(*args: str) -> SimpleNamespace:
    """`tokenfleet ARGS` in this process: exit code, stdout and stderr apart (an exception is exit code 1)."""
    r = CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})
    return SimpleNamespace(returncode=r.exit_code, stdout=r.stdout, stderr=r.stderr, exception=r.exception)


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

    r = cli("compare", str(a), str(b), "--fail-over", "5", "--format", "json")
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
    assert cli("compare", str(a), str(b), "--fail-over", "60").returncode == 0  # 50% slower is under 60%
    assert cli("compare", str(a), str(b)).returncode == 0  # without --fail-over: a report, not a gate
    # A slowdown inside the noise (spread 4%) is "same", whatever --fail-over says.
    c = make_run(tmp_path / "c", _slow_one(pts, 1.03), run_id="c")
    assert cli("compare", str(a), str(c), "--fail-over", "1").returncode == 0


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
    r = cli("compare", str(a), str(b), "--format", "md")
    assert r.returncode == 0, r.stderr
    assert "cross-device comparison" in r.stdout and "Points in one run only" in r.stdout


def test_different_schema_versions_refused(tmp_path: Path):
    a = make_run(tmp_path / "a", synthetic_points()[:3], run_id="a")
    b = make_run(tmp_path / "b", synthetic_points()[:3], run_id="b")
    m = json.loads((b / "manifest.json").read_text())
    m["schema_version"] = 2
    (b / "manifest.json").write_text(json.dumps(m))
    r = cli("compare", str(a), str(b))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "schema_version" in lines[0] and "not comparable" in lines[0], r.stderr


def _with_samples(points: list[dict], factor: float = 1.0, jitter: float = 0.01, seed: int = 1) -> list[dict]:
    """`points` with 40 samples each around median x `factor` (relative jitter `jitter`), as a new run keeps them."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for p in points:
        p = dict(p)
        if p.get("median_ms"):
            s = p["median_ms"] * factor * np.exp(jitter * rng.standard_normal(40))
            p["samples_ms"] = [float(x) for x in s]
            p["median_ms"] = float(np.median(s))
        out.append(p)
    return out


def test_bootstrap_identical_samples_are_same(tmp_path: Path):
    pts = _with_samples(synthetic_points())
    cmp = compare(make_run(tmp_path / "a", pts, run_id="a"), make_run(tmp_path / "b", pts, run_id="b"))
    timed = [r for r in cmp.rows if r["time_ratio"] is not None]
    assert timed and all(r["method"] == "bootstrap" and r["changed"] == "same" for r in timed)
    assert all(r["ratio_lo"] <= 1 <= r["ratio_hi"] for r in timed)


def test_bootstrap_shift_is_claimed_and_gated(tmp_path: Path):
    base = synthetic_points()
    a = make_run(tmp_path / "a", _with_samples(base, seed=1), run_id="a")
    b = make_run(tmp_path / "b", _with_samples(base, factor=1.2, seed=2), run_id="b")
    c = make_run(tmp_path / "c", _with_samples(base, factor=0.8, seed=3), run_id="c")
    slow = [r for r in compare(a, b).rows if r["time_ratio"] is not None]
    assert all(r["changed"] == "slower" and 1 < r["ratio_lo"] <= r["time_ratio"] <= r["ratio_hi"] for r in slow)
    assert all(r["changed"] == "faster" and r["ratio_hi"] < 1 for r in compare(a, c).rows
               if r["time_ratio"] is not None)
    cmp = compare(a, b)
    assert cmp.regressions(10) and not cmp.regressions(30)  # 20% slower: over 10%, not over 30%
    again = compare(a, b)  # seeded: the same intervals every time
    assert [r["ratio_lo"] for r in again.rows] == [r["ratio_lo"] for r in cmp.rows]


def test_bootstrap_noisy_pair_is_not_claimed(tmp_path: Path):
    base = [p for p in synthetic_points() if p.get("median_ms")]
    a = make_run(tmp_path / "a", _with_samples(base, jitter=0.4, seed=1), run_id="a")
    b = make_run(tmp_path / "b", _with_samples(base, factor=1.05, jitter=0.4, seed=1), run_id="b")
    rows = [r for r in compare(a, b).rows if r["time_ratio"] is not None]
    # Medians 5% apart, samples spread +-40%: every interval straddles 1, so nothing is claimed (nor gated),
    # where the old rule, reading the points' recorded 4% spread, would have called each one slower.
    assert rows and all(r["time_ratio"] == pytest.approx(1.05) and r["spread_a"] < 0.05 for r in rows)
    assert all(r["ratio_lo"] < 1 < r["ratio_hi"] and r["changed"] == "same" for r in rows)
    assert not compare(a, b).regressions(0)


def test_old_runs_without_samples_use_the_spread_rule(tmp_path: Path):
    pts = synthetic_points()
    cmp = compare(make_run(tmp_path / "a", pts, run_id="a"), make_run(tmp_path / "b", _slow_one(pts, 1.5),
                                                                        run_id="b"))
    assert {r["method"] for r in cmp.rows if r["time_ratio"] is not None} == {"spread"}


def test_samples_follow_a_derived_median(tmp_path: Path):
    """A point whose median was derived from its samples (layer scaling) compares on samples scaled to it."""
    p = {"kind": "decode", "model": "m", "backend": "torch", "dtype": "fp32", "batch": 1, "context": 8, "status": "ok",
         "samples_ms": [1.0, 1.01, 0.99, 1.0, 1.02, 0.98] * 5}
    a = make_run(tmp_path / "a", [{**p, "median_ms": 4.0}], run_id="a")
    b = make_run(tmp_path / "b", [{**p, "median_ms": 5.0}], run_id="b")  # same raw samples, a larger scaled median
    (row,) = compare(a, b).rows
    assert row["method"] == "bootstrap" and row["changed"] == "slower" and row["ratio_lo"] > 1.2


# --- judged against each run's own ceilings (issue 24) -----------------------------------------------------------


def _on_machine(points: list[dict], speed: float, ceiling_speed: float | None = None, seed: int = 1) -> list[dict]:
    """`points` measured on a machine `speed` times as fast (times / speed, rates x speed; the ceilings by
    `ceiling_speed`, default the same), each timed point against its run's copy ceiling (ceiling_ratio,
    ceiling_name) as the runner records it, with 40 samples each."""
    cs = speed if ceiling_speed is None else ceiling_speed
    out = []
    for p in points:
        p = dict(p)
        f = cs if p["kind"] == "ceiling" else speed
        for k in ("median_ms", "p20_ms", "p80_ms"):
            if p.get(k):
                p[k] /= f
        for k in ("value", "tflops", "gbps", "tokens_per_s"):
            if p.get(k):
                p[k] *= f
        if p["kind"] != "ceiling" and p.get("status") == "ok" and p.get("gbps"):
            p["ceiling_ratio"], p["ceiling_name"] = p["gbps"] / (2900 * cs), "copy_gbps"
        out.append(p)
    return _with_samples(out, seed=seed)


def _roofed() -> list[dict]:
    """The synthetic ceilings and the gemm points: every timed point has a bandwidth, hence a ceiling ratio."""
    return [p for p in synthetic_points() if p["kind"] == "ceiling" or p.get("op") == "gemm"]


def _run(folder: Path, points: list[dict], copy_gbps: float, run_id: str) -> Path:
    from tokenfleet import results

    with results.RunWriter(folder, {"run_id": run_id, "environment": {"device": {"name": "NVIDIA H100 80GB HBM3"}},
                                    "ceilings": {"copy_gbps": copy_gbps}}) as w:
        for p in points:
            w.append(p)
    return folder


def test_a_busy_machine_is_not_a_regression_against_its_own_ceilings(tmp_path: Path):
    """B ran on a machine three times slower (a neighbour took it): every time and ceiling x3. The raw times all
    read slower; against each run's own ceiling nothing changed, and the machines are said to differ."""
    pts = _roofed()
    a = _run(tmp_path / "a", _on_machine(pts, 1.0, seed=1), 2900, "a")
    b = _run(tmp_path / "b", _on_machine(pts, 1 / 3, seed=2), 2900 / 3, "b")
    cmp = compare(a, b)
    judged = [r for r in cmp.rows if r["rel_ratio"] is not None]
    assert len(judged) >= 8
    assert all(r["changed_raw"] == "slower" and r["time_ratio"] == pytest.approx(3, rel=0.05) for r in judged)
    assert all(r["changed"] == "same" and r["rel_lo"] <= 1 <= r["rel_hi"] for r in judged)
    assert "copy_gbps x0.333" in cmp.machines_differed and all(m.endswith("x0.333") for m in cmp.machines_differed)
    assert "the machines differed" in cmp.header() and "the machines differed" in cmp.summary()
    assert not cmp.regressions(10)
    r = cli("compare", str(a), str(b), "--fail-over", "10", "--format", "json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert "copy_gbps x0.333" in data["machines_differed"]
    assert all("time_ratio" in row and "rel_ratio" in row for row in data["rows"])  # raw beside relative


def test_a_real_regression_on_another_machine_is_still_caught(tmp_path: Path):
    pts = _roofed()
    a = _run(tmp_path / "a", _on_machine(pts, 1.0, seed=1), 2900, "a")
    slow = _on_machine(pts, 0.5, seed=2)  # a machine half as fast ...
    p = next(p for p in slow if p.get("op") == "gemm" and p.get("backend") == "torch" and p.get("m") == 4096)
    p["samples_ms"] = [x * 1.5 for x in p["samples_ms"]]  # ... and this point 1.5x slower than that
    p["median_ms"] *= 1.5
    p["gbps"] /= 1.5
    p["ceiling_ratio"] /= 1.5
    b = _run(tmp_path / "b", slow, 1450, "b")
    cmp = compare(a, b)
    (bad,) = cmp.regressions(10)
    assert bad["name"] == "gemm" and bad["rel_ratio"] == pytest.approx(1.5, rel=0.05) and bad["rel_lo"] > 1.1
    assert bad["time_ratio"] == pytest.approx(3, rel=0.05)  # the raw time, beside
    r = cli("compare", str(a), str(b), "--fail-over", "10")
    assert r.returncode == 1 and "against each run's own ceiling" in r.stderr and "raw time x2.99" in r.stderr


def test_same_machine_says_nothing_about_machines(tmp_path: Path):
    pts = _roofed()
    cmp = compare(_run(tmp_path / "a", _on_machine(pts, 1.0, seed=1), 2900, "a"),
                  _run(tmp_path / "b", _on_machine(pts, 1.0, seed=2), 2900, "b"))
    assert cmp.machines_differed == [] and "machines differed" not in cmp.header() + cmp.summary()
    assert all(r["changed"] == "same" for r in cmp.rows if r["rel_ratio"] is not None)


def test_ceiling_noise_widens_the_judgement(tmp_path: Path):
    """Ceilings 3% apart but noisy (spread 40%): not 'the machines differed'; points are judged with that noise."""
    pts = _roofed()
    a_pts, b_pts = _on_machine(pts, 1.0, seed=1), _on_machine(pts, 1.0, ceiling_speed=1.03, seed=2)
    for p in b_pts:
        if p["kind"] == "ceiling" and p.get("samples_ms"):
            p["samples_ms"] = [x * (1 + 0.4 * (-1) ** i) for i, x in enumerate(p["samples_ms"])]
    cmp = compare(_run(tmp_path / "a", a_pts, 2900, "a"), _run(tmp_path / "b", b_pts, 2900 * 1.03, "b"))
    c = cmp.ceilings["copy_gbps"]
    assert c["lo"] < 1 < c["hi"] and not c["differed"]


def test_machine_limit_is_the_drift_limit():
    from tokenfleet.measure.parts.ceilings import DRIFT_LIMIT
    from tokenfleet.report.compare import MACHINE_LIMIT

    assert MACHINE_LIMIT == DRIFT_LIMIT


def test_a_contended_point_is_not_judged_and_does_not_pass_the_gate(tmp_path: Path):
    pts = synthetic_points()
    b_pts = [dict(p) for p in pts]
    g = next(p for p in b_pts if p.get("op") == "gemm" and p.get("backend") == "torch" and p.get("m") == 4096)
    g.update(status="contended", error="measured on a shared machine: other processes used 1.00 CPU cores")
    a, b = make_run(tmp_path / "a", pts, run_id="a"), make_run(tmp_path / "b", b_pts, run_id="b")
    cmp = compare(a, b)
    (row,) = [r for r in cmp.rows if r["changed"] == "contended"]
    assert row["name"] == "gemm" and row["time_ratio"] is None and "shared machine" in row["note"]
    assert cmp.regressions(10) == [row]
    r = cli("compare", str(a), str(b), "--fail-over", "10")
    assert r.returncode == 1 and "not judged: measured on a shared machine" in r.stderr


def test_a_ceiling_that_moved_alone_is_not_a_regression(tmp_path: Path):
    """Two runs on one quiet VM (2026-12-04): B's copy and read probes read 1.44x A's, every point's raw time within
    its noise. Against each run's own ceiling every point would read 1.44x slower; a change is claimed only where the
    raw time agrees, so nothing is, and the gate passes (the machines are still said to differ)."""
    pts = _roofed()
    a = _run(tmp_path / "a", _on_machine(pts, 1.0, seed=1), 2900, "a")
    b = _run(tmp_path / "b", _on_machine(pts, 1.0, ceiling_speed=1.44, seed=2), 2900 * 1.44, "b")
    cmp = compare(a, b)
    judged = [r for r in cmp.rows if r["rel_ratio"] is not None]
    assert len(judged) >= 8 and all(r["rel_lo"] > 1.3 for r in judged)  # relative alone: 1.44x slower
    assert all(r["changed_raw"] == "same" and r["changed"] == "same" for r in judged)
    assert cmp.machines_differed and not cmp.regressions(10)


# --- per-ceiling noise floors (issue 24) ---------------------------------------------------------------------------


def _floored(folder: Path, slow: dict[str, float], drift: dict[str, float], run_id: str) -> Path:
    """A run of three kernel points, 40 tight samples each (1% jitter) at 1 ms x `slow[op]`: a gemm judged against the
    bf16 matmul ceiling, a silu_mul against the copy ceiling, an rmsnorm with no ceiling; its ceilings drifted
    `drift` (end/start) between its start and its end-of-run re-probe."""
    from tokenfleet import results

    pts = [{"kind": "kernel", "op": op, "backend": "torch", "dtype": "bf16", "rows": 64, "status": "ok",
            "median_ms": slow.get(op, 1.0), **({"ceiling_name": name} if name else {})}
           for op, name in (("gemm", "matmul_tflops.bf16"), ("silu_mul", "copy_gbps"), ("rmsnorm", None))]
    run = make_run(folder, _with_samples(pts, seed=len(run_id) + sum(map(ord, run_id))), run_id=run_id)
    results.update_manifest(run, ceiling_drift={"limit": 0.05, "ratios": drift, "flagged": sorted(drift)})
    return run


# A quiet VM's two runs (2026-12-05): the copy probe drifted 48% and 39% within them, the matmul under 6%.
DRIFT_A = {"copy_gbps": 1.48, "matmul_tflops.bf16": 1.03}
DRIFT_B = {"copy_gbps": 1 / 1.39, "matmul_tflops.bf16": 0.97}


def test_a_matmul_point_is_judged_by_the_matmul_drift_not_the_copys(tmp_path: Path):
    """The gemm 2x slower in B: beyond the matmul ceiling's own floor (1.03 x 1/0.97: ±6.2%), so a regression at
    --fail-over 10, though the copy probe's drift (±106%) would hide anything under 2x."""
    a = _floored(tmp_path / "a", {}, DRIFT_A, "a")
    b = _floored(tmp_path / "b", {"gemm": 2.0}, DRIFT_B, "b")
    cmp = compare(a, b, "ceiling")
    rows = {r["name"]: r for r in cmp.rows}
    g = rows["gemm"]
    assert g["floor_from"] == "matmul_tflops.bf16" and g["noise_floor"] == pytest.approx(1.03 / 0.97 - 1)
    assert g["changed"] == "slower" and g["ratio_lo"] > 1.9
    assert cmp.floor == pytest.approx(1.48 * 1.39 - 1)  # the largest, for the points without a ceiling
    assert cmp.regressions(10) == [g]
    r = cli("compare", str(a), str(b), "--fail-over", "10", "--floor", "ceiling")
    assert r.returncode == 1
    assert "regression: kernel gemm torch bf16" in r.stderr and "±6% from matmul_tflops.bf16" in r.stderr
    # The gate says what it cannot see, per class of point: the copy-judged and ceiling-less points, not the gemm.
    warn = next(line for line in r.stderr.splitlines() if line.startswith("--fail-over"))
    assert "copy_gbps ±106%" in warn and "each run's largest drift ±106%" in warn
    assert "matmul" not in warn


def test_a_copy_point_is_same_within_the_copy_drift(tmp_path: Path):
    """The silu_mul 1.5x slower, judged against the copy ceiling that drifted 48% and 39%: `same`, said to be
    inside the copy ceiling's floor; the gemm unchanged stays `same` without a note."""
    a = _floored(tmp_path / "a", {}, DRIFT_A, "a")
    b = _floored(tmp_path / "b", {"silu_mul": 1.5}, DRIFT_B, "b")
    cmp = compare(a, b, "ceiling")
    rows = {r["name"]: r for r in cmp.rows}
    s = rows["silu_mul"]
    assert s["floor_from"] == "copy_gbps" and s["noise_floor"] == pytest.approx(1.48 * 1.39 - 1)
    assert s["changed"] == "same" and s["changed_raw"] == "same" and s["ratio_lo"] > 1.4
    assert s["note"].startswith(FLOOR_NOTE) and "±106% from copy_gbps" in s["note"]
    assert rows["gemm"]["changed"] == "same" and rows["gemm"]["note"] is None
    assert not cmp.regressions(10)
    assert "1 same only within this machine's between-run noise (1 by copy_gbps ±106%)" in cmp.summary()
    head = cmp.header()
    assert "matmul_tflops.bf16 ±6.2%" in head and "copy_gbps ±105.7%" in head
    assert "each run's largest drift ±105.7%" in head


def test_a_point_without_a_ceiling_keeps_the_largest_drift(tmp_path: Path):
    """The rmsnorm (no ceiling_name) 1.5x slower: judged with each run's largest drift (the copy's here), `same`;
    a matmul drift alone in both runs would give it the matmul's, since that is then the largest."""
    a = _floored(tmp_path / "a", {}, DRIFT_A, "a")
    b = _floored(tmp_path / "b", {"rmsnorm": 1.5}, DRIFT_B, "b")
    (rms,) = [r for r in compare(a, b, "ceiling").rows if r["name"] == "rmsnorm"]
    assert rms["floor_from"] == "largest" and rms["noise_floor"] == pytest.approx(1.48 * 1.39 - 1)
    assert rms["changed"] == "same" and rms["note"].startswith(FLOOR_NOTE)
    tight = {"matmul_tflops.bf16": 1.03}
    a2 = _floored(tmp_path / "a2", {}, tight, "a")
    b2 = _floored(tmp_path / "b2", {"rmsnorm": 1.5}, tight, "b")
    (rms2,) = [r for r in compare(a2, b2, "ceiling").rows if r["name"] == "rmsnorm"]
    assert rms2["floor_from"] == "largest" and rms2["noise_floor"] == pytest.approx(1.03**2 - 1)
    assert rms2["changed"] == "slower"


def test_a_ceiling_one_run_did_not_reprobe_falls_back_to_that_runs_largest(tmp_path: Path):
    """B re-probed its copy ceiling only (its matmul re-probe was, say, `contended`): B has no matmul drift to
    compound with A's, so the gemm takes each run's largest drift (conservative)."""
    a = _floored(tmp_path / "a", {}, DRIFT_A, "a")
    b = _floored(tmp_path / "b", {"gemm": 2.0}, {"copy_gbps": 1.1}, "b")
    (g,) = [r for r in compare(a, b, "ceiling").rows if r["name"] == "gemm"]
    assert g["floor_from"] == "largest" and g["noise_floor"] == pytest.approx(1.48 * 1.1 - 1)
    assert g["changed"] == "slower"  # 2x is beyond a 63% floor


def test_the_default_floor_is_each_runs_largest_drift(tmp_path: Path):
    """By default (`largest`) every point takes each run's largest drift: the gemm 1.5x slower is `same` within the
    copy probe's ±106%, though its own matmul ceiling drifted 3% (two quiet runs of one commit on the 2-core VM moved
    small gemm points 1.45x while their matmul ceilings drifted under 5%: results/compare/); `--floor ceiling` flags
    it; an unknown rule is one line naming the flag, exit 2."""
    a = _floored(tmp_path / "a", {}, DRIFT_A, "a")
    b = _floored(tmp_path / "b", {"gemm": 1.5}, DRIFT_B, "b")
    (g,) = [r for r in compare(a, b).rows if r["name"] == "gemm"]
    assert g["floor_from"] == "largest" and g["noise_floor"] == pytest.approx(1.48 * 1.39 - 1)
    assert g["changed"] == "same" and g["note"].startswith(FLOOR_NOTE)
    (g2,) = [r for r in compare(a, b, "ceiling").rows if r["name"] == "gemm"]
    assert g2["floor_from"] == "matmul_tflops.bf16" and g2["changed"] == "slower"
    assert cli("compare", str(a), str(b), "--fail-over", "10").returncode == 0
    assert cli("compare", str(a), str(b), "--fail-over", "10", "--floor", "ceiling").returncode == 1
    bad = cli("compare", str(a), str(b), "--floor", "median")
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "--floor" in bad.stderr
