"""harness.measure.parts.kernels: shapes come from the ops themselves (no per-op code in the part), model grids are
validated against what the op needs, and the `compile` backend times the compiled vendor path with its compile in
first_call_ms."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from pydantic import ValidationError

import kernels
from harness.measure.parts import kernels as part
from harness.measure.runner import execute
from harness.model.spec import load_model_config
from harness.results import USABLE


def test_an_op_brings_its_own_model_shapes(monkeypatch):
    # A new op needs only its registry entry: the part plans its model shapes without knowing its name.
    def fake_shapes(cfg, tokens=(), batch=(), context=()):
        return [{"rows": t * b, "width": cfg.hidden_size, "source": cfg.id} for t in tokens for b in batch]

    fake = dataclasses.replace(kernels.REGISTRY["silu_mul"], name="fake", model_shapes=fake_shapes,
                               model_grid=("tokens", "batch"))
    monkeypatch.setitem(kernels.REGISTRY, "fake", fake)
    case = part.OpCase(op="fake", dtypes=["fp32"], models=["tiny"], tokens=[2, 3], batch=[5])
    assert part.case_shapes(case) == [{"rows": 10, "width": 64, "source": "tiny"},
                                      {"rows": 15, "width": 64, "source": "tiny"}]
    with pytest.raises(ValidationError, match="fake at model shapes needs `batch`"):
        part.OpCase(op="fake", dtypes=["fp32"], models=["tiny"], tokens=[2])


@pytest.mark.parametrize("name", list(kernels.REGISTRY))
def test_model_shapes_are_runnable_shapes(name):
    # Every op's model shapes at a real model are shapes its own make_inputs and counts accept.
    op = kernels.REGISTRY[name]
    cfg = load_model_config("qwen3-0.6b")
    shapes = op.model_shapes(cfg, tokens=[1, 16], batch=[2], context=[32])
    assert shapes and all(s["source"].startswith("qwen3-0.6b") for s in shapes)
    for shape in shapes:
        args = {k: v for k, v in shape.items() if k != "source"}
        assert op.flops(args) > 0 and op.bytes_moved(args, torch.float32) > 0


def test_model_grid_is_validated():
    with pytest.raises(ValidationError, match="attention_decode at model shapes needs `batch`"):
        part.OpCase(op="attention_decode", dtypes=["fp32"], models=["tiny"], tokens=[1])
    with pytest.raises(ValidationError, match="give `shapes` or `models`"):
        part.OpCase(op="gemm", dtypes=["fp32"])


def test_compile_backend_times_the_compiled_baseline(ctx):
    spec = part.Spec(cases=[part.OpCase(op="silu_mul", dtypes=["fp32"], shapes=[{"rows": 3, "n": 40}],
                                        backends=["torch", "compile"])])
    eager, compiled = (execute(j, ctx) for j in part.plan(spec, ctx))
    assert (eager["backend"], compiled["backend"]) == ("torch", "compile")
    assert eager["status"] in USABLE and compiled["status"] in USABLE, compiled.get("error")  # noisy: load
    assert compiled["rel_error"] <= kernels.REGISTRY["silu_mul"].tolerance(torch.float32)
    assert compiled["graphs_compiled"] >= 1 and compiled["first_call_ms"] > 0 and compiled["n_samples"] >= 2
    assert "graphs_compiled" not in eager
