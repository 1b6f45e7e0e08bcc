"""e4m3 routed experts in the MoE models (model.fp8 on a qwen3_moe / deepseek_v3 model): DeepSeek-V3's 128x128 block
scales, bf16 elsewhere (MLA included); against the bf16 model's fp32 reference within a stated multiple of the measured
error; the triton backend (fused MoE kernel, e4m3 dots exact under the interpreter) against the reference backend of
the same e4m3 weights; fp8 MoE points: key, refusals, bytes."""

from __future__ import annotations

import pytest
import torch
from test_model import tokens
from tokenfleet.kernels import moe as K
from tokenfleet.kernels import rel_error
from tokenfleet.kernels.gemm_fp8 import gemm_fp8_ref
from tokenfleet.measure.parts import model as part
from tokenfleet.measure.parts.model_points import _decode_point
from tokenfleet.measure.runner import job_key
from tokenfleet.model import decoder as M
from tokenfleet.model import fp8 as F8
from tokenfleet.model.spec import load_model_config
from tokenfleet.results import USABLE

FP8 = torch.float8_e4m3fn
TINY = ("tiny-qwen3-moe", "tiny-deepseek-v3")
# The triton backend against the reference backend on the same e4m3 experts (fp32 model, interpreter), logits of a
# prefill + a decode step: measured 4.4e-3 to 1.6e-2 over model seeds 3, 4, 5 of both tiny models (2026-12-04): the
# expert outputs are bf16 on both sides, the kernel's k slot outputs summed in bf16, the reference's in fp32, and a
# rounding flip of the e4m3 intermediate h moves an element by one e4m3 step. Allowed: twice the largest.
TRITON_VS_REFERENCE = 2 * 1.6e-2


def _logits(m, x):
    cache = m.new_cache(x.shape[0], x.shape[1])
    s = x.shape[1] - 1
    return torch.stack([M.prefill(m, x[:, :s], cache), M.decode_one_token(m, x[:, s], cache)], 1)


