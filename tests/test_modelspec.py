"""Parameter, KV, FLOP and byte counting of tokenfleet.model.spec against the exact counts in facts.yaml."""

import pytest
from tokenfleet.model.spec import all_model_configs, load_model_config

# facts.yaml params.exact (keras-hub presets) or params.derived_check (recomputed from config).
TOTAL = {
    "llama-2-7b": 6738415616, "llama-2-70b": 68976648192, "llama-3.1-8b": 8030261248,
    "llama-3.1-70b": 70553706496, "qwen3-0.6b": 596049920, "qwen3-8b": 8190735360, "qwen3-32b": 32762123264,
    "qwen3-30b-a3b": 30532122624, "qwen3-235b-a22b": 235093634560,
    "deepseek-v3": 671026419200,  # main model, MTP excluded
}
ACTIVE = {"qwen3-30b-a3b": 3353032704, "qwen3-235b-a22b": 22190763520, "deepseek-v3": 37552297472}
KV_BF16 = {"llama-2-7b": 524288, "llama-2-70b": 327680, "llama-3.1-8b": 131072, "qwen3-0.6b": 114688,
           "qwen3-8b": 147456, "qwen3-32b": 262144, "qwen3-30b-a3b": 98304, "qwen3-235b-a22b": 192512,
           "deepseek-v3": 70272}


@pytest.mark.parametrize("name", sorted(TOTAL))
def test_param_count_exact(name):
    assert load_model_config(name).param_count() == TOTAL[name]


@pytest.mark.parametrize("name", sorted(ACTIVE))
def test_active_param_count_exact(name):
    assert load_model_config(name).active_param_count() == ACTIVE[name]


@pytest.mark.parametrize("name", sorted(KV_BF16))
def test_kv_bytes_per_token(name):
    m = load_model_config(name)
    assert m.kv_bytes_per_token(2) == KV_BF16[name]
    assert m.kv_bytes_per_token(1) == KV_BF16[name] / 2


def test_declared_exact_counts_agree():
    for name, m in all_model_configs().items():
        if m.params_exact is not None:
            assert m.param_count() == m.params_exact, name
        if m.params_active_exact is not None:
            assert m.active_param_count() == m.params_active_exact, name


def test_dense_active_equals_total_and_fp8_halves_bytes():
    for m in all_model_configs().values():
        if m.moe is None:
            assert m.active_param_count() == m.param_count()
        assert m.weight_bytes(1) * 2 == m.weight_bytes(2)
        assert m.decode_weight_bytes(4, 1) * 2 == pytest.approx(m.decode_weight_bytes(4, 2))


def test_flops_per_token():
    m = load_model_config("llama-3.1-8b")
    # no context: 2 FLOPs per non-embedding parameter (the LM head is a matmul, the embedding a gather)
    assert m.flops_per_token(0) == 2 * (m.param_count() - m.embedding_params)
    assert m.flops_per_token(1000) - m.flops_per_token(0) == 4 * 32 * 32 * 128 * 1000
    tied = load_model_config("qwen3-0.6b")  # tied: the one table is still multiplied as the LM head
    assert tied.flops_per_token(0) == 2 * tied.param_count()
    ds = load_model_config("deepseek-v3")  # MLA: qk 192 + v 128 per head
    assert ds.flops_per_token(10) - ds.flops_per_token(0) == 2 * 61 * 128 * (192 + 128) * 10


def test_expected_experts_and_decode_bytes():
    m = load_model_config("qwen3-30b-a3b")
    assert m.expected_experts_touched(1) == pytest.approx(8)
    assert m.expected_experts_touched(10_000) == pytest.approx(128)
    seq = [m.expected_experts_touched(b) for b in (1, 2, 8, 64, 512)]
    assert seq == sorted(seq)
    # batch 1 reads about the active parameters (minus the embedding table), a big batch about all of them
    assert m.decode_weight_bytes(1, 1) == pytest.approx(m.active_param_count() - m.embedding_params)
    assert m.decode_weight_bytes(10_000, 1) == pytest.approx(m.param_count() - m.embedding_params)
    dense = load_model_config("llama-3.1-8b")
    assert dense.decode_weight_bytes(1, 2) == dense.decode_weight_bytes(64, 2) == \
        (dense.param_count() - dense.embedding_params) * 2
