"""Measured energy (issue 23): NVML's total-energy counter read around each GPU point's samples (a fake counter and
fake CUDA here), the point's joules, mean power and joules per token, and capacity's use of them."""

from __future__ import annotations

import pytest
import torch
from tokenfleet.measure import timing
from tokenfleet.measure.runner import energy_rates, execute


class Counter:
    """An energy counter in joules that the timed function advances: 1 J per call."""

    def __init__(self):
        self.j = 0.0

    def __call__(self) -> float:
        return self.j


def test_metered_reads_the_counter_around_the_samples_only(monkeypatch):
    clock = {"ns": 0}
    monkeypatch.setattr(timing, "_now_ns", lambda: clock["ns"])
    counter = Counter()

    def samples():
        counter.j += 42.0
        clock["ns"] += 2 * 10**8  # 0.2 s of samples
        return [1.0, 2.0]

    out, joules = timing.metered(counter, samples)
    assert out == [1.0, 2.0] and joules == {"energy_j": 42.0, "energy_s": pytest.approx(0.2)}
    assert timing.metered(None, samples) == ([1.0, 2.0], {})

    def broken():
        raise RuntimeError("NVML: GPU is lost")

    assert timing.metered(broken, samples)[1] == {}  # the samples stand without energy


@pytest.mark.parametrize("args", [None, (torch.ones(4),)], ids=["step", "kernel"])
def test_gpu_measure_meters_the_samples_not_the_first_call_or_warmup(monkeypatch, args):
    from test_timing import _fake_cuda, _FakeGraph

    _fake_cuda(monkeypatch)
    counter = Counter()
    calls = []

    def run():
        calls.append(1)
        counter.j += 1.0  # one joule per call

    def fn(*a):
        if _FakeGraph.capturing is not None:  # captured: each replay makes the call again
            _FakeGraph.capturing.fns.append(run)
        else:
            run()

    t = timing.measure(fn, args=args, device="cuda", min_samples=5, max_samples=5, min_time_s=0.0, warmup_s=0.0,
                       energy=counter)
    per_sample = t.graph_calls or 1
    # Only the samples' calls are in energy_j: the first call, the warm-up, the copies, the launch timing and the
    # capture all ran before the counter's first read.
    assert t.energy_j == 5 * per_sample < len(calls) and t.energy_s >= 0
    untimed = timing.measure(fn, args=args, device="cuda", min_samples=2, max_samples=2, min_time_s=0.0,
                             warmup_s=0.0)
    assert untimed.energy_j is None and untimed.energy_s is None


def test_points_get_power_and_model_points_joules_per_token():
    decode = {"kind": "decode", "tokens_per_s": 1000.0, "energy_j": 35.0, "energy_s": 0.05}
    assert energy_rates(decode) == {"power_w_measured": 700.0, "joules_per_token": pytest.approx(0.7)}
    kernel = {"kind": "kernel", "energy_j": 10.0, "energy_s": 0.02}
    assert energy_rates(kernel) == {"power_w_measured": 500.0}
    assert energy_rates({"kind": "decode", "tokens_per_s": 5.0, "energy_j": None, "energy_s": None}) == {}
    assert energy_rates({"kind": "decode", "energy_j": 0.0, "energy_s": 0.1}) == {}  # counter did not move


def test_execute_records_energy_beside_the_time(tmp_path):
    from tokenfleet.measure.context import Job, RunContext
    from tokenfleet.measure.device import detect
    from tokenfleet.measure.suite import Suite, SuiteFile

    ctx = RunContext(device=detect("cpu"), suite=Suite(SuiteFile(id="t", description="t"), {}, "t"), datasheet=None)
    assert ctx.energy_reader() is None  # a CPU has no counter: nothing is opened
    job = Job({"kind": "decode", "model": "m", "backend": "torch", "dtype": "bf16", "batch": 8},
              lambda c: {"median_ms": 10.0, "tokens_per_s": 800.0, "energy_j": 4.0, "energy_s": 0.01})
    p = execute(job, ctx)
    assert p["status"] == "ok" and p["power_w_measured"] == 400.0 and p["joules_per_token"] == 0.5
    from tokenfleet import results

    assert results.point_key(p) == results.point_key({**job.key, "device": p["device"], "status": "x"})


