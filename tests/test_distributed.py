"""Runs on several ranks (torchrun, gloo on the CPU): tensor-parallel logits against the unsharded model, the
ci-cpu-tp suite end to end, a rank killed mid-run (recorded, no hang) and its --resume; plus the pieces that
need no second process (lockstep call counts, the collective curve, one-process skips)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, run_cli
from tokenfleet import results
from tokenfleet.cli.main import app
from tokenfleet.cli.measure import _without_nproc as without_nproc
from tokenfleet.measure import distributed as D
from tokenfleet.measure.launch import merge
from tokenfleet.measure.parts.collective import Spec as CollectiveSpec
from tokenfleet.measure.parts.collective import collective_curve, per_collective, sizes
from tokenfleet.measure.runner import run_suite
from typer.testing import CliRunner

BOUND_S = 120  # a two-rank launch here costs ~10-25 s (three Python processes importing torch on 2 cores)


@pytest.fixture(scope="module")
def tp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp") / "run"
    t0 = time.perf_counter()
    r = run_cli("bench", "--suite", "ci-cpu-tp", "--nproc", "2", "--out", str(out), "--quiet", timeout=BOUND_S)
    assert r.returncode == 0, r.stderr[-3000:]
    manifest, points = results.read_run(out)
    return manifest, points, time.perf_counter() - t0


def test_tp2_logits_equal_tp1_logits_fp32(tp_run):
    # Every tp point carries its check: the sharded model over 2 gloo ranks against the unsharded model on the
    # same full weights, next-token logits of a prefill and of a decode step.
    _, points, _ = tp_run
    tp = [p for p in points if p.get("tp") == 2]
    assert tp and all(p["dtype"] == "fp32" for p in tp)
    for p in tp:
        assert p["rel_error_prefill"] <= 1e-5 and p["rel_error_decode"] <= 1e-5, p
        assert p["rel_error_prefill"] > 0 or p["rel_error_decode"] > 0  # a real comparison, not the same tensor


def test_bench_nproc2_writes_tp_decode_and_collective_points(tp_run):
    manifest, points, _ = tp_run
    env = manifest["environment"]
    assert env["world_size"] == 2 and env["distributed_backend"] == "gloo"
    assert [r["device"]["kind"] for r in env["ranks"]] == ["cpu", "cpu"] and "failure" not in manifest
    assert env["telemetry_end_by_rank"] == [None, None]  # NVML telemetry on GPU; none on a CPU
    decode = [p for p in points if p["kind"] == "decode"]
    assert decode and all(p["tp"] == 2 and p["world_size"] == 2 for p in decode)
    for p in decode + [p for p in points if p["kind"] == "prefill"]:
        assert p["status"] in ("ok", "noisy"), p
        assert p["median_ms"] > 0 and len(p["median_ms_by_rank"]) == 2
        assert p["median_ms"] - p["median_ms_no_comm"] == pytest.approx(p["comm_ms"])
    coll = [p for p in points if p["kind"] == "collective"]
    assert {p["op"] for p in coll} == {"all_reduce", "all_gather", "all_to_all"}
    for p in coll:
        assert p["status"] in ("ok", "noisy"), p
        factor = 2 * (2 - 1) / 2 if p["op"] == "all_reduce" else (2 - 1) / 2  # nccl-tests' busbw, n = 2
        assert p["busbw_gbps"] == pytest.approx(p["algbw_gbps"] * factor)
        assert p["algbw_gbps"] == pytest.approx(p["bytes"] / (p["median_ms"] / 1e3) / 1e9)
    curve = collective_curve(points, "all_reduce")
    assert curve is not None and curve.world_size == 2 and curve.floor_ms > 0


def test_capacity_reads_the_tp_run_as_a_replica_with_its_curve(tp_run, tmp_path):
    # The capacity model on this runner-written tp=2 run (its manifest given a datasheet: a CPU has none): the
    # tp points are the replica (world_size 2, collectives inside), the gloo all-reduce curve times the collectives.
    from tokenfleet.capacity.calibrate import measured_allreduce, measured_for
    from tokenfleet.hardware import load_hardware

    manifest, points, _ = tp_run
    env = {**manifest["environment"], "datasheet": load_hardware("h200").model_dump()}
    run = results.Run(tmp_path, {**manifest, "environment": env}, points)
    curve, label = measured_allreduce([run], "h200", 2)
    assert "gloo, world 2" in label and curve.world_size == 2
    m = measured_for([run], "h200", "tiny", "fp32", 2)
    assert m is not None and not m.shard and m.decode
    assert measured_allreduce([run], "h200", 4) is None


def _wait_for(pred, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_rank_killed_mid_run_is_recorded_without_hang_and_resumes(tmp_path):
    suite = tmp_path / "coll.yaml"
    suite.write_text("""
