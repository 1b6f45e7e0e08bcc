"""Independent oracles for tokenfleet.model.spec (`make mutate`'s survivors): three small configs whose every count was
worked out by hand, term by term, in the comments beside each value — not by calling another counting function.

Dense (D): H 6, I 10, 2 layers, 4 heads of 3, 2 KV heads, vocab 11, q/k/v bias, QK-norm, untied.
  attention: q 6·4·3 = 72, k+v 2·6·2·3 = 72, o 4·3·6 = 72, bias 4·3 + 2·2·3 = 24, q/k norms 2·3 = 6 -> 246
  layer: + 2 norms 12 + MLP 3·6·10 = 180 -> 438; layers 876; embedding = head = 11·6 = 66; final norm 6 -> 1014
MoE (M): H 4, I 6, 3 layers (layer 0 dense, 1-2 MoE), 2 heads of 2, 1 KV head, vocab 5, 4 experts top-2 of width 3,
  1 shared. attention 4·2·2 + 2·4·1·2 + 2·2·4 = 48; dense MLP 3·4·6 = 72; expert 3·4·3 = 36; router 4·4 = 16.
  layers(e experts) = 3·(48 + 8) + 1·72 + 2·(16 + (e + 1)·36): all 632, top-2 488; emb = head = 20, norm 4.
MLA: H 8, 2 layers, 2 heads, q_lora 4, kv_lora 3, nope 2, rope 1, v 2 (qk 3).
  q 8·4 + 4 + 4·2·3 = 60; kv 8·(3 + 1) + 3 + 3·2·(2 + 2) = 59; o 2·2·8 = 32 -> 151 (no q_lora: q 8·2·3 = 48 -> 139).
"""

import pytest
from pydantic import ValidationError
from tokenfleet.model import spec as S
from tokenfleet.model.spec import ModelConfig, MoE

BASE = dict(id="t", hf_repo="none", rope_theta=1e4, rms_norm_eps=1e-6, max_position_embeddings=64, sources=["test"])


def dense(**kw) -> ModelConfig:
    return ModelConfig(**{**BASE, "family": "qwen2", "hidden_size": 6, "intermediate_size": 10, "num_layers": 2,
                          "num_heads": 4, "num_kv_heads": 2, "head_dim": 3, "vocab_size": 11, "attention_bias": True,
                          "qk_norm": True, **kw})


def moe(family="qwen3_moe", **kw) -> ModelConfig:
    return ModelConfig(**{**BASE, "family": family, "hidden_size": 4, "intermediate_size": 6, "num_layers": 3,
                          "num_heads": 2, "num_kv_heads": 1, "head_dim": 2, "vocab_size": 5,
                          "moe": {"num_experts": 4, "experts_per_token": 2, "moe_intermediate_size": 3,
                                  "shared_experts": 1, "dense_layers": 1}, **kw})


def mla(q_lora=4) -> ModelConfig:
    return ModelConfig(**{**BASE, "family": "deepseek_v3", "hidden_size": 8, "intermediate_size": 6, "num_layers": 2,
                          "num_heads": 2, "num_kv_heads": 2, "head_dim": 2, "vocab_size": 5,
                          "mla": {"q_lora_rank": q_lora, "kv_lora_rank": 3, "qk_nope_head_dim": 2,
                                  "qk_rope_head_dim": 1, "v_head_dim": 2}})


def test_dense_parameter_counts_term_by_term():
    d = dense()
    assert d.attention_params() == 246
    assert dense(attention_bias=False).attention_params() == 246 - 24
    assert dense(qk_norm=False).attention_params() == 246 - 6
    assert d.dense_mlp_params == 180
    assert d.embedding_params == d.lm_head_params == 66
    assert d.param_count() == 1014 == d.active_param_count()
    assert dense(tie_word_embeddings=True).param_count() == 1014 - 66
    assert S.layer_params(d) == 438  # fused QKV (4 + 2·2)·3 = 24 wide: 2·6 + 24·6 + 24 + 6 + 72 + 180
    assert S.param_counts(d) == {"layer": 438, "layers": 876, "embedding": 66, "lm_head": 66, "norm": 6,
                                 "total": 1014}
    assert S.param_counts(dense(tie_word_embeddings=True))["lm_head"] == 0
    assert d.router_params() == 0 and d.num_moe_layers == 0 and d.routed_expert_params() == 0
    assert d.is_dense and not moe().is_dense and not mla().is_dense


