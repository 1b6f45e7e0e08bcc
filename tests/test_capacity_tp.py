"""Issue 13, the capacity side: TP projections use a run's measured all-reduce curve of that device (else the
datasheet's interconnect, said so); real tp points (world_size == tp) are measurements of the replica, the model
part's shard points (one GPU, no collectives) are not; MoE across nodes adds an assumed expert-parallel all-to-all.
Run folders are written the way the runner writes them (RunWriter, the whole datasheet in the manifest)."""

import pytest
from tokenfleet.capacity.calibrate import efficiency_from_runs, measured_allreduce, measured_for, read_runs
from tokenfleet.capacity.config import Workload
from tokenfleet.capacity.project import project
from tokenfleet.capacity.serving import Projector
from tokenfleet.hardware import load_hardware
from tokenfleet.model.spec import load_model_config
from tokenfleet.results import RunWriter

MODEL, GPU, TP = "llama-3.1-70b", "h200", 8
H = load_model_config(MODEL).hidden_size
L = load_model_config(MODEL).num_layers
SIZES = [2**k for k in range(3, 27)]  # 8 B .. 64 MiB, as the collective part sweeps


def ring_ms(nbytes: float, world: int) -> float:
    """A made-up all-reduce curve: 25 us floor plus a ring at 100 GB/s (slower than the datasheet's 450)."""
    return 0.025 + 2 * (world - 1) / world * nbytes / 100e9 * 1e3


def write_run(folder, run_id: str, points: list[dict], gpu: str = GPU):
    w = RunWriter(folder, {"run_id": run_id, "environment": {"device": {"name": gpu},
                                                           "datasheet": load_hardware(gpu).model_dump()},
                           "ceilings": {}})
    for p in points:
        w.append(p)
    w.close()
    return folder


def collective_points(world: int, backend: str = "nccl", scale: float = 1.0) -> list[dict]:
    return [{"kind": "collective", "op": "all_reduce", "dtype": "bf16", "size_bytes": b, "bytes": b,
             "world_size": world, "backend": backend, "status": "ok", "median_ms": scale * ring_ms(b, world),
             "busbw_gbps": 1.0} for b in SIZES]


def decode_points(ms_of, world: int | None, batches=(1, 8, 64, 256), contexts=(1024, 4096)) -> list[dict]:
    """Decode points of MODEL at tp TP: world_size TP (a replica, tp part) or none (the model part's shard)."""
    out = []
    for b in batches:
        for c in contexts:
            ms = ms_of(b, c)
            p = {"kind": "decode", "model": MODEL, "backend": "triton", "dtype": "bf16", "tp": TP, "status": "ok",
                 "batch": b, "context": c, "median_ms": ms, "tpot_ms": ms, "spread": 0.01, "mbu_datasheet": 0.5}
            out.append(p | ({"world_size": world, "comm_ms": 0.2 * ms, "comm_fraction": 0.2} if world else {}))
    return out


def no_slo(context: int) -> Workload:
    return Workload(id="grid", description="t", input_len=context - 64, output_len=128, ttft_ms=1e9, tpot_ms=1e9,
                    count="output")


def proj(**kw) -> Projector:
    return Projector(load_model_config(MODEL), load_hardware(GPU), "bf16", TP, **kw)


# ---- 1. the measured all-reduce curve ----------------------------------------------------------------------------
def test_measured_allreduce_curve_drives_tp_projection(tmp_path):
    runs = read_runs([write_run(tmp_path / "coll", "coll8", collective_points(TP))])
    got = measured_allreduce(runs, GPU, TP)
    assert got is not None and got[1] == "measured (run coll8, nccl, world 8, bf16)"
    msg = 64 * H * 2
    assert got[0](msg) == pytest.approx(ring_ms(msg, TP), rel=0.02)  # log-log between measured sizes
    w = no_slo(4096)
    with_run = project(MODEL, GPU, w, "bf16", tp=TP, batch_cap=64, runs=runs)
    sheet = project(MODEL, GPU, w, "bf16", tp=TP, batch_cap=64)
    assert with_run["allreduce_source"] == got[1]
    assert sheet["allreduce_source"].startswith("datasheet NVLink 4 450 GB/s")
    assert with_run["batch"] == sheet["batch"] == 64
    # the step differs by exactly 2 all-reduces per layer, measured curve instead of the datasheet ring
    want = 2 * L * (got[0](msg) - proj().one_allreduce_s(64) * 1e3)
    assert with_run["decode_step_ms"] - sheet["decode_step_ms"] == pytest.approx(want, rel=1e-6)
    assert with_run["decode_step_ms"] > sheet["decode_step_ms"]  # the made-up link is slower than the datasheet


