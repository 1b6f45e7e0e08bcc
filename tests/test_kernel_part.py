"""tokenfleet.measure.parts.kernels: shapes come from the ops themselves (no per-op code in the part), model grids are
validated against what the op needs, and the `compile` backend times the compiled vendor path with its compile in
first_call_ms."""

from __future__ import annotations

import dataclasses
import json
import weakref

import pytest
import torch
from pydantic import ValidationError
from tokenfleet import kernels
from tokenfleet.measure.context import LastInputs, RunContext
from tokenfleet.measure.parts import kernels as part
from tokenfleet.measure.runner import execute
from tokenfleet.model.spec import load_model_config
from tokenfleet.results import USABLE


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


# The model each op's shapes come from: MoE ops from an MoE model, MLA from DeepSeek-V3 (a dense model gives them none).
_MODEL_OF = {"moe": "qwen3-30b-a3b", "router": "deepseek-v3", "attention_mla": "deepseek-v3"}


@pytest.mark.parametrize("name", list(kernels.REGISTRY))
def test_model_shapes_are_runnable_shapes(name):
    # Every op's model shapes at a real model are shapes its own make_inputs and counts accept.
    op = kernels.REGISTRY[name]
    model = _MODEL_OF.get(name, "qwen3-0.6b")
    cfg = load_model_config(model)
    shapes = op.model_shapes(cfg, tokens=[1, 16], batch=[2], context=[32])
    assert shapes and all(s["source"].startswith(model) for s in shapes)
    if name in _MODEL_OF:
        assert op.model_shapes(load_model_config("qwen3-0.6b"), tokens=[1], batch=[1], context=[8]) == []
    for shape in shapes:
        args = {k: v for k, v in shape.items() if k != "source"}
        assert op.flops(args) > 0 and op.bytes_moved(args, torch.float32) > 0


def test_model_grid_is_validated():
    with pytest.raises(ValidationError, match="attention_decode at model shapes needs `batch`"):
        part.OpCase(op="attention_decode", dtypes=["fp32"], models=["tiny"], tokens=[1])
    with pytest.raises(ValidationError, match="give `shapes` or `models`"):
        part.OpCase(op="gemm", dtypes=["fp32"])
    # Inputs are drawn in the point's dtype: e4m3 only where the op makes it (scaled), one clear line elsewhere.
    with pytest.raises(ValidationError, match="dtype fp8 is for gemm_fp8, attention_decode, attention_mla, moe; gemm"):
        part.OpCase(op="gemm", dtypes=["bf16", "fp8"], shapes=[{"m": 1, "n": 8, "k": 8}])
    assert all(part.OpCase(op=op, dtypes=["fp8"], shapes=[SMALL[op][0]]) for op in part.FP8_OPS)


def test_compile_backend_times_the_compiled_baseline(ctx):
    spec = part.Spec(cases=[part.OpCase(op="silu_mul", dtypes=["fp32"], shapes=[{"rows": 3, "n": 40}],
                                        backends=["torch", "compile"])])
    eager, compiled = (execute(j, ctx) for j in part.plan(spec, ctx))
    assert (eager["backend"], compiled["backend"]) == ("torch", "compile")
    assert eager["status"] in USABLE and compiled["status"] in USABLE, compiled.get("error")  # noisy: load
    assert compiled["rel_error"] <= kernels.REGISTRY["silu_mul"].tolerance(torch.float32)
    assert compiled["graphs_compiled"] >= 1 and compiled["first_call_ms"] > 0 and compiled["n_samples"] >= 2
    assert "graphs_compiled" not in eager


# ---- inputs: drawn once per point, shared by its backends, never written ------------------------------------------

