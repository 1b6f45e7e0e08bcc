"""Oracles for tokenfleet.report.compare (`make mutate`): ratios, intervals, verdicts, noise floors and the messages,
each from values worked out by hand (the bootstrap against scipy called directly). Fast: no timing, no CLI, the only
run folders a few points each."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from tokenfleet import results
from tokenfleet.config import ConfigError
from tokenfleet.report import compare as C
from tokenfleet.results import Run, point_key

DA = {"copy_gbps": 0.5, "matmul_tflops.fp32": 0.1}
DB = {"copy_gbps": 0.2, "matmul_tflops.fp32": 0.05}


def test_constants():
    assert (C.RESAMPLES, C.CONFIDENCE, C.MIN_SAMPLES, C.SEED, C.MACHINE_LIMIT) == (2000, 0.95, 5, 0, 0.05)
    assert C.THROUGHPUT == ("tokens_per_s", "tflops", "gbps", "value")
    assert C.NAME_FIELDS == ("kind", "op", "model", "backend", "dtype")
    assert C.KIND_ORDER == {"ceiling": 0, "kernel": 1, "prefill": 2, "decode": 3}
    assert C.FLOOR_NOTE == "within this machine's between-run noise" and C.LARGEST == "largest"
    assert C.COLUMNS[-6:] == ["noise_floor", "floor_from", "speed_ratio", "changed", "method", "note"]
    assert C.MACHINE == "machine"


# --- the bootstrap ------------------------------------------------------------------------------------------------


def test_median_ratio_is_median_b_over_median_a_along_the_last_axis():
    a = np.array([[1.0, 2.0, 3.0], [2.0, 2.0, 8.0]])
    b = np.array([[2.0, 4.0, 9.0], [1.0, 1.0, 1.0]])
    assert C._median_ratio(a, b).tolist() == [2.0, 0.5]
    assert C._median_ratio(a, b, axis=0).tolist() == [1.5 / 1.5, 2.5 / 2.0, 5.0 / 5.5]


def test_interval_is_scipys_percentile_bootstrap_with_the_defaults():
    rng = np.random.default_rng(3)
    a, b = rng.lognormal(0, 0.1, 9), rng.lognormal(0.2, 0.1, 7)
    want = stats.bootstrap((a, b), lambda x, y, axis=-1: np.median(y, axis=axis) / np.median(x, axis=axis),
                           n_resamples=2000, confidence_level=0.95, method="percentile", vectorized=True,
                           random_state=np.random.default_rng(0)).confidence_interval
    assert C.median_ratio_interval(list(a), list(b)) == (want.low, want.high)
    assert C.median_ratio_interval([1.0] * 5, [2.0] * 5) == (2.0, 2.0)  # every resample: 2 / 1
    half = stats.bootstrap((a, b), lambda x, y, axis=-1: np.median(y, axis=axis) / np.median(x, axis=axis),
                           n_resamples=300, confidence_level=0.5, method="percentile",
                           random_state=np.random.default_rng(4)).confidence_interval
    assert C.median_ratio_interval(list(a), list(b), resamples=300, confidence=0.5, seed=4) == (half.low, half.high)
    lo, hi = C.median_ratio_interval([1, 1.1, 0.9, 1, 1], [1.0] * 5)
    assert (lo, hi) == pytest.approx((1 / 1.1, 1 / 0.9))  # medians of resamples lie between 0.9 and 1.1


# --- the noise floors ---------------------------------------------------------------------------------------------


def test_drifts_per_ceiling_both_ways_and_only_finite_positive_ratios():
    m = {"ceiling_drift": {"ratios": {"copy_gbps": 1.25, "read_gbps": 0.8, "neg": -1.0, "zero": 0, "inf": math.inf,
                                      "tiny": 1e-320, "nan": math.nan, "text": "1.2", "none": None}}}
    got = C.drifts(m)
    assert set(got) == {"copy_gbps", "read_gbps"}
    assert got["copy_gbps"] == pytest.approx(0.25) and got["read_gbps"] == pytest.approx(0.25)
    assert C.drifts({}) == {} and C.drifts({"ceiling_drift": None}) == {}
    assert C.drifts({"ceiling_drift": {"ratios": None}}) == {} and C.drifts({"ceiling_drift": {}}) == {}
    assert C.drifts({"ceiling_drift": {"ratios": {"copy_gbps": 1}}}) == {"copy_gbps": 0}
    assert C.drifts({"ceiling_drift": {"ratios": {"copy_gbps": 1e-308}}}) == {"copy_gbps": 1e308 - 1}  # 1/r finite


def test_noise_floor_is_the_largest_drift_or_none():
    assert C.noise_floor({"ceiling_drift": {"ratios": {"copy_gbps": 1.5, "read_gbps": 0.5}}}) == pytest.approx(1.0)
    assert C.noise_floor({"ceiling_drift": {"ratios": {"copy_gbps": 1.1}}}) == pytest.approx(0.1)
    assert C.noise_floor({}) is None


def test_combined_floor_compounds_and_stays_finite():
    assert C.combined_floor(0.1, 0.2) == pytest.approx(0.32)
    assert C.combined_floor(0.5, None) == 0.5 and C.combined_floor(None, 0.25) == 0.25
    assert C.combined_floor(None, None) == 0.0 and C.combined_floor(0.0, 0.0) == 0.0
    assert C.combined_floor(1e300, 1e300) == sys.float_info.max


def test_point_floor_from_its_own_ceiling_in_both_runs():
    assert C.point_floor("matmul_tflops.fp32", DA, DB) == (pytest.approx(1.1 * 1.05 - 1), "matmul_tflops.fp32")
    assert C.point_floor("copy_gbps", DA, DB) == (pytest.approx(1.5 * 1.2 - 1), "copy_gbps")
    # a burst ceiling: its sustained probe's drift (the one re-probed)
    assert C.point_floor("burst_matmul_tflops.fp32", DA, DB) == (pytest.approx(0.155), "matmul_tflops.fp32")


def test_point_floor_falls_back_to_each_runs_largest():
    largest = (pytest.approx(1.5 * 1.2 - 1), "largest")
    assert C.point_floor(None, DA, DB) == largest
    assert C.point_floor("", DA, DB) == largest
    assert C.point_floor("read_gbps", DA, DB) == largest  # neither run re-probed it
    assert C.point_floor("matmul_tflops.fp32", DA, {"copy_gbps": 0.2}) == largest  # B did not re-probe it
    assert C.point_floor("matmul_tflops.fp32", {"copy_gbps": 0.5}, DB) == largest  # A did not
    # one run without any estimate adds nothing; the other's own drift stands
    assert C.point_floor("matmul_tflops.fp32", DA, {}) == (pytest.approx(0.1), "matmul_tflops.fp32")
    assert C.point_floor("matmul_tflops.fp32", {}, DB) == (pytest.approx(0.05), "matmul_tflops.fp32")
    assert C.point_floor(None, {}, DB) == (pytest.approx(0.2), "largest")
    assert C.point_floor(None, {}, {}) == (0.0, "largest")
    assert C.point_floor("copy_gbps", {}, {}) == (0.0, "copy_gbps")


def test_floor_name_of_a_pair():
    def ceil(op, dtype="fp32", **kw):
        return {"kind": "ceiling", "op": op, "dtype": dtype, **kw}

    assert C.floor_name(ceil("copy"), ceil("copy")) == "copy_gbps"
    assert C.floor_name(ceil("read", ceiling_name="copy_gbps"), ceil("read")) == "read_gbps"  # its own, not the copy
    assert C.floor_name(ceil("matvec", "bf16"), {}) == "matvec_gbps.bf16"
    assert C.floor_name(ceil("matmul", "fp8"), {}) == "matmul_tflops.fp8"
    assert C.floor_name(ceil("allreduce"), {}) is None
    k = {"kind": "kernel", "ceiling_name": "read_gbps"}
    assert C.floor_name(k, dict(k)) == "read_gbps"
    assert C.floor_name(k, {"kind": "kernel", "ceiling_name": "copy_gbps"}) is None  # the runs disagree
    assert C.floor_name(k, {"kind": "kernel"}) is None and C.floor_name({"kind": "kernel"}, k) is None


def test_floor_label():
    assert C.floor_label("largest") == "each run's largest drift"
    assert C.floor_label("copy_gbps") == "copy_gbps"


def test_floor_text_exactly():
    assert C.floor_text({"A": None, "B": None}, 0.0) == (
        "no between-run noise estimate (neither run has a usable end-of-run ceiling re-probe): changes judged on the "
        "points' own samples only")
    classes = {"copy_gbps": 0.8, "largest": 0.8, "matmul_tflops.fp32": 0.155}
    assert C.floor_text({"A": 0.5, "B": 0.2}, 0.8, classes) == (
        "between-run noise floors by the ceiling each point is judged against (its drift start to end in each run, "
        "compounded; --floor ceiling): copy_gbps ±80.0%; each run's largest drift ±80.0%; matmul_tflops.fp32 ±15.5%; "
        "a change inside its point's floor is `same` (each run's largest drift: A ±50.0%, B ±20.0%; compounded ±80.0%)")
    assert C.floor_text({"A": 0.5, "B": 0.2}, 0.8, {"largest": 0.8}, "largest") == (
        "between-run noise floors of every point: each run's largest ceiling drift (a ceiling's move start to end), "
        "compounded; --floor largest): each run's largest drift ±80.0%; a change inside its point's floor is `same` "
        "(each run's largest drift: A ±50.0%, B ±20.0%; compounded ±80.0%)")
    assert C.floor_text({"A": None, "B": 0.2}, 0.2) == (
        "between-run noise floors by the ceiling each point is judged against (its drift start to end in each run, "
        "compounded; --floor ceiling): no point judged; a change inside its point's floor is `same` (each run's "
        "largest drift: B ±20.0%; compounded ±20.0%); A carries no estimate (no usable end-of-run re-probe)")
    assert C.floor_text({"A": 0.1, "B": None}, 0.1, {}).endswith("; B carries no estimate (no usable end-of-run "
                                                                 "re-probe)")
    assert "carries no estimate" not in C.floor_text({"A": 0.1, "B": 0.0}, 0.1, {})


# --- a point's samples, spread, identity, verdict -------------------------------------------------------------------


def test_samples_kept_scaled_or_refused():
    s = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert C._samples({"samples_ms": s}) is s  # no median to follow
    assert C._samples({"samples_ms": s, "median_ms": 3.002}) is s  # within 1e-3 of the samples' median
    assert C._samples({"samples_ms": s, "median_ms": 6.0}) == [2.0, 4.0, 6.0, 8.0, 10.0]
    assert C._samples({"samples_ms": s, "median_ms": 3.0031}) == pytest.approx([x * 3.0031 / 3 for x in s])
    assert C._samples({"samples_ms": s[:4]}) is None  # fewer than MIN_SAMPLES
    assert C._samples({"samples_ms": [1.0, 2.0, 3.0, 4.0, 0.0]}) is None
    assert C._samples({"samples_ms": [1.0, 2.0, 3.0, 4.0, -1.0]}) is None
    assert C._samples({"samples_ms": tuple(s)}) is None and C._samples({}) is None


def test_spread_of_a_point():
    assert C._spread({"status": "failed", "spread": 0.1}) is None
    assert C._spread({"status": "contended", "spread": 0.1}) is None
    assert C._spread({"status": "ok", "spread": 0.1, "p20_ms": 1, "p80_ms": 3, "median_ms": 1}) == 0.1
    assert C._spread({"status": "noisy", "spread": 0, "p20_ms": 1, "p80_ms": 3, "median_ms": 1}) == 0.0
    assert C._spread({"status": "ok", "p20_ms": 0.9, "p80_ms": 1.3, "median_ms": 2.0}) == pytest.approx(0.2)
    assert C._spread({"status": "ok", "p20_ms": 0.9, "median_ms": 2.0}) == 0.0
    assert C._spread({"status": "ok", "p80_ms": 1.3, "median_ms": 2.0}) == 0.0
    assert C._spread({"status": "ok", "p20_ms": 0.9, "p80_ms": 1.3, "median_ms": 0}) == 0.0
    assert C._spread({"status": "ok"}) == 0.0


def test_ident_of_a_key():
    key = point_key({"kind": "kernel", "op": "gemm", "backend": "torch", "dtype": "fp32", "m": 64, "n": 4096})
    assert C._ident(key) == {"kind": "kernel", "name": "gemm", "backend": "torch", "dtype": "fp32",
                             "shape": "m=64 n=4096"}
    key = point_key({"kind": "decode", "model": "qwen", "backend": "compile", "batch": 8, "context": 512})
    assert C._ident(key) == {"kind": "decode", "name": "qwen", "backend": "compile", "dtype": None,
                             "shape": "batch=8 context=512"}


@pytest.mark.parametrize(("lo", "hi", "floor", "want"), [
    (1.01, 1.2, 0.0, "slower"), (1.0, 1.2, 0.0, "same"), (0.9, 0.99, 0.0, "faster"), (0.9, 1.0, 0.0, "same"),
    (1.3, 1.4, 0.3, "same"), (1.31, 1.4, 0.3, "slower"),  # at 1 + floor is not beyond it
    (0.4, 0.5, 1.0, "same"), (0.4, 0.49, 1.0, "faster"),  # hi x (1 + floor) at 1 is not below it
])
def test_verdict_boundaries(lo, hi, floor, want):
    assert C._verdict(lo, hi, floor) == want


def test_verdict_default_floor_is_none():
    assert C._verdict(1.01, 1.2) == "slower" and C._verdict(0.8, 0.99) == "faster"


# --- ceilings -----------------------------------------------------------------------------------------------------


def _ceil(op, value, dtype="fp32", status="ok", **kw):
    return {"kind": "ceiling", "op": op, "dtype": dtype, "status": status, "value": value, **kw}


def test_ceiling_point_is_the_best_usable_start_probe():
    pts = [_ceil("copy", 10.0), _ceil("copy", 12.0, status="noisy", mb=1), _ceil("copy", 15.0, status="failed", mb=2),
           _ceil("copy", 20.0, phase="end"), _ceil("matmul", 1.0), _ceil("matmul", 2.0, "bf16"),
           {"kind": "kernel", "op": "copy", "status": "ok", "value": 30.0}]
    run = Run(Path("r"), {}, pts)
    assert C._ceiling_point(run, "copy_gbps")["value"] == 12.0
    assert C._ceiling_point(run, "matmul_tflops.bf16")["value"] == 2.0
    assert C._ceiling_point(run, "matmul_tflops.fp32")["value"] == 1.0
    assert C._ceiling_point(run, "matmul_tflops.fp8") is None and C._ceiling_point(run, "read_gbps") is None
    assert C._ceiling_point(Run(Path("r"), {}, [_ceil("copy", None)]), "copy_gbps") is None


def _ceiling_run(copy: float, points: list[dict], **manifest) -> Run:
    return Run(Path("r"), {"ceilings": {"copy_gbps": copy, "read_gbps": None, "matvec_gbps": {},
                                        "matmul_tflops": {}}, **manifest}, points)


def test_ceiling_ratios_from_the_probes_spreads():
    a = _ceiling_run(10.0, [_ceil("copy", 10.0, spread=0.1)])
    b = _ceiling_run(12.0, [_ceil("copy", 12.0, spread=0.3)])
    c = C.ceiling_ratios(a, b)["copy_gbps"]
    assert c["ratio"] == pytest.approx(1.2) and not c["differed"]  # 1.2 x (1 -+ 0.3) holds 1
    assert (c["lo"], c["hi"]) == (pytest.approx(0.84), pytest.approx(1.56))
    tight = C.ceiling_ratios(a, _ceiling_run(12.0, [_ceil("copy", 12.0, spread=0.1)]))["copy_gbps"]
    assert tight["differed"] and (tight["lo"], tight["hi"]) == (pytest.approx(1.08), pytest.approx(1.32))
    # no probe points: no noise; 4% apart is within MACHINE_LIMIT, 6% beyond it, either way
    assert C.ceiling_ratios(_ceiling_run(10.0, []), _ceiling_run(10.4, []))["copy_gbps"]["differed"] is False
    assert C.ceiling_ratios(_ceiling_run(10.0, []), _ceiling_run(10.6, []))["copy_gbps"]["differed"] is True
    assert C.ceiling_ratios(_ceiling_run(10.0, []), _ceiling_run(9.4, []))["copy_gbps"]["differed"] is True
    none = C.ceiling_ratios(_ceiling_run(10.0, []), _ceiling_run(10.6, []))["copy_gbps"]
    assert none["lo"] == none["hi"] == none["ratio"] == pytest.approx(1.06)
    only_a = C.ceiling_ratios(_ceiling_run(10.0, [_ceil("copy", 10.0, spread=0.5)]), _ceiling_run(10.6, []))
    assert only_a["copy_gbps"]["lo"] == pytest.approx(1.06)  # one side's probe missing: no noise
    assert set(C.ceiling_ratios(a, Run(Path("r"), {"ceilings": {"read_gbps": 3.0}}, []))) == set()


def test_ceiling_ratios_from_the_probes_samples():
    sa, sb = [2.0, 2.2, 1.8, 2.0, 2.0], [3.0] * 5  # B's probe times constant, A's within +-10%
    a = _ceiling_run(10.0, [_ceil("copy", 10.0, samples_ms=sa, median_ms=2.0, spread=0.9)])
    b = _ceiling_run(15.0, [_ceil("copy", 15.0, samples_ms=sb, median_ms=3.0, spread=0.9)])
    c = C.ceiling_ratios(a, b)["copy_gbps"]
    lo_t, hi_t = C.median_ratio_interval([1.0, 1.1, 0.9, 1.0, 1.0], [1.0] * 5)  # each probe about its own median
    assert (c["lo"], c["hi"]) == (pytest.approx(1.5 / hi_t), pytest.approx(1.5 / lo_t))
    assert c["lo"] == pytest.approx(1.5 * 0.9) and c["hi"] == pytest.approx(1.5 * 1.1) and c["differed"]


def test_ceiling_ratios_one_sided_samples_and_no_spread():
    sa = [2.0, 2.2, 1.8, 2.0, 2.0]
    a = _ceiling_run(10.0, [_ceil("copy", 10.0, samples_ms=sa, median_ms=2.0, spread=0.1)])
    b = _ceiling_run(15.0, [_ceil("copy", 15.0, spread=0.2)])  # no samples: both sides' spreads
    c = C.ceiling_ratios(a, b)["copy_gbps"]
    assert (c["lo"], c["hi"]) == (pytest.approx(1.2), pytest.approx(1.8))
    bare = C.ceiling_ratios(_ceiling_run(10.0, [_ceil("copy", 10.0)]), _ceiling_run(15.0, [_ceil("copy", 15.0)]))
    assert bare["copy_gbps"]["lo"] == bare["copy_gbps"]["hi"] == pytest.approx(1.5)  # probes without a spread: 0


def test_ceiling_differed_at_the_interval_edges():
    # 1.25 x (1 - 0.2) is exactly 1.0: an interval that touches 1 does not exclude it
    at_lo = C.ceiling_ratios(_ceiling_run(8.0, [_ceil("copy", 8.0, spread=0.2)]),
                             _ceiling_run(10.0, [_ceil("copy", 10.0, spread=0.2)]))["copy_gbps"]
    assert at_lo["lo"] == 1.0 and not at_lo["differed"]
    at_hi = C.ceiling_ratios(_ceiling_run(10.0, [_ceil("copy", 10.0, spread=0.25)]),
                             _ceiling_run(8.0, [_ceil("copy", 8.0, spread=0.25)]))["copy_gbps"]
    assert at_hi["hi"] == 1.0 and not at_hi["differed"]


def test_relative_ratio_and_its_interval():
    cl = {"copy_gbps": {"ratio": 0.5, "lo": 0.4, "hi": 0.6}}
    a = {"kind": "kernel", "ceiling_name": "copy_gbps"}
    boot = {"time_ratio": 2.0, "method": "bootstrap", "ratio_lo": 1.8, "ratio_hi": 2.2}
    C._relative(boot, a, dict(a), cl)
    assert (boot["rel_ratio"], boot["rel_lo"], boot["rel_hi"]) == (1.0, pytest.approx(0.72), pytest.approx(1.32))
    spread = {"time_ratio": 2.0, "method": "spread", "spread_a": 0.1, "spread_b": 0.2}
    C._relative(spread, a, dict(a), cl)
    # noise: the larger spread 0.2 plus the ceiling's half-width over its ratio, 0.1 / 0.5
    assert (spread["rel_ratio"], spread["rel_lo"], spread["rel_hi"]) == (1.0, pytest.approx(0.6), pytest.approx(1.4))
    spread_b = {"time_ratio": 2.0, "method": "spread", "spread_a": 0.3, "spread_b": 0.2}
    C._relative(spread_b, a, dict(a), cl)
    assert spread_b["rel_lo"] == pytest.approx(0.5)
    for aa, bb, ceil, row in ((a, {"kind": "kernel", "ceiling_name": "read_gbps"}, cl, {}),
                              ({**a, "kind": "ceiling"}, {**a, "kind": "ceiling"}, cl, {}),
                              ({"kind": "kernel"}, {"kind": "kernel"}, {None: cl["copy_gbps"]}, {}),
                              (a, dict(a), {}, {}),
                              (a, dict(a), cl, {"time_ratio": None})):
        r = {"time_ratio": 2.0, "method": "bootstrap", "ratio_lo": 1.8, "ratio_hi": 2.2, **row}
        C._relative(r, aa, bb, ceil)
        assert "rel_ratio" not in r


def test_judge_claims_only_where_both_agree():
    assert C.judge({"rel_lo": None}, 1.2, 1.3, 0.1) == ("slower", "slower")
    assert C.judge({}, 0.5, 0.6, 0.1) == ("faster", "faster")
    assert C.judge({"rel_lo": 1.2, "rel_hi": 1.3}, 1.2, 1.3, 0.1) == ("slower", "slower")
    assert C.judge({"rel_lo": 0.9, "rel_hi": 1.3}, 1.2, 1.3, 0.1) == ("same", "slower")
    assert C.judge({"rel_lo": 1.2, "rel_hi": 1.3}, 0.9, 1.3, 0.1) == ("same", "same")
    assert C.judge({"rel_lo": 0.5, "rel_hi": 0.6}, 1.2, 1.3, 0.1) == ("same", "slower")
    # the floor applies to the relative interval too
    assert C.judge({"rel_lo": 1.15, "rel_hi": 1.3}, 1.2, 1.3, 0.18) == ("same", "slower")
    assert C.judge({"rel_lo": 1.15, "rel_hi": 1.3}, 1.2, 1.3, 0.1) == ("slower", "slower")


# --- one pair of points -------------------------------------------------------------------------------------------

KEY = point_key({"kind": "kernel", "op": "gemm", "backend": "torch", "dtype": "fp32", "m": 64})


def _floors(name):
    return {"copy_gbps": 0.25}.get(name, 0.0), name or "largest"


def _ok(**kw):
    return {"kind": "kernel", "status": "ok", **kw}


def test_pair_one_sided():
    row = C._pair(KEY, None, _ok(median_ms=1.0), {}, _floors)
    assert row["changed"] == "only_b" and row["status_a"] is None and row["status_b"] == "ok"
    assert row["median_ms_b"] == 1.0 and row["time_ratio"] is None and row["noise_floor"] is None
    assert row["floor_from"] is None and row["note"] is None
    only_a = C._pair(KEY, _ok(median_ms=1.0), None, {}, _floors)
    assert only_a["changed"] == "only_a" and only_a["status_a"] == "ok" and only_a["median_ms_a"] == 1.0
    assert set(row) == set(only_a) == set(C.COLUMNS) | {"throughput_field"}
    assert {k for k in row if k not in ("changed", "status_b", "median_ms_b", "spread_b", "kind", "name", "backend",
                                        "dtype", "shape") and row[k] is not None} == set()


@pytest.mark.parametrize(("sa", "sb", "changed"), [
    ("ok", "failed", "failed"), ("noisy", "oom", "failed"), ("failed", "ok", "n/a"), ("failed", "failed", "n/a"),
    ("ok", "contended", "contended"), ("contended", "noisy", "contended"), ("contended", "contended", "contended"),
    ("contended", "failed", "n/a"), ("failed", "contended", "n/a"),
])
def test_pair_unusable(sa, sb, changed):
    row = C._pair(KEY, _ok(status=sa, median_ms=1.0), _ok(status=sb, median_ms=1.0), {}, _floors)
    assert row["changed"] == changed and row["time_ratio"] is None and row["changed_raw"] is None


def test_pair_unusable_note_names_each_side():
    row = C._pair(KEY, _ok(status="oom", error="out of memory"), _ok(status="failed"), {}, _floors)
    assert row["note"] == "A: oom out of memory; B: failed"
    row = C._pair(KEY, _ok(), _ok(status="contended", error="shared"), {}, _floors)
    assert row["note"] == "B: contended shared"


def test_pair_without_time_or_throughput():
    row = C._pair(KEY, _ok(gbps=5.0), _ok(tflops=1.0), {}, _floors)
    assert row["changed"] == row["changed_raw"] == "n/a" and row["note"] == "no time or throughput on both sides"
    assert row["noise_floor"] is None and row["method"] is None


def test_pair_on_throughput_alone():
    row = C._pair(KEY, _ok(gbps=10.0, value=1.0), _ok(gbps=5.0, value=4.0), {}, _floors)
    assert row["throughput_ratio"] == 0.5 and row["throughput_field"] == "gbps" and row["time_ratio"] is None
    assert row["method"] == "spread" and row["changed"] == "slower" and row["changed_raw"] == "slower"
    one_time = C._pair(KEY, _ok(median_ms=1.0, gbps=10.0), _ok(gbps=5.0), {}, _floors)  # a time on one side only
    assert one_time["time_ratio"] is None and one_time["throughput_ratio"] == 0.5 and one_time["changed"] == "slower"
    first = C._pair(KEY, _ok(tokens_per_s=2.0, gbps=10.0), _ok(tokens_per_s=4.0, gbps=5.0), {}, _floors)
    assert first["throughput_field"] == "tokens_per_s" and first["throughput_ratio"] == 2.0
    assert first["changed"] == "faster"


def test_pair_spread_rule_and_the_floor_note():
    a, b = _ok(median_ms=2.0, spread=0.1), _ok(median_ms=3.0, spread=0.3)
    row = C._pair(KEY, a, b, {}, _floors)
    assert set(row) == set(C.COLUMNS) | {"throughput_field"}
    assert row["time_ratio"] == 1.5 and row["method"] == "spread" and row["ratio_lo"] is None
    assert row["changed"] == "slower" and row["noise_floor"] == 0.0 and row["floor_from"] == "largest"
    assert row["note"] is None and row["spread_a"] == 0.1 and row["spread_b"] == 0.3
    # both judged against the copy ceiling, whose drift gives a 25% floor: 1.2..1.8 is not wholly beyond 1.25
    a, b = {**a, "ceiling_name": "copy_gbps"}, {**b, "ceiling_name": "copy_gbps"}
    row = C._pair(KEY, a, b, {}, _floors)
    assert row["changed"] == "same" and row["changed_raw"] == "same" and row["noise_floor"] == 0.25
    assert row["floor_from"] == "copy_gbps"
    assert row["note"] == "within this machine's between-run noise of ±25% from copy_gbps (B/A x1.200..x1.800)"
    # and against each run's own ceiling (ceilings equal, their interval +-10%)
    cl = {"copy_gbps": {"ratio": 1.0, "lo": 0.9, "hi": 1.1}}
    row = C._pair(KEY, a, b, cl, _floors)
    assert (row["rel_lo"], row["rel_hi"]) == (pytest.approx(1.1), pytest.approx(1.9))
    assert row["note"] == ("within this machine's between-run noise of ±25% from copy_gbps (B/A x1.200..x1.800; "
                           "against each run's own ceiling x1.100..x1.900)")


def test_pair_same_by_disagreement_has_no_floor_note():
    """Raw x1.2..x1.8 but against the ceilings (B's half as fast, +-10%) x0.35..x1.15: the two disagree even without
    a floor, so `same` is not the floor's doing and carries no note."""
    a = _ok(median_ms=2.0, spread=0.1, ceiling_name="copy_gbps")
    b = _ok(median_ms=3.0, spread=0.3, ceiling_name="copy_gbps")
    row = C._pair(KEY, a, b, {"copy_gbps": {"ratio": 0.5, "lo": 0.45, "hi": 0.55}}, _floors)
    assert (row["rel_lo"], row["rel_hi"]) == (pytest.approx(0.35), pytest.approx(1.15))
    assert row["changed"] == "same" and row["note"] is None


def test_pair_same_without_the_floor_has_no_note():
    row = C._pair(KEY, _ok(median_ms=1.0, spread=0.1, ceiling_name="copy_gbps"),
                  _ok(median_ms=1.05, spread=0.1, ceiling_name="copy_gbps"), {}, _floors)
    assert row["changed"] == "same" and row["note"] is None and row["noise_floor"] == 0.25


def test_pair_bootstrap():
    a = _ok(median_ms=1.0, samples_ms=[1.0] * 5, spread=0.5)
    b = _ok(median_ms=2.0, samples_ms=[2.0] * 5, spread=0.5)
    row = C._pair(KEY, a, b, {}, _floors)
    assert row["method"] == "bootstrap" and (row["ratio_lo"], row["ratio_hi"]) == (2.0, 2.0)
    assert row["changed"] == "slower" and row["time_ratio"] == 2.0
    row = C._pair(KEY, a, {**b, "samples_ms": [2.0] * 4}, {}, _floors)  # too few on one side: the spread rule
    assert row["method"] == "spread" and row["ratio_lo"] is None and row["changed"] == "slower"  # 2 -+ 0.5


# --- the comparison -----------------------------------------------------------------------------------------------


def _cmp(rows=(), ceilings=None, dev_a="X", dev_b="X", floors=None, floor=0.0) -> C.Comparison:
    def run(rid, dev):
        return Run(Path(rid), {"run_id": rid, "environment": {"device": {"name": dev}}}, [])

    return C.Comparison(run("a", dev_a), run("b", dev_b), rows=list(rows), ceilings=ceilings or {},
                        floor=floor, floors=floors if floors is not None else {"A": None, "B": None})


def _row(changed="same", kind="kernel", **kw):
    base = {"kind": kind, "changed": changed, "note": None, "rel_ratio": None, "rel_lo": None, "method": "bootstrap",
            "ratio_lo": 1.0, "time_ratio": 1.0, "floor_from": None, "noise_floor": None}
    return {**base, **kw}


def test_machines_differed_and_cross_device():
    c = _cmp(ceilings={"copy_gbps": {"ratio": 1.5, "differed": True}, "read_gbps": {"ratio": 1.2, "differed": False},
                       "matmul_tflops.bf16": {"ratio": 0.6666, "differed": True}})
    assert c.machines_differed == ["copy_gbps x1.500", "matmul_tflops.bf16 x0.667"]
    assert not c.cross_device and _cmp(dev_b="Y").cross_device


def test_header_lines():
    none = C.floor_text({"A": None, "B": None}, 0.0)
    assert _cmp().header() == f"A: a (X)  vs  B: b (X); ratios are B/A\n{none}"
    assert _cmp(dev_b="Y").header() == (f"A: a (X)  vs  B: b (Y); ratios are B/A\ncross-device comparison: the ratios "
                                        f"compare devices, not code changes\n{none}")
    c = _cmp(ceilings={"copy_gbps": {"ratio": 1.5, "differed": True}, "read_gbps": {"ratio": 0.5, "differed": True}})
    assert c.header() == ("A: a (X)  vs  B: b (X); ratios are B/A\nthe machines differed: ceilings B/A copy_gbps "
                          "x1.500, read_gbps x0.500 beyond their noise; a change is claimed where a point's raw time "
                          f"and its time against its own run's ceiling (rel_ratio) agree\n{none}")
    rows = [_row(floor_from="copy_gbps", noise_floor=0.8), _row(floor_from="matmul_tflops.fp32", noise_floor=0.1)]
    c = _cmp(rows, floors={"A": 0.5, "B": 0.2}, floor=0.8)
    assert c.header().endswith(C.floor_text({"A": 0.5, "B": 0.2}, 0.8, {"copy_gbps": 0.8,
                                                                         "matmul_tflops.fp32": 0.1}, c.floor_rule))


def test_summary_counts_and_floors():
    assert _cmp().summary() == "compared: no points"
    note = C.FLOOR_NOTE + " of ..."
    rows = [_row("same", rel_ratio=1.0, floor_from="copy_gbps", noise_floor=0.8, note=note),
            _row("same", floor_from="copy_gbps", noise_floor=0.8, note=note),
            _row("same", floor_from="largest", noise_floor=0.9, note=note),
            _row("same", floor_from="matmul_tflops.fp32", noise_floor=0.1, note="another note"),
            _row("slower", rel_ratio=2.0, floor_from="matmul_tflops.fp32", noise_floor=0.1),
            _row("n/a"), _row("n/a")]
    two = {"copy_gbps": {"ratio": 1.5, "differed": True}, "read_gbps": {"ratio": 2, "differed": True}}
    c = _cmp(rows, ceilings=two)
    assert c.summary() == ("compared: 2 n/a, 4 same, 1 slower (2 judged against each run's own ceilings); 3 same "
                           "only within this machine's between-run noise (1 by each run's largest drift "
                           "±90%, 2 by copy_gbps ±80%); the machines differed: copy_gbps x1.500, read_gbps x2.000")
    assert _cmp([_row("same")]).summary() == "compared: 1 same"


def test_floor_classes_and_blind():
    rows = [_row(floor_from="read_gbps", noise_floor=0.5), _row(floor_from="matmul_tflops.fp32", noise_floor=0.1),
            _row(floor_from="copy_gbps", noise_floor=0.5), _row(floor_from="largest", noise_floor=0.9),
            _row(kind="ceiling", floor_from="matvec_gbps.bf16", noise_floor=2.0), _row()]
    c = _cmp(rows)
    assert list(c.floor_classes().items()) == [("matvec_gbps.bf16", 2.0), ("largest", 0.9), ("copy_gbps", 0.5),
                                               ("read_gbps", 0.5), ("matmul_tflops.fp32", 0.1)]
    assert list(c.blind(10).items()) == [("largest", 0.9), ("copy_gbps", 0.5), ("read_gbps", 0.5)]
    assert list(c.blind(50).items()) == [("largest", 0.9)]  # a floor of exactly 50% does not blind a 50% gate
    assert c.blind(90) == {} and list(c.blind(9.9)) == ["largest", "copy_gbps", "read_gbps", "matmul_tflops.fp32"]


def test_regressions_thresholds():
    boot = _row("slower", ratio_lo=1.25, time_ratio=1.5)
    boot_rel = _row("slower", ratio_lo=1.25, rel_ratio=1.6, rel_lo=1.5, time_ratio=1.5)
    boot_rel2 = _row("slower", ratio_lo=1.5, rel_ratio=1.4, rel_lo=1.25, time_ratio=1.6)
    spread = _row("slower", method="spread", ratio_lo=None, time_ratio=1.5)
    spread_rel = _row("slower", method="spread", ratio_lo=None, time_ratio=1.75, rel_ratio=1.5, rel_lo=1.2)
    spread_rel2 = _row("slower", method="spread", ratio_lo=None, time_ratio=1.5, rel_ratio=1.75, rel_lo=1.2)
    no_time = _row("slower", method="spread", ratio_lo=None, time_ratio=None)
    ceiling = _row("slower", kind="ceiling", ratio_lo=3.0, time_ratio=3.0)
    faster, same = _row("faster", ratio_lo=0.5), _row("same", ratio_lo=2.0)
    failed, contended = _row("failed", time_ratio=None), _row("contended", time_ratio=None)
    c = _cmp([boot, boot_rel, boot_rel2, spread, spread_rel, spread_rel2, no_time, ceiling, faster, same, failed,
              contended])
    ids = lambda pct: [id(r) for r in c.regressions(pct)]  # noqa: E731
    assert ids(24) == [id(r) for r in (boot, boot_rel, boot_rel2, spread, spread_rel, spread_rel2, failed, contended)]
    assert ids(25) == [id(r) for r in (spread, spread_rel, spread_rel2, failed, contended)]  # 1.25: not over 25%
    assert ids(49) == [id(r) for r in (spread, spread_rel, spread_rel2, failed, contended)]
    assert ids(50) == [id(r) for r in (failed, contended)]  # x1.5 is not over 50%
    assert ids(1000) == [id(r) for r in (failed, contended)]


# --- compare() on run folders ------------------------------------------------------------------------------------


def _write(folder: Path, points: list[dict], ratios: dict | None = None, device: str = "CPU X", **manifest) -> Path:
    with results.RunWriter(folder, {"run_id": folder.name, "environment": {"device": {"name": device}},
                                    "ceilings": {"copy_gbps": 10.0}, **manifest}) as w:
        for p in points:
            w.append(p)
    if ratios is not None:
        results.update_manifest(folder, ceiling_drift={"limit": 0.05, "ratios": ratios, "flagged": []})
    return folder


def _k(op, median, name=None, **kw):
    return {"kind": "kernel", "op": op, "backend": "torch", "dtype": "fp32", "status": "ok", "median_ms": median,
            "spread": 0.01, **({"ceiling_name": name} if name else {}), **kw}


def test_compare_runs_end_to_end(tmp_path: Path):
    a = _write(tmp_path / "a", [_k("silu", 1.0, "copy_gbps"), _k("gemm", 1.0, "matmul_tflops.fp32"),
                                {"kind": "decode", "model": "m", "backend": "torch", "status": "ok",
                                 "median_ms": 1.0, "spread": 0.01}, _k("only_a", 1.0)],
               {"copy_gbps": 1.5, "matmul_tflops.fp32": 1.1})
    b = _write(tmp_path / "b", [_k("silu", 1.4, "copy_gbps"), _k("gemm", 1.4, "matmul_tflops.fp32"),
                                {"kind": "decode", "model": "m", "backend": "torch", "status": "ok",
                                 "median_ms": 1.0, "spread": 0.01}, _k("add", 1.0)],
               {"copy_gbps": 1 / 1.2, "matmul_tflops.fp32": 1.05}, device="CPU Y")
    c = C.compare(a, b, "ceiling")
    assert c.floor_rule == "ceiling"
    assert c.floors == {"A": pytest.approx(0.5), "B": pytest.approx(0.2)} and c.floor == pytest.approx(0.8)
    assert c.drifts["A"] == {"copy_gbps": pytest.approx(0.5), "matmul_tflops.fp32": pytest.approx(0.1)}
    assert c.drifts["B"]["matmul_tflops.fp32"] == pytest.approx(0.05)
    assert c.cross_device and all(r["cross_device"] for r in c.rows)
    # ordered: matched before one-sided, then by kind (kernel before decode), name, backend, dtype
    assert [(r["kind"], r["name"]) for r in c.rows] == [("kernel", "gemm"), ("kernel", "silu"), ("decode", "m"),
                                                        ("kernel", "add"), ("kernel", "only_a")]
    rows = {r["name"]: r for r in c.rows}
    assert rows["gemm"]["changed"] == "slower" and rows["gemm"]["floor_from"] == "matmul_tflops.fp32"
    assert rows["gemm"]["noise_floor"] == pytest.approx(0.155)
    assert rows["silu"]["changed"] == "same" and rows["silu"]["noise_floor"] == pytest.approx(0.8)
    assert rows["m"]["changed"] == "same" and rows["m"]["floor_from"] == "largest"
    assert c.regressions(10) == [rows["gemm"]]
    assert [r["changed"] for r in c.rows[-2:]] == ["only_b", "only_a"]
    d = C.compare(a, b)  # the default rule: every point takes each run's largest drift, compounded (1.5 x 1.2)
    assert d.floor_rule == "largest"
    assert {r["name"]: (r["floor_from"], round(r["noise_floor"], 12), r["changed"]) for r in d.rows[:3]} == {
        "gemm": ("largest", 0.8, "same"), "silu": ("largest", 0.8, "same"), "m": ("largest", 0.8, "same")}
    assert d.regressions(10) == []
    with pytest.raises(ConfigError) as e:
        C.compare(a, b, "Largest")
    assert (e.value.file, e.value.field) == ("--floor", None)
    assert str(e.value).endswith("unknown rule 'Largest'; known: largest, ceiling")


def test_compare_orders_by_backend_and_dtype(tmp_path: Path):
    pts = [_k("gemm", 1.0, backend="triton", dtype="fp32"), _k("gemm", 1.0, backend="torch", dtype="fp32"),
           _k("gemm", 1.0, backend="torch", dtype="bf16"), {**_k("zz", 1.0), "kind": "prefill"},
           {**_k("aa", 1.0), "kind": "mystery"}, {**_k("copy", 1.0), "kind": "ceiling"},
           {"kind": "kernel", "op": "gemm", "status": "ok", "median_ms": 1.0},  # no backend, no dtype
           {"kind": "kernel", "m": 1, "backend": "torch", "status": "ok", "median_ms": 1.0}]  # no op: no name
    c = C.compare(_write(tmp_path / "a", pts), _write(tmp_path / "b", pts))
    assert [(r["kind"], r["name"], r["backend"], r["dtype"]) for r in c.rows] == [
        ("ceiling", "copy", "torch", "fp32"), ("kernel", None, "torch", None), ("kernel", "gemm", None, None),
        ("kernel", "gemm", "torch", "bf16"), ("kernel", "gemm", "torch", "fp32"), ("kernel", "gemm", "triton", "fp32"),
        ("prefill", "zz", "torch", "fp32"), ("mystery", "aa", "torch", "fp32")]
    assert not c.cross_device and c.floors == {"A": None, "B": None} and c.drifts == {"A": {}, "B": {}}


def test_compare_refuses_different_schema_versions(tmp_path: Path):
    a = _write(tmp_path / "a", [_k("gemm", 1.0)])
    b = _write(tmp_path / "b", [_k("gemm", 1.0)])
    m = json.loads((b / "manifest.json").read_text())
    m["schema_version"] = 99
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ConfigError) as e:
        C.compare(a, b)
    assert e.value.field == "schema_version" and Path(e.value.file) == b / "manifest.json"
    assert str(e.value).endswith(f"99 differs from {results.SCHEMA_VERSION!r} of run A ({a}): runs of different "
                                 "schema versions are not comparable")


