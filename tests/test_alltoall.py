"""The measured all-to-all (expert-parallel dispatch/combine) on 2 gloo ranks, and the serving model reading it as it
reads the all-reduce curve."""

from __future__ import annotations

import pytest
from conftest import run_cli
from tokenfleet import results
from tokenfleet.capacity.calibrate import measured_alltoall
from tokenfleet.capacity.expert import PoolStep
from tokenfleet.capacity.pools import project_deployment
from tokenfleet.hardware import load_hardware
from tokenfleet.measure.parts.collective import BUS_FACTOR, Spec, collective_curve, sizes
from tokenfleet.model.spec import load_model_config

SUITE = """
id: a2a
description: all-to-all on 2 gloo ranks at a MoE model's dispatch sizes
noise_limit: 100
timing: {min_samples: 3, min_time_s: 0.01, warmup_s: 0.0, max_samples: 20}
collectives: {ops: [all_to_all], dtypes: [fp32], min_bytes: 64, max_bytes: 4096, models: [qwen3-30b-a3b],
              batch: [1], tokens: [4]}
"""


def test_alltoall_sizes_are_the_dispatch_sizes():
    m = load_model_config("qwen3-30b-a3b")
    spec = Spec(ops=["all_to_all"], dtypes=["bf16"], min_bytes=8, max_bytes=8, models=["qwen3-30b-a3b"],
                batch=[1], tokens=[64])
    assert sizes(spec, "bf16", "all_to_all") == [8, int(m.alltoall_bytes(1, 2)), int(m.alltoall_bytes(64, 2))]
    assert sizes(spec, "bf16") == [8, m.hidden_size * 2, 64 * m.hidden_size * 2]  # all-reduce: TP activations
    assert BUS_FACTOR["all_to_all"](8) == pytest.approx(7 / 8)


@pytest.fixture(scope="module")
def a2a_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("a2a")
    (d / "a2a.yaml").write_text(SUITE)
    out = d / "run"
    r = run_cli("bench", "--suite", str(d / "a2a.yaml"), "--nproc", "2", "--out", str(out), "--quiet", timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return results.load_run(out)


def test_gloo_alltoall_points_are_checked_and_timed(a2a_run):
    pts = [p for p in a2a_run.points if p["kind"] == "collective"]
    assert pts and all(p["op"] == "all_to_all" and p["world_size"] == 2 and p["backend"] == "gloo" for p in pts)
    assert all(p["status"] in ("ok", "noisy") and p["median_ms"] > 0 for p in pts), pts
    for p in pts:
        assert p["busbw_gbps"] == pytest.approx(p["algbw_gbps"] / 2)


def test_serving_model_reads_the_measured_alltoall(a2a_run):
    """A run's all-to-all curve of the device at world size ep replaces DeepEP's figures, and says so."""
    as_h800 = results.Run(a2a_run.path, {**a2a_run.manifest, "environment": {
        **(a2a_run.manifest.get("environment") or {}), "datasheet": "h800"}}, a2a_run.points)
    got = measured_alltoall([as_h800], "h800", 2)
    assert got is not None and got[1].startswith("measured") and "gloo" in got[1]
    assert measured_alltoall([as_h800], "h800", 8) is None  # another world size: not measured
    curve = collective_curve(a2a_run.points, "all_to_all")
    m = load_model_config("qwen3-30b-a3b")
    ps = PoolStep(m, load_hardware("h800"), "bf16", "bf16", ep=2, kind="decode", alltoall=got)
    d, c = ps.alltoall_s(4)
    assert d == pytest.approx(curve(m.alltoall_bytes(4, 1.0)) * 1e-3)
    assert c == pytest.approx(curve(m.alltoall_bytes(4, 2.0)) * 1e-3)
    assert ps.a2a_source == got[1]
    dep = {"id": "two", "description": "t", "mixed": {"gpus": 2, "batch_per_gpu": 8}, "assumptions": {"mixed": "t"}}
    from tokenfleet.capacity.deployment import DeploymentSpec

    res = project_deployment("qwen3-30b-a3b", "h800", "chat", DeploymentSpec.model_validate(dep), "bf16",
                             runs=[as_h800])
    assert res["pools"]["mixed"]["alltoall_source"] == got[1]
