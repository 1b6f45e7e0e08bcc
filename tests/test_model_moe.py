"""The MoE families of tokenfleet.model (Qwen3-MoE, DeepSeek-V3 with MLA): logits match transformers'
Qwen3MoeForCausalLM and DeepseekV3ForCausalLM at small random configs with odd sizes (prefill and a decode step with
the cache), loaded from a checkpoint save_pretrained wrote; the backends agree; the routers and expert layers agree
with each other at edge cases; routing skew and expert counts; the counts of the spec."""

from __future__ import annotations

import pytest
import torch

# The dense tests' pinned Triton config (an autouse fixture, active here once imported) and token draw.
from test_model import _one_config, tokens  # noqa: F401
from tokenfleet.kernels import rel_error
from tokenfleet.model import decoder as M
from tokenfleet.model import hf as HF
from tokenfleet.model import moe as E
from tokenfleet.model.spec import load_model_config, param_counts

TINY = ["tiny-qwen3-moe", "tiny-deepseek-v3"]




def _perturb(hf):
    with torch.no_grad():  # HF initialises norms to 1 and the correction bias to 0: perturb so a swap would show
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
        for name, b in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn_like(b))
        for name, p in hf.named_parameters():
            if name.endswith("gate.weight"):  # router logits of unit scale: routing depends on the input
                p.normal_(0, p.shape[1] ** -0.5)


