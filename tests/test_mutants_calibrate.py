"""Oracles for tokenfleet.capacity.calibrate's helpers (`make mutate`'s survivors): the ratio grid at and beyond its
edges, the board power at a batch, the all-to-all curve chosen from a run. Values worked out by hand."""

import math
from pathlib import Path

import numpy as np
import pytest
from tokenfleet.capacity import calibrate as C
from tokenfleet.capacity import project as P
from tokenfleet.capacity.calibrate import Measured, RatioGrid, measured_allreduce, measured_alltoall
from tokenfleet.model.spec import load_model_config
from tokenfleet.results import Run


def test_ratio_grid_bilinear_and_below_one():
    g = RatioGrid([(1, 1, 1.0), (4, 1, 2.0), (1, 4, 3.0), (4, 4, 4.0)])  # log2 axes: 0 and 2
    assert g(2, 2) == 2.5  # the middle of the four corners
    assert g(1, 1) == 1.0 and g(4, 4) == 4.0 and g(64, 0.25) == 2.0  # held at the edges beyond them
    half = RatioGrid([(0.5, 0.5, 1.0), (2, 2, 3.0), (0.5, 2, 1.0), (2, 0.5, 3.0)])  # axes at −1 and 1
    assert half(0.5, 0.5) == 1.0 and half(1, 1) == 2.0  # 0.5 is log2 −1, not clamped to 1
    cols = RatioGrid([(2, 0.5, 1.0), (2, 2, 3.0)])
    assert cols(2, 0.5) == 1.0


def _reference_grid(samples, a, b):
    """The ratio grid by hand: each (log2 a, log2 b) cell the mean of its nearest samples (brute force), then
    np.interp along b in each row and along a across the rows (np.interp holds the end values beyond the ends)."""
    pts = [(math.log2(x), math.log2(y), r) for x, y, r in samples]
    xs, ys = sorted({p[0] for p in pts}), sorted({p[1] for p in pts})
    grid = []
    for x in xs:
        row = []
        for y in ys:
            d = [(p[0] - x) ** 2 + (p[1] - y) ** 2 for p in pts]
            row.append(sum(p[2] for p, di in zip(pts, d, strict=True) if di == min(d)) / d.count(min(d)))
        grid.append(row)
    la, lb = math.log2(max(a, 1e-9)), math.log2(max(b, 1e-9))
    return float(np.interp(la, xs, [np.interp(lb, ys, row) for row in grid]))


def test_ratio_grid_equals_bilinear_by_hand_on_random_grids():
    # scipy's RegularGridInterpolator on clipped coordinates against np.interp row by row (the code it replaced):
    # worst relative difference measured 6.5e-16 over 26,000 points (2026-12-05); tolerance 1e-14, ~15x that.
    rng = np.random.default_rng(25)
    for _ in range(60):
        bs = rng.choice([1, 2, 4, 8, 16, 64, 256], int(rng.integers(1, 5)), replace=False)
        cs = rng.choice([128, 512, 700, 1024, 3000, 8192], int(rng.integers(1, 5)), replace=False)
        samples = [(float(rng.choice(bs)) * rng.choice([1, rng.uniform(0.5, 2)]), float(rng.choice(cs)),
                    float(rng.uniform(0.3, 3))) for _ in range(int(rng.integers(1, 12)))]
        g = RatioGrid(samples)
        a0, a1, b0, b1 = 2 ** g.xs[0], 2 ** g.xs[-1], 2 ** g.ys[0], 2 ** g.ys[-1]
        queries = [(rng.uniform(a0 / 4, a1 * 4), rng.uniform(b0 / 4, b1 * 4)) for _ in range(4)]
        queries += [(a0, b0), (a1, b1), (a0, rng.uniform(b0, b1)), (rng.uniform(a0, a1), b1), (a1 * 64, b0 / 64),
                    (0, 0)]
        for a, b in queries:
            assert g(a, b) == pytest.approx(_reference_grid(samples, a, b), rel=1e-14, abs=0)