def test_dense_kv_flops_and_bytes():
    d = dense()
    assert d.kv_bytes_per_token(2) == 48  # k and v: 2 · 2 layers · 2 heads · 3 · 2 bytes
    assert d.attn_dims == d.absorbed_attn_dims() == (3, 3)
    assert d.attention_flops_per_token(5) == 480 == d.attention_flops(5)  # 2 · 2 layers · 4 heads · (3 + 3) · 5
    assert d.flops_per_token(0) == 1896  # 2 · (1014 − 66 embedding)
    assert d.flops_per_token(5) == 1896 + 480
    assert dense(tie_word_embeddings=True).flops_per_token(0) == 1896  # 2 · (948 − 66 + 66 multiplied as the head)
    assert d.weight_bytes(2) == 2028 and d.weight_bytes(1) == 1014
    assert d.decode_weight_bytes(1, 2) == d.decode_weight_bytes(50, 2) == 1896  # (1014 − 66 embedding) · 2
    assert dense(tie_word_embeddings=True).decode_weight_bytes(3, 1) == 948  # the tied table is read as the head
    # prefill, batch 2 of 3 tokens: 2·876·6 + attention over 2·(3·4/2) = 12 pairs: 2·(3+3)·4·2·12 = 1152,
    # head on the last tokens 2·6·11·2 = 264
    assert S.prefill_flops(d, 2, 3) == 10512 + 1152 + 264
    # (876 + 6 layers and norm, 66 head, 6 embedding rows · 6, 2 · 11 logits) · 2 bytes + 6 tokens · 48 KV bytes
    assert S.prefill_bytes(d, 2, 3, 2) == 2 * (882 + 66 + 36 + 22) + 288
    # decode, batch 2 at context 4: 2·2·(876 + 66) + attention over 2·5 pairs: 2·6·4·2·10
    assert S.decode_flops(d, 2, 4) == 3768 + 960
    # weights once (876 + 6 + 66), 2 embedding rows (12), 2 logit rows (22), at 2 bytes; KV: 2 · (4 + 2) · 48
    assert S.decode_bytes(d, 2, 4, 2) == 2 * (948 + 12 + 22) + 576


def test_dense_forward_ops():
    ops = {n: (f, b) for n, f, b in dense().forward_ops(tokens=3, attn_ctx=5, kv_read_tokens=7, logits_tokens=2,
                                                         weight_bytes=2, kv_bytes_per_token=48)}
    assert ops == {"attn_proj": (2 * 3 * 516, 1032),  # 2 layers · (246 + 12 norms) = 516 weights
                   "attn_core": (3 * 480, 7 * 48),
                   "mlp": (2 * 3 * 360, 720),  # 2 dense layers · 180
                   "lm_head": (2 * 2 * 72, 144)}  # 66 + the final norm's 6


def test_dense_tensor_parallel():
    d = dense()
    assert [d.kv_replication(tp) for tp in (1, 2, 4)] == [1.0, 1.0, 2.0]  # 2 KV heads: split, then copied
    assert [d.kv_bytes_per_token_per_gpu(tp, 2) for tp in (1, 2, 4)] == [48, 24, 24]
    assert S.tp_problem(d, 0) == "tp must be >= 1, got 0"
    assert S.tp_problem(d, 1) is None and S.tp_problem(d, 4) is None
    assert "num_heads 4 is not divisible by tp 3" in S.tp_problem(d, 3)
    odd = dense(num_heads=12, num_kv_heads=4)  # tp 6 divides the heads; 4 and 6 divide neither way
    assert "num_kv_heads 4 and tp 6" in S.tp_problem(odd, 6)
    assert S.tp_problem(odd, 2) is None and S.tp_problem(odd, 12) is None
    assert S.tp_problem(mla(), 2) is None  # MLA's latent is not split by heads


