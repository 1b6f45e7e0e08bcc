"""MoE decode and prefill points (measure.parts.model) on the CPU: tiny Qwen3-MoE and DeepSeek-V3 points are timed and
checked, say which routing they ran and what it produced (experts touched per layer, tokens per expert), count the
bytes of the experts touched, and name what the triton backend ran on the torch path; `more` grids; refusals."""

from __future__ import annotations

import pytest
import torch
from tokenfleet.measure.parts import model as part
from tokenfleet.measure.runner import execute, job_key
from tokenfleet.model import decoder as M
from tokenfleet.model.spec import load_model_config
from tokenfleet.results import USABLE, point_key


def test_moe_decode_points_report_their_routing(ctx):
    spec = part.DecodeSpec(models=["tiny"], backends=["torch"], dtypes=["fp32"], batch=[1], context=[4],
                           more=[{"models": ["tiny-qwen3-moe", "tiny-deepseek-v3"], "batch": [1, 6], "context": [9]}])
    jobs = part.plan_decode(spec, ctx)
    assert [(j.key["model"], j.key["batch"]) for j in jobs] == [
        ("tiny", 1), ("tiny-qwen3-moe", 1), ("tiny-qwen3-moe", 6), ("tiny-deepseek-v3", 1), ("tiny-deepseek-v3", 6)]
    assert "routing" not in jobs[0].key and jobs[1].key["routing"] == "router"  # dense keys are unchanged
    points = [execute(j, ctx) for j in jobs]
    assert [point_key(p) for p in points] == [job_key(j) for j in jobs]  # the MoE fields are measurements
    assert all(p["status"] in USABLE for p in points), [p.get("error") for p in points]
    for p in points[1:]:
        cfg = load_model_config(p["model"])
        k, e = cfg.moe.experts_per_token, cfg.moe.num_experts
        assert p["routing"] == "router" and p["rel_error"] < 1e-4
        assert len(p["experts_touched"]) == cfg.num_moe_layers and len(p["tokens_per_expert"]) == e
        assert sum(p["tokens_per_expert"]) == p["batch"] * k * cfg.num_moe_layers
        assert all(k <= t <= min(e, p["batch"] * k) for t in p["experts_touched"])
        assert p["bytes"] == (M.decode_bytes(cfg, p["batch"], 9, 4, experts_touched=sum(p["experts_touched"]))
                              + M.padded_kv_bytes(cfg, p["batch"], 9, 4, p["backend"]))  # the padded cache read
        assert p["flops"] == M.decode_flops(cfg, p["batch"], 9)
        assert "experts: torch._grouped_mm (transformers' grouped_mm)" in p["note"]  # fp32 rows of 16-byte multiples
    one = points[1]  # batch 1 touches exactly k experts per layer
    assert one["experts_touched"] == [2, 2] and "routing: router, 2.0 of 8 experts touched per layer" in one["note"]


def test_zipf_routing_is_a_stated_condition(ctx):
    spec = part.PrefillSpec(models=["tiny-qwen3-moe"], backends=["torch", "compile"], dtypes=["fp32"], batch=[2],
                            prompt_len=[32], routing={"kind": "zipf", "exponent": 3.0})
    points = [execute(j, ctx) for j in part.plan_prefill(spec, ctx)]
    assert all(p["status"] in USABLE for p in points), [p.get("error") for p in points]
    p = points[0]
    assert p["routing"] == "zipf-3"  # the condition, in the point's key
    assert max(p["tokens_per_expert"]) > 3 * sum(p["tokens_per_expert"]) / 8  # far from uniform
    assert points[1]["tokens_per_expert"] == p["tokens_per_expert"]  # compile: counted on its eager twin
    assert "experts: gathered expert weights (gpt-fast's form) under torch.compile" in points[1]["note"]


def test_triton_points_say_what_runs_on_torch(ctx):
    spec = part.DecodeSpec(models=["tiny-deepseek-v3"], backends=["triton"], dtypes=["fp32"], context=[4])
    (job,) = part.plan_decode(spec, ctx)
    session = part._Session()
    from tokenfleet.measure.parts.model_points import _routing
    built = session.get(ctx, "tiny-deepseek-v3", "fp32", spec)
    m = built.model.with_backend("triton")
    cache = m.new_cache(1, 5)
    fields, touched, note = _routing(spec, built, m, "triton",
                                     lambda mm: mm.forward_decode(torch.zeros(1, dtype=torch.long),
                                                                  torch.full((1,), 4, dtype=torch.int32), cache))
    assert "triton backend: MLA prefill attention on the torch path" in note  # the one op left on it
    assert "experts: fused Triton MoE kernel (kernels/moe.py)" in note
    assert touched == pytest.approx(2 * 2) and fields["experts_touched"] == [2, 2]


