"""FP8 (issue 14): the e4m3 GEMM in both scale layouts and decode attention over an e4m3 KV cache against their
references on odd shapes (Triton's interpreter on the CPU: fp8 tl.dot is exact there), the fp8 model against the
bf16 model, fp8 points in the parts, and the refusal on devices without FP8 tensor cores."""

from __future__ import annotations

import pytest
import torch
from conftest import invoke_cli
from tokenfleet.kernels import REGISTRY, rel_error
from tokenfleet.kernels import gemm_fp8 as G8
from tokenfleet.kernels._triton import INTERPRET, pinned_configs
from tokenfleet.kernels.attention_decode import _CHUNK_ALIGN
from tokenfleet.kernels.gemm_fp8 import FP8, gemm_fp8, gemm_fp8_baseline, gemm_fp8_ref, quantize_fp8, quantize_fp8_ref

DEVICE = "cpu" if INTERPRET else "cuda"
# fp32 output against the fp32 reference: exact products under the interpreter; on Hopper the fp8 MMA accumulates
# with ~14 bits (DeepSeek-V3 report, sec. 3.3.2) and the compiled quantizer divides approximately.
TIGHT = 1e-5 if INTERPRET else 2e-3
# Odd sizes: no M, N or K a multiple of any block; K past one and two 128-channel scale groups.
GEMM_SHAPES = [(1, 45, 70), (5, 33, 300), (70, 130, 19), (17, 129, 257)]


@pytest.fixture(autouse=True)
def _one_config():
    # On a GPU each autotuned kernel runs one pinned config, as in tests/test_kernels.py: otherwise every new shape
    # here (16 GEMM keys alone) compiles and times the whole space inside gpu-check's test budget.
    with pinned_configs():
        yield


def _to64(args):
    return tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


@pytest.mark.parametrize("layout", ["tensor", "block"])
@pytest.mark.parametrize("m,n,k", GEMM_SHAPES)
def test_gemm_fp8_matches_reference(m, n, k, layout):
    op = REGISTRY["gemm_fp8"]
    # fp32 activations: the output is fp32 too, so the check is tight (only the quantization could differ).
    args = op.make_inputs({"m": m, "n": n, "k": k, "scale": layout}, torch.float32, DEVICE, seed=m + n)
    ref = op.reference(*_to64(args))
    for split_k in (1, 3):
        out = gemm_fp8(*args, split_k=split_k)
        assert out.dtype == torch.float32 and out.shape == (m, n)
        assert rel_error(out, ref) < TIGHT, (split_k, rel_error(out, ref))


@pytest.mark.parametrize("layout", ["tensor", "block"])
def test_gemm_fp8_bf16_output_within_tolerance(layout):
    op = REGISTRY["gemm_fp8"]
    args = op.make_inputs({"m": 9, "n": 70, "k": 300, "scale": layout}, FP8, DEVICE, seed=3)
    assert args[0].dtype == torch.bfloat16 and args[1].dtype == FP8
    out = op.triton(*args)
    assert out.dtype == torch.bfloat16
    assert rel_error(out, op.reference(*_to64(args))) <= op.tolerance(FP8)


