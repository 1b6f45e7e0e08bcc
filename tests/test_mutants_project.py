"""Oracles for tokenfleet.capacity.project's inputs (`make mutate`'s survivors): the ad-hoc workload and its defaults,
overrides of a named one, the context check. Values worked out by hand, not by calling the code that
computes them."""

import pytest
from tokenfleet.capacity import project as P
from tokenfleet.capacity.config import load_workload
from tokenfleet.config import ConfigError
from tokenfleet.model.spec import load_model_config


def test_ad_hoc_workload_and_its_default_slos():
    w = P.resolve_workload(None, input_len=100, output_len=10)
    assert (w.id, w.description, w.input_len, w.output_len, w.ttft_ms, w.tpot_ms, w.count) == \
        ("custom", "from the command line", 100, 10, 2000, 50, "total")
    assert w.assumption == "default SLOs ttft 2000 ms, tpot 50 ms unless given"
    w = P.resolve_workload(None, input_len=100, output_len=10, tpot_ms=0.5, ttft_ms=300)
    assert (w.tpot_ms, w.ttft_ms) == (0.5, 300)  # below 1 ms is still positive


def test_named_workload_with_overrides():
    chat = load_workload("chat")  # 1024 in, 256 out, ttft 1000, tpot 50
    w = P.resolve_workload("chat", output_len=7, ttft_ms=900)
    assert (w.id, w.input_len, w.output_len, w.ttft_ms, w.tpot_ms) == ("chat", 1024, 7, 900, 50)
    assert P.resolve_workload(chat) == chat


@pytest.mark.parametrize("kw, field, message", [
    ({"input_len": 100}, "--workload", "give --workload, or both --input-len and --output-len"),
    ({"output_len": 10}, "--workload", "give --workload, or both --input-len and --output-len"),
    ({"input_len": 100, "output_len": -1}, "--output-len", "must be positive, got -1"),
    ({"input_len": 100, "output_len": 10, "ttft_ms": 0}, "--ttft-ms", "must be positive, got 0"),
])
def test_bad_lengths_name_their_flag(kw, field, message):
    with pytest.raises(ConfigError) as e:
        P.resolve_workload(None, **kw)
    assert (e.value.file, e.value.field, e.value.message) == (field, None, message)


def test_context_check_counts_prompt_and_output():
    m = load_model_config("tiny-qwen3")
    ctx = m.max_position_embeddings
    fits = P.resolve_workload(None, input_len=ctx - 10, output_len=10)
    P.check_context(m, fits)
    over = P.resolve_workload(None, input_len=ctx - 10, output_len=11)
    with pytest.raises(ConfigError) as e:
        P.check_context(m, over)
    assert e.value.file == "--input-len"
    assert str(e.value) == f"--input-len: {ctx - 10} prompt + 11 output tokens exceed {m.id}'s context of {ctx}"