id: coll
description: collectives only, slow enough to be killed mid-run (24 points of >= 30 ms; the kill lands after 2)
noise_limit: 100
timing: {min_samples: 3, min_time_s: 0.03, warmup_s: 0.0, max_samples: 500}
collectives: {ops: [all_reduce, all_gather], dtypes: [fp32], min_bytes: 8, max_bytes: 16384}
""")
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "tokenfleet", "bench", "--suite", str(suite), "--nproc", "2",
                             "--out", str(out), "--quiet"], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        def started() -> bool:
            pts = out / "points.jsonl"
            return pts.exists() and pts.read_text().count("\n") >= 2

        assert _wait_for(started, BOUND_S), "the run never got going"
        victim = results.read_manifest(out)["environment"]["ranks"][1]["pid"]
        os.kill(victim, signal.SIGKILL)
        t_kill = time.perf_counter()
        _, err = proc.communicate(timeout=60)  # no hang: torchrun and rank 0 give up within a bounded time
        waited = time.perf_counter() - t_kill
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    manifest, before = results.read_run(out)
    assert manifest.get("failure", {}).get("error"), err[-2000:]
    assert before[-1]["status"] == "error", before[-1]
    jobs = 2 * len(sizes(CollectiveSpec(ops=["all_reduce"], dtypes=["fp32"], min_bytes=8, max_bytes=16384), "fp32"))
    assert 2 <= len([p for p in before if p["status"] != "error"]) < jobs, "the kill should land mid-run"

    r = run_cli("bench", "--resume", str(out), "--nproc", "2", "--quiet", timeout=BOUND_S)
    assert r.returncode == 0, r.stderr[-3000:]
    after = results.read_points(out)
    # what was final before the kill is kept as it was; the point in flight (`error`) is measured again, replaced
    final = [p for p in before if p["status"] in results.FINAL]
    assert [p for p in after if results.point_key(p) in {results.point_key(q) for q in final}] == final
    ok = [results.point_key(p) for p in after if p["status"] == "ok"]
    assert len(ok) == len(set(ok)) == jobs, "every job measured exactly once"
    print(f"killed run gave up {waited:.1f} s after the kill")


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="needs 2 CUDA GPUs (NCCL); the gloo tests above cover the same code on the CPU")
def test_nccl_tp2_decode_in_cuda_graphs(tmp_path):
    suite = tmp_path / "gpu2.yaml"
    suite.write_text("""
id: gpu2
description: two GPUs, NCCL
timing: {min_samples: 5, min_time_s: 0.05, warmup_s: 0.02, max_samples: 200}
collectives: {ops: [all_reduce, all_gather], dtypes: [bf16], min_bytes: 8, max_bytes: 1048576}
tp: {models: [tiny, tiny-qwen3], backends: [triton, torch], dtypes: [fp32, bf16], batch: [1, 8], prompt_len: [64],
     context: [256]}