def test_quantizer_kernel_is_the_reference_quantizer():
    x = torch.randn(7, 300) * torch.exp(torch.randn(1, 300))  # channels of different magnitude
    x[0, :5] = torch.tensor([127.5, 31.9, 1e-5, 0.0, -447.0])  # round-up carries, a subnormal, zero
    x = x.to(DEVICE)
    for scale in (None, (x.abs().amax() / 448).reshape(())):
        q, s = quantize_fp8(x, scale)
        rq, rs = quantize_fp8_ref(x, scale)
        assert torch.allclose(s.reshape(rs.shape), rs, rtol=0 if INTERPRET else 1e-6, atol=0)
        mismatch = (q.float() != rq.float()).sum().item()
        # Compiled kernels divide approximately: a value on a rounding boundary may land one e4m3 step over.
        assert mismatch <= (0 if INTERPRET else x.numel() // 100), mismatch


def test_reference_is_the_quantized_product():
    # Independent of the kernel: the reference is within e4m3 rounding of the unquantized product, and block
    # scales follow channels of different magnitude more closely than one scale per tensor.
    op = REGISTRY["gemm_fp8"]
    errs = {}
    for layout in ("tensor", "block"):
        x, w_q, w_s, x_s = op.make_inputs({"m": 16, "n": 256, "k": 384, "scale": layout}, FP8, "cpu", seed=1)
        exact = x.double() @ (w_q.double() * (w_s.double().repeat_interleave(128, 0).repeat_interleave(128, 1)
                                              if layout == "block" else w_s.double())).T
        errs[layout] = rel_error(gemm_fp8_ref(x, w_q, w_s, x_s), exact)
        assert 1e-3 < errs[layout] < 0.06, (layout, errs[layout])


def test_baseline_scaled_mm():
    op = REGISTRY["gemm_fp8"]
    args = op.make_inputs({"m": 5, "n": 64, "k": 256, "scale": "tensor"}, FP8, DEVICE, seed=2)
    out = gemm_fp8_baseline(*args)
    assert out.dtype == torch.bfloat16 and rel_error(out, op.reference(*_to64(args))) <= op.tolerance(FP8)
    if DEVICE == "cpu":
        block = op.make_inputs({"m": 5, "n": 64, "k": 256, "scale": "block"}, FP8, "cpu", seed=2)
        with pytest.raises(RuntimeError, match="sm90"):
            gemm_fp8_baseline(*block)


def test_both_sides_accumulate_alike(monkeypatch):
    # Issue 23: Triton's fp8 tl.dot on sm90 takes fast accumulation by default (max_num_imprecise_acc 2**30) while
    # _scaled_mm ran with use_fast_accum=False. Both sides now take one mode from FAST_ACCUM: what each is handed.
    args = REGISTRY["gemm_fp8"].make_inputs({"m": 3, "n": 64, "k": 256, "scale": "tensor"}, FP8, DEVICE, seed=4)
    seen = {}

    class Launch:  # the Triton kernel's launcher, recording what it is handed
        def __getitem__(self, grid):
            return lambda *a, **kw: seen.setdefault("acc_promote", kw["ACC_PROMOTE"])

    real_mm = torch._scaled_mm

    def scaled_mm(*a, **kw):
        seen["use_fast_accum"] = kw["use_fast_accum"]
        return real_mm(*a, **kw)

    monkeypatch.setattr(G8, "_gemm_fp8_kernel", Launch())
    monkeypatch.setattr(torch, "_scaled_mm", scaled_mm)
    gemm_fp8(*args, split_k=1)
    gemm_fp8_baseline(*args)
    assert seen["use_fast_accum"] is G8.FAST_ACCUM is False
    assert seen["acc_promote"] == G8.ACC_PROMOTE_K <= min(c.kwargs["BLOCK_K"] for c in G8._fp8_configs(False))
    # ... and every point of the op records the one mode, whatever its backend or device.
    modes = {G8.timing_fields(b, d)["fp8_accum"] for b in ("triton", "torch", "compile") for d in ("cpu", "cuda")}
    assert modes == {G8.ACCUMULATION} == {"fp32"}


def test_baseline_quantizes_in_one_fused_kernel_on_a_gpu(monkeypatch):
    # Issue 23: the torch baseline quantized x in 4-5 eager passes around a 4-12 us GEMM. On a GPU it now runs the
    # op's own one-kernel quantizer (the sides differ only in the GEMM); the CPU keeps torch's ops; points say which.
    assert G8.baseline_quantization("cuda") == ("eager torch ops" if INTERPRET else "fused: one kernel (quantize_fp8)")
    assert G8.baseline_quantization("cpu") == "eager torch ops"
    assert G8.baseline_quantization("cuda", compiling=True) == "torch ops fused by Inductor"
    assert G8.timing_fields("triton", "cuda")["quantization"] == "fused: one kernel (quantize_fp8)"
    assert G8.timing_fields("compile", "cuda")["quantization"] == "torch ops fused by Inductor"
    op = REGISTRY["gemm_fp8"]
    args = op.make_inputs({"m": 5, "n": 64, "k": 300, "scale": "tensor"}, FP8, DEVICE, seed=6)
    monkeypatch.setattr(G8, "baseline_quantization", lambda *a, **k: "eager torch ops")
    eager = gemm_fp8_baseline(*args)
    calls = []
    monkeypatch.setattr(G8, "baseline_quantization", lambda *a, **k: "fused: one kernel (quantize_fp8)")
    monkeypatch.setattr(G8, "quantize_fp8", lambda *a: calls.append(1) or quantize_fp8(*a))
    fused = gemm_fp8_baseline(*args)
    assert calls == [1] and rel_error(fused, eager) <= op.tolerance(FP8)
    # Block scales come out M-major, as cuBLASLt's 1x128 recipe takes them (no transposing copy in the time).
    _, s = quantize_fp8(torch.randn(6, 300, device=DEVICE))
    assert s.shape == (6, 3) and s.stride() == (1, 6)


def test_gemm_fp8_rejects_bad_scales():
    op = REGISTRY["gemm_fp8"]
    x, w_q, w_s, x_s = op.make_inputs({"m": 2, "n": 200, "k": 300, "scale": "block"}, FP8, "cpu", seed=0)
    with pytest.raises(ValueError, match="per 128x128 block"):
        gemm_fp8(x, w_q, w_s[:1], None)
    with pytest.raises(ValueError, match="scalar static x_scale"):
        gemm_fp8(x, w_q, torch.tensor(1.0), None)
    with pytest.raises(ValueError, match="w_q"):
        gemm_fp8(x, w_q.float(), w_s, None)


def test_gemm_fp8_counts():
    op, gemm = REGISTRY["gemm_fp8"], REGISTRY["gemm"]
    shape = {"m": 1, "n": 4096, "k": 4096}
    assert op.flops({**shape, "scale": "tensor"}) == gemm.flops(shape)
    # A decode row reads the weight: e4m3 halves what bf16 reads (quantization traffic is the small remainder).
    ratio = op.bytes_moved({**shape, "scale": "tensor"}, FP8) / gemm.bytes_moved(shape, torch.bfloat16)
    assert 0.5 <= ratio < 0.51
    assert op.bytes_moved({**shape, "scale": "block"}, FP8) > op.bytes_moved({**shape, "scale": "tensor"}, FP8)


# ---- FP8 KV cache in decode attention -----------------------------------------------------------------------

DECODE_SHAPES = [
    {"batch": 3, "q_heads": 6, "kv_heads": 2, "context": [1, 37, 50], "max_context": 53, "head_dim": 32},
    {"batch": 2, "q_heads": 4, "kv_heads": 4, "max_context": 45, "head_dim": 16},  # random lengths
]


@pytest.mark.parametrize("kv_scale", ["head", "tensor"])
@pytest.mark.parametrize("shape", DECODE_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_attention_decode_fp8_cache(shape, dtype, kv_scale):
    op = REGISTRY["attention_decode"]
    args = op.make_inputs({**shape, "kv_dtype": "fp8", "kv_scale": kv_scale}, dtype, DEVICE, seed=5)
    q, k, v, lens, ks, vs = args
    assert k.dtype == v.dtype == FP8 and q.dtype == dtype and ks.numel() == (shape["kv_heads"] if kv_scale == "head"
                                                                             else 1)
    ref = op.reference(*_to64(args))
    out = op.triton(*args, chunk_size=_CHUNK_ALIGN)  # 16 under the interpreter (splits); a GPU takes 128
    assert rel_error(out, ref) <= op.tolerance(dtype)
    assert rel_error(op.baseline(*args), ref) <= op.tolerance(dtype)
    # The scales matter: ignoring them is far off.
    assert rel_error(op.triton(q, k, v, lens, torch.ones_like(ks), torch.ones_like(vs)), ref) > 0.05


def test_attention_decode_fp8_halves_kv_bytes_and_checks_scales():
    op = REGISTRY["attention_decode"]
    shape = {"batch": 2, "q_heads": 8, "kv_heads": 2, "context": 4096, "head_dim": 128}
    qo = 2 * 2 * 8 * 128 * 2 + 4 * 2
    assert op.bytes_moved(shape, FP8) - qo == (op.bytes_moved(shape, torch.bfloat16) - qo) // 2
    q, k, v, lens, ks, vs = op.make_inputs({**shape, "context": 20}, FP8, "cpu", seed=0)
    assert q.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="needs k_scale"):
        op.triton(q, k, v, lens)
    with pytest.raises(ValueError, match="e4m3 cache only"):
        op.triton(q, k.to(q.dtype), v.to(q.dtype), lens, ks, vs)


# ---- the fp8 model -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))


def _cached_logits(m, tokens):
    from tokenfleet.model import decoder as M

    tokens = tokens.to(m.device)
    cache = m.new_cache(tokens.shape[0], tokens.shape[1])
    first = M.prefill(m, tokens[:, :-1], cache)
    return torch.stack([first, M.decode_one_token(m, tokens[:, -1], cache)], 1), cache


# Relative error of tiny-qwen3's fp8 logits (seed 0, `tokens`) against its bf16 model's, measured on the CPU (2-core
# AMD EPYC, torch 2.13): 0.0627 with the bf16 KV cache, 0.0639 with e4m3 KV. Held within [1/2, 2x] of that: fp8 must
# change the logits by as much as e4m3's rounding does, and by no more than twice it. (Only `wqkv` in e4m3: 0.034;
# the activation scale from x[0] only: 0.112, caught exactly by test_fp8_linear_scales_activations_per_tensor.)
FP8_MODEL_ERROR = {"bf16": 0.0627, "fp8": 0.0639}
FP8_PROJECTIONS = ("wqkv", "wo", "w13", "w2")  # decoder.Layer's projections: all of them go to e4m3
# A projection's e4m3 weight (dequantized) against its bf16 weight, measured: 0.0252-0.0259 over tiny-qwen3's 8
# (per-tensor scale; elementwise rounding, no BLAS in it). Held within [1/2 the least, 2x the largest].
FP8_WEIGHT_ERROR = (0.0252, 0.0259)


@pytest.mark.parametrize("kv_dtype", ["bf16", "fp8"])
def test_fp8_model_against_bf16(tokens, kv_dtype):
    from tokenfleet.model import decoder as M
    from tokenfleet.model import fp8 as F8

    bf = M.build_model("tiny-qwen3", "torch", "bf16", seed=0)
    with torch.no_grad():
        want = bf.forward(tokens)[:, -2:]
    before = [{n: getattr(lw, n).clone() for n in FP8_PROJECTIONS} for lw in bf.weights.layers]
    q = F8.quantize(bf, "tensor", kv_dtype)
    assert len(q.weights.layers) == len(before) == q.cfg.num_layers == 2
    for i, (lw, orig) in enumerate(zip(q.weights.layers, before, strict=True)):  # every projection of every layer
        for n, w in orig.items():
            f = getattr(lw, n)
            assert isinstance(f, F8.Fp8Weight) and f.q.dtype == FP8 and f.q.shape == w.shape, (i, n)
            err = rel_error(f.q.double() * f.scale.double(), w)  # its own weight, rounded to e4m3
            assert FP8_WEIGHT_ERROR[0] / 2 < err < 2 * FP8_WEIGHT_ERROR[1], (i, n, err)
    assert q.weights.embed.dtype == torch.bfloat16  # bf16 elsewhere
    got, cache = _cached_logits(q, tokens)
    assert cache.k.dtype == (FP8 if kv_dtype == "fp8" else torch.bfloat16)
    err = rel_error(got, want)
    assert FP8_MODEL_ERROR[kv_dtype] / 2 < err < 2 * FP8_MODEL_ERROR[kv_dtype], err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_linear_scales_activations_per_tensor(dtype):
    """`tensor` scales: one dynamic activation scale, amax over the whole input / 448, so no row saturates. Rows of
    very different size (row 0 the smallest) against the quantized product worked out here, and against the exact
    product row by row. A scale from one row (x[0]) clips the others: errors near 1."""
    from tokenfleet.model import fp8 as F8

    g = torch.Generator().manual_seed(0)
    n, k = 96, 160
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
    x = (torch.randn(4, k, generator=g) * torch.tensor([[0.05], [1.0], [3.0], [0.5]])).to(dtype)
    fw = F8.Fp8Weight.quantize(w, "tensor")
    xs = x.double().abs().max() / 448
    xq = (x.double() / xs).clamp(-448, 448).to(FP8).double() * xs
    hand = xq @ (fw.q.double() * fw.scale.double()).T
    exact = x.double() @ w.double().T
    # Measured (CPU): against `hand` 2.9e-7 in fp32 (output rounding), 1.8e-3 in bf16 (the output rounded to bf16);
    # per row against `exact` 0.031-0.040 (e4m3 rounding of x and w). Held to about 3x and 2x of those.
    tol_hand = 1e-6 if dtype == torch.float32 else 4e-3
    for backend in ("torch", "reference"):
        out = fw.linear(x, backend)
        assert out.dtype == dtype and rel_error(out, hand) < tol_hand, (backend, rel_error(out, hand))
        rows = [rel_error(out[i], exact[i]) for i in range(4)]
        assert max(rows) < 2 * 0.040, (backend, rows)


# The fp8 model's Triton logits against torch's (`tensor`) and the reference's (`block`), fp32 activations: under the
# interpreter (exact e4m3 products) 2.5e-7 and 2.7e-7 measured on the CPU, held to 4x (summation order differs
# between CPUs' BLAS); on a GPU not measured here: the fp8 MMA's ~14-bit accumulation, TIGHT's 2e-3 per op, x100 over
# two layers and the LM head as before.
FP8_TRITON_MODEL = 1e-6 if INTERPRET else TIGHT * 100


def test_fp8_model_triton_matches_torch(tokens):
    # fp32 activations, so Triton's interpreter (whose bf16 tl.dot is wrong) can run every op of the model.
    from tokenfleet.model import fp8 as F8

    # On DEVICE: compiled Triton (a GPU) takes no CPU tensors.
    m = F8.build_model("tiny", "torch", DEVICE, layout="tensor", kv_dtype="fp8", act_dtype="fp32", seed=2)
    want, _ = _cached_logits(m, tokens)
    got, _ = _cached_logits(m.with_backend("triton"), tokens)
    assert rel_error(got, want) < FP8_TRITON_MODEL
    ref, _ = _cached_logits(F8.build_model("tiny", "reference", DEVICE, layout="block", act_dtype="fp32", seed=2),
                            tokens)
    blk, _ = _cached_logits(F8.build_model("tiny", "triton", DEVICE, layout="block", act_dtype="fp32", seed=2), tokens)
    assert rel_error(blk, ref) < FP8_TRITON_MODEL


# ---- parts, datasheets, CLI ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ctx():
    from tokenfleet.measure.device import detect
    from tokenfleet.measure.runner import RunContext
    from tokenfleet.measure.suite import Suite, SuiteFile, TimingSpec

    file = SuiteFile(id="test", description="test", noise_limit=10.0,
                     timing=TimingSpec(min_samples=2, min_time_s=0.005, warmup_s=0.0, max_samples=5))
    return RunContext(device=detect("cpu"), suite=Suite(file, {}, "test"), datasheet=None,
                      ceilings={"copy_gbps": 10.0, "matvec_gbps": {}, "matmul_tflops": {}})


def test_fp8_points_on_cpu(ctx):
    from tokenfleet.measure.parts import ceilings, kernels, model
    from tokenfleet.measure.runner import execute
    from tokenfleet.model import decoder as M
    from tokenfleet.model import fp8 as F8

    spec = kernels.Spec(cases=[{"op": "gemm_fp8", "dtypes": ["fp8"], "shapes": [{"m": 4, "n": 64, "k": 256}],
                                "scales": ["tensor", "block"]},
                               {"op": "attention_decode", "dtypes": ["fp8"], "backends": ["torch"],
                                "shapes": [{"batch": 2, "q_heads": 4, "kv_heads": 2, "context": 40, "head_dim": 32}]}])
    pts = [execute(j, ctx) for j in kernels.plan(spec, ctx)]
    by = {(p["op"], p.get("scale"), p["backend"]): p for p in pts}
    timed = {"ok", "noisy"}  # a loaded CI machine may flag a timing noisy; it was checked and timed all the same
    # torch._scaled_mm on a CPU: checked at a small shape, not timed, and the point says why (issue 20)
    fp8_torch = by[("gemm_fp8", "tensor", "torch")]
    assert fp8_torch["status"] == "skipped" and "not timed on a CPU" in fp8_torch["note"]
    assert "median_ms" not in fp8_torch
    assert fp8_torch["rel_error"] <= REGISTRY["gemm_fp8"].tolerance(torch.float8_e4m3fn) and "m=4 n=64 k=128" in (
        fp8_torch["note"])  # the small shape: K capped at 128
    assert by[("gemm_fp8", "tensor", "triton")]["status"] == "skipped"
    assert by[("gemm_fp8", "block", "torch")]["status"] == "error"  # no CPU block-scaled _scaled_mm: a row
    torch_pt = by[("gemm_fp8", "tensor", "torch")]
    assert torch_pt["fp8_accum"] == G8.ACCUMULATION and torch_pt["quantization"] == "eager torch ops"
    assert by[("attention_decode", None, "torch")]["status"] in timed
    assert by[("attention_decode", None, "torch")]["dtype"] == "fp8"

    cspec = ceilings.Spec(copy_mb=4, matmul={"fp8": 128, "fp32": 32}, matvec={"n": 64, "k": 64, "dtypes": ["fp32"]})
    layouts = [(j.key["dtype"], j.key["layout"]) for j in ceilings.plan(cspec, ctx) if j.key["op"] == "matmul"]
    assert layouts == [("fp8", "nt"), ("fp32", "nn"), ("fp32", "nt")]  # cuBLASLt's fp8 takes nt only
    mm = execute(ceilings.matmul_job(cspec, "fp8", 128, "nt"), ctx)
    assert mm["status"] == "skipped" and mm["dtype"] == "fp8" and "value" not in mm  # checked, not timed, on a CPU
    assert mm["rel_error"] < 0.02 and f"at {ceilings.FP8_CPU_CHECK_SIZE}x" in mm["note"]
    assert mm["fp8_accum"] == torch_pt["fp8_accum"]  # the ceiling accumulates as the points it bounds

    dec = model.DecodeSpec(models=["tiny"], backends=["torch", "triton"], dtypes=["fp32"], batch=[1], context=[8],
                           fp8={"models": ["tiny-qwen3"], "batch": [2], "context": [16], "kv_dtype": "fp8"})
    jobs = model.plan_decode(dec, ctx)
    fp8_jobs = [j for j in jobs if j.key["dtype"] == "fp8"]
    assert len(jobs) == 4 and len(fp8_jobs) == 2
    assert all(j.key["kv_dtype"] == "fp8" and j.key["fp8_scale"] == "tensor" for j in fp8_jobs)
    assert "kv_dtype" not in jobs[0].key  # bf16/fp32 points keep their keys
    p = execute(next(j for j in fp8_jobs if j.key["backend"] == "torch"), ctx)
    assert p["status"] in timed, p.get("error")
    # checked against the bf16 model: 0.0654 measured (CPU, seeded); held within [1/2, 2x] of it, inside the part's
    # own bound for real models (F8.TOLERANCE)
    assert 0.0654 / 2 < p["rel_error"] < 2 * 0.0654 < F8.TOLERANCE
    cfg = M.load_model_config("tiny-qwen3")
    # torch reads the cache padded to 64 positions (M.padded_kv_bytes), 1-byte KV elements
    assert p["bytes"] == F8.decode_bytes(cfg, 2, 16, 1) + M.padded_kv_bytes(cfg, 2, 16, 1, "torch")
    assert p["bytes"] < M.decode_bytes(cfg, 2, 16, 2) + M.padded_kv_bytes(cfg, 2, 16, 2, "torch")


def test_no_fp8_tensor_cores_refuse(ctx):
    from dataclasses import replace

    from tokenfleet.config import ConfigError
    from tokenfleet.hardware import Hardware, load_hardware
    from tokenfleet.measure.parts import ceilings, kernels, model
    from tokenfleet.measure.runner import execute

    a100 = load_hardware("a100-sxm")
    assert not a100.has_fp8 and not load_hardware("ascend-910b").has_fp8 and load_hardware("h200").has_fp8
    with pytest.raises(ConfigError, match="fp8_tensor_cores"):
        a100.check_fp8()
    bad = a100.model_dump() | {"fp8_tensor_cores": True}
    with pytest.raises(ValueError, match="disagree"):
        Hardware.model_validate(bad)

    on_a100 = replace(ctx, datasheet=a100)
    spec = kernels.Spec(cases=[{"op": "gemm_fp8", "dtypes": ["fp8"], "shapes": [{"m": 4, "n": 64, "k": 256}],
                                "backends": ["torch"]}])
    pts = [execute(j, on_a100) for j in kernels.plan(spec, on_a100)]
    cspec = ceilings.Spec(copy_mb=4, matmul={"fp8": 128}, matvec={"n": 64, "k": 64, "dtypes": ["fp32"]})
    pts.append(execute(ceilings.matmul_job(cspec, "fp8", 128, "nt"), on_a100))
    dec = model.DecodeSpec(models=["tiny"], dtypes=["fp8"], batch=[1], context=[8], backends=["torch"])
    pts += [execute(j, on_a100) for j in model.plan_decode(dec, on_a100)]
    assert len(pts) == 3
    for p in pts:
        assert p["status"] == "skipped" and "fp8_tensor_cores: false" in p["note"] and "\n" not in p["note"]


def test_project_fp8_on_a100_exits_2_with_one_line():
    r = invoke_cli("project", "--dtype", "fp8", "--gpu", "a100-sxm", "--model", "llama-3.1-8b")
    assert r.exit_code == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "a100-sxm.yaml: fp8_tensor_cores: false" in lines[0], r.stderr


def test_projection_and_fleet_around_the_refusal():
    from tokenfleet.capacity.fleet import fleet_of, gpu_mix
    from tokenfleet.capacity.project import project
    from tokenfleet.config import ConfigError

    with pytest.raises(ConfigError, match="ascend-910b.yaml: fp8_tensor_cores"):
        project("deepseek-v3", "ascend-910b", "chat", tp=16)  # native fp8
    with pytest.raises(ConfigError, match="fp8_tensor_cores"):
        project("llama-3.1-8b", "a100-sxm", "chat", "bf16", kv_dtype="fp8")
    assert project("llama-3.1-8b", "h200", "chat", "fp8")["fits"]
    # A fleet's A100 / 910B serve fp8 checkpoints weight-only, and say so.
    fleet, _ = fleet_of("china-2026-mix")
    mix = gpu_mix("ascend-910b", fleet, None, [])
    notes = [n for _, r in mix["classes"] for n in r["notes"]]
    assert any("fp8 weights, bf16 compute" in n for n in notes)
