"""Bytes and FLOPs of one decode step and one prefill of real configs, counted by hand here, term by term (each
projection, the norms, the embedding rows, the LM head, the KV read and written, the logits), and compared with
`tokenfleet.model.spec`'s counts. An independent oracle: nothing here calls the function that made the value, and
the shapes are transcribed from the published config.json (checked against the YAML first), so a count that drops
or doubles a term (the LM head, a projection, the KV write) fails here.

Conventions the counts follow (spec.py's, stated so the hand count can follow them): 2 FLOPs per multiply-add;
norm weights counted as matmul parameters in the FLOPs (<0.01%); attention QK^T and PV at 2 FLOPs per MAC; a decode
token attends to context + 1 positions (the new one written first); prefill is causal (S(S+1)/2 pairs per sequence)
and takes logits for the last token only; a step reads each weight once, B rows of the embedding table, writes B
logit rows; KV read for context + 1 positions and written once per new token."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from tokenfleet.model import fp8 as F8
from tokenfleet.model import spec as S

# ---- Llama 3.1 8B (config.json of meta-llama/Meta-Llama-3.1-8B): untied LM head, GQA 32/8, no biases ----------
L8 = dict(hidden=4096, inter=14336, layers=32, heads=32, kv_heads=8, head_dim=128, vocab=128256)
L8_TERMS = {  # one layer's parameters, by name
    "q_proj": 4096 * 32 * 128,  # 16,777,216
    "k_proj": 4096 * 8 * 128,  # 4,194,304
    "v_proj": 4096 * 8 * 128,  # 4,194,304
    "o_proj": 32 * 128 * 4096,  # 16,777,216
    "gate_proj": 4096 * 14336,  # 58,720,256
    "up_proj": 4096 * 14336,  # 58,720,256
    "down_proj": 14336 * 4096,  # 58,720,256
    "input_layernorm": 4096,
    "post_attention_layernorm": 4096,
}
L8_LAYER = 218_112_000  # the sum of L8_TERMS, added up by hand
L8_EMBED = L8_HEAD = 128256 * 4096  # 525,336,576 each (untied: two tables)
L8_FINAL_NORM = 4096
L8_KV_PER_TOKEN = 2 * 32 * 8 * 128 * 2  # K and V, 32 layers, 8 KV heads x 128, bf16: 131,072 bytes

# ---- Qwen3 0.6B (config.json of Qwen/Qwen3-0.6B): tied embeddings, q/k RMSNorm over head_dim, q wider than hidden
Q06 = dict(hidden=1024, inter=3072, layers=28, heads=16, kv_heads=8, head_dim=128, vocab=151936)
Q06_TERMS = {
    "q_proj": 1024 * 16 * 128,  # 2,097,152
    "k_proj": 1024 * 8 * 128,  # 1,048,576
    "v_proj": 1024 * 8 * 128,  # 1,048,576
    "o_proj": 16 * 128 * 1024,  # 2,097,152
    "q_norm": 128,
    "k_norm": 128,
    "gate_proj": 1024 * 3072,  # 3,145,728
    "up_proj": 1024 * 3072,
    "down_proj": 3072 * 1024,
    "input_layernorm": 1024,
    "post_attention_layernorm": 1024,
}
Q06_LAYER = 15_730_944
Q06_TABLE = 151936 * 1024  # 155,582,464: the embedding, and (tied) the LM head too
Q06_FINAL_NORM = 1024
Q06_KV_PER_TOKEN = 2 * 28 * 8 * 128 * 2  # 114,688 bytes

CASES = {
    "llama-3.1-8b": (L8, L8_TERMS, L8_LAYER, L8_HEAD, L8_FINAL_NORM, L8_KV_PER_TOKEN),
    "qwen3-0.6b": (Q06, Q06_TERMS, Q06_LAYER, Q06_TABLE, Q06_FINAL_NORM, Q06_KV_PER_TOKEN),
}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # e4m3 in fp8 serving


def _case(name: str) -> SimpleNamespace:
    """The config as loaded (its shapes checked against the transcription) and the hand counts, by short names."""
    cfg = S.load_model_config(name)
    shapes, terms, layer, head, final_norm, kv_token = CASES[name]
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
            cfg.vocab_size) == tuple(shapes.values()), "the YAML no longer matches the transcribed config.json"
    return SimpleNamespace(cfg=cfg, terms=terms, layer=layer, head=head, final_norm=final_norm, kv_token=kv_token,
                           L=shapes["layers"], H=shapes["hidden"], V=shapes["vocab"], nh=shapes["heads"],
                           hd=shapes["head_dim"], proj=sum(terms[p] for p in PROJECTIONS))


def test_hand_counts_add_up_to_the_published_parameter_counts():
    """The hand count itself, against the exact counts of an independent source (keras-hub presets)."""
    assert sum(L8_TERMS.values()) == L8_LAYER
    assert 32 * L8_LAYER + L8_EMBED + L8_HEAD + L8_FINAL_NORM == 8_030_261_248
    assert sum(Q06_TERMS.values()) == Q06_LAYER
    assert 28 * Q06_LAYER + Q06_FINAL_NORM == 440_467_456  # Qwen's "0.44B non-embedding"
    assert 28 * Q06_LAYER + Q06_FINAL_NORM + Q06_TABLE == 596_049_920  # tied: the table once


@pytest.mark.parametrize("name", sorted(CASES))
def test_decode_step_bytes_by_hand(name):
    c = _case(name)
    B, ctx = 4, 1000
    weights = 2 * (c.L * c.layer + c.final_norm)  # every layer weight once, and the final norm, bf16
    lm_head = 2 * c.head  # the LM head once (tied or not, the table is read as the head)
    embed_rows = 2 * B * c.H  # B rows gathered, not the table
    logits = 2 * B * c.V  # B rows of logits written
    kv_read = B * (ctx + 1) * c.kv_token  # context + the new position, per sequence
    kv_write = B * c.kv_token  # the new token's K and V
    assert S.decode_bytes(c.cfg, B, ctx, 2) == weights + lm_head + embed_rows + logits + kv_read + kv_write
    # fp8 serving: the seven projections in 1 byte, norms / embedding / head in bf16, KV in e4m3
    f8 = (weights - c.L * c.proj) + lm_head + embed_rows + logits + (kv_read + kv_write) // 2
    assert F8.decode_bytes(c.cfg, B, ctx, 1) == f8
    # the capacity model's weight bytes per decode step (dense: every weight but the embedding table)
    assert c.cfg.decode_weight_bytes(B, 2) == weights + lm_head


@pytest.mark.parametrize("name", sorted(CASES))
def test_decode_step_flops_by_hand(name):
    c = _case(name)
    B, ctx = 4, 1000
    matmuls = 2 * B * c.L * c.layer  # every layer weight, one multiply-add per token (norms included by convention)
    lm_head = 2 * B * c.H * c.V
    qk = 2 * B * c.L * c.nh * c.hd * (ctx + 1)  # QK^T over context + 1 keys
    pv = 2 * B * c.L * c.nh * c.hd * (ctx + 1)  # PV over as many values
    assert S.decode_flops(c.cfg, B, ctx) == matmuls + lm_head + qk + pv
    # the capacity model's per-token count: the same terms for one token at `ctx` keys (the final norm counted as a
    # matmul parameter there, not in decode_flops)
    assert c.cfg.flops_per_token(ctx) == 2 * (c.L * c.layer + c.final_norm + c.H * c.V) + 4 * c.L * c.nh * c.hd * ctx


@pytest.mark.parametrize("name", sorted(CASES))
def test_prefill_bytes_and_flops_by_hand(name):
    c = _case(name)
    B, Sq = 2, 512
    tokens = B * Sq
    weights = 2 * (c.L * c.layer + c.final_norm)
    lm_head = 2 * c.head
    embed_rows = 2 * tokens * c.H
    logits = 2 * B * c.V  # the last token's logits only
    kv_write = tokens * c.kv_token
    assert S.prefill_bytes(c.cfg, B, Sq, 2) == weights + lm_head + embed_rows + logits + kv_write
    f8 = (weights - c.L * c.proj) + lm_head + embed_rows + logits + kv_write // 2
    assert F8.prefill_bytes(c.cfg, B, Sq, 1) == f8
    pairs = B * Sq * (Sq + 1) // 2  # causal: token i attends to i + 1 keys
    matmuls = 2 * tokens * c.L * c.layer
    qk = pv = 2 * c.L * c.nh * c.hd * pairs
    lm = 2 * B * c.H * c.V  # the last token of each sequence
    assert S.prefill_flops(c.cfg, B, Sq) == matmuls + qk + pv + lm