def test_moe_parameter_counts_term_by_term():
    m = moe()
    assert m.attention_params() == 48 and m.dense_mlp_params == 72 and m.expert_params == 36
    assert m.num_moe_layers == 2
    assert m.router_params() == 16
    assert moe(family="deepseek_v3").router_params() == 20  # + the 4-expert score-correction bias
    assert m.param_count() == 20 + 20 + 632 + 4
    assert m.active_param_count() == 20 + 20 + 488 + 4
    assert m.routed_expert_params() == 288  # 2 layers · 4 experts · 36
    assert m.nonrouted_params() == 676 - 288
    # the largest layer: an MoE layer's attention 48, norms 8, router 16 and 4 + 1 experts of 36
    assert S.layer_params(m) == 48 + 8 + 16 + 5 * 36
    assert S.param_counts(m)["layers"] == 632 and S.param_counts(m)["total"] == 676
    assert m.kv_bytes_per_token(2) == 24  # 2 · 3 layers · 1 head · 2 · 2 bytes
    assert m.flops_per_token(0) == 2 * (532 - 20)


def test_moe_expert_bytes():
    m = moe()
    # E·(1 − (1 − k/E)^B) = 4·(1 − 0.5^B)
    assert [m.expected_experts_touched(b) for b in (0, 1, 2, 3)] == [0, 2, 3, 3.5]
    assert dense().expected_experts_touched(8) == 0
    # always-read 676 − 288 routed − 20 embedding = 368, plus 2 layers · 3 experts · 36
    assert m.decode_weight_bytes(2, 1) == 368 + 216
    assert m.experts_per_rank(2, 2) == 3 and m.experts_per_rank(4) == 1 and dense().experts_per_rank(2) == 0
    assert m.ep_weight_bytes_per_gpu(2, 2, 1) == 388 + 2 * 3 * 36
    assert m.ep_weight_bytes_per_gpu(4, 0, 2) == (388 + 2 * 1 * 36) * 2
    # 1 token per rank, 2 ranks: each copy untouched with (1 − 2/4)^2 = 0.25; 2 layers · 2 held · 0.75 · 36
    assert m.ep_expert_bytes_read(1, 2, 0, 1) == pytest.approx(108)
    # 4 redundant copies: slots 8, untouched (1 − 2/8)^2 = 0.5625, held (4 + 4)/2 = 4: 2 · 4 · 0.4375 · 36 · 2 bytes
    assert m.ep_expert_bytes_read(1, 2, 4, 2) == pytest.approx(252)
    assert dense().ep_expert_bytes_read(1, 2) == 0
    assert m.alltoall_bytes(3, 2) == 48 and dense().alltoall_bytes(3, 2) == 0  # 3 tokens · top-2 · H 4 · 2 bytes
    assert m.kv_replication(2) == 2.0


def test_moe_step_counts():
    m = moe()
    # 1 sequence of 2 tokens: 2·488·2 + attention over 3 pairs 2·(2+2)·2 heads·3 layers·3 + head 2·4·5
    assert S.prefill_flops(m, 1, 2) == 1952 + 144 + 40
    # batch 1 at context 0 reads 632 − 288 routed + 2 layers · 2 experts · 36 = 488, + norm 4 + head 20, 1 embedding
    # row 4 and 1 logit row 5 at 1 byte, KV 1·(0 + 2)·12
    assert S.decode_bytes(m, 1, 0, 1) == 488 + 24 + 9 + 24
    assert S.decode_bytes(m, 1, 0, 1, experts_touched=5) == 632 - 288 + 5 * 36 + 24 + 9 + 24
    # prefill of 1·2 tokens touches 2 · expected(2) = 6 experts: 632 − 288 + 216 = 560; norm 4, head 20,
    # 2 embedding rows 8, 5 logits
    assert S.prefill_bytes(m, 1, 2, 1) == (560 + 4) + 20 + 8 + 5 + 2 * 12
    assert S.decode_flops(m, 1, 0) == 2 * (488 + 20) + 2 * 4 * 2 * 3 * 1