def test_experts_go_e4m3_with_block_scales_and_the_rest_stays():
    m = M.build_model("tiny-deepseek-v3", dtype="bf16", seed=1)
    dense, mla = m.weights.layers[0].w13, m.weights.layers[1].mla.wkv_b
    q = F8.quantize(m, "block")
    cfg = q.cfg
    i, d = cfg.moe.moe_intermediate_size, cfg.hidden_size
    for lw in q.weights.layers[cfg.moe.dense_layers:]:
        mw = lw.moe
        assert mw.w13.dtype == mw.w2.dtype == FP8
        assert tuple(mw.w13_scale.shape) == (cfg.moe.num_experts, -(-2 * i // 128), -(-d // 128))
        assert tuple(mw.w2_scale.shape) == (cfg.moe.num_experts, -(-d // 128), -(-i // 128))
        assert mw.shared_w13.dtype == torch.bfloat16 and lw.mla.wkv_b.dtype == torch.bfloat16
    assert q.weights.layers[0].w13 is dense and q.weights.layers[1].mla.wkv_b is mla  # dense layer, MLA: bf16
    with pytest.raises(ValueError, match="block scales"):
        F8.quantize(M.build_model("tiny-qwen3-moe", dtype="bf16"), "tensor")


def test_the_tolerance_is_a_stated_multiple_of_the_measured_error():
    assert F8.MOE_TOLERANCE == pytest.approx(F8.MOE_TOLERANCE_FACTOR * max(F8.MOE_MEASURED.values()))
    assert set(TINY) <= set(F8.MOE_MEASURED) and part.MOE_TOLERANCE["fp8"] == F8.MOE_TOLERANCE


@pytest.mark.parametrize("name", TINY)
def test_e4m3_experts_against_the_bf16_reference(name):
    """What the part's check does for an fp8 MoE point (the measured numbers' own setting, seed 0): the e4m3 model's
    logits against the bf16 model's fp32 reference; e4m3 rounding moves them, within the tolerance."""
    m = M.build_model(name, "torch", "bf16", seed=0)
    want = part.reference_logits(m, seed=1)
    err = part.check_logits(F8.quantize(m, "block").with_backend("reference"), seed=1, want=want)
    assert 1e-3 < err <= F8.MOE_MEASURED[name] * 1.01, err  # the measured value (the same seed and inputs)
    assert err < F8.MOE_TOLERANCE


@pytest.mark.parametrize("name", TINY)
def test_triton_e4m3_experts_match_the_reference_backend(name, monkeypatch):
    """The triton backend runs the fused MoE kernel on the e4m3 experts (bf16 activations in, as served; the model in
    fp32 so the interpreter's dense ops are right) and agrees with the reference backend's definition of the same
    e4m3 weights (x and h quantized per token per 128 channels alike; e4m3 tl.dot is exact in the interpreter)."""
    calls = []
    real = K.moe
    monkeypatch.setattr(K, "moe", lambda *a, **kw: calls.append(a[3].dtype) or real(*a, **kw))
    m = F8.build_model(name, "reference", layout="block", act_dtype="fp32", seed=3)
    x = tokens(2, 6, m.cfg.vocab_size, seed=5)
    want = _logits(m, x)
    got = _logits(m.with_backend("triton"), x)
    assert calls and set(calls) == {FP8}
    assert rel_error(got, want) < TRITON_VS_REFERENCE


def test_compile_refuses_e4m3_experts():
    m = F8.build_model("tiny-qwen3-moe", "torch", layout="block", act_dtype="fp32")
    with pytest.raises(ValueError, match="triton, torch and reference"):
        m.with_backend("compile")


def test_fp8_moe_points_plan_key_and_refusals(ctx):
    spec = part.DecodeSpec(models=["tiny-deepseek-v3"], backends=["triton", "torch", "compile"], dtypes=["bf16"],
                           batch=[2], context=[8], fp8={"scale": "block"})
    fp8 = [j for j in part.plan_decode(spec, ctx) if j.key["dtype"] == "fp8"]
    assert [j.key["backend"] for j in fp8] == ["triton", "torch", "compile"]
    assert all(j.key["expert_dtype"] == "fp8" and j.key["fp8_scale"] == "block" for j in fp8)
    notes = {j.key["backend"]: j.run(ctx)["note"] for j in fp8}  # all skipped on a CPU, each saying why
    assert "torch.compile" in notes["compile"] and "CUDA sm90+" in notes["torch"]
    cfg = load_model_config("tiny-deepseek-v3")
    assert "block scales" in part.moe_fp8_problem(cfg, "triton", "tensor", "bf16", True)
    assert "latent cache" in part.moe_fp8_problem(cfg, "triton", "block", "fp8", True)
    assert part.moe_fp8_problem(cfg, "torch", "block", "bf16", True) is None  # a GPU: torch's block-scaled loop
    assert part.not_buildable(load_model_config("deepseek-v3"), 1, "fp8", layers=4) is None  # 3 dense + 1 MoE


def test_fp8_moe_point_on_torchs_loop(ctx, monkeypatch):
    """The torch backend's e4m3 experts (transformers' loop, torch._scaled_mm with block scales per expert: CUDA sm90+)
    with the GPU's block-scaled GEMM stood in by its reference on the CPU: the point is checked against the bf16
    model, counts 1-byte experts + scales for the experts touched, and says what its experts were."""
    monkeypatch.setattr(K, "gemm_fp8_baseline", gemm_fp8_ref)
    spec = part.DecodeSpec(models=["tiny-qwen3-moe"], backends=["torch"], dtypes=["fp8"], fp8_scale="block",
                           batch=[3], context=[8])
    (job,) = part.plan_decode(spec, ctx)
    p = {**job.key, **part._run(part._Session(), _decode_point, spec, ("tiny-qwen3-moe", "fp8", "torch", 3, 8), ctx)}
    assert p.get("status", "ok") in USABLE and "error" not in p, p.get("error")  # (the runner adds the status)
    assert 0 < p["rel_error"] < F8.MOE_TOLERANCE
    assert "e4m3 with 128x128 block scales" in p["note"] and "per-expert loop" in p["note"]
    cfg = load_model_config("tiny-qwen3-moe")
    touched = sum(p["experts_touched"])
    assert p["bytes"] == F8.decode_bytes(cfg, 3, 8, 2, touched) + M.padded_kv_bytes(cfg, 3, 8, 2, "torch")
    assert p["bytes"] < M.decode_bytes(cfg, 3, 8, 2, touched) + M.padded_kv_bytes(cfg, 3, 8, 2, "torch")
    assert job_key(job) and job.key["expert_dtype"] == "fp8"