# --- points measured at different CPU speeds (issue 24) ----------------------------------------------------------


def test_speed_of_a_point_is_its_slower_reading():
    assert C.speed_of({}) is None and C.speed_of({"load": None}) is None and C.speed_of({"load": {}}) is None
    assert C.speed_of({"load": {"speed_us": None}}) is None
    assert C.speed_of({"load": {"speed_us": [5.0, 7.0]}}) == 7.0
    assert C.speed_of({"load": {"speed_us": [7.0, 5.0]}}) == 7.0
    assert C.speed_of({"load": {"speed_us": [0.0, -1.0, "x"]}}) is None
    assert C.speed_of({"load": {"speed_us": [0.0, 4.0]}}) == 4.0


def test_speed_text_exactly():
    rows = [{"speed_ratio": 1.5}, {"speed_ratio": 1 / 1.3}, {"speed_ratio": 1.4}]
    assert C.speed_text(rows) == (
        "3 point(s) not judged (`machine`): measured while the CPU ran at speeds x1.30..x1.50 apart in the two runs "
        "(the speed probe; limit x1.25), another guest sharing the cores in one of them; measure them again to judge "
        "them")


def _sp(us, **kw):
    return _ok(**kw, load={"speed_us": [us * 0.9, us]})


@pytest.mark.parametrize(("ua", "ub", "changed"), [
    (5.0, 6.25, "slower"),  # x1.25 exactly: within the limit, judged
    (5.0, 6.26, "machine"),
    (6.26, 5.0, "machine"),  # either way
    (6.25, 5.0, "slower"),
])
def test_pair_at_different_speeds_boundary(ua, ub, changed):
    row = C._pair(KEY, _sp(ua, median_ms=2.0, spread=0.1), _sp(ub, median_ms=3.0, spread=0.1), {}, _floors)
    assert row["changed"] == changed and row["speed_ratio"] == pytest.approx(ub / ua)
    if changed == "machine":
        assert row["note"] == (f"not judged: slower x1.400..x1.600, but the CPU ran x{ub / ua:.2f} as slow in B as in "
                               f"A around it (speed probe {ua:.1f} us in A, {ub:.1f} us in B)")
        assert row["time_ratio"] == 1.5 and row["changed_raw"] == "slower"
    else:
        assert row["note"] is None