""")
    r = run_cli("bench", "--suite", str(suite), "--nproc", "2", "--out", str(tmp_path / "run"), "--quiet",
                timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    manifest, points = results.read_run(tmp_path / "run")
    assert manifest["environment"]["distributed_backend"] == "nccl"
    assert all(p["status"] in ("ok", "noisy") for p in points), [p.get("error") for p in points]
    assert all(p["cuda_graph"] for p in points if p["kind"] in ("decode", "collective")), "graphs not captured"
    # fp32 torch is exact fp32 on GPU (matmul TF32 off by default); the Triton backend's fp32 dot runs as TF32.
    assert all(p["rel_error_decode"] <= 1e-5 for p in points if p.get("backend") == "torch" and p["dtype"] == "fp32")


# ---------------------------------------------------------------------------------------------------------------
# No second process


def test_lockstep_counts_are_what_measure_calls(tmp_path):
    # lockstep_measure relies on ctx.measure making exactly 1 + 1 + n calls with warmup_s=0, min=max=n: a peer
    # rank calling its collectives a different number of times would pair the wrong ones.
    from tokenfleet.measure.timing import measure

    calls = []
    for n in (3, 7):
        calls.clear()
        measure(lambda: calls.append(1), warmup_s=0.0, min_samples=n, max_samples=n, min_time_s=10.0)
        assert len(calls) == 2 + n


def test_graph_replays_are_divided_into_collectives_samples_too():
    # Issue 23: the medians were divided by graph_iters, the kept samples not (compare read them 20x the median).
    t = {"median_ms": 20.0, "p20_ms": 10.0, "p80_ms": 40.0, "samples_ms": [10.0, 20.0, 40.0], "n_samples": 3}
    out = per_collective(t, 20)
    assert (out["median_ms"], out["p20_ms"], out["p80_ms"]) == (1.0, 0.5, 2.0)
    assert out["samples_ms"] == [0.5, 1.0, 2.0] and out["n_samples"] == 3
    assert min(out["samples_ms"]) <= out["median_ms"] <= max(out["samples_ms"])


def test_failed_capture_restores_the_current_stream(monkeypatch):
    # Issue 23: torch.cuda.graph's exit ends an invalidated capture (raising) before restoring the stream; the
    # capture stream stayed current for the eager fallback. The fake CUDA of test_timing behaves as torch 2.11 does.
    from test_timing import _fake_cuda, _FakeGraph

    current = _fake_cuda(monkeypatch)
    graph = torch.cuda.graph
    monkeypatch.setattr(torch.cuda, "graph", lambda g, **kw: graph(g))

    def syncs_inside():
        if _FakeGraph.capturing is not None:
            raise RuntimeError("operation not permitted when stream is capturing")

    replay, why = D.agreed_graph(syncs_inside, 4)
    assert replay is None and "capture" in why
    assert current["stream"] is current["default"]
    replay, why = D.agreed_graph(lambda: None, 4)  # a capture that works: its replay, the stream as it was
    assert replay is not None and why is None and current["stream"] is current["default"]


def test_collective_curve_interpolates_and_floors():
    pts = [{"kind": "collective", "op": "all_reduce", "status": "ok", "world_size": 8, "dtype": "bf16",
            "bytes": b, "median_ms": ms} for b, ms in [(8, 0.01), (1 << 20, 0.02), (1 << 30, 4.0)]]
    pts.append({**pts[0], "world_size": 2, "median_ms": 1.0})
    curve = collective_curve(pts, "all_reduce")
    assert curve.world_size == 8 and curve.floor_ms == 0.01
    assert curve(1) == 0.01  # below the smallest size: the latency floor
    assert 0.02 < curve(1 << 25) < 4.0  # between sizes: log-log
    assert curve(1 << 31) == pytest.approx(8.0)  # beyond: the largest size's bandwidth
    assert curve.busbw_gbps(1 << 30) == pytest.approx((1 << 30) / 4e-3 / 1e9 * 2 * 7 / 8)
    assert collective_curve(pts, "all_gather") is None


def test_one_process_skips_collectives_and_tp_points(tmp_path):
    suite = tmp_path / "one.yaml"
    suite.write_text("""
id: one
description: distributed parts in one process
timing: {min_samples: 1, min_time_s: 0.001, warmup_s: 0.0, max_samples: 2}
collectives: {ops: [all_reduce], dtypes: [fp32], min_bytes: 8, max_bytes: 8}
tp: {models: [tiny], backends: [torch], dtypes: [fp32], context: [8]}
""")
    run = run_suite(str(suite), out=tmp_path / "run", progress=False)
    points = results.read_points(run)
    assert [p["status"] for p in points] == ["skipped", "skipped"]
    assert all("--nproc" in p["note"] for p in points)
    assert D.current() is None and D.world_size() == 1


def test_merge_names_the_failing_rank_and_stops_on_disagreement():
    ok = {"status": "ok", "error": None, "median_ms": 1.0, "raised": False}
    bad = {"status": "oom", "error": "OutOfMemoryError: CUDA out of memory", "median_ms": None, "raised": True}
    point, stop = merge({"kind": "decode", "status": "ok", "median_ms": 1.0}, [ok, bad])
    assert point["status"] == "oom" and point["error"].startswith("rank 1: ") and stop
    assert point["median_ms_by_rank"] == [1.0, None]
    point, stop = merge({"kind": "decode", "status": "oom", "error": "x"}, [{**bad, "error": "x"}, bad])
    assert point["error"] == "x" and not stop  # every rank raised alike: in step, the run goes on


def test_nproc_is_taken_out_of_the_relaunched_command():
    assert without_nproc(["bench", "--nproc", "2", "--suite", "s", "--nproc=4", "-q"]) == ["bench", "--suite", "s",
                                                                                           "-q"]


def test_bad_suite_with_nproc_is_one_line_exit_2():
    # Checked before torchrun starts: one line, exit 2, no ranks launched.
    res = CliRunner().invoke(app, ["bench", "--suite", "no-such-suite", "--nproc", "2"])
    assert res.exit_code == 2 and "no-such-suite" in res.output and res.output.count("\n") == 1, res.output
