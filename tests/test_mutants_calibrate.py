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


def test_ratio_grid_inside_has_a_closed_1e9_slack():
    # log2 axes 2 and 3; 2^(2 − 1e-9) and 2^(3 + 1e-9) have log2 exactly 2 − 1e-9 and 3 + 1e-9 (round trip checked
    # in floats): on the slack's edge, inside; 2e-9 beyond, outside
    box = RatioGrid([(4, 4, 1.0), (8, 8, 2.0)])
    lo, hi, below, above = 2 ** (2 - 1e-9), 2 ** (3 + 1e-9), 2 ** (2 - 2e-9), 2 ** (3 + 2e-9)
    assert math.log2(lo) == 2 - 1e-9 and math.log2(hi) == 3 + 1e-9
    assert box.inside(lo, 6) and box.inside(hi, 6) and box.inside(6, lo) and box.inside(6, hi)
    assert not box.inside(below, 6) and not box.inside(above, 6)
    assert not box.inside(6, below) and not box.inside(6, above)
    three = RatioGrid([(1, 1, 1.0), (2, 2, 1.0), (4, 4, 1.0)])  # three values on each axis: 0, 1, 2
    assert three.inside(3, 3) and three.inside(4, 4) and not three.inside(3, 5) and not three.inside(5, 3)


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


def _run(run_id, points, hw="h200"):
    return Run(Path(run_id), {"run_id": run_id, "environment": {"datasheet": {"id": hw} if hw else None}}, points)


def test_groups_keys_and_what_they_leave_out():
    dense = _pt("decode", {"tpot_ms": 1.0}, model="m", dtype="bf16", backend="triton", batch=1, context=8)
    routed = dense | {"routing": "router", "backend": "compile"}
    skewed = dense | {"routing": "zipf-1.2"}  # a what-if, not the grid
    ep2, ep1 = dense | {"ep": 2}, dense | {"ep": 1, "backend": None}
    shard, replica = dense | {"tp": 2}, dense | {"tp": 2, "world_size": 2}
    pre = _pt("prefill", {"median_ms": 1.0}, model="m", dtype="fp8", backend="triton", batch=1, prompt_len=8)
    other = [dense | {"kind": "gemm"}, dense | {"model": None}, dense | {"kind": None}]
    gs = C.groups([_run("a", [dense, routed, skewed, ep2, ep1, shard, replica, pre, *other]),
                   _run("b", [dense]), _run("c", [dense], hw=None)])
    assert set(gs) == {("h200", "m", "bf16", 1, False), ("h200", "m", "bf16", 2, True),
                       ("h200", "m", "bf16", 2, False), ("h200", "m", "fp8", 1, False)}
    g = gs[("h200", "m", "bf16", 1, False)]
    assert (g.hardware_id, g.model, g.dtype, g.tp, g.shard) == ("h200", "m", "bf16", 1, False)
    assert dict(g.points) == {"triton": [("a", dense), ("b", dense)], "compile": [("a", routed)],
                              "unknown": [("a", ep1)]}
    assert dict(gs[("h200", "m", "bf16", 2, True)].points) == {"triton": [("a", shard)]}
    assert gs[("h200", "m", "bf16", 2, False)].replica and not gs[("h200", "m", "bf16", 2, True)].replica
    assert not g.replica
    assert C.groups([_run("d", [dense | {"ep": 3}])]) == {}


def test_correct_backends():
    ok = _pt("decode", {"tpot_ms": 1.0}, batch=1, context=8)
    bad, failed, noisy = ok | {"status": "incorrect"}, ok | {"status": "error"}, ok | {"status": "noisy"}
    g = C.Group("h200", "m", "bf16", 1, False, {"triton": [("r", ok), ("r", bad)], "compile": [("r", failed)],
                                                  "torch": [("r", noisy)], "x": [("r", failed), ("r", ok)]})
    assert g.correct() == ["torch", "x"]  # an incorrect point rules its backend out; one usable point is needed
    assert g.deployable() is None  # torch is correct but not the only backend present
    assert C.Group("h200", "m", "bf16", 1, False, {"torch": [("r", bad)]}).deployable() is None


def _cells(ms, kind="decode", **kw):
    key = "context" if kind == "decode" else "prompt_len"
    return [_pt(kind, {"tpot_ms" if kind == "decode" else "median_ms": t}, 0.1, model="m", dtype="bf16",
                backend="triton", batch=b, **{key: c}, **kw) for (b, c), t in ms.items()]