# One small shape per op (fp32: Triton's interpreter runs it; e4m3 where the op takes it).
SMALL = {
    "gemm": ({"m": 3, "n": 20, "k": 40}, "fp32"),
    "gemm_fp8": ({"m": 3, "n": 64, "k": 256, "scale": "tensor"}, "fp8"),
    "rmsnorm": ({"rows": 3, "hidden": 40, "residual": True}, "fp32"),
    "rope": ({"tokens": 3, "q_heads": 4, "kv_heads": 2, "head_dim": 16}, "fp32"),
    "silu_mul": ({"rows": 3, "n": 40}, "fp32"),
    "attention_prefill": ({"batch": 1, "q_heads": 2, "kv_heads": 1, "seq": 19, "head_dim": 16}, "fp32"),
    "attention_decode": ({"batch": 2, "q_heads": 4, "kv_heads": 2, "context": [5, 19], "max_context": 19,
                          "head_dim": 16, "kv_dtype": "fp8"}, "fp32"),
    "attention_mla": ({"batch": 2, "heads": 3, "context": [5, 19], "max_context": 19, "kv_lora_rank": 16,
                       "rope_dim": 16, "nope_dim": 8, "v_dim": 8, "kv_dtype": "fp8"}, "fp32"),
    "moe": ({"tokens": 5, "hidden": 24, "inter": 16, "experts": 4, "topk": 2}, "fp32"),
    "router": ({"tokens": 3, "experts": 16, "topk": 4, "scoring": "sigmoid", "n_group": 4, "topk_group": 2,
                "scaling": 2.5}, "fp32"),
}


def test_every_op_has_a_small_shape_here():
    assert set(SMALL) == set(kernels.REGISTRY)


@pytest.mark.parametrize("name", list(SMALL))
def test_no_backend_writes_into_its_inputs(name):
    # What makes sharing one draw between a point's backends sound: each backend's call (and the reference, which
    # the check runs after it) leaves the inputs as drawn, bit for bit. (`compile` is the baseline compiled.)
    from tokenfleet.dtypes import to_dtype

    op = kernels.REGISTRY[name]
    shape, dtype = SMALL[name]
    args = op.make_inputs(shape, to_dtype(dtype), "cpu", 0)
    drawn = [_bits(a).clone() if isinstance(a, torch.Tensor) else a for a in args]
    for fn in (op.triton, op.baseline, op.reference, *op.baselines.values()):
        fn(*args)
        for a, d in zip(args, drawn, strict=True):
            assert torch.equal(_bits(a), d) if isinstance(a, torch.Tensor) else a == d, f"{fn.__name__} wrote"


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


class _Interpreted(RunContext):
    """A CPU context whose triton backend runs too (under Triton's interpreter), so two backends draw inputs."""

    on_gpu = True  # type: ignore[assignment]


def test_backends_of_a_point_share_one_draw_and_one_reference(ctx, monkeypatch):
    real = kernels.REGISTRY["silu_mul"]
    draws, refs, seen = [], [], []

    def make_inputs(shape, dtype, device, seed):
        draws.append(dict(shape))
        return real.make_inputs(shape, dtype, device, seed)

    def reference(gate, up):
        refs.append(tuple(gate.shape))
        return real.reference(gate, up)

    def recording(fn):
        def call(gate, up):
            seen.append((fn.__name__, gate.data_ptr(), up.data_ptr()))
            return fn(gate, up)
        return call

    fake = dataclasses.replace(real, make_inputs=make_inputs, reference=reference, triton=recording(real.triton),
                               baseline=recording(real.baseline))
    monkeypatch.setitem(kernels.REGISTRY, "silu_mul", fake)
    run = _interpreted(ctx)
    spec = part.Spec(cases=[part.OpCase(op="silu_mul", dtypes=["fp32"], shapes=[{"rows": 3, "n": 40},
                                                                                {"rows": 2, "n": 8}])])
    points = []
    for job in part.plan(spec, run):
        points.append({**job.key, **job.run(run)})  # (not `execute`: it would poll a GPU's telemetry)
        if job.key["backend"] == "triton":  # held for the point's next backend: its inputs and its reference
            assert run.inputs.value[0].shape[0] == job.key["rows"] == run.inputs.ref[0].shape[0]
        else:
            assert run.inputs.key is run.inputs.value is run.inputs.ref is None  # freed after its last backend
    assert [(p["backend"], p["rows"]) for p in points] == [("triton", 3), ("torch", 3), ("triton", 2), ("torch", 2)]
    assert all("status" not in p and p["rel_error"] <= 1e-5 and p["median_ms"] > 0 for p in points), points
    assert draws == [{"rows": 3, "n": 40}, {"rows": 2, "n": 8}]  # one draw per point, not per backend
    assert refs == [(3, 40), (2, 8)]  # one reference per point, not per backend
    first = [s[1:] for s in seen if s[0] == "silu_mul"][0]
    assert [s[1:] for s in seen if s[0] == "silu_mul_baseline"][0] == first  # the very tensors triton got


