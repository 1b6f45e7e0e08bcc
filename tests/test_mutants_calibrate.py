"""Oracles for tokenfleet.capacity.calibrate's helpers (`make mutate`'s survivors): the ratio grid at and beyond its
edges, the board power at a batch, the all-to-all curve chosen from a run. Values worked out by hand."""

from pathlib import Path

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