def test_measured_cells_power_and_runs():
    dec = _cells({(1, 128): 2.0, (4, 128): 3.0, (4, 256): 4.0})
    dec[0] |= {"telemetry": {"power_w": 300.0}, "power_w_measured": 310.0}
    dec[1] |= {"telemetry": {"power_w": 500.0}, "power_w_measured": 400.0}
    dec[2] |= {"telemetry": {"power_w": 0}, "power_w_measured": 600.0}  # no reading: left out of the median
    pre = _cells({(1, 64): 10.0}, "prefill", telemetry={"power_w": 900.0}, power_w_measured=999.0)
    m = C.measured_for([_run("r2", dec), _run("r1", pre)], "h200", "m", "bf16", 1)
    assert (m.backend, m.runs, m.shard) == ("triton", ["r1", "r2"], False)
    assert m.decode == {(1, 128): 0.002, (4, 128): 0.003, (4, 256): 0.004} and m.prefill == {(1, 64): 0.01}
    assert m.power_w == 400.0  # the median of the decode readings 300 and 500 (prefill's 900 not counted)
    assert m.energy_w == {1: 310.0, 4: 500.0}  # per decode batch: median of 400 and 600
    assert m.label == "triton, run r1, r2"
    plain = C.measured_for([_run("r", _cells({(1, 128): 2.0}, telemetry="x"))], "h200", "m", "bf16", 1)
    assert plain.power_w is None and plain.energy_w == {}
    assert C.measured_for([_run("r", dec)], "h200", "m", "fp8", 1) is None
    assert C.measured_for([_run("r", dec)], "h100", "m", "bf16", 1) is None


def test_measured_for_tp_takes_the_replica_before_the_shard():
    shard = _cells({(1, 128): 2.0}, tp=2)
    replica = _cells({(1, 128): 3.0}, tp=2, world_size=2)
    m = C.measured_for([_run("s", shard)], "h200", "m", "bf16", 2)
    assert (m.shard, m.decode) == (True, {(1, 128): 0.002})
    assert m.label == "shard on one GPU, collectives added: triton, run s"
    m = C.measured_for([_run("s", shard), _run("p", replica)], "h200", "m", "bf16", 2)
    assert (m.shard, m.decode, m.runs) == (False, {(1, 128): 0.003}, ["p"])
    untimed = [p | {"tpot_ms": None} for p in replica]  # a correct backend with no timed cell: no measurement
    m = C.measured_for([_run("s", shard), _run("p", untimed)], "h200", "m", "bf16", 2)
    assert (m.shard, m.runs) == (True, ["s"])
    assert C.measured_for([_run("p", untimed)], "h200", "m", "bf16", 2) is None


def test_collective_backend_and_world_size():
    gloo, nccl = _coll("all_reduce", 2, 3.0, "gloo"), _coll("all_reduce", 2, 1.0)
    one = _coll("all_reduce", 1, 0.5)  # a world of one has no collective
    assert C.measured_allreduce([_run("g", gloo + one)], "h200", 1) is None
    curve, label = C.measured_allreduce([_run("g", gloo), _run("n", nccl)], "h200", 2)
    assert (curve.times, label) == ([1.0, 4.0], "measured (run n, nccl, world 2, bf16)")
    curve, label = C.measured_allreduce([_run("g", gloo + [p | {"backend": None} for p in nccl])], "h200", 2)
    assert (curve.times, label) == ([3.0, 12.0], "measured (run g, gloo, world 2, bf16)")
    broken = [p | {"status": "error"} for p in nccl]  # unusable nccl points: gloo's curve
    assert C.measured_allreduce([_run("g", gloo + broken)], "h200", 2)[1] == "measured (run g, gloo, world 2, bf16)"
    fp32 = [p | {"dtype": "fp32", "median_ms": 9.0} for p in nccl]  # bf16 chosen: only its run is named
    curve, label = C.measured_allreduce([_run("a", nccl), _run("b", fp32)], "h200", 2)
    assert (curve.dtype, label) == ("bf16", "measured (run a, nccl, world 2, bf16)")
    assert C.measured_allreduce([_run("n", nccl)], "h200", 4) is None
    assert C.measured_allreduce([_run("n", nccl)], "h100", 2) is None
    curve, label = C.measured_allreduce([_run("b", nccl), _run("a", nccl)], "h200", 2)  # two runs merged
    assert (curve.times, label) == ([1.0, 4.0], "measured (run a, b, nccl, world 2, bf16)")
    decode = [p | {"kind": "decode"} for p in nccl]
    assert C.measured_allreduce([_run("n", decode + gloo)], "h200", 2)[1] == "measured (run n, gloo, world 2, bf16)"


def test_read_runs_and_efficiency_dict():
    assert C.read_runs(None) == [] and C.read_runs([]) == []
    r = _run("a", [])
    assert C.read_runs([r]) == [r]
    e = C.Efficiency(0.4, 0.6, 0.2, "src", "a", "calibrated")
    assert e.to_dict() == {"compute": 0.4, "memory": 0.6, "overhead_ms": 0.2, "from": "src", "kind": "calibrated"}
    d = C.Efficiency()
    assert (d.run_id, d.kind) == (None, "global default")
    assert d.source == "defaults (e_c 0.5, e_m 0.7, 0.3 ms/forward: assumptions, see harness/capacity/calibrate.py)"