def test_pair_at_different_speeds_that_agree_is_same():
    row = C._pair(KEY, _sp(5.0, median_ms=2.0, spread=0.1), _sp(8.0, median_ms=2.02, spread=0.1), {}, _floors)
    assert row["changed"] == "same" and row["speed_ratio"] == 1.6 and row["note"] is None
    one = C._pair(KEY, _sp(5.0, median_ms=2.0, spread=0.1), _ok(median_ms=3.0, spread=0.1), {}, _floors)
    assert one["speed_ratio"] is None and one["changed"] == "slower"


def test_unjudged_header_summary_and_gate():
    rows = [_row("machine", speed_ratio=1.5, time_ratio=1.5, ratio_lo=1.4), _row("same", speed_ratio=1.0),
            _row("slower", time_ratio=1.5, ratio_lo=1.4)]
    c = _cmp(rows)
    assert c.unjudged == [rows[0]]
    assert c.header().splitlines()[:2] == ["A: a (X)  vs  B: b (X); ratios are B/A", C.speed_text([rows[0]])]
    assert c.summary() == ("compared: 1 machine, 1 same, 1 slower; 1 not judged: the CPU ran at different speeds for "
                           "them (`machine`)")
    assert c.regressions(10) == [rows[2]]
    assert _cmp(rows[1:]).unjudged == [] and "not judged" not in _cmp(rows[1:]).header()
