"""`tokenfleet compare` beyond the points' own samples: the between-run noise floor each run measures of itself (its
ceilings' drift from the run's start to its end-of-run re-probe), and the bootstrap being scipy's.

A point is `slower` only when its whole interval on B/A lies above 1 + floor (`faster`: below 1 / (1 + floor));
the floor compounds the two runs' largest ceiling drifts, (1 + fa)(1 + fb) - 1. Runs without a re-probe are judged as
before."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from test_compare import _slow_one, _with_samples, cli
from test_report import make_run, synthetic_points
from tokenfleet import results
from tokenfleet.report import compare as cmp_mod
from tokenfleet.report.compare import FLOOR_NOTE, combined_floor, compare, median_ratio_interval, noise_floor


def _drifted(folder: Path, ratios: dict[str, float] | None) -> Path:
    """The run at `folder` as if its ceilings were probed again at its end and moved by `ratios` (end/start)."""
    if ratios is not None:
        results.update_manifest(folder, ceiling_drift={"limit": 0.05, "ratios": ratios,
                                                       "flagged": sorted(k for k, r in ratios.items()
                                                                         if abs(r - 1) > 0.05)})
    return folder


def _pair(tmp_path: Path, factor: float, drift_a: dict | None, drift_b: dict | None, slow: float = 1.0):
    """Runs A and B of the synthetic points with 40 tight samples each (1% jitter); B's every timed point `factor`
    times A's, and its torch gemm at m=4096 `slow` times more."""
    base = [p for p in synthetic_points() if p["kind"] != "ceiling"]  # no ceiling_name: judged on raw time alone
    a = _drifted(make_run(tmp_path / "a", _with_samples(base, seed=1), run_id="a"), drift_a)
    b = _drifted(make_run(tmp_path / "b", _with_samples(_slow_one(base, slow), factor=factor, seed=2), run_id="b"),
                 drift_b)
    return a, b


def test_noise_floor_is_the_largest_drift_either_way():
    assert noise_floor({"ceiling_drift": {"ratios": {"copy_gbps": 1.2, "read_gbps": 0.8}}}) == pytest.approx(0.25)
    assert noise_floor({"ceiling_drift": {"ratios": {"copy_gbps": 1.3}}}) == pytest.approx(0.3)
    assert noise_floor({"ceiling_drift": {"ratios": {}}}) is None
    assert noise_floor({}) is None  # an older run, or a suite without the re-probe
    assert noise_floor({"ceiling_drift": {"ratios": {"copy_gbps": 1e-320, "read_gbps": 1.1}}}) == pytest.approx(0.1)


def test_the_two_runs_floors_compound():
    assert combined_floor(0.1, 0.2) == pytest.approx(1.1 * 1.2 - 1)  # either run may be off by its own drift
    assert combined_floor(None, 0.2) == pytest.approx(0.2) and combined_floor(0.2, None) == pytest.approx(0.2)
    assert combined_floor(None, None) == 0
    assert combined_floor(1e300, 1e300) < float("inf")  # written to JSON, which has no inf


@pytest.mark.parametrize(("lo", "hi", "floor", "want"), [
    (1.29, 1.35, 0.30, "same"),  # above 1, but not wholly beyond the floor
    (1.31, 1.35, 0.30, "slower"),
    (1.31, 1.35, 0.0, "slower"),
    (1 / 1.31, 1 / 1.29, 0.30, "same"),  # the floor is symmetric in the ratio: 1 / 1.3 below
    (1 / 1.35, 1 / 1.31, 0.30, "faster"),
    (0.99, 1.01, 0.0, "same"),
    (2.0, 2.5, 1.0, "same"),  # at the floor is not beyond it
    (0.4, 0.5, 1.0, "same"),
    (0.4, 0.49, 1.0, "faster"),
])
def test_verdict_against_the_floor(lo, hi, floor, want):
    assert cmp_mod._verdict(lo, hi, floor) == want