def _interpreted(ctx: RunContext) -> RunContext:
    return _Interpreted(device=ctx.device, suite=ctx.suite, datasheet=None, ceilings=ctx.ceilings)


@pytest.mark.parametrize("wrong", ["scaled", "nan"])
def test_a_shared_reference_still_flags_a_wrong_backend(ctx, monkeypatch, wrong):
    # The reference is computed once per point: by whichever backend runs first, never taken from a backend's output.
    # A baseline 1% off, or with one NaN, is `incorrect` whether it runs before or after the right Triton kernel.
    real = kernels.REGISTRY["silu_mul"]

    def bad_baseline(gate, up):
        out = real.baseline(gate, up)
        if wrong == "nan":
            out[0, 0] = float("nan")
            return out
        return out * 1.01

    monkeypatch.setitem(kernels.REGISTRY, "silu_mul", dataclasses.replace(real, baseline=bad_baseline))
    run = _interpreted(ctx)
    for backends in (["triton", "torch"], ["torch", "triton"]):
        spec = part.Spec(cases=[part.OpCase(op="silu_mul", dtypes=["fp32"], shapes=[{"rows": 3, "n": 40}],
                                            backends=backends)])
        points = {j.key["backend"]: j.run(run) for j in part.plan(spec, run)}
        assert "status" not in points["triton"] and points["triton"]["rel_error"] <= 1e-5, points
        bad = points["torch"]
        assert bad["status"] == "incorrect" and "median_ms" not in bad, bad
        assert bad["rel_error"] == (float("inf") if wrong == "nan" else pytest.approx(0.01, rel=1e-3))


def test_the_upcast_inputs_are_freed_once_the_reference_is_computed(ctx, monkeypatch):
    # Memory: the reference's upcast copies (fp64 here, fp32 on a GPU) are gone before the backend's output is made;
    # the point holds its inputs and the reference only.
    real = kernels.REGISTRY["silu_mul"]
    upcast = []

    def reference(gate, up):
        assert gate.dtype == torch.float64  # a copy: the inputs are fp32
        upcast.extend(weakref.ref(a) for a in (gate, up))
        return real.reference(gate, up)

    def baseline(gate, up):
        assert upcast and all(u() is None for u in upcast), "upcast inputs alive beside the backend's output"
        return real.baseline(gate, up)

    monkeypatch.setitem(kernels.REGISTRY, "silu_mul", dataclasses.replace(real, reference=reference,
                                                                          baseline=baseline))
    spec = part.Spec(cases=[part.OpCase(op="silu_mul", dtypes=["fp32"], shapes=[{"rows": 3, "n": 40}],
                                        backends=["torch"])])
    (job,) = part.plan(spec, ctx)
    assert "status" not in job.run(ctx)


def test_last_inputs_holds_one_entry():
    cache = LastInputs()
    with pytest.raises(RuntimeError, match="no inputs drawn"):
        cache.reference(lambda: pytest.fail("a reference without inputs"))
    a = cache.get("a", lambda: torch.ones(4))
    assert cache.get("a", lambda: pytest.fail("drawn twice")) is a
    ra = cache.reference(lambda: torch.full((4,), 2.0))
    assert cache.reference(lambda: pytest.fail("computed twice")) is ra
    gone = weakref.ref(a), weakref.ref(ra)
    del a, ra

    def make_b():
        # the old entry (inputs and reference) is freed before the new one is drawn: one point's memory at most
        assert cache.value is None and cache.ref is None and all(g() is None for g in gone)
        return torch.zeros(4)

    b = cache.get("b", make_b)
    assert cache.key == "b" and cache.value is b and cache.ref is None  # b's reference is b's own, computed anew
    assert torch.equal(cache.reference(lambda: b + 1), torch.ones(4))
    cache.clear()
    assert cache.key is None and cache.value is None and cache.ref is None


def test_inputs_key_leaves_out_source_and_backend():
    # Two models' identical gemm shapes (dropped as duplicates by the plan) and every backend share one key.
    a = part.inputs_key("gemm", {"m": 1, "n": 8, "k": 8}, "bf16", 0)
    assert a == part.inputs_key("gemm", {"k": 8, "n": 8, "m": 1}, "bf16", 0)
    assert a != part.inputs_key("gemm", {"m": 1, "n": 8, "k": 8}, "bf16", 1)
    assert a != part.inputs_key("gemm", {"m": 1, "n": 8, "k": 8}, "fp16", 0)


