"""Invariants that hold for any input (hypothesis): capacity never falls as GPUs are added or memory bandwidth
rises, no projection's batch exceeds what its memory holds, a fleet's tokens/day add up over its GPU types, and a
point's key is the same however often it is measured. Examples are derandomized (the same ones every run, on every
CI machine) and few: the file runs in a few seconds."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenfleet import results
from tokenfleet.capacity.config import Fleet, load_workload
from tokenfleet.capacity.fleet import capacity_table
from tokenfleet.capacity.project import F_MEM, RESERVE_BYTES_PER_GPU, project
from tokenfleet.hardware import load_hardware
from tokenfleet.model.spec import load_model_config

SETTINGS = settings(max_examples=15, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
# (model, tp) pairs that fit on one 80+ GiB GPU or a small TP group in bf16; dense and MoE
REPLICAS = [("llama-3.1-8b", 1), ("qwen3-8b", 1), ("qwen3-32b", 2), ("qwen3-30b-a3b", 1), ("llama-3.1-70b", 4)]
GPUS = ["h200", "h100-sxm", "h20", "b200", "mi300x", "h800"]
WORKLOADS = ["chat", "reasoning", "summarize-8k", "baseline-1k1k", "coding-agent"]


def _fleet(counts: dict[str, int], models=(("llama-3.1-8b", 1.0),), workloads=(("chat", 1.0),), tp: int = 1) -> Fleet:
    gpus = [{"gpu": g, "count": n, "tp": tp, "source": "t"} for g, n in counts.items()]
    return Fleet.model_validate(dict(id="p", description="property", gpus=gpus,
                                     models=[{"model": m, "share": s} for m, s in models],
                                     workloads=[{"workload": w, "share": s} for w, s in workloads]))


def _tokens_per_day(fleet: Fleet) -> float:
    _, summary = capacity_table(fleet)
    return summary["capacity_tokens_per_day"]


@SETTINGS
@given(a=st.integers(0, 5000), b=st.integers(0, 5000), more=st.integers(1, 5000),
       grow=st.sampled_from(["h200", "h20"]))
def test_capacity_never_falls_as_gpus_are_added(a, b, more, grow):
    """Two GPU types serving a mix (two models, two workloads: routing decides who serves what); adding GPUs of
    either type never lowers the fleet's tokens/day."""
    mix = dict(models=(("llama-3.1-8b", 0.6), ("qwen3-30b-a3b", 0.4)), workloads=(("chat", 0.7), ("reasoning", 0.3)))
    before = {"h200": a, "h20": b}
    after = {**before, grow: before[grow] + more}
    assert _tokens_per_day(_fleet(after, **mix)) >= _tokens_per_day(_fleet(before, **mix)) * (1 - 1e-9)


@SETTINGS
@given(replica=st.sampled_from(REPLICAS), gpu=st.sampled_from(GPUS), workload=st.sampled_from(WORKLOADS),
       bw=st.floats(500, 8000), factor=st.floats(1.0, 4.0))
def test_throughput_never_falls_as_bandwidth_rises(replica, gpu, workload, bw, factor):
    model, tp = replica
    hw = load_hardware(gpu)
    slow = project(model, hw.model_copy(update={"memory_bandwidth_gbps": bw}), workload, "bf16", tp=tp)
    fast = project(model, hw.model_copy(update={"memory_bandwidth_gbps": bw * factor}), workload, "bf16", tp=tp)
    assert fast["tokens_per_s_per_gpu"] >= slow["tokens_per_s_per_gpu"] * (1 - 1e-9)
    assert fast["decode_step_ms"] <= slow["decode_step_ms"] * (1 + 1e-9) or slow["batch"] < fast["batch"]


@SETTINGS
@given(replica=st.sampled_from(REPLICAS), gpu=st.sampled_from(GPUS), workload=st.sampled_from(WORKLOADS),
       kv=st.sampled_from(["bf16", "fp8"]), cap=st.one_of(st.none(), st.integers(1, 4096)),
       memory_gib=st.floats(24, 288))