def test_moe_forward_ops():
    ops = {n: (f, b) for n, f, b in moe().forward_ops(tokens=2, attn_ctx=3, kv_read_tokens=4, logits_tokens=1,
                                                       weight_bytes=1, kv_bytes_per_token=12)}
    assert ops == {"attn_proj": (2 * 2 * 168, 168),  # 3 layers · (48 + 8)
                   "attn_core": (2 * 144, 48),  # 2·3·2·(2 + 2)·3 per token
                   "mlp": (2 * 2 * 72, 72),  # the one dense layer
                   # 2 tokens · 2 layers · (2 + 1 shared) · 36, router 2 · 16; reads expected(2) = 3 + 1 shared
                   "experts": (2 * 2 * 2 * 3 * 36 + 2 * 2 * 32, 2 * 4 * 36 + 32),
                   "lm_head": (2 * 1 * 24, 24)}


def test_mla_counts():
    m = mla()
    assert m.attention_params() == 151
    assert mla(q_lora=None).attention_params() == 139
    assert m.kv_bytes_per_token(2) == 16  # (3 + 1) · 2 layers · 2 bytes
    assert m.attn_dims == (3, 2) and m.absorbed_attn_dims() == (4, 3)
    assert m.attention_flops(5) == 200 and m.attention_flops(5, absorbed=True) == 280  # 2·2·2·(5 or 7)·5
    assert m.kv_replication(4) == 4.0 and m.kv_bytes_per_token_per_gpu(4, 2) == 16
    core = {n: f for n, f, _ in m.forward_ops(1, 5, 1, 0, 2, 16, absorbed=0.5)}["attn_core"]
    assert core == 240  # half of each form


def test_moe_layer_rule_and_validation():
    rule = MoE(num_experts=4, experts_per_token=2, moe_intermediate_size=3, dense_layers=1, sparse_step=2,
               mlp_only_layers=[3])
    assert [rule.is_moe_layer(i) for i in range(6)] == [False, True, False, False, False, True]
    ok = dict(num_experts=8, experts_per_token=2, moe_intermediate_size=3)
    MoE(**ok, n_group=4, topk_group=4)  # 2 experts a group, every group allowed: possible
    for bad in ({"experts_per_token": 9}, {"n_group": 3}, {"n_group": 2, "topk_group": 3},
                {"n_group": 8, "topk_group": 1}):
        with pytest.raises(ValidationError, match="routing"):
            MoE(**{**ok, **bad})
    with pytest.raises(ValidationError, match="num_heads 4 is not a multiple of num_kv_heads 3"):
        dense(num_kv_heads=3)


def test_decoder_layer_count_without_bias_or_norms_and_the_largest_moe_layer():
    assert S.layer_params(dense(attention_bias=False, qk_norm=False)) == 438 - 24 - 6
    # a dense first layer wider than an MoE layer's experts: 3·4·60 = 720 > 16 + 5·36 = 196
    assert S.layer_params(moe(intermediate_size=60)) == 48 + 8 + 720
    # every layer MoE: the dense MLP is not in the model, however wide
    all_moe = moe(intermediate_size=60, moe={"num_experts": 4, "experts_per_token": 2, "moe_intermediate_size": 3,
                                             "shared_experts": 1})
    assert S.layer_params(all_moe) == 48 + 8 + 196