def test_ratio_grid_missing_cells_take_the_nearest_sample():
    # samples at log2 (0, 0) 1.0, (1, 0) 5.0, (3, 2) 7.0 and 9.0: axes a 0, 1, 3 and b 0, 2. Missing cells take the
    # mean of every sample at the smallest distance: (0, 2) -> (0, 0) at 2: 1.0; (1, 2) -> (1, 0) and both (3, 2) at
    # 2: (5 + 7 + 9) / 3 = 7.0; (3, 0) -> the same three at 2: 7.0; (3, 2) -> its two samples: 8.0
    g = RatioGrid([(1, 1, 1.0), (2, 1, 5.0), (8, 4, 7.0), (8, 4, 9.0)])
    assert g.xs.tolist() == [0, 1, 3] and g.ys.tolist() == [0, 2]
    assert g.grid.tolist() == [[1.0, 1.0], [5.0, 7.0], [7.0, 8.0]]
    # bilinear: (a 2, b 0) halfway 5 -> 7: 6.0; (2, 2): 7 -> 8: 7.5; (1, 1): 5 -> 7: 6.0; (0, 1): 1.0
    assert g(4, 1) == 6.0 and g(4, 4) == 7.5 and g(2, 2) == 6.0 and g(1, 2) == 1.0
    assert g(1024, 2) == 7.5 and g(0.01, 64) == 1.0  # clipped to the edges: (3, 1) and (0, 2)
    assert isinstance(g(4, 1), float)


def test_ratio_grid_inside_is_its_log_box():
    g = RatioGrid([(1, 1, 1.0), (4, 4, 2.0)])
    assert g.inside(1, 1) and g.inside(4, 4) and g.inside(2, 3)
    assert not g.inside(8, 2) and not g.inside(2, 8) and not g.inside(0.5, 2) and not g.inside(2, 0.5)
    low = RatioGrid([(0.5, 0.5, 1.0), (0.5, 0.25, 1.0)])  # one column at log2 −1, rows at −2 and −1
    assert low.inside(0.5, 0.5) and low.inside(0.5, 0.25)
    assert not low.inside(1, 0.5) and not low.inside(0.5, 1)


def test_power_at_the_nearest_measured_batch():
    m = Measured("triton", ["r1", "r2"], {}, {}, power_w=300.0, energy_w={1: 100.0, 3: 200.0})
    # batch 1.5: |ln(1/1.5)| = 0.41 < |ln(3/1.5)| = 0.69
    assert m.power_at(1.5) == (100.0, "measured: NVML energy counter, decode batch 1 (run r1, r2)")
    assert m.power_at(2.5)[0] == 200.0 and m.power_at(0.1)[0] == 100.0  # below 1: as batch 1
    no_counter = Measured("triton", ["r1", "r2"], {}, {}, power_w=300.0)
    assert no_counter.power_at(8) == (300.0, "measured: NVML power read after the decode points (run r1, r2)")
    assert Measured("triton", ["r1"], {}, {}).power_at(8) == (None, None)


def _coll(op, world, ms, backend="nccl"):
    return [{"kind": "collective", "op": op, "dtype": "bf16", "bytes": b, "world_size": world, "backend": backend,
             "status": "ok", "median_ms": ms * b / 1024} for b in (1024, 4096)]


def test_alltoall_curve_of_this_device_and_op():
    points = _coll("all_to_all", 4, 1.0) + _coll("all_reduce", 4, 5.0)
    runs = [Run(Path("a"), {"run_id": "a", "environment": {"datasheet": {"id": "h200"}}}, points),
            Run(Path("b"), {"run_id": "b", "environment": {"datasheet": {"id": "h100"}}}, _coll("all_to_all", 4, 9.0))]
    curve, label = measured_alltoall(runs, "h200", 4)
    assert (curve.op, curve.sizes, curve.times) == ("all_to_all", [1024, 4096], [1.0, 4.0])
    assert label == "measured (run a, nccl, world 4, bf16)"
    assert measured_allreduce(runs, "h200", 4)[0].times == [5.0, 20.0]
    assert measured_alltoall(runs, "h100", 4)[0].times == [9.0, 36.0]
    assert measured_alltoall(runs, "h200", 8) is None and measured_alltoall(runs, "h200", 1) is None