def test_curve_applies_only_to_its_device_and_world(tmp_path):
    pts = collective_points(4) + collective_points(TP, "gloo", scale=10)
    runs = read_runs([write_run(tmp_path / "a", "a", pts), write_run(tmp_path / "b", "b", collective_points(TP),
                                                                       gpu="h100-sxm")])
    assert measured_allreduce(runs, GPU, 2) is None  # no world-2 points
    assert measured_allreduce(runs, GPU, 1) is None  # tp 1 has no collectives
    assert "gloo, world 8" in measured_allreduce(runs, GPU, TP)[1]  # only gloo measured at 8 on this device
    assert "run b, nccl" in measured_allreduce(runs, "h100-sxm", TP)[1]
    both = read_runs([write_run(tmp_path / "c", "c", pts + collective_points(TP, "nccl"))])
    assert "nccl" in measured_allreduce(both, GPU, TP)[1]  # nccl preferred over gloo
    r = project(MODEL, "h200", "chat", "bf16", tp=2, runs=runs)
    assert r["allreduce_source"].startswith("datasheet")
    assert project("llama-3.1-8b", GPU, "chat", "bf16", tp=1, runs=runs)["allreduce_source"] is None


# ---- 2. shard points vs real tp points ---------------------------------------------------------------------------
def _ms(b, c):
    return 10.0 + b * c / 4096 * 0.05


def test_real_tp_points_measure_the_replica(tmp_path):
    shard = decode_points(lambda b, c: 0.5 * _ms(b, c), None)  # one GPU's shard: faster, no collectives
    real = decode_points(_ms, TP)
    runs = read_runs([write_run(tmp_path / "r", "r", shard + real + collective_points(TP))])
    m = measured_for(runs, GPU, MODEL, "bf16", TP)
    assert not m.shard and m.decode[(64, 4096)] == pytest.approx(_ms(64, 4096) / 1e3)  # never mixed with shards
    for b, c in ((8, 4096), (64, 1024), (256, 4096)):
        r = project(MODEL, GPU, no_slo(c), "bf16", tp=TP, batch_cap=b, max_batched_tokens=1 << 20, runs=runs)
        assert r["source"] == "measured" and r["batch"] == b
        # within 5% of its own point: the measured time holds its collectives, none are added on top
        assert r["decode_step_ms"] == pytest.approx(_ms(b, c), rel=0.05)
        assert "shard" not in r["decode_source"]


def test_shard_points_are_compute_plus_collectives(tmp_path):
    shard = decode_points(_ms, None)
    for extra, label in (([], "datasheet NVLink 4"), (collective_points(TP), "measured (run s, nccl")):
        runs = read_runs([write_run(tmp_path / label[:4], "s", shard + extra)])
        m = measured_for(runs, GPU, MODEL, "bf16", TP)
        assert m.shard and measured_for(runs, GPU, MODEL, "bf16", 1) is None
        r = project(MODEL, GPU, no_slo(4096), "bf16", tp=TP, batch_cap=64, runs=runs)
        assert r["source"] == "measured-shard" and "shard on one GPU" in r["decode_source"]
        assert r["allreduce_source"].startswith(label)
        p = Projector(load_model_config(MODEL), load_hardware(GPU), "bf16", TP,
                      allreduce=measured_allreduce(runs, GPU, TP))
        comm_ms = p.allreduce_s(64) * 1e3
        assert comm_ms > 0
        assert r["decode_step_ms"] == pytest.approx(_ms(64, 4096) + comm_ms, rel=0.05)


def test_efficiencies_skip_replica_points_when_others_exist(tmp_path):
    real = decode_points(_ms, TP)
    tp1 = [p | {"tp": 1, "model": "llama-3.1-8b", "mbu_datasheet": 0.7} for p in decode_points(_ms, None)]
    for p in real:
        p["mbu_datasheet"] = 0.3  # the step's communication pulls a replica's MBU down
    both = read_runs([write_run(tmp_path / "b", "b", real + tp1)])
    assert efficiency_from_runs(both, "bf16").memory == pytest.approx(0.7)
    only = read_runs([write_run(tmp_path / "o", "o", real)])
    assert efficiency_from_runs(only, "bf16").memory == pytest.approx(0.3)  # nothing else: replica points


# ---- 3. expert parallelism across nodes -----------------------------------------------------------------------------
def test_moe_across_nodes_adds_assumed_all_to_all():
    ds, h200 = load_model_config("deepseek-v3"), load_hardware("h200")
    p16, p8 = Projector(ds, h200, "fp8", 16), Projector(ds, h200, "fp8", 8)
    assert p8.alltoall_source is None
    assert p8.allreduce_s(64) == pytest.approx(2 * ds.num_layers * p8.one_allreduce_s(64))
    assert p16.alltoall_source.startswith("assumed")
    moe = ds.num_moe_layers
    a2a = p16.one_alltoall_s(1024)
    assert p16.allreduce_s(1024) == pytest.approx((2 * ds.num_layers - moe) * p16.one_allreduce_s(1024) + 2 * moe * a2a)
    # dispatch of 1024 tokens: each of 16 ranks sends its 64 tokens' 8 expert copies, half of them off the node
    sent = 1024 / 16 * ds.moe.experts_per_token * ds.hidden_size * 2
    assert a2a == pytest.approx(10e-6 + sent * 8 / 16 / 50e9)
    assert p16.one_alltoall_s(4096) > a2a
    dense = Projector(load_model_config(MODEL), h200, "bf16", 16)
    assert dense.alltoall_source is None and "inter-node" in dense.allreduce_source
    r = project("deepseek-v3", "h200", "chat", "fp8", tp=16)
    assert r["alltoall_source"].startswith("assumed") and any("all-to-all" in n for n in r["notes"])