def test_batch_never_above_what_memory_holds(replica, gpu, workload, kv, cap, memory_gib):
    """The batch a projection plans fits its KV beside the weights (counted here from the config, not from
    b_mem): weights/tp + batch x sequence x KV bytes per token per GPU <= memory x F_MEM - the reserve."""
    model, tp = replica
    hw = load_hardware(gpu)
    hw = hw.model_copy(update={"memory_gib": memory_gib, "memory_gb": None})
    if kv == "fp8" and not hw.has_fp8:
        kv = "bf16"
    r = project(model, hw, workload, "bf16", tp=tp, kv_dtype=kv, batch_cap=cap)
    if not r["fits"]:
        return
    m, w = load_model_config(model), load_workload(workload)
    seq = w.input_len + w.output_len
    kv_gpu = m.kv_bytes_per_token(1 if kv == "fp8" else 2) * m.kv_replication(tp) / tp
    used = m.param_count() * 2 / tp + r["batch"] * seq * kv_gpu
    assert 1 <= r["batch"] <= r["b_mem"]
    assert used <= memory_gib * 2**30 * F_MEM - RESERVE_BYTES_PER_GPU
    assert cap is None or r["batch"] <= cap


@SETTINGS
@given(a=st.integers(1, 3000), b=st.integers(1, 3000), pair=st.sampled_from([("h200", "h20"), ("h100-sxm", "b200"),
                                                                              ("mi300x", "h800")]),
       workload=st.sampled_from(WORKLOADS))
def test_tokens_per_day_add_up_over_gpu_types(a, b, pair, workload):
    """One class (one model, one workload): a fleet of two types serves what each type serves alone, summed; and a
    fleet's total row is the sum of its types' rows."""
    x, y = pair
    wl = ((workload, 1.0),)
    both = _fleet({x: a, y: b}, workloads=wl)
    alone = _tokens_per_day(_fleet({x: a}, workloads=wl)) + _tokens_per_day(_fleet({y: b}, workloads=wl))
    rows, summary = capacity_table(both)
    assert summary["capacity_tokens_per_day"] == pytest.approx(alone, rel=1e-9)
    assert rows[-1]["gpu"] == "total" and rows[-1]["tokens_per_day"] == pytest.approx(
        sum(r["tokens_per_day"] for r in rows[:-1]), rel=1e-12)


@pytest.fixture(scope="module")
def ctx():
    from tokenfleet.measure.device import detect
    from tokenfleet.measure.runner import RunContext
    from tokenfleet.measure.suite import Suite, SuiteFile, TimingSpec

    file = SuiteFile(id="p", description="p", noise_limit=10.0,
                     timing=TimingSpec(min_samples=2, min_time_s=0.001, warmup_s=0.0, max_samples=3))
    return RunContext(device=replace(detect("cpu"), l2_bytes=256 << 10), suite=Suite(file, {}, "p"), datasheet=None,
                      ceilings={"copy_gbps": 10.0, "read_gbps": 10.0, "matvec_gbps": {}, "matmul_tflops": {}})


@settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=st.sampled_from([("silu_mul", ("rows", "n")), ("rmsnorm", ("rows", "hidden")), ("gemm", ("m", "n", "k"))]),
       sizes=st.lists(st.integers(1, 48), min_size=3, max_size=3), dtype=st.sampled_from(["fp32", "fp16"]),
       backend=st.sampled_from(["torch", "triton"]))
def test_point_key_is_stable_under_remeasurement(ctx, tmp_path_factory, case, sizes, dtype, backend):
    """The same job measured twice gives two points with one key, the job's own: every field a measurement adds
    is declared a measurement (results.MEASURED_FIELDS), and the key survives the run folder's write and read."""
    from tokenfleet.measure.parts import kernels
    from tokenfleet.measure.runner import execute

    op, dims = case
    shape = dict(zip(dims, sizes, strict=False))
    spec = kernels.Spec(cases=[{"op": op, "dtypes": [dtype], "backends": [backend], "shapes": [shape]}])
    (job,) = kernels.plan(spec, ctx)
    first, second = execute(job, ctx), execute(job, ctx)
    assert first["status"] != "error" and second["status"] != "error", first.get("error")
    assert results.point_key(first) == results.point_key(second) == results.point_key(job.key)
    folder = tmp_path_factory.mktemp("run")
    w = results.RunWriter(folder, {"run_id": "p", "suite": "p", "command": "test"})
    w.append(first)
    w.close()
    _, (read,) = results.read_run(folder)
    assert results.point_key(read) == results.point_key(job.key)