def _eff_points(dtype="bf16", mbu=(0.2, 0.4, 0.9), mfu=(0.3, 0.5), **kw):
    dec = [_pt("decode", {"tpot_ms": 1.0}, 0.1, model="m", dtype=dtype, backend="triton", batch=b, context=8,
               mbu_datasheet=e, **kw) for b, e in zip((1, 2, 4), mbu, strict=False)]
    pre = [_pt("prefill", {"median_ms": 1.0}, 0.1, model="m", dtype=dtype, backend="triton", batch=1, prompt_len=n,
               mfu_datasheet=e, **kw) for n, e in zip((8, 16), mfu, strict=False)]
    return dec + pre


def test_efficiency_source_and_fields():
    e = C.efficiency_from_runs([_run("b", _eff_points()), _run("a", _eff_points("fp8", (0.6,), (0.7,)))], "bf16")
    assert (e.compute, e.memory, e.overhead_ms, e.run_id, e.kind) == (0.4, 0.4, 0.0, "b", "calibrated")
    assert e.source == ("run b (h200 m bf16 tp1 triton): e_c median prefill mfu_datasheet of 2 points, "
                        "e_m median decode mbu_datasheet of 3 points (step overhead included)")
    both = C.efficiency_from_runs([_run("b", _eff_points()), _run("a", _eff_points("fp8", (0.6,), (0.7,)))])
    assert (both.compute, both.memory, both.run_id) == (0.5, 0.5, "a, b")  # no dtype: all 5 and 4 points
    assert both.source.startswith("run a, b (h200 m bf16 tp1 triton; h200 m fp8 tp1 triton): ")
    none = C.efficiency_from_runs([_run("b", _eff_points())], "fp8")  # no fp8 point: the dtypes measured
    assert (none.compute, none.memory) == (0.4, 0.4)
    assert none.source.endswith("(step overhead included) (no fp8 points: efficiencies of the dtypes measured)")


def test_efficiency_base_scale_clamp_and_exclude():
    base = C.Efficiency(0.45, 0.55, 0.25, "fam", kind="family default")
    only_dec = C.efficiency_from_runs([_run("r", _eff_points(mfu=()))], "bf16", base=base)
    assert (only_dec.compute, only_dec.memory, only_dec.overhead_ms) == (0.45, 0.4, 0.0)
    assert "e_c family default 0.45, e_m median decode" in only_dec.source
    only_pre = C.efficiency_from_runs([_run("r", _eff_points(mbu=()))], "bf16", base=base)
    assert (only_pre.compute, only_pre.memory, only_pre.overhead_ms) == (0.4, 0.55, 0.25)
    assert only_pre.source.endswith("e_c median prefill mfu_datasheet of 2 points, e_m family default 0.55")
    assert C.efficiency_from_runs([_run("r", _eff_points(mbu=(), mfu=()))], base=base) is base
    assert C.efficiency_from_runs([_run("r", _eff_points(mbu=(0,), mfu=(-1,)))], base=base) is base
    scaled = C.efficiency_from_runs([_run("r", _eff_points())], scale=lambda hw, f: {"compute": 2, "memory": 3}[f])
    assert (scaled.compute, scaled.memory) == (0.8, 1.0)  # 0.4·2; 0.4·3 = 1.2 clamped at 1 (a byte-count bug)
    scaled = C.efficiency_from_runs([_run("r", _eff_points())], scale=lambda hw, f: {"compute": 3, "memory": 2}[f])
    assert (scaled.compute, scaled.memory) == (1.0, 0.8)
    half = C.efficiency_from_runs([_run("r", _eff_points())], scale=lambda hw, f: 0.5 if hw == "h200" else 9)
    assert (half.compute, half.memory) == (0.2, 0.2)
    key = ("h200", "m", "bf16", 1, False)
    runs = [_run("r", _eff_points()), _run("s", _eff_points("fp8", (0.6,), (0.7,)))]
    assert C.efficiency_from_runs(runs, exclude=key).run_id == "s"
    assert C.efficiency_from_runs(runs[:1], exclude=key) == C.Efficiency()


def test_efficiency_replica_points_only_when_nothing_else():
    rep = _eff_points(mbu=(0.1,), mfu=(0.1,), tp=2, world_size=2)
    shard = _eff_points(mbu=(0.3,), mfu=(0.3,), tp=2)
    e = C.efficiency_from_runs([_run("p", rep), _run("s", shard)])
    assert (e.compute, e.memory, e.run_id) == (0.3, 0.3, "s")
    assert "tp2 shard triton" in e.source
    e = C.efficiency_from_runs([_run("p", rep)])
    assert (e.compute, e.memory, e.run_id) == (0.1, 0.1, "p")
    assert e.source.startswith("run p (h200 m bf16 tp2 triton): ")