def test_refusals_and_layer_subsets():
    cfg = load_model_config("deepseek-v3")
    assert "tensor-parallel" in part.not_buildable(cfg, 8, "bf16")
    assert part.not_buildable(cfg, 1, "fp8", layers=4) is None  # e4m3 experts (tests/test_model_moe_fp8.py)
    assert "holds no MoE layer" in part.not_buildable(cfg, 1, "bf16", layers=3)
    assert part.not_buildable(cfg, 1, "bf16", layers=5) is None  # 3 dense + 2 MoE
    assert part.not_buildable(load_model_config("qwen3-30b-a3b"), 1, "bf16", layers=4) is None
    # 141 GB free (an H200): 3 dense layers and 2 MoE layers of 22.5 GB fit the weight budget
    assert part.layers_to_build(cfg, 2, 141e9, None) == 5
    with pytest.raises(torch.OutOfMemoryError, match="holds no MoE layer"):
        part.layers_to_build(cfg, 2, 40e9, None)
    assert part.layers_to_build(load_model_config("qwen3-30b-a3b"), 2, 80e9, None) < 48  # 61 GB of bf16 weights
    assert part.layers_to_build(load_model_config("qwen3-30b-a3b"), 2, 141e9, None) == 48
    interleaved = load_model_config("tiny-qwen3-moe").model_copy(
        update={"moe": load_model_config("tiny-qwen3-moe").moe.model_copy(update={"sparse_step": 2})})
    with pytest.raises(ValueError, match="interleave"):
        part.layers_to_build(interleaved, 4, 80e9, 1)


def test_deepseek_subset_scales_each_kind(ctx):
    """tiny-deepseek-v3 (1 dense + 2 MoE layers) built with 2: the dense layer timed apart and each kind scaled."""
    spec = part.DecodeSpec(models=["tiny-deepseek-v3"], backends=["torch"], dtypes=["fp32"], batch=[2], context=[8],
                           layers=2)
    (p,) = [execute(j, ctx) for j in part.plan_decode(spec, ctx)]
    assert p["status"] in USABLE, p.get("error")
    assert p["scaled_from_layers"] == 2 and "(1 dense + 1 MoE, scaled to 1 + 2)" in p["note"]
    assert len(p["experts_touched"]) == 1  # the MoE layer built
    cfg = load_model_config("tiny-deepseek-v3")  # bytes of the full depth: the built layer's touched count x 2
    assert p["bytes"] == (M.decode_bytes(cfg, 2, 8, 4, experts_touched=2 * p["experts_touched"][0])
                          + M.padded_kv_bytes(cfg, 2, 8, 4, "torch"))


def test_two_kind_scaling():
    from tokenfleet.measure.parts.model_points import _scaled
    from tokenfleet.measure.timing import Timing, summarize

    def timing(ms):
        return Timing(**summarize([ms] * 5, 0.1), first_call_ms=0.0)

    head, prefix, t = timing(1.0), timing(4.0), timing(10.0)  # head 1, + 3 dense layers 3, + 2 MoE layers 6
    out = _scaled(t, head, 5, 61, (prefix, 3, 3))
    assert out["median_ms"] == pytest.approx(1.0 + 3.0 + 6.0 / 2 * 58) and not out["noisy"]
    assert _scaled(t, head, 5, 61)["median_ms"] == pytest.approx(1.0 + 9.0 / 5 * 61)  # one kind: as before


def test_moe_16bit_check_tolerance(ctx, monkeypatch):
    """A bf16 MoE model is held to MOE_TOLERANCE (near-tied routers flip experts against the fp32 reference), a dense
    one to the bf16 tolerance."""
    monkeypatch.setattr(part, "check_logits", lambda *a, **k: 0.08)
    for name, bad in (("tiny-qwen3-moe", False), ("tiny-qwen3", True)):
        spec = part.DecodeSpec(models=[name], backends=["torch"], dtypes=["bf16"], context=[4])
        session = part._Session()
        built = session.get(ctx, name, "bf16", spec)
        built.backends["torch"] = built.model
        assert (session.check(ctx, built, "torch", "bf16", True) is not None) == bad, name