def test_defaults_and_the_measured_experts_in_prefill():
    assert dense().flops_per_token() == 1896  # context 0 by default
    # prefill with 5 measured experts touched: 632 − 288 + 5·36 = 524, norm 4, head 20, 2 rows 8, 5 logits, KV 24
    assert S.prefill_bytes(moe(), 1, 2, 1, experts_touched=5) == 528 + 20 + 8 + 5 + 24
    # MLA without MoE: layers 2·(151 + 16) + 2 dense MLPs 3·8·6 = 622; decode of 1 token at context 0:
    # 2·(622 + 8·5 head) + attention over 1 pair 2·(3 + 2)·2 heads·2 layers
    assert S.decode_flops(mla(), 1, 0) == 2 * (622 + 40) + 40
    assert {"llama-3.1-8b", "qwen3-30b-a3b", "deepseek-v3"} <= set(S.all_model_configs())


def test_default_widths_are_two_bytes():
    d, m = dense(), moe()
    assert d.kv_bytes_per_token() == 48 and d.kv_bytes_per_token_per_gpu(4) == 24
    assert d.weight_bytes() == 2028 and d.decode_weight_bytes(1) == 1896
    # no redundant copies, 2 bytes: (388 + 2 layers · 4/2 experts · 36) · 2; read: 2 · 2 · 0.75 · 36 · 2
    assert m.ep_weight_bytes_per_gpu(2) == (388 + 144) * 2
    assert m.ep_expert_bytes_read(1, 2) == pytest.approx(216)
    assert dense().ep_weight_bytes_per_gpu(2) == 2028  # no MoE: every weight on every rank


def test_expert_parallel_reads_by_tokens_of_the_whole_group():
    m = moe()
    # 2 tokens per rank on 2 ranks: 4 tokens, each copy untouched with 0.5^4 = 0.0625; 2 layers · 2 held · 36 · 1 byte
    assert m.ep_expert_bytes_read(2, 2, 0, 1) == pytest.approx(2 * 2 * 0.9375 * 36)
    assert m.ep_expert_bytes_read(0, 2, 0, 1) == 0  # no token: no expert read
    # a quarter token per rank on 2 ranks: 1 − 0.5^0.5
    assert m.ep_expert_bytes_read(0.25, 2, 0, 1) == pytest.approx(2 * 2 * (1 - 0.5 ** 0.5) * 36)


def test_forward_ops_weight_width_and_absorbed_default():
    ops = {n: b for n, _, b in moe().forward_ops(tokens=2, attn_ctx=3, kv_read_tokens=4, logits_tokens=1,
                                                  weight_bytes=2, kv_bytes_per_token=12)}
    assert ops["experts"] == (2 * 4 * 36 + 32) * 2  # expected(2) = 3 touched + 1 shared, router 32, at 2 bytes
    # MLA: not absorbed unless told: 1 token over 5 keys, 2·2·2·(3 + 2)·5
    assert {n: f for n, f, _ in mla().forward_ops(1, 5, 1, 0, 2, 16)}["attn_core"] == 200


def test_sparse_step_counts_from_layer_one():
    rule = MoE(num_experts=4, experts_per_token=2, moe_intermediate_size=3, sparse_step=3)
    assert [rule.is_moe_layer(i) for i in range(7)] == [False, False, True, False, False, True, False]


def test_mla_without_moe_counts_dense_mlps():
    m = mla()  # 2 layers of attention 151 + norms 16 + dense MLP 3·8·6 = 144: 622; embedding = head = 40, norm 8
    assert S.param_counts(m) == {"layer": 311, "layers": 622, "embedding": 40, "lm_head": 40, "norm": 8,
                                 "total": 710}
    assert m.param_count() == m.active_param_count() == 710
    # decode of 1 token at context 0, 1 byte: 622 + 8 + 40 head, 1 embedding row 8, 5 logits; KV (0 + 2)·(3 + 1)·2
    assert S.decode_bytes(m, 1, 0, 1) == 670 + 8 + 5 + 16
