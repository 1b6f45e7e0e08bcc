"""measure.parts.model: the prefill and decode grids on the CPU (torch and compile timed, triton skipped), layer
scaling, compile time in first_call_ms and never in the samples, failed checks as `incorrect` rows, plans as explicit
products, and spec validation."""

from __future__ import annotations

import itertools

import pytest
import torch
from pydantic import ValidationError
from tokenfleet import results
from tokenfleet.measure.parts import model as part
from tokenfleet.measure.runner import execute, job_key
from tokenfleet.model import decoder as M
from tokenfleet.results import USABLE  # ok or noisy: a loaded machine makes points noisy, not wrong


def test_prefill_grid(ctx):
    spec = part.PrefillSpec(models=["tiny", "tiny-qwen3"], backends=["triton", "torch"], dtypes=["fp32"],
                            batch=[1, 2], prompt_len=[8, 16])
    jobs = part.plan_prefill(spec, ctx)
    assert len(jobs) == 2 * 2 * 2 * 2  # models x backends x batch x prompt_len
    assert [(j.key["model"], j.key["backend"], j.key["batch"], j.key["prompt_len"]) for j in jobs] == list(
        itertools.product(spec.models, spec.backends, spec.batch, spec.prompt_len))
    points = [execute(j, ctx) for j in jobs]
    torch_pts = [p for p in points if p["backend"] == "torch"]
    assert all(p["status"] in USABLE for p in torch_pts), [p.get("error") for p in torch_pts]  # noisy: load
    assert all(p["status"] == "skipped" and "interpreter" in p["note"] for p in points if p["backend"] == "triton")
    p = next(p for p in torch_pts if p["model"] == "tiny" and p["batch"] == 2 and p["prompt_len"] == 16)
    assert p["kind"] == "prefill" and p["tp"] == 1 and p["layers"] is None and "scaled_from_layers" not in p
    assert p["ttft_ms"] == p["median_ms"] > 0
    assert p["tokens_per_s"] == pytest.approx(32 / (p["median_ms"] / 1e3))
    cfg = M.load_model_config("tiny")
    assert p["flops"] == M.prefill_flops(cfg, 2, 16) and p["bytes"] == M.prefill_bytes(cfg, 2, 16, 4)
    assert p["mfu"] is not None and p["rel_error"] < 1e-4


def test_jobs_run_in_any_order(ctx, monkeypatch):
    # The session is explicit and keyed: running the grid backwards gives the same points (timings aside), and
    # whichever job runs last releases the model (the parts after it get the memory back).
    spec = part.DecodeSpec(models=["tiny", "tiny-qwen3"], backends=["torch"], dtypes=["fp32"], context=[4, 6])
    fields = ("model", "context", "rel_error", "flops", "bytes")
    held = []
    real_drop = part._Session.drop

    def drop(self, device, everything=True):
        real_drop(self, device, everything)
        held.append(self.built is not None)

    monkeypatch.setattr(part._Session, "drop", drop)
    forward = [execute(j, ctx) for j in part.plan_decode(spec, ctx)]
    assert held[-1] is False and sum(not h for h in held) >= 1
    backward = [execute(j, ctx) for j in reversed(part.plan_decode(spec, ctx))][::-1]
    assert held[-1] is False
    assert all(p["status"] in USABLE for p in forward + backward)  # ok, or noisy on a loaded machine
    assert [[p[f] for f in fields] for p in forward] == [[p[f] for f in fields] for p in backward]


def test_decode_grid_with_scaled_layers(ctx):
    spec = part.DecodeSpec(models=["tiny"], backends=["torch"], dtypes=["fp32"], batch=[1, 3], context=[5, 20],
                           layers=1)
    points = [execute(j, ctx) for j in part.plan_decode(spec, ctx)]
    assert all(p["status"] in USABLE for p in points) and len(points) == 4, [p.get("error") for p in points]
    p = points[-1]
    assert (p["kind"], p["batch"], p["context"], p["layers"]) == ("decode", 3, 20, 1)
    assert p["scaled_from_layers"] == 1 and "1 of 2 layers" in p["note"]
    assert min(p["samples_ms"]) <= p["median_ms"] <= max(p["samples_ms"])  # the samples are scaled with the median
    assert p["cuda_graph"] is False  # CPU: eager
    assert p["tpot_ms"] == p["median_ms"] > 0
    assert p["tokens_per_s"] == pytest.approx(3 / (p["median_ms"] / 1e3))
    assert p["tokens_per_s_per_seq"] == pytest.approx(1e3 / p["median_ms"])
    cfg = M.load_model_config("tiny")  # counted at the full layer count; the torch path reads the padded cache
    assert p["bytes"] == M.decode_bytes(cfg, 3, 20, 4) + 3 * (64 - 21) * cfg.kv_bytes_per_token(4)
    assert p["mbu"] is not None


def test_decode_bytes_count_the_cache_each_backend_reads():
    # Issue 23: the torch path's SDPA reads the whole cache, context + 1 padded to KV_ALIGN, but was credited
    # context + 1 positions; Triton's decode attention reads each sequence's own context + 1.
    cfg = M.load_model_config("tiny")
    for context in (20, 63, 64, 4096):
        alloc = M.KVCache(cfg, 2, context + 1).max_len  # what a decode point allocates, and torch reads
        assert M.kv_positions_read("torch", context) == M.kv_positions_read("compile", context) == alloc
        assert M.kv_positions_read("triton", context) == context + 1
        assert M.padded_kv_bytes(cfg, 2, context, 2, "triton") == 0
        assert M.padded_kv_bytes(cfg, 2, context, 2, "torch") == 2 * (alloc - context - 1) * cfg.kv_bytes_per_token(2)
    assert M.padded_kv_bytes(cfg, 1, 63, 2, "torch") == 0  # 64 positions: no padding to read