def _hf_qwen3_moe(norm_topk: bool, sparse_step: int = 1, mlp_only=()):
    transformers = pytest.importorskip("transformers")
    conf = transformers.Qwen3MoeConfig(
        vocab_size=253, hidden_size=56, intermediate_size=72, moe_intermediate_size=37, num_hidden_layers=3,
        num_attention_heads=6, num_key_value_heads=2, head_dim=20, num_experts=7, num_experts_per_tok=3,
        norm_topk_prob=norm_topk, decoder_sparse_step=sparse_step, mlp_only_layers=list(mlp_only),
        rms_norm_eps=1e-6, max_position_embeddings=512, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    conf._experts_implementation = "eager"  # HF's default grouped_mm refuses rows of odd byte widths
    torch.manual_seed(0)
    return transformers.Qwen3MoeForCausalLM(conf).eval()


def _hf_deepseek_v3(q_lora: int | None, interleave: bool = True):
    transformers = pytest.importorskip("transformers")
    conf = transformers.DeepseekV3Config(
        vocab_size=251, hidden_size=48, intermediate_size=88, moe_intermediate_size=21, num_hidden_layers=3,
        num_attention_heads=3, num_key_value_heads=3, n_shared_experts=1, n_routed_experts=12,
        num_experts_per_tok=3, n_group=4, topk_group=2, first_k_dense_replace=1, routed_scaling_factor=2.5,
        q_lora_rank=q_lora, kv_lora_rank=28, qk_nope_head_dim=12, qk_rope_head_dim=6, v_head_dim=10,
        rope_interleave=interleave, max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    conf._experts_implementation = "eager"
    torch.manual_seed(1)
    return transformers.DeepseekV3ForCausalLM(conf).eval()


HF_CASES = {
    "qwen3_moe": lambda: _hf_qwen3_moe(True),
    "qwen3_moe-unnormed-sparse2": lambda: _hf_qwen3_moe(False, sparse_step=2, mlp_only=(0,)),
    "deepseek_v3": lambda: _hf_deepseek_v3(17),
    "deepseek_v3-no-q-lora-no-interleave": lambda: _hf_deepseek_v3(None, interleave=False),
}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_matches_transformers(tmp_path, case):
    hf = HF_CASES[case]()
    _perturb(hf)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    m = HF.from_pretrained(tmp_path, backend="torch", dtype="fp32")
    assert m.cfg.family == case.split("-")[0]
    bias = sum(b.numel() for n, b in hf.named_buffers() if n.endswith("e_score_correction_bias"))  # a buffer in HF
    assert param_counts(m.cfg)["total"] == sum(p.numel() for p in hf.parameters()) + bias
    if m.cfg.moe.sparse_step == 2:  # layers 0 (mlp_only) and 2 (odd step) dense, layer 1 MoE
        assert [lw.moe is not None for lw in m.weights.layers] == [False, True, False]
    x = tokens(2, 9, m.cfg.vocab_size, seed=3)
    with torch.no_grad():
        want = hf(x).logits  # [B, S, V]
    for backend in ("torch", "reference"):
        mb = m.with_backend(backend)
        torch.testing.assert_close(mb.forward(x), want, atol=3e-5, rtol=1e-4)
        cache = mb.new_cache(2, 9)  # prefill 8 tokens into the cache, then one decode step
        first = M.prefill(mb, x[:, :8], cache)
        second = M.decode_one_token(mb, x[:, 8], cache)
        torch.testing.assert_close(first, want[:, 7], atol=3e-5, rtol=1e-4)
        torch.testing.assert_close(second, want[:, 8], atol=3e-5, rtol=1e-4)
    # Greedy generation with the cache follows HF's argmax at every step.
    out = M.generate(m, x, 4)
    with torch.no_grad():
        picks = hf(torch.cat([x, out], 1)).logits[:, 8:12].argmax(-1)
    assert torch.equal(out, picks)


@pytest.mark.parametrize("name", TINY)
def test_backends_agree_with_the_reference(name, monkeypatch):
    """prefill + decode with the cache on every backend against the reference's full recompute (fp32; triton runs
    its kernels under the interpreter: the dense ops, the router, the fused MoE experts and MLA decode)."""
    from tokenfleet.kernels import attention_mla, router
    from tokenfleet.kernels import moe as kmoe

    calls = {"router": 0, "moe": 0, "attention_mla": 0}

    def spy(mod, fn):
        real = getattr(mod, fn)

        def counted(*a, **kw):
            calls[fn] += 1
            return real(*a, **kw)
        monkeypatch.setattr(mod, fn, counted)

    spy(router, "router")
    spy(kmoe, "moe")
    spy(attention_mla, "attention_mla")
    m = M.build_model(name, dtype="fp32", seed=2)
    x = tokens(3, 7, m.cfg.vocab_size, seed=4)
    want = m.with_backend("reference").forward(x)[:, 5:]
    for backend in ("torch", "compile", "triton"):
        mb = m.with_backend(backend)
        cache = mb.new_cache(3, 7)
        got = torch.stack([M.prefill(mb, x[:, :6], cache), M.decode_one_token(mb, x[:, 6], cache)], 1)
        assert rel_error(got, want) < 1e-4, backend
        if backend != "triton":
            assert calls == {"router": 0, "moe": 0, "attention_mla": 0}, backend
    moe_layers = m.cfg.num_moe_layers
    assert calls["router"] == calls["moe"] == 2 * moe_layers  # prefill and the decode step, each MoE layer
    assert calls["attention_mla"] == (m.cfg.num_layers if m.cfg.mla else 0)  # the decode step, each layer


def test_triton_routers_match_the_models_routers():
    """The triton backend's routers (kernels/router.py) choose the experts moe.route_* choose, with their weights
    (fp32 ids compared as sets per token: the kernel breaks ties to the lower id, torch.topk leaves them open)."""
    from tokenfleet.model import backends as B

    g = torch.Generator().manual_seed(5)
    logits = torch.randn(37, 16, generator=g)
    bias = 0.1 * torch.randn(16, generator=g)
    skew = E.routing_skew(16, 1.5, seed=1, device="cpu")
    cases = [(B.triton_route_softmax(logits, 3, norm), E.route_softmax(logits, 3, norm)) for norm in (True, False)]
    cases += [(B.triton_route_sigmoid(logits, 3, True, b, 4, 2, 2.5, s), E.route_sigmoid(logits, 3, True, b, 4, 2,
                                                                                         2.5, s))
              for b in (None, bias) for s in (None, skew)]
    cases.append((B.triton_route_sigmoid(logits, 4, False, bias, 1, 1, 1.0), E.route_sigmoid(logits, 4, False, bias,
                                                                                           1, 1, 1.0)))
    for (w, ids), (want_w, want_ids) in cases:
        assert ids.dtype == torch.int32 and w.dtype == torch.float32
        torch.testing.assert_close(ids.long(), want_ids)  # both best first
        torch.testing.assert_close(w, want_w, atol=1e-6, rtol=1e-5)
    # Under a skew the softmax router keeps the model's own (no choice-only term in the kernel's softmax scoring).
    w, ids = B.triton_route_softmax(logits, 3, True, skew)
    want_w, want_ids = E.route_softmax(logits, 3, True, skew)
    assert torch.equal(ids, want_ids) and torch.equal(w, want_w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_mla_decode_matches_the_reference(dtype):
    """The triton backend's MLA decode (the attention_mla kernel on views of wkv_b) against moe's fp32 reference:
    ragged context lengths in a longer cache, the latent cache as the model lays it out [B, 1, S, r + rope]."""
    from tokenfleet.model import backends as B

    g = torch.Generator().manual_seed(6)
    b, h, nope, rope, v, r, s = 3, 5, 16, 16, 24, 32, 40

    def rnd(*shape, std=1.0):
        return (std * torch.randn(*shape, generator=g)).to(dtype)

    q_nope = rnd(b, h, nope + rope)[..., :nope]  # a strided slice, as the model's q[..., :nope]
    q_rope, kv = rnd(b, h, rope), rnd(b, 1, s, r + rope)
    wkv_b = rnd(h * (nope + v), r, std=r**-0.5)
    lens = torch.tensor([1, 17, 33], dtype=torch.int32)
    scale = E.mla_scale(nope + rope)
    got = B.triton_mla_decode(q_nope, q_rope, kv, lens, wkv_b, scale)
    want = E.mla_decode_reference(q_nope.float(), q_rope.float(), kv.float(), lens, wkv_b.float(), scale)
    assert got.shape == (b, h, v) and got.dtype == dtype
    assert rel_error(got.float(), want) < (2e-3 if dtype == torch.float16 else 1e-5)


def test_compile_bf16_runs_grouped_mm():
    """bf16 under torch.compile: the experts as torch._grouped_mm (the form compile traces in bf16)."""
    m = M.build_model("tiny-qwen3-moe", "compile", dtype="bf16", seed=3)
    x = tokens(2, 5, m.cfg.vocab_size, seed=5)
    cache = m.new_cache(2, 6)
    got = torch.stack([M.prefill(m, x, cache), M.decode_one_token(m, x[:, -1], cache)], 1)
    ref = m.with_backend("reference")
    want = ref.forward(torch.cat([x, x[:, -1:]], 1))[:, 4:]
    assert rel_error(got.float(), want.float()) < 6e-2
    assert m.experts is E.experts_grouped_mm  # picked when the model was built, outside the trace
    assert m.with_backend("torch").experts is E.experts_grouped_mm
    assert M.build_model("tiny-qwen3-moe", "compile", dtype="fp32").experts is E.experts_gathered


# --- routers and expert layers ---------------------------------------------------------------------------------


def _experts(e=6, d=24, i=12, seed=0):  # rows of 16-byte multiples: torch._grouped_mm takes no others
    g = torch.Generator().manual_seed(seed)
    return torch.randn(e, 2 * i, d, generator=g) / d**0.5, torch.randn(e, d, i, generator=g) / i**0.5


@pytest.mark.parametrize("case", ["ragged", "all-on-one", "top1", "one-token"])
def test_expert_layers_agree(case):
    w13, w2 = _experts()
    t, k = {"ragged": (11, 2), "all-on-one": (9, 1), "top1": (10, 1), "one-token": (1, 3)}[case]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(t, 24, generator=g)
    ids = torch.stack([torch.randperm(6, generator=g)[:k] for _ in range(t)])
    if case == "all-on-one":
        ids.fill_(4)  # every other expert gets no token
    weights = torch.rand(t, k, generator=g)
    want = torch.zeros(t, 24)
    for a in range(t):  # the definition, token by token
        for j in range(k):
            gu = w13[ids[a, j]] @ x[a]
            want[a] += weights[a, j] * (w2[ids[a, j]] @ (torch.nn.functional.silu(gu[:12]) * gu[12:]))
    for fn in (E.experts_reference, E.experts_loop, E.experts_grouped_mm, E.experts_gathered):
        torch.testing.assert_close(fn(x, w13, w2, ids, weights), want, atol=1e-5, rtol=1e-5)


def test_sigmoid_router_is_group_limited():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 16, generator=g)
    bias = 0.1 * torch.randn(16, generator=g)
    w, ids = E.route_sigmoid(logits, 3, True, bias, n_group=4, topk_group=2, scale=2.5)
    assert torch.allclose(w.sum(-1), torch.full((64,), 2.5))
    groups = (ids // 4)
    assert all(len(set(r.tolist())) <= 2 for r in groups)  # at most topk_group groups per token
    # the chosen experts are the top 3 of the biased scores among the two best groups (by their top-2 sums)
    choice = logits.sigmoid() + bias
    for a in range(64):
        best = choice[a].view(4, 4).topk(2, -1).values.sum(-1).topk(2).indices
        allowed = torch.cat([torch.arange(4) + 4 * int(b) for b in best])
        top = allowed[choice[a, allowed].topk(3).indices]
        assert set(top.tolist()) == set(ids[a].tolist())


def test_softmax_router_without_and_with_renormalisation():
    logits = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    w, ids = E.route_softmax(logits, 2, False)
    assert torch.allclose(w, torch.softmax(logits, -1).topk(2).values)
    w, _ = E.route_softmax(logits, 2, True)
    assert torch.allclose(w.sum(-1), torch.ones(5))


def test_skewed_routing_concentrates_tokens():
    m = M.build_model("tiny-qwen3-moe", dtype="fp32", seed=0)
    x = tokens(4, 32, m.cfg.vocab_size, seed=1)
    uniform = M.expert_counts(m, lambda mm: mm.forward(x))
    skew = E.routing_skew(m.cfg.moe.num_experts, 2.0, seed=0, device="cpu")
    skewed = M.expert_counts(m.with_routing(skew), lambda mm: mm.forward(x))
    assert uniform.shape == skewed.shape == (2, 8)
    assert (uniform.sum(1) == skewed.sum(1)).all() and (uniform.sum(1) == 4 * 32 * 2).all()
    top = int(skew.argmax())  # the rank-1 expert takes the most tokens under skew, far more than uniform gives it
    assert (skewed.argmax(1) == top).all() and (skewed[:, top] > 2 * uniform[:, top]).all()


# --- spec counts ---------------------------------------------------------------------------------------------


def test_published_counts_and_layer_rules():
    for name, cfg_layers in (("qwen3-30b-a3b", 48), ("qwen3-235b-a22b", 94), ("deepseek-v3", 58)):
        cfg = load_model_config(name)
        assert cfg.num_moe_layers == cfg_layers
        assert param_counts(cfg)["total"] == cfg.params_exact == cfg.param_count()
    ds = load_model_config("deepseek-v3")
    assert ds.kv_bytes_per_token(2) == (512 + 64) * 61 * 2
    # a decode step that touched fewer experts reads fewer bytes; all experts: every weight but the embedding
    few, expected = M.decode_bytes(ds, 1, 0, 1, experts_touched=58 * 8), M.decode_bytes(ds, 1, 0, 1)
    assert few == pytest.approx(expected, rel=1e-9)  # batch 1: the expectation is exactly k per layer
    assert M.decode_bytes(ds, 256, 0, 1, experts_touched=58 * 100) < M.decode_bytes(ds, 256, 0, 1)


def test_mla_cache_holds_the_latent():
    cfg = load_model_config("tiny-deepseek-v3")
    cache = M.KVCache(cfg, 2, 10, "fp32")
    assert cache.k.shape == (3, 2, 1, 64, 32 + 16) and cache.v.shape[-1] == 32
    assert cache.v.data_ptr() == cache.k.data_ptr() and cache.nbytes == cache.k.nbytes