def test_the_floor_widens_same_exactly_as_designed(tmp_path: Path):
    """B 25% slower everywhere, samples tight (every interval wholly above 1.2): with a floor of 30% (A's copy ceiling
    drifted 1.3x within A, B's ceilings held) every point is `same`, said to be within the machine's noise; with 20%
    each is `slower`."""
    a, b = _pair(tmp_path, 1.25, {"copy_gbps": 1.3, "read_gbps": 1.02}, {"copy_gbps": 1.0})
    c = compare(a, b)
    timed = [r for r in c.rows if r["time_ratio"] is not None]
    assert len(timed) > 10 and c.floor == pytest.approx(0.3)
    assert c.floors["A"] == pytest.approx(0.3) and c.floors["B"] == 0
    assert all(1.2 < r["ratio_lo"] and r["ratio_hi"] < 1.3 for r in timed)
    assert all(r["changed"] == "same" and r["changed_raw"] == "same" and r["noise_floor"] == pytest.approx(0.3)
               and r["note"].startswith(FLOOR_NOTE) and "±30%" in r["note"] for r in timed)
    assert not c.regressions(10)
    assert "each run's largest drift ±30.0%" in c.header()  # these points have no ceiling_name
    assert f"{len(timed)} same only within" in c.summary()
    r = cli("compare", str(a), str(b), "--fail-over", "10", "--format", "json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["noise_floor"] == pytest.approx(0.3) and data["noise_floors"]["A"] == pytest.approx(0.3)

    a2, b2 = _pair(tmp_path / "tighter", 1.25, {"copy_gbps": 1.2}, {"copy_gbps": 1.0})
    c2 = compare(a2, b2)
    timed2 = [r for r in c2.rows if r["time_ratio"] is not None]
    assert c2.floor == pytest.approx(0.2)
    assert all(r["changed"] == "slower" and not r["note"] for r in timed2)
    assert len(c2.regressions(10)) == len(timed2)


@pytest.mark.parametrize(("drift_b", "floor"), [(1.0, 0.3), (1 / 1.3, 1.3 * 1.3 - 1)])
def test_a_2x_slowdown_with_tight_samples_is_caught_through_a_30pct_floor(tmp_path: Path, drift_b, floor):
    """A drifted 30% (B: not at all, or 30% the other way: a 69% floor): one point 2x slower with tight samples is
    still a regression, every other point `same`."""
    a, b = _pair(tmp_path, 1.0, {"copy_gbps": 1.3}, {"matmul_tflops.fp32": drift_b}, slow=2.0)
    c = compare(a, b)
    assert c.floor == pytest.approx(floor)
    (bad,) = c.regressions(10)
    assert bad["name"] == "gemm" and bad["changed"] == "slower" and bad["ratio_lo"] > 1.9
    assert all(r["changed"] == "same" for r in c.rows if r["time_ratio"] is not None and r is not bad)
    r = cli("compare", str(a), str(b), "--fail-over", "10")
    assert r.returncode == 1
    pct = f"±{floor:.0%}"
    assert "regression: kernel gemm torch" in r.stderr and f"beyond the between-run noise of {pct}" in r.stderr
    # what it cannot see, for which points (these have no ceiling of their own: each run's largest drift)
    assert (f"--fail-over 10% is inside these runs' between-run noise for the points judged by each run's largest "
            f"drift {pct}") in r.stderr
    assert "inside these runs'" not in cli("compare", str(a), str(b), "--fail-over", "80").stderr


def test_runs_without_an_estimate_compare_as_before(tmp_path: Path):
    """Neither run re-probed its ceilings: no floor, a 25% shift is `slower` (and said why in the header); where one
    run measured its noise, its floor is used and the other is named as carrying none."""
    a, b = _pair(tmp_path, 1.25, None, None)
    c = compare(a, b)
    timed = [r for r in c.rows if r["time_ratio"] is not None]
    assert c.floor == 0 and c.floors == {"A": None, "B": None}
    assert all(r["changed"] == "slower" and r["noise_floor"] == 0 for r in timed)
    assert "no between-run noise estimate" in c.header()
    assert cli("compare", str(a), str(b), "--fail-over", "10").returncode == 1

    a1, b1 = _pair(tmp_path / "one", 1.25, None, {"read_gbps": 1.4})
    c1 = compare(a1, b1)
    assert c1.floor == pytest.approx(0.4) and c1.floors["A"] is None
    assert "A carries no estimate" in c1.header()
    assert all(r["changed"] == "same" for r in c1.rows if r["time_ratio"] is not None)


def test_the_bootstrap_is_scipys_seeded_and_deterministic():
    rng = np.random.default_rng(7)
    a, b = rng.lognormal(0, 0.05, 40), rng.lognormal(np.log(1.1), 0.05, 60)
    got = median_ratio_interval(list(a), list(b))
    want = stats.bootstrap((a, b), lambda x, y, axis=-1: np.median(y, axis=axis) / np.median(x, axis=axis),
                           n_resamples=cmp_mod.RESAMPLES, confidence_level=cmp_mod.CONFIDENCE, method="percentile",
                           vectorized=True, random_state=np.random.default_rng(cmp_mod.SEED)).confidence_interval
    assert got == (want.low, want.high)
    assert median_ratio_interval(list(a), list(b)) == got  # the same samples, the same interval
    assert median_ratio_interval(list(a), list(b), seed=1) != got  # the seed is what fixes it
    assert got[0] < 1.1 < got[1]



def test_the_floor_holds_against_each_runs_own_ceilings_too(tmp_path: Path):
    """Points judged against their runs' ceilings (rel_ratio): B's points 1.25x slower on the same ceilings. Within a
    30% floor `same` on both judgments, said so; without a floor `slower` on both."""
    from test_compare import _on_machine, _roofed, _run

    pts = _roofed()
    for floor_a, want in ((1.3, "same"), (None, "slower")):
        d = tmp_path / str(floor_a)
        a = _drifted(_run(d / "a", _on_machine(pts, 1.0, seed=1), 2900, "a"), floor_a and {"copy_gbps": floor_a})
        b = _drifted(_run(d / "b", _on_machine(pts, 0.8, ceiling_speed=1.0, seed=2), 2900, "b"), None)
        judged = [r for r in compare(a, b).rows if r["rel_ratio"] is not None]
        assert len(judged) >= 8 and all(r["rel_lo"] > 1.15 and r["ratio_lo"] > 1.15 for r in judged)
        assert all(r["changed"] == want and r["changed_raw"] == want for r in judged)
        assert all(bool(r["note"]) == (want == "same") for r in judged)
        assert all("against each run's own ceiling x" in r["note"] for r in judged if want == "same")


def _with_speed(points: list[dict], us: float, gemm_us: float | None = None) -> list[dict]:
    """`points` as if each read the CPU's speed probe at `us` around it (the torch gemm at m=4096: `gemm_us`)."""
    out = []
    for p in points:
        v = gemm_us if gemm_us and p.get("op") == "gemm" and p.get("backend") == "torch" and p.get("m") == 4096 else us
        out.append({**p, "load": {"speed_us": [v * 0.98, v], "speed_fastest_us": us * 0.98}})
    return out


def test_a_point_measured_while_the_cpu_ran_slower_is_not_judged_nor_gated(tmp_path: Path):
    """The torch gemm 1.5x slower in B, its speed probe 1.5x slower around it too (another guest on our cores): not
    judged (`machine`), not gated, and said; the same slowdown at the same speed is a regression as before."""
    base = [p for p in synthetic_points() if p["kind"] != "ceiling"]
    a = make_run(tmp_path / "a", _with_speed(_with_samples(base, seed=1), 5.0), run_id="a")
    b = make_run(tmp_path / "b", _with_speed(_with_samples(_slow_one(base, 1.5), seed=2), 5.0, gemm_us=7.5),
                 run_id="b")
    c = compare(a, b)
    gemm = [r for r in c.rows if r["changed"] == cmp_mod.MACHINE]
    assert len(gemm) == 1 and gemm[0]["name"] == "gemm" and gemm[0]["speed_ratio"] == pytest.approx(1.5)
    assert gemm[0]["note"].startswith("not judged: slower x1.4") and "7.5 us in B" in gemm[0]["note"]
    assert all(r["speed_ratio"] == pytest.approx(1.0) for r in c.rows if r["changed"] == "same")
    assert c.regressions(10) == [] and c.unjudged == gemm
    assert "1 point(s) not judged (`machine`)" in c.header() and "1 not judged" in c.summary()
    r = cli("compare", str(a), str(b), "--fail-over", "10")
    assert r.returncode == 0 and "--fail-over 10%: 1 point(s) not judged" in r.stderr, r.stderr
    # Speeds within SPEED_LIMIT (x1.2): judged, and the gate fails on it.
    b2 = make_run(tmp_path / "b2", _with_speed(_with_samples(_slow_one(base, 1.5), seed=2), 5.0, gemm_us=6.0),
                  run_id="b2")
    c2 = compare(a, b2)
    assert not c2.unjudged and [r["name"] for r in c2.regressions(10)] == ["gemm"]
    assert cli("compare", str(a), str(b2), "--fail-over", "10").returncode == 1
    # A point that moved within its noise is `same` whatever the speeds: nothing to excuse.
    b3 = make_run(tmp_path / "b3", _with_speed(_with_samples(base, seed=2), 5.0, gemm_us=7.5), run_id="b3")
    g3 = [r for r in compare(a, b3).rows if r["speed_ratio"] and r["speed_ratio"] > 1.4]
    assert len(g3) == 1 and g3[0]["changed"] == "same"
    # Runs without speed readings (GPU runs, older runs): no speed_ratio, judged as before.
    assert all(r["speed_ratio"] is None for r in compare(tmp_path / "a", make_run(
        tmp_path / "b4", _with_samples(base, seed=2), run_id="b4")).rows)