def test_project_uses_a_runs_measured_energy_for_measured_rows(tmp_path):
    # The committed H200 followup run (decode batch 1/32/128 at 4k on Triton), its decode points given what the
    # energy counter would record: 300 W at batch 1, 600 W at 32, 650 W at 128.
    from test_capacity_runs import FOLLOWUP, copy_run, grid_workload
    from tokenfleet.capacity.calibrate import read_runs
    from tokenfleet.capacity.project import project
    from tokenfleet.hardware import load_hardware

    watts = {1: 300.0, 32: 600.0, 128: 650.0}

    def with_energy(p):
        if p.get("kind") == "decode" and p.get("batch") in watts:
            p.update(energy_j=watts[p["batch"]] * 0.1, energy_s=0.1, power_w_measured=watts[p["batch"]])
        return p

    plain = read_runs([copy_run(FOLLOWUP, tmp_path / "plain")])
    metered = read_runs([copy_run(FOLLOWUP, tmp_path / "metered", with_energy)])
    w, _ = grid_workload(4096, 32)
    for batch in (1, 32):
        r = project("llama-3.1-8b", "h200", w, "bf16", batch_cap=batch, runs=metered)
        assert r["source"] == "measured" and r["batch"] == batch
        assert r["power_w_per_gpu"] == watts[batch]
        assert r["power_source"].startswith(f"measured: NVML energy counter, decode batch {batch}")
        assert r["joules_per_token"] == pytest.approx(watts[batch] / r["tokens_per_s_per_gpu"])
    # Without the counter: the run's NVML power reading, as before; with no run at all: the datasheet's TDP.
    old = project("llama-3.1-8b", "h200", w, "bf16", batch_cap=32, runs=plain)
    assert old["power_source"].startswith("measured: NVML power read")
    none = project("llama-3.1-8b", "h200", w, "bf16", batch_cap=32)
    assert none["power_source"] == "datasheet TDP" and none["power_w_per_gpu"] == load_hardware("h200").tdp_w


def test_a_gpu_context_meters_every_measurement_with_nvmls_counter(monkeypatch):
    # RunContext.measure on a (fake) GPU: NVML's counter of the CUDA device found by UUID (CUDA 0 = NVML 2 here),
    # opened once, read around the samples of every point: what the runner turns into power and joules per token.
    import dataclasses

    import fake_nvml
    from test_timing import _fake_cuda
    from tokenfleet.measure import device as D
    from tokenfleet.measure.context import RunContext
    from tokenfleet.measure.suite import Suite, SuiteFile, TimingSpec

    _fake_cuda(monkeypatch)
    state = fake_nvml.install(monkeypatch)
    monkeypatch.setattr(D, "cuda_identity", lambda i: {"uuid": fake_nvml.uuid(2)})
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    info = dataclasses.replace(D.detect("cpu"), kind="cuda", name="Fake GPU")
    suite = Suite(SuiteFile(id="t", description="t", timing=TimingSpec(min_samples=4, min_time_s=1e-9, warmup_s=0.0,
                                                                        max_samples=4)), {}, "t")
    ctx = RunContext(device=info, suite=suite, datasheet=None)

    def step():  # 2.5 J per call on NVML's device 2; another device's counter must not move the result
        state.energy_mj[2] += 2500.0
        state.energy_mj[0] += 1e6

    for _ in range(2):
        t = ctx.measure(step)
        assert t.energy_j == pytest.approx(4 * 2.5) and t.energy_s >= 0
    assert state.inits == 1 and ctx.energy[1] is None  # one nvmlInit for the run