def test_tp_shard_is_measured(ctx):
    spec = part.DecodeSpec(models=["tiny"], backends=["torch"], dtypes=["fp32"], context=[4], tp=2)
    (p,) = [execute(j, ctx) for j in part.plan_decode(spec, ctx)]
    assert p["status"] in USABLE and p["tp"] == 2
    assert p["flops"] == M.decode_flops(M.shard_config(M.load_model_config("tiny"), 2), 1, 4)


def test_failed_check_is_incorrect_and_not_timed(ctx, monkeypatch):
    monkeypatch.setattr(part, "check_logits", lambda *a, **k: 0.5)
    spec = part.PrefillSpec(models=["tiny"], backends=["torch"], dtypes=["fp32"], prompt_len=[4, 8])
    points = [execute(j, ctx) for j in part.plan_prefill(spec, ctx)]
    assert [p["status"] for p in points] == ["incorrect", "incorrect"]
    assert "relative error" in points[0]["error"] and "median_ms" not in points[0]


def test_check_catches_a_broken_cache_path(monkeypatch):
    m = M.build_model("tiny", dtype="fp32", seed=1)
    assert part.check_logits(m) < 1e-5
    ops = M.load_ops("torch")
    # Decode attention that misses the newest position: the reference's full recompute stays right.
    def late(q, k, v, lens):
        return ops.attention_decode(q, k, v, lens - 1)

    broken = M.Ops(**{**ops.__dict__, "attention_decode": late})
    reference = M.load_ops("reference")
    monkeypatch.setattr(M, "load_ops", lambda backend: reference if backend == "reference" else broken)
    assert part.check_logits(M.build_model("tiny", dtype="fp32", seed=1)) > 1e-2


def test_compile_points_put_the_compile_in_first_call_ms(ctx):
    # A decode shape the check did not compile (batch 1, the check's 2): its first call compiles, the samples
    # run the compiled graph; a torch point has no compile. What the first call reports is a measurement: the
    # point keeps its job's key (resume and compare match by it).
    spec = part.DecodeSpec(models=["tiny-qwen3"], backends=["compile", "torch"], dtypes=["fp32"], context=[70])
    jobs = part.plan_decode(spec, ctx)
    compiled, eager = (execute(j, ctx) for j in jobs)
    assert [results.point_key(p) for p in (compiled, eager)] == [job_key(j) for j in jobs]
    assert compiled["status"] in USABLE and eager["status"] in USABLE, (compiled.get("error"), eager.get("error"))
    assert compiled["graphs_compiled"] >= 1 and compiled["first_call_ms"] > 0 and compiled["n_samples"] >= 2
    assert "graphs_compiled" not in eager and eager["first_call_ms"] > 0
    assert compiled["rel_error"] < 1e-5 and eager["rel_error"] < 1e-5  # both checked against the reference


def test_a_compile_during_the_samples_is_an_error(ctx, monkeypatch):
    count = iter(range(100))
    monkeypatch.setattr(M, "compiled_graphs", lambda: next(count))  # a new graph at every look
    spec = part.DecodeSpec(models=["tiny"], backends=["torch"], dtypes=["fp32"], context=[4])
    (p,) = [execute(j, ctx) for j in part.plan_decode(spec, ctx)]
    assert p["status"] == "error" and "during the samples" in p["error"]


def test_oom_estimate_is_an_oom_point(ctx, monkeypatch):
    monkeypatch.setattr(part, "_available_bytes", lambda device: 10_000)  # nothing fits
    spec = part.DecodeSpec(models=["tiny"], backends=["torch"], dtypes=["fp32"], batch=[1, 2], context=[8])
    points = [execute(j, ctx) for j in part.plan_decode(spec, ctx)]
    assert [p["status"] for p in points] == ["oom", "oom"]


def test_layers_to_build_fits_memory():
    cfg = M.load_model_config("llama-3.1-70b")
    per_layer = M.param_counts(cfg)["layer"] * 2
    n = part.layers_to_build(cfg, 2, 80e9, None)
    assert 1 <= n < cfg.num_layers and n * per_layer < 80e9 * part.MEMORY_FRACTION
    assert part.layers_to_build(cfg, 2, 80e9, 4) == 4
    assert part.layers_to_build(M.load_model_config("tiny"), 2, 80e9, None) == 2
    with pytest.raises(torch.OutOfMemoryError):
        part.layers_to_build(cfg, 2, 1e9, None)


def test_spec_validation():
    with pytest.raises(ValidationError, match="unknown model"):
        part.PrefillSpec(models=["gpt-5"])
    with pytest.raises(ValidationError):
        part.DecodeSpec(models=["tiny"], backends=["cuda"])
    with pytest.raises(ValidationError):
        part.DecodeSpec(models=["tiny"], context=[0])
    assert part.DecodeSpec(models=["tiny"]).cuda_graph is True