@pytest.mark.parametrize("suite_name", ["quick", "full"])
def test_a_points_backends_are_consecutive_in_the_run_order(suite_name):
    # What sharing needs from the run's plan (value order, duplicates across models dropped): the jobs of one
    # point follow each other, so its inputs are drawn once and held for one point at a time.
    from tokenfleet.measure.plan import ordered_jobs, planning_context
    from tokenfleet.measure.suite import load_suite

    suite = load_suite(suite_name)
    points = [part.inputs_key(j.key["op"], {k: v for k, v in j.key.items() if k not in _NOT_SHAPE}, j.key["dtype"], 0)
              for j in ordered_jobs(suite, planning_context(suite, "cuda")) if j.key["kind"] == "kernel"]
    runs = [p for i, p in enumerate(points) if i == 0 or points[i - 1] != p]
    assert len(runs) == len(set(runs)) and len(runs) < len(points)


_NOT_SHAPE = ("kind", "op", "backend", "dtype", "source")


# ---- moe: routing as a condition, what it produced recorded -------------------------------------------------------

def test_moe_points_record_routing_experts_touched_and_bytes(ctx):
    from tokenfleet.results import point_key

    shape = {"tokens": 6, "hidden": 32, "inter": 16, "experts": 8, "topk": 2}
    case = part.OpCase(op="moe", dtypes=["fp32"], shapes=[shape, {**shape, "routing": "zipf:2"}],
                       backends=["triton", "torch", "loop"], routing=["uniform", "zipf:1.1"])
    assert [s["routing"] for s in part.case_shapes(case)] == ["uniform", "zipf:1.1", "zipf:2"]
    run = _interpreted(ctx)
    points = [{**j.key, **j.run(run)} for j in part.plan(part.Spec(cases=[case]), run)]
    assert [p["backend"] for p in points[:3]] == ["triton", "torch", "loop"]
    for p in points:
        assert "status" not in p and p["rel_error"] <= 2e-3, p
        assert sum(p["tokens_per_expert"]) == 12 and p["experts_touched"] == sum(c > 0 for c in p["tokens_per_expert"])
        args = {k: p[k] for k in (*shape, "routing")}
        assert p["bytes"] == kernels.REGISTRY["moe"].bytes_moved({**args, "experts_touched": p["experts_touched"]},
                                                                 torch.float32)
        assert "tokens_per_expert" not in point_key(p) and '"routing"' in point_key(p)
    # One draw per point: its backends saw the same routing.
    assert len({json.dumps(p["tokens_per_expert"]) for p in points[:3]}) == 1


def test_backends_and_routings_are_validated():
    with pytest.raises(ValidationError, match="backend 'loop': gemm runs triton, torch, compile"):
        part.OpCase(op="gemm", dtypes=["fp32"], shapes=[{"m": 1, "n": 8, "k": 8}], backends=["loop"])
    with pytest.raises(ValidationError, match="routing must be 'uniform' or 'zipf:<exponent > 0>'"):
        part.OpCase(op="moe", dtypes=["fp32"], models=["qwen3-30b-a3b"], tokens=[1], routing=["zipf:-1"])


def test_an_expert_parallel_slice_counts_its_own_slots_and_experts(ctx):
    shape = {"tokens": 6, "hidden": 32, "inter": 16, "experts": 8, "topk": 2, "ep": 2, "ep_rank": 1}
    case = part.OpCase(op="moe", dtypes=["fp32"], shapes=[shape], backends=["triton", "torch", "loop"])
    run = _interpreted(ctx)
    points = [{**j.key, **j.run(run)} for j in part.plan(part.Spec(cases=[case]), run)]
    op = kernels.REGISTRY["moe"]
    for p in points:
        assert "status" not in p and p["rel_error"] <= 2e-3, p
        assert len(p["tokens_per_expert"]) == 4 and p["ep"] == 2  # the 4 experts this rank holds
        drawn = {**shape, "routing": "uniform", "tokens_per_expert": p["tokens_per_expert"],
                 "experts_touched": p["experts_touched"]}
        assert p["flops"] == op.flops(drawn) <= op.flops({k: v for k, v in shape.items() if k not in ("ep", "ep_rank")})
        assert p["bytes"] == op.bytes_moved(drawn, torch.float32)