def test_auto_tp_takes_a_model_config():
    by_name = P.auto_tp("llama-3.1-8b", "h100-sxm", "chat")
    by_config = P.auto_tp(load_model_config("llama-3.1-8b"), "h100-sxm", "chat")
    assert by_config["fits"] and by_config["tp"] == by_name["tp"]
    assert by_config["tokens_per_s_per_gpu"] == by_name["tokens_per_s_per_gpu"] > 0


def _pt(kind, ms, spread=None, status="ok", **kw):
    p = {"kind": kind, "status": status, **kw, **({"spread": spread} if spread is not None else {})}
    return {**p, **ms}


def test_point_helpers():
    assert C._pos(1) and not C._pos(0) and not C._pos(True) and not C._pos(float("inf"))
    assert C._spread({"spread": 0.25}) == 0.25
    assert C._spread({"spread": float("nan")}) == math.inf and C._spread({}) == math.inf
    # decode: the TPOT before the median; prefill: the median before the TTFT
    assert C._seconds({"kind": "decode", "tpot_ms": 8.0, "median_ms": 10.0}) == 0.008
    assert C._seconds({"kind": "decode", "median_ms": 10.0}) == 0.01
    assert C._seconds({"kind": "prefill", "tpot_ms": 8.0, "median_ms": 20.0, "ttft_ms": 30.0}) == 0.02
    assert C._seconds({"kind": "prefill", "ttft_ms": 30.0}) == 0.03
    assert C._cell({"kind": "decode", "batch": 2, "context": 128}) == ("decode", 2, 128)
    assert C._cell({"kind": "decode", "batch": 0, "context": 128}) is None
    assert C._cell({"kind": "prefill", "batch": 2, "prompt_len": 64, "context": 64}) == ("prefill", 2, 64)
    assert C._cell({"kind": "prefill", "batch": 0, "prompt_len": 64}) is None
    assert C._cell({"kind": "gemm", "batch": 2, "prompt_len": 64}) is None
    assert C._tp({}) == (1, False) and C._tp({"tp": 2}) == (2, True) and C._tp({"tp": 2, "world_size": 2}) == (2, False)


def test_group_cells_take_the_smallest_spread():
    a = _pt("decode", {"tpot_ms": 10.0}, 0.2, batch=1, context=128)
    b = _pt("decode", {"tpot_ms": 12.0}, 0.1, batch=1, context=128)
    tie = _pt("decode", {"tpot_ms": 14.0}, 0.1, batch=1, context=128)
    bad = _pt("decode", {"tpot_ms": 1.0}, 0.0, status="incorrect", batch=8, context=128)
    g = C.Group("h200", "m", "bf16", 1, False, {"triton": [("r1", bad), ("r1", a), ("r2", b), ("r3", tie)]})
    assert g.cells("triton") == {("decode", 1, 128): (0.012, 0.1, "r2", b)}
    assert g.cells("compile") == {}


def _backend(times, spreads=(0.1, 0.1)):
    return [("r", _pt("decode", {"tpot_ms": t}, s, batch=1, context=c)) for t, s, c in zip(times, spreads, (128, 256),
                                                                                         strict=True)]


def test_deployable_is_the_faster_correct_backend():
    def group(**points):
        return C.Group("h200", "m", "bf16", 1, False, points)

    # geometric mean over the shared cells: triton 10·20 = 200 ms² against compile 15·12 = 180 ms²
    assert group(triton=_backend((10.0, 20.0)), compile=_backend((15.0, 12.0))).deployable() == "compile"
    assert group(triton=_backend((10.0, 10.0)), compile=_backend((15.0, 12.0), (0.01, 0.01))).deployable() == "triton"
    only = [("r", _pt("decode", {"tpot_ms": 5.0}, 0.1, batch=1, context=512))]
    assert group(triton=_backend((10.0, 20.0)), compile=only).deployable() == "triton"  # no shared cell: the first
    assert group(compile=_backend((10.0, 20.0)), torch=_backend((1.0, 1.0))).deployable() == "compile"
    assert group(torch=_backend((1.0, 1.0))).deployable() == "torch"
