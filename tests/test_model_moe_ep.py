"""Per-GPU expert-parallel slices (decoder.ep_slice, the model part's `ep`): a GPU holds E/ep experts (vLLM's
expert_map), its MoE layers route the pool's tokens and compute the pairs routed to its experts; the ranks' slices sum
to the whole layer on every backend; an EP point records the experts it held and its routed-expert time."""

from __future__ import annotations

import pytest
import torch
from tokenfleet.kernels import rel_error
from tokenfleet.measure.parts import model as part
from tokenfleet.measure.runner import execute
from tokenfleet.model import decoder as M
from tokenfleet.model import fp8 as F8
from tokenfleet.model import moe as E
from tokenfleet.model.spec import load_model_config
from tokenfleet.results import USABLE


@pytest.mark.parametrize("backend, fp8", [("reference", False), ("torch", False), ("triton", False),
                                          ("reference", True), ("triton", True)])
def test_the_ranks_slices_sum_to_the_whole_layer(backend, fp8):
    """Every rank's slice on the same tokens and routing (rows of its non-local pairs add nothing): their sum is the
    unsliced layer (the combine's sum), on the backend's own expert layer."""
    m = M.build_model("tiny-qwen3-moe", dtype="fp32", seed=1)
    if fp8:
        m = F8.quantize(m, "block")
    mw = m.weights.layers[0].moe
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(7, m.cfg.hidden_size, generator=gen)
    ids = torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(7)])
    ids[3] = torch.tensor([0, 1])  # a token wholly on rank 0 with ep 4
    w = torch.softmax(torch.randn(7, 2, generator=gen), -1)
    whole_mw = E.slice_experts(mw, 1, 0) if not fp8 else mw  # ep 1: the kernels' form with an identity map
    fn = E.kernel_experts(backend, fp8, torch.float32, x.device, (*mw.w13.shape[1:], *mw.w2.shape[1:]))
    whole = E.run_kernel_experts(fn, x, whole_mw, ids, w)
    for ep in (2, 4):
        parts = [E.run_kernel_experts(fn, x, E.slice_experts(mw, ep, r), ids, w) for r in range(ep)]
        assert all(p.shape[0] == 7 for p in parts)
        assert rel_error(sum(parts), whole) < (2e-2 if fp8 else 1e-5), (backend, ep)
        held = E.slice_experts(mw, ep, 0)
        assert held.w13.shape[0] == 8 // ep and E.ep_degree(held) == ep
        assert held.expert_map.tolist() == list(range(8 // ep)) + [-1] * (8 - 8 // ep)
        if fp8:
            assert held.w13_scale.shape[0] == 8 // ep
    with pytest.raises(ValueError, match="divide"):
        E.slice_experts(mw, 3, 0)


def test_pool_tokens_are_distinct_stand_ins():
    y = torch.randn(3, 16)
    pool = E.pool_tokens(y, 4)
    assert pool.shape == (12, 16) and torch.equal(pool[:3], y)
    assert torch.allclose(pool[3:6].norm(dim=1), y.norm(dim=1)) and not torch.allclose(pool[3:6], y)


def test_a_sliced_model_checks_against_its_reference():
    m = M.ep_slice(M.build_model("tiny-deepseek-v3", dtype="fp32", seed=3), 2)
    assert all(lw.moe.w13.shape[0] == 4 for lw in m.weights.layers if lw.moe is not None)
    assert part.check_logits(m, seed=1) < 1e-4  # torch (grouped_mm over the held experts) vs the reference
    with pytest.raises(ValueError, match="triton, torch and reference"):
        m.with_backend("compile")


def test_ep_points_hold_their_slice_and_time_its_experts(ctx):
    spec = part.DecodeSpec(models=["tiny-qwen3-moe"], backends=["torch", "compile"], dtypes=["fp32"], batch=[4],
                           context=[8], ep=2)
    jobs = part.plan_decode(spec, ctx)
    assert [(j.key["ep"], j.key["ep_rank"]) for j in jobs] == [(2, 0), (2, 0)]
    p, skipped = (execute(j, ctx) for j in jobs)
    assert skipped["status"] == "skipped" and "torch.compile" in skipped["note"]
    assert p["status"] in USABLE, p.get("error")
    assert p["rel_error"] < 1e-4 and p["expert_ms"] > 0
    assert len(p["tokens_per_expert"]) == 4  # the held experts: of the pool's 2 x 4 tokens' choices
    cfg = load_model_config("tiny-qwen3-moe")
    assert sum(p["tokens_per_expert"]) <= 2 * 4 * 2 * cfg.num_moe_layers
    assert all(t <= 4 for t in p["experts_touched"])
    assert "EP slice: 4 of 8 experts held (ep 2, rank 0)" in p["note"]
    assert p["bytes"] == (M.decode_bytes(cfg, 4, 8, 4, experts_touched=sum(p["experts_touched"]))
                          + M.padded_kv_bytes(cfg, 4, 8, 4, "torch"))
    other = execute(part.plan_decode(spec.model_copy(update={"ep_rank": 1, "backends": ["torch"]}), ctx)[0], ctx)
    assert other["ep_rank"] == 1 and "(ep 2, rank 1)" in other["note"]
    assert other["tokens_per_expert"] != p["tokens_per_expert"]  # the other half of the experts
    with pytest.raises(ValueError, match="ep_rank 2 must be below ep 2"):
        part.DecodeSpec(models=["tiny-qwen3-moe"], ep=2, ep_rank=2)
    for name, ep, why in (("tiny", 2, "dense model"), ("tiny-qwen3-moe", 3, "does not divide")):
        s = part.DecodeSpec(models=[name], backends=["torch"], dtypes=["fp32"], context=[8], ep=ep)
        (job,) = part.plan_decode(s, ctx)
        assert why in job.run(ctx)["note"]
    plain = part.plan_decode(part.DecodeSpec(models=["tiny-qwen3-moe"], backends=["torch"], context=[8]), ctx)
    assert "ep" not in plain[0].key  # unsliced points keep their keys


def test_an_fp8_ep_point_is_checked_against_its_bf16_slice(ctx, monkeypatch):
    """e4m3 experts on an EP slice: the check's reference is the bf16 slice's (the same experts held), and only the
    held experts are quantized; torch's block-scaled GEMM (CUDA sm90+) stood in by its reference on the CPU."""
    from tokenfleet.kernels import moe as K
    from tokenfleet.kernels.gemm_fp8 import gemm_fp8_ref
    from tokenfleet.measure.parts.model_points import _decode_point

    monkeypatch.setattr(K, "gemm_fp8_baseline", gemm_fp8_ref)
    spec = part.DecodeSpec(models=["tiny-deepseek-v3"], backends=["torch"], dtypes=["fp8"], fp8_scale="block",
                           batch=[3], context=[8], ep=4)
    (job,) = part.plan_decode(spec, ctx)
    assert job.key["ep"] == 4 and job.key["expert_dtype"] == "fp8"
    session = part._Session()
    p = part._run(session, _decode_point, spec, ("tiny-deepseek-v3", "fp8", "torch", 3, 8), ctx)
    assert "error" not in p, p.get("error")
    assert 0 < p["rel_error"] < F8.MOE_TOLERANCE and p["expert_ms"] > 0
    mw = next(lw.moe for lw in session.built.model.weights.layers if lw.moe is not None)
    assert mw.w13.dtype == torch.float8_e4m3fn and mw.w13.shape[0] == 2 and mw.w13_scale.shape[0] == 2
    assert len(p["tokens_per_expert"]) == 2


def test_the_full_suite_slices_the_deployments_pools():
    """full.yaml's EP points are one GPU of pools the deployment files run (so `project --deployment --run` finds
    an expert time at their ep), deepseek-v3's with e4m3 experts."""
    from tokenfleet.capacity.deployment import load_deployment
    from tokenfleet.measure.plan import ordered_jobs, planning_context
    from tokenfleet.measure.suite import load_suite

    suite = load_suite("full")
    keys = [j.key for j in ordered_jobs(suite, planning_context(suite)) if j.key.get("ep")]
    eps = {(k["model"], k["ep"], k["dtype"]) for k in keys}
    assert eps == {("qwen3-30b-a3b", 8, "bf16"), ("deepseek-v3", 128, "fp8")}
    assert load_deployment("qwen3-moe-dp-ep8").pools()["mixed"].gpus == 8
    assert load_deployment("deepseek-v3-profile").pools()["decode"].gpus == 128
    assert {k["backend"] for k in keys} == {"triton", "torch"}
