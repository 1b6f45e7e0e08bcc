"""Capacity figures against values worked out here, not against the functions that made them (issue 25): the
efficiencies as medians of fixtures whose median, mean and max differ; the documented default e_m as its source
states it; a fleet's KV dtype reaching the projection exactly (both bounds). fp8 weights' memory room, counted
by hand: tests/test_capacity.py::test_fp8_halves_weight_bytes_and_grows_batch."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_capacity_tp import write_run
from tokenfleet.capacity import calibrate
from tokenfleet.capacity.calibrate import Efficiency, efficiency_from_runs, read_runs
from tokenfleet.capacity.config import Fleet
from tokenfleet.capacity.fleet import capacity_table
from tokenfleet.capacity.pools import project_deployment
from tokenfleet.capacity.project import project

MODEL = "llama-3.1-8b"
# Distinct efficiencies: the median differs from the mean and the max (and from the first and last value).
MBU = [0.21, 0.85, 0.34]  # median 0.34, mean 0.4667, max 0.85
MFU = [0.12, 0.90, 0.30, 0.36]  # median (0.30 + 0.36) / 2 = 0.33, mean 0.42, max 0.90


def _points() -> list[dict]:
    base = {"model": MODEL, "backend": "triton", "dtype": "bf16", "status": "ok", "spread": 0.01}
    dec = [base | {"kind": "decode", "batch": b, "context": 1024, "median_ms": 5.0 + b, "tpot_ms": 5.0 + b,
                   "mbu_datasheet": e} for b, e in zip((1, 8, 64), MBU, strict=True)]
    pre = [base | {"kind": "prefill", "batch": 1, "prompt_len": n, "median_ms": n / 100, "ttft_ms": n / 100,
                   "mfu_datasheet": e} for n, e in zip((128, 512, 2048, 8192), MFU, strict=True)]
    return dec + pre


def test_efficiencies_are_the_medians(tmp_path: Path):
    eff = efficiency_from_runs(read_runs([write_run(tmp_path / "r", "r", _points())]), "bf16")
    assert eff.memory == pytest.approx(0.34, abs=1e-12)  # not 0.4667 (mean), not 0.85 (max), not 0.21 (min)
    assert eff.compute == pytest.approx(0.33, abs=1e-12)  # not 0.42 (mean), not 0.90 (max)
    assert eff.overhead_ms == 0.0  # folded into the measured MBU
    assert "median decode mbu_datasheet of 3 points" in eff.source
    assert "median prefill mfu_datasheet of 4 points" in eff.source


def test_default_efficiencies_are_the_documented_ones():
    """The defaults are assumptions the source documents (calibrate.py's comment and Efficiency's `source`, which the
    capacity output prints): e_c 0.5, e_m 0.7, 0.3 ms per forward. A default that drifts from what the output says it
    is fails here."""
    assert (calibrate.DEFAULT_E_C, calibrate.DEFAULT_E_M, calibrate.DEFAULT_OVERHEAD_MS) == (0.5, 0.7, 0.3)
    text = Path(calibrate.__file__).read_text()
    documented = {k: float(v) for k, v in re.findall(r"^#\s+(e_c|e_m|overhead) ([0-9.]+)", text, re.M)}
    assert documented == {"e_c": calibrate.DEFAULT_E_C, "e_m": calibrate.DEFAULT_E_M,
                          "overhead": calibrate.DEFAULT_OVERHEAD_MS}
    d = Efficiency()
    assert (d.compute, d.memory, d.overhead_ms) == (0.5, 0.7, 0.3)
    assert f"e_c {d.compute:g}, e_m {d.memory:g}, {d.overhead_ms:g} ms/forward" in d.source
    assert efficiency_from_runs([]) == d  # no run: the defaults


def _fleet(**kw) -> Fleet:
    return Fleet.model_validate(dict(id="t", description="t", gpus=[{"gpu": "h200", "count": 8, "tp": 1,
                                                                       "source": "t"}],
                                     models=[{"model": MODEL, "share": 1.0}],
                                     workloads=[{"workload": "reasoning", "share": 1.0}], **kw))


def test_fleet_kv_dtype_reaches_the_projection_exactly():
    """A fleet's kv_dtype is the KV dtype its GPUs are projected with: the row equals the projection at that KV
    dtype (both bounds), and differs from the bf16 one (the test has something to catch: memory binds the batch)."""
    bf = project(MODEL, "h200", "reasoning", "bf16", tp=1, weight_only_fp8=True)
    f8 = project(MODEL, "h200", "reasoning", "bf16", tp=1, weight_only_fp8=True, kv_dtype="fp8")
    assert f8["tokens_per_s_per_gpu"] > 1.2 * bf["tokens_per_s_per_gpu"]  # fp8 KV: twice the sequences
    rows, _ = capacity_table(_fleet(kv_dtype="fp8", assumptions={"kv_dtype": "t"}))
    assert rows[0]["tokens_per_s_per_gpu"] == pytest.approx(f8["tokens_per_s_per_gpu"], rel=1e-9)
    rows, _ = capacity_table(_fleet())  # none given: the engines' default, bf16
    assert rows[0]["tokens_per_s_per_gpu"] == pytest.approx(bf["tokens_per_s_per_gpu"], rel=1e-9)


def test_fleet_kv_dtype_reaches_a_named_deployment_exactly():
    """The same through a deployment the fleet names (DP attention + EP over a node): the fleet's kv_dtype replaces
    the deployment file's."""
    model, dep = "qwen3-235b-a22b", "qwen3-moe-dp-ep8"

    def fleet(**kw) -> Fleet:
        return Fleet.model_validate(dict(
            id="t", description="t", gpus=[{"gpu": "h200", "count": 16, "source": "t"}],
            models=[{"model": model, "share": 1.0, "dtype": "fp8"}],
            workloads=[{"workload": "reasoning", "share": 1.0}],
            deployments=[{"model": model, "deployment": dep, "source": "t"}], **kw))

    def alone(kv: str | None) -> float:
        r = project_deployment(model, "h200", "reasoning", dep, "fp8", weight_only_fp8=True, kv_dtype=kv)
        return r["tokens_per_s_per_gpu"]

    assert alone("fp8") > 1.2 * alone(None)  # the file's bf16 KV: fewer bytes per step in fp8
    rows, _ = capacity_table(fleet(kv_dtype="fp8", assumptions={"kv_dtype": "t"}))
    assert rows[0]["tokens_per_s_per_gpu"] == pytest.approx(alone("fp8"), rel=1e-9)
    rows, _ = capacity_table(fleet())
    assert rows[0]["tokens_per_s_per_gpu"] == pytest.approx(alone(None), rel=1e-9)

