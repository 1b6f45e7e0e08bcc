"""The MoE and MLA ops (kernels.moe, kernels.router, kernels.attention_mla) against their references under Triton's
interpreter at tiny shapes (fp16/fp32: the interpreter's bf16 dot is wrong; e4m3 dots are exact there), with the edge
cases: an expert no token chose, every token on one expert, top-k 1, ragged context lengths, odd sizes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tokenfleet.kernels import REGISTRY, moe, rel_error
from tokenfleet.kernels import attention_mla as mla
from tokenfleet.kernels import router as rt

FP8 = torch.float8_e4m3fn


def _f64(args: tuple) -> tuple:
    return tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def _check(op: str, args: tuple, dtype: torch.dtype, fns=("triton", "baseline")) -> None:
    entry = REGISTRY[op]
    refs = entry.outputs(entry.reference(*_f64(args)))
    for name in fns:
        fn = getattr(entry, name) if name in ("triton", "baseline") else entry.baselines[name]
        outs = entry.outputs(fn(*args))
        errs = [rel_error(o, r) for o, r in zip(outs, refs, strict=True)]
        assert max(errs) <= entry.tolerance(dtype), (name, errs)


# ---- moe ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,dtype,fns", [
    ({"tokens": 5, "hidden": 40, "inter": 24, "experts": 6, "topk": 2}, torch.float32, ("baseline", "loop")),
    # Odd sizes: torch's grouped GEMM needs 16-byte strides, so only the loop beside the kernel.
    ({"tokens": 7, "hidden": 33, "inter": 17, "experts": 5, "topk": 1, "routing": "zipf:1.5"}, torch.float16,
     ("loop",)),
    ({"tokens": 1, "hidden": 64, "inter": 32, "experts": 8, "topk": 3}, torch.float32, ("baseline", "loop")),
])
def test_moe_matches_reference_and_torch(shape, dtype, fns):
    args = moe.make_inputs(shape, dtype, "cpu", 0)
    _check("moe", args, dtype, fns=("triton", *fns))


@pytest.mark.parametrize("shape", [
    {"tokens": 4, "hidden": 256, "inter": 128, "experts": 4, "topk": 2},
    {"tokens": 3, "hidden": 200, "inter": 136, "experts": 5, "topk": 3},  # partial 128-blocks in D and I
])
def test_moe_fp8_block_scales_match_reference(shape):
    args = moe.make_inputs(shape, FP8, "cpu", 1)
    assert args[3].dtype == FP8 and args[5].shape == (shape["experts"], 3 if shape["inter"] > 128 else 2,
                                                      -(-shape["hidden"] // 128))
    _check("moe", args, FP8, fns=("triton",))


def test_moe_all_tokens_on_one_expert_and_empty_experts():
    t, d, i, e, k = 9, 32, 16, 6, 1
    hidden, _, _, w13, w2 = moe.make_inputs({"tokens": t, "hidden": d, "inter": i, "experts": e, "topk": k},
                                            torch.float32, "cpu", 2)
    ids = torch.full((t, k), 4, dtype=torch.int32)  # experts 0-3 and 5: no tokens
    w = torch.rand((t, k))
    out = moe.moe(hidden, ids, w, w13, w2)
    gu = hidden.double() @ w13[4].double().T
    want = (F.silu(gu[:, :i]) * gu[:, i:]) @ w2[4].double().T * w.double()
    assert rel_error(out, want) <= 1e-5
    # A weight of zero for a slot removes it; the result is then the other slot's alone.
    ids2 = torch.tensor([[1, 3]] * t, dtype=torch.int32)
    w2s = torch.tensor([[1.0, 0.0]] * t)
    ref = moe.moe_ref(hidden, ids2[:, :1], w2s[:, :1], w13, w2)
    assert rel_error(moe.moe(hidden, ids2, w2s, w13, w2), ref) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, FP8])
def test_moe_expert_parallel_slices_sum_to_the_whole_layer(dtype):
    # Four ranks each hold E/4 experts and see the routing over all E (expert_map: -1 elsewhere); their outputs add
    # up to the one-rank layer's. Each slice is checked against the reference and torch's two paths too.
    shape = {"tokens": 6, "hidden": 128 if dtype == FP8 else 24, "inter": 128 if dtype == FP8 else 16,
             "experts": 8, "topk": 3}
    whole = moe.make_inputs(shape, dtype, "cpu", 5)
    total = torch.zeros(whole[0].shape, dtype=torch.float64)
    touched = 0
    for r in range(4):
        part = moe.make_inputs({**shape, "ep": 4, "ep_rank": r}, dtype, "cpu", 5)
        assert part[3].shape[0] == 2 and part[7].tolist().count(-1) == 6 and torch.equal(part[1], whole[1])
        # the slice's weights are the whole layer's experts 2r, 2r + 1 (drawn alike): take them from `whole`
        held = slice(2 * r, 2 * r + 2)
        args = (*whole[:3], whole[3][held], whole[4][held], *((whole[5][held], whole[6][held]) if dtype == FP8
                                                               else (None, None)), part[7])
        _check("moe", args, dtype, fns=("triton",) if dtype == FP8 else ("triton", "baseline", "loop"))
        total += moe.moe(*args).double()
        fields = moe.point_fields({**shape, "ep": 4, "ep_rank": r}, part)
        assert len(fields["tokens_per_expert"]) == 2
        touched += fields["experts_touched"]
    assert rel_error(total, moe.moe_ref(*_f64(whole))) <= moe.tolerance(dtype)
    assert touched == moe.point_fields(shape, whole)["experts_touched"]


def test_align_tokens_pads_each_touched_expert_to_the_block():
    ids = torch.tensor([[2, 0], [2, 5], [2, 0]], dtype=torch.int32)  # expert 2: 3 slots, 0: 2, 5: 1; 1, 3, 4: none
    sorted_ids, block_expert = moe.align_tokens(ids, 6, 4)
    n = ids.numel()
    assert sorted_ids.numel() == moe.max_padded_rows(n, 6, 4) == 24  # 6 + min(6, 6) * 3, whole blocks
    blocks = sorted_ids.view(-1, 4).tolist()
    assert block_expert.tolist()[:3] == [0, 2, 5] and all(x == 6 for x in block_expert.tolist()[3:])
    assert blocks[0] == [1, 5, n, n] and blocks[1] == [0, 2, 4, n] and blocks[2] == [3, n, n, n]
    assert all(v == n for row in blocks[3:] for v in row)
    # Slots mapped to -1 (held by another rank) get no row: expert 0's two slots leave.
    sorted_ids, block_expert = moe.align_tokens(torch.where(ids == 0, -1, ids), 6, 4)
    assert sorted_ids.view(-1, 4).tolist()[:2] == [[0, 2, 4, n], [3, n, n, n]] and block_expert.tolist()[:2] == [2, 5]
    assert all(x == 6 for x in block_expert.tolist()[2:]) and 1 not in sorted_ids.tolist()


def test_moe_rejects_bad_inputs():
    args = list(moe.make_inputs({"tokens": 2, "hidden": 16, "inter": 8, "experts": 3, "topk": 2}, torch.float32,
                                "cpu", 0))
    with pytest.raises(ValueError, match="w13 .* do not fit"):
        moe.moe(args[0], args[1], args[2], args[3][:, :, :8], args[4])
    with pytest.raises(ValueError, match="scales apply to e4m3"):
        moe.moe(*args, w13_scale=torch.ones(1))
    with pytest.raises(ValueError, match="routing must be"):
        moe.make_inputs({"tokens": 2, "hidden": 16, "inter": 8, "experts": 3, "topk": 2, "routing": "zipf"},
                        torch.float32, "cpu", 0)


def test_zipf_routing_is_skewed_and_bytes_count_touched_experts():
    base = {"tokens": 64, "hidden": 8, "inter": 8, "experts": 64, "topk": 4}
    uni = moe.point_fields(base, moe.make_inputs(base, torch.float32, "cpu", 0))
    skew = {**base, "routing": "zipf:1.2"}
    zipf = moe.point_fields(skew, moe.make_inputs(skew, torch.float32, "cpu", 0))
    assert sum(uni["tokens_per_expert"]) == sum(zipf["tokens_per_expert"]) == 256
    assert zipf["experts_touched"] < uni["experts_touched"] and max(zipf["tokens_per_expert"]) > \
        2 * max(uni["tokens_per_expert"])
    # Weight bytes follow the experts touched: the uniform expectation without a draw, the draw's count with one.
    assert moe.bytes_moved({**base, "experts_touched": 10}, torch.bfloat16) < moe.bytes_moved(
        {**base, "experts_touched": 20}, torch.bfloat16)
    assert 60 < moe.expected_touched(base) < 64


# ---- router -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [
    {"tokens": 5, "experts": 16, "topk": 4},  # Qwen3-MoE: softmax, renormalized
    {"tokens": 4, "experts": 12, "topk": 1, "renormalize": False},
    {"tokens": 6, "experts": 32, "topk": 8, "scoring": "sigmoid", "n_group": 4, "topk_group": 2, "scaling": 2.5},
    {"tokens": 3, "experts": 24, "topk": 3, "scoring": "sigmoid", "n_group": 3, "topk_group": 1},  # odd groups
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_router_matches_reference_and_torch(shape, dtype):
    _check("router", rt.make_inputs(shape, dtype, "cpu", 0), dtype)


def test_router_matches_transformers_deepseek_v3_and_qwen3_moe():
    from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
    from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    e = 32
    logits, bias, *_ = rt.make_inputs({"tokens": 7, "experts": e, "topk": 6, "scoring": "sigmoid"}, torch.float32,
                                      "cpu", 3)
    cfg = DeepseekV3Config(hidden_size=e, n_routed_experts=e, num_experts_per_tok=6, n_group=4, topk_group=2,
                           routed_scaling_factor=2.5, norm_topk_prob=True)
    hf = DeepseekV3TopkRouter(cfg)
    with torch.no_grad():
        hf.weight.copy_(torch.eye(e))  # the router's linear passes the logits through
        hf.e_score_correction_bias.copy_(bias)
        _, w_hf, ids_hf = hf(logits)
    w, ids = rt.router(logits, bias, 6, 4, 2, "sigmoid", True, 2.5)
    order = ids_hf.sort(dim=-1).indices  # transformers' columns are unsorted
    mine = ids.long().sort(dim=-1).indices
    assert torch.equal(ids_hf.gather(1, order), ids.long().gather(1, mine))
    assert torch.allclose(w_hf.gather(1, order), w.gather(1, mine), rtol=1e-5, atol=1e-7)

    qcfg = Qwen3MoeConfig(hidden_size=e, num_experts=e, num_experts_per_tok=4, norm_topk_prob=True)
    q = Qwen3MoeTopKRouter(qcfg)
    with torch.no_grad():
        q.weight.copy_(torch.eye(e))
        _, w_q, ids_q = q(logits)
    w2, ids2 = rt.router(logits, None, 4)
    assert torch.equal(ids_q, ids2.long()) and torch.allclose(w_q, w2, rtol=1e-5, atol=1e-7)


def test_group_limit_changes_the_choice():
    # With groups, an expert outside the topk_group best groups is never chosen even when its score is high.
    args = list(rt.make_inputs({"tokens": 64, "experts": 32, "topk": 4, "scoring": "sigmoid"}, torch.float32,
                               "cpu", 4))
    free = rt.router(*args[:2], 4, 1, 1, "sigmoid")[1]
    grouped = rt.router(*args[:2], 4, 8, 1, "sigmoid")[1]  # one group of 4 experts: all four from it
    assert (grouped.long() // 4 == grouped.long()[:, :1] // 4).all()
    assert not torch.equal(free, grouped)


def test_router_rejects_bad_groups():
    logits = torch.zeros(2, 12)
    with pytest.raises(ValueError, match="n_group 5 must divide"):
        rt.router(logits, None, 2, 5, 1, "sigmoid")
    with pytest.raises(ValueError, match="group-limited routing is DeepSeek"):
        rt.router(logits, None, 2, 2, 1, "softmax")


# ---- attention_mla ------------------------------------------------------------------------------------------------

_MLA = {"batch": 3, "heads": 5, "context": [1, 17, 40], "max_context": 40, "kv_lora_rank": 32, "rope_dim": 16,
        "nope_dim": 24, "v_dim": 20}


@pytest.mark.parametrize("shape,dtype", [
    (_MLA, torch.float32),
    (_MLA, torch.float16),
    ({**_MLA, "kv_dtype": "fp8"}, torch.float16),  # fp16 q over an e4m3 latent cache
    ({**_MLA, "heads": 18, "batch": 2, "context": [33, 7], "max_context": 41}, torch.float32),  # two head blocks
])
def test_mla_matches_reference_and_torch(shape, dtype):
    _check("attention_mla", mla.make_inputs(shape, dtype, "cpu", 0), dtype)


def test_mla_splits_agree_and_reference_equals_the_unabsorbed_form():
    args = mla.make_inputs(_MLA, torch.float32, "cpu", 1)
    ref = mla.attention_mla_ref(*_f64(args))
    assert rel_error(mla.attention_mla(*args, chunk_size=16), ref) <= 1e-5
    assert rel_error(mla.attention_mla(*args, chunk_size=48), ref) <= 1e-5
    qn, qp, kv, lens, wuk, wuv, scale = _f64(args)
    r = wuk.shape[2]
    k = torch.cat([torch.einsum("bsr,hdr->bhsd", kv[..., :r], wuk),
                   kv[:, None, :, r:].expand(-1, qn.shape[1], -1, -1)], dim=-1)  # per-head keys, shared rope part
    v = torch.einsum("bsr,hvr->bhsv", kv[..., :r], wuv)
    s = torch.einsum("bhd,bhsd->bhs", torch.cat([qn, qp], -1), k) * scale
    valid = torch.arange(kv.shape[1])[None] < lens[:, None]
    o = torch.einsum("bhs,bhsv->bhv", torch.softmax(s.masked_fill(~valid[:, None], float("-inf")), -1), v)
    assert rel_error(ref, o) <= 1e-12


def test_mla_rejects_bad_inputs():
    args = list(mla.make_inputs(_MLA, torch.float32, "cpu", 0))
    with pytest.raises(ValueError, match="shapes do not fit"):
        mla.attention_mla(args[0], args[1], args[2][..., :40], *args[3:])
    with pytest.raises(ValueError, match="e4m3 cache needs kv_scale"):
        mla.attention_mla(*args[:2], args[2].to(FP8), *args[3:])


# ---- tuned block sizes --------------------------------------------------------------------------------------------

def _tune_module():
    import importlib.util
    from pathlib import Path

    path = Path(moe.__file__).resolve().parent.parent / "benchmarks" / "tune_moe.py"
    spec = importlib.util.spec_from_file_location("tune_moe", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tuning_keeps_the_fastest_correct_config_and_the_kernel_finds_it(tmp_path, monkeypatch):
    tune = _tune_module()
    shape = {"tokens": 3, "hidden": 32, "inter": 16, "experts": 4, "topk": 2}
    good = moe.default_config(6, 4, False)
    space = [good, {**good, "BLOCK_M": 32}]
    times = iter([2.0, 1.0])  # the second config "runs faster"
    best, ms = tune.tune(shape, torch.float32, "cpu", space, lambda fn: (fn(), next(times))[1])
    assert best == space[1] and ms == 1.0
    assert all(c["BLOCK_N"] == 128 and 128 % c["BLOCK_K"] == 0 for c in tune.search_space(True, "cpu"))
    path = tmp_path / "cpu.json"
    entry = {"experts": 4, "hidden": 32, "inter": 16, "dtype": "fp32", "config": best}
    tune.merge(path, [{**entry, "slots": 6}, {**entry, "slots": 512, "config": good}], {"device": "cpu"})
    tune.merge(path, [{**entry, "slots": 512, "config": space[1]}], {"device": "cpu"})  # replaces, keeps the other
    assert len(__import__("json").loads(path.read_text())["moe"]) == 2
    monkeypatch.setattr(moe, "TUNED_DIR", tmp_path)
    moe._tuned_entries.cache_clear()
    assert moe.tuned_config(8, 4, 32, 16, "fp32", "cpu") == (best, "configs/tuned/cpu.json")  # nearest: 6 slots
    assert moe.tuned_config(8, 4, 32, 16, "bf16", "cpu") is None  # no entry for the dtype
    path.write_text('{"moe": [{"experts": 4}]}')
    moe._tuned_entries.cache_clear()
    with pytest.raises(ValueError, match="cpu.json: moe: not a tuned-config file"):
        moe.tuned_config(8, 4, 32, 16, "fp32", "cpu")
    moe._tuned_entries.cache_clear()


# ---- the GPU autotune space of the MLA kernel, one config at a time; model-sized shapes on a GPU ------------------

def test_every_mla_autotune_config(monkeypatch):
    from tokenfleet.kernels._triton import INTERPRET

    dtype = torch.float16 if INTERPRET else torch.bfloat16
    device = "cpu" if INTERPRET else "cuda"
    shape = {**_MLA, "heads": 17, "context": [1, 70, 130], "max_context": 130}
    args = mla.make_inputs(shape, dtype, device, 0)
    ref = mla.attention_mla_ref(*_f64(args))
    for config in mla._mla_configs(interpret=False):
        monkeypatch.setattr(mla._mla_decode_kernel, "configs", [config])
        assert rel_error(mla.attention_mla(*args), ref) <= mla.tolerance(dtype), config


_GPU = [
    ("moe", {"tokens": 1, "hidden": 2048, "inter": 768, "experts": 128, "topk": 8}, torch.bfloat16),
    ("moe", {"tokens": 300, "hidden": 2048, "inter": 768, "experts": 128, "topk": 8, "routing": "zipf:1.0"},
     torch.bfloat16),
    ("moe", {"tokens": 33, "hidden": 1000, "inter": 300, "experts": 16, "topk": 4}, torch.float32),
    ("moe", {"tokens": 64, "hidden": 7168, "inter": 2048, "experts": 8, "topk": 2}, FP8),
    ("router", {"tokens": 300, "experts": 256, "topk": 8, "scoring": "sigmoid", "n_group": 8, "topk_group": 4,
                "scaling": 2.5}, torch.float32),
    ("router", {"tokens": 300, "experts": 128, "topk": 8}, torch.bfloat16),
    ("attention_mla", {"batch": 4, "heads": 128, "context": [1, 300, 4096, 2000], "max_context": 4096,
                       "kv_lora_rank": 512, "rope_dim": 64, "nope_dim": 128, "v_dim": 128}, torch.bfloat16),
    ("attention_mla", {"batch": 2, "heads": 16, "context": 1000, "kv_lora_rank": 512, "rope_dim": 64,
                       "nope_dim": 128, "v_dim": 128}, FP8),
]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled Triton)")
@pytest.mark.parametrize("op,shape,dtype", [pytest.param(*x, id=f"{x[0]}-{i}") for i, x in enumerate(_GPU)])
def test_ops_at_model_shapes_on_gpu(op, shape, dtype):
    entry = REGISTRY[op]
    args = entry.make_inputs(shape, dtype, "cuda", 0)
    refs = entry.outputs(entry.reference(*tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point()
                                                else a for a in args)))
    for out, ref in zip(entry.outputs(entry.triton(*args)), refs, strict=True):
        assert rel_error(out, ref) <= entry.tolerance(dtype), (op, shape)
