"""Oracles for tokenfleet.capacity.validate (`make mutate`): the token budget of a source's deployment, the command a
row prints, each row's published and projected figure per GPU and their ratio, the markdown table, the ratio file's
records and summary. Rows worked by hand; the projections replaced by fakes that record what they were asked (the
projection itself is checked in test_mutants_project.py), so every figure here is known exactly."""

import datetime
import time

import pytest
from pydantic import ValidationError
from tokenfleet.capacity import validate as V
from tokenfleet.capacity.validate import Deploy, Published, Row


def test_constants():
    assert V.NO_LIMIT_MS == 1e9 and V.GOAL == 0.2
    assert V.METRICS == ("output", "total", "prefill_input", "decode_output")


@pytest.mark.parametrize("chunked, input_len, budget", [
    (True, 100_000, 8192),  # chunked: the configured budget, whatever the prompt
    (False, 128, 8192),  # 128 + 2048 < 8192
    (False, 6144, 8192),  # 6144 + 2048 = 8192: equal
    (False, 6145, 8193),
    (False, 20000, 22048),  # trtllm's 20000/2000 rows: 20000 + 2048
])
def test_deploy_budget(chunked, input_len, budget):
    assert Deploy(batch=2048, max_batched_tokens=8192, kv_dtype="fp8", chunked_prefill=chunked).budget(input_len) == \
        budget


def test_deploy_and_row_defaults():
    d = Deploy(batch=1, max_batched_tokens=1, kv_dtype="bf16")
    assert d.chunked_prefill is True
    with pytest.raises(ValidationError):
        Deploy(batch=0, max_batched_tokens=1, kv_dtype="bf16")
    r = Row(source="s", model="m", gpu="g", dtype="bf16", input_len=1, output_len=1, published=1.0)
    assert (r.tp, r.deployment, r.prefix_cache_hit, r.tpot_ms, r.metric, r.published_gpus, r.tolerance,
            r.expected_miss, r.note) == (1, None, 0.0, None, "output", None, 0.2, None, None)


def test_published_file_loads():
    pub = V.load_published()
    assert {"trtllm", "gptfast"} <= set(pub.deployments) and pub.deployments["trtllm"].chunked_prefill is False
    assert pub.rows[0].model == "llama-2-7b" and pub.rows[0].published == 104.9


TP_ROW = Row(source="trtllm", model="llama-3.1-8b", gpu="h200", dtype="fp8", tp=1, input_len=20000, output_len=2000,
             published=1234.0)
TRT = Deploy(batch=2048, max_batched_tokens=8192, kv_dtype="fp8", chunked_prefill=False)


def test_command_of_a_tp_row():
    assert V.command(TP_ROW, TRT) == (
        "tokenfleet project -m llama-3.1-8b -g h200 --dtype fp8 --tp 1 --input-len 20000 --output-len 2000 "
        "--tpot-ms 1e+09 --ttft-ms 1e+09 --batch 2048 --max-batched-tokens 22048 --kv-dtype fp8 "
        "--no-chunked-prefill -f json")
    chunked = Deploy(batch=1, max_batched_tokens=8192, kv_dtype="bf16")
    r = TP_ROW.model_copy(update={"tp": 2, "input_len": 5, "output_len": 200, "dtype": "bf16"})
    assert V.command(r, chunked) == (
        "tokenfleet project -m llama-3.1-8b -g h200 --dtype bf16 --tp 2 --input-len 5 --output-len 200 "
        "--tpot-ms 1e+09 --ttft-ms 1e+09 --batch 1 --max-batched-tokens 8192 --kv-dtype bf16 -f json")


def test_command_of_a_deployment_row():
    r = Row(source="deepseek-day6", model="deepseek-v3", gpu="h800", dtype="fp8", deployment="deepseek-v3-day6",
            input_len=4383, output_len=1211, prefix_cache_hit=0.5625, tpot_ms=47.6, published=1.0)
    assert V.command(r, None) == (
        "tokenfleet project -m deepseek-v3 -g h800 --dtype fp8 --deployment deepseek-v3-day6 --input-len 4383 "
        "--output-len 1211 --prefix-cache-hit 0.5625 --tpot-ms 47.6 --ttft-ms 1e+09 -f json")
    offline = r.model_copy(update={"tpot_ms": None, "prefix_cache_hit": 0.0})
    assert V.command(offline, None) == (
        "tokenfleet project -m deepseek-v3 -g h800 --dtype fp8 --deployment deepseek-v3-day6 --input-len 4383 "
        "--output-len 1211 --prefix-cache-hit 0 --offline -f json")


# ---- validation_rows with recorded projections ----------------------------------------------------------------
def _published(rows):
    return Published(sources={"a": "source a", "b": "source b"},
                     deployments={"a": Deploy(batch=4, max_batched_tokens=100, kv_dtype="fp8", chunked_prefill=False),
                                  "b": Deploy(batch=8, max_batched_tokens=512, kv_dtype="bf16")},
                     rows=rows)


@pytest.fixture
def fakes(monkeypatch):
    calls = {"project": [], "deployment": [], "runs": []}

    def project(model, gpu, w, dtype, **kw):
        calls["project"].append((model, gpu, w, dtype, kw))
        cal = "runs" in kw
        return {"output_tokens_per_s_per_gpu": 600.0 if cal else 500.0, "batch": 3, "batch_limit": "memory",
                "source": "calibrated" if cal else "projected"}

    def project_deployment(model, gpu, w, deployment, dtype, runs=None):
        calls["deployment"].append((model, gpu, w, deployment, dtype, runs))
        f = 2.0 if runs else 1.0
        return {"output_tokens_per_s_per_gpu": 100.0 * f, "total_tokens_per_s_per_gpu": 400.0 * f,
                "prefill_fraction": 0.25, "source": "calibrated" if runs else "projected",
                "pools": {"prefill": {"input_tokens_per_s_per_gpu": 9000.0 * f, "tokens_per_gpu": 16384},
                          "decode": {"output_tokens_per_s_per_gpu": 1500.0 * f, "batch_per_gpu": 96,
                                     "batch_limit": "slo"}}}

    def read_runs(runs):
        calls["runs"].append(runs)
        return list(runs or [])

    monkeypatch.setattr(V, "project", project)
    monkeypatch.setattr(V, "project_deployment", project_deployment)
    monkeypatch.setattr(V, "read_runs", read_runs)
    return calls


ROW_A = Row(source="a", model="m1", gpu="g1", dtype="bf16", tp=2, input_len=200, output_len=50, published=1000.0,
            published_gpus=4, metric="total", tolerance=0.1, expected_miss="known")
ROW_B = Row(source="b", model="m2", gpu="g2", dtype="fp8", input_len=30, output_len=60, published=800.0,
            prefix_cache_hit=0.5, tpot_ms=20.0)


def test_tp_rows_project_with_the_sources_deployment(monkeypatch, fakes):
    monkeypatch.setattr(V, "load_published", lambda: _published([ROW_A, ROW_B]))
    rows = V.validation_rows()
    assert fakes["runs"] == [None] and fakes["deployment"] == []
    (m1, g1, w1, d1, kw1), (m2, g2, w2, d2, kw2) = fakes["project"]
    assert (m1, g1, d1, kw1) == ("m1", "g1", "bf16", {"tp": 2, "batch_cap": 4, "max_batched_tokens": 204,
                                                      "kv_dtype": "fp8", "chunked_prefill": False})
    assert (w1.id, w1.description, w1.input_len, w1.output_len, w1.prefix_cache_hit, w1.ttft_ms, w1.tpot_ms,
            w1.count) == ("validation", "a", 200, 50, 0.0, 1e9, 1e9, "total")
    assert (m2, g2, d2, kw2) == ("m2", "g2", "fp8", {"tp": 1, "batch_cap": 8, "max_batched_tokens": 512,
                                                     "kv_dtype": "bf16", "chunked_prefill": True})
    assert (w2.description, w2.prefix_cache_hit, w2.ttft_ms, w2.tpot_ms, w2.count) == ("b", 0.5, 1e9, 20.0, "output")
    assert rows[0] == {"source": "a", "model": "m1", "gpu": "g1", "dtype": "bf16", "tp": 2, "isl_osl": "200/50",
                       "published_per_gpu": 250.0, "projected_per_gpu": 500.0, "batch": 3, "batch_limit": "memory",
                       "command": V.command(ROW_A, _published([]).deployments["a"]), "metric": "total",
                       "tolerance": 0.1, "expected_miss": "known", "ratio": 2.0}
    assert (rows[1]["published_per_gpu"], rows[1]["ratio"], rows[1]["tp"], rows[1]["isl_osl"]) == \
        (800.0, 0.625, 1, "30/60")  # published_gpus defaults to tp; no prefix mark on a tp row
    assert rows[1]["expected_miss"] is None and "calibrated_ratio" not in rows[1]


def test_tp_rows_with_runs_and_a_kv_override(monkeypatch, fakes):
    monkeypatch.setattr(V, "load_published", lambda: _published([ROW_A]))
    rows = V.validation_rows(["run1"], kv_dtype="bf16")
    assert fakes["runs"] == [["run1"]]
    (m, g, w, d, kw), (cm, cg, cw, cd, cal) = fakes["project"]
    assert (cm, cg, cw, cd) == (m, g, w, d) == ("m1", "g1", w, "bf16") and w.input_len == 200
    assert kw["kv_dtype"] == "bf16" and cal == {**kw, "runs": ["run1"]}
    assert (rows[0]["calibrated_per_gpu"], rows[0]["calibrated_source"], rows[0]["calibrated_ratio"]) == \
        (600.0, "calibrated", 2.4)
    assert rows[0]["ratio"] == 2.0


def _dep_row(metric, hit=0.5625, gpus=16):
    return Row(source="deepseek-day6", model="deepseek-v3", gpu="h800", dtype="fp8", deployment="deepseek-v3-day6",
               input_len=4383, output_len=1211, prefix_cache_hit=hit, tpot_ms=47.6, metric=metric, published=8000.0,
               published_gpus=gpus)


@pytest.mark.parametrize("metric, value, batch, limit", [
    ("output", 100.0, 96, "slo"),
    ("total", 400.0, 96, "slo"),
    ("prefill_input", 9000.0, 16384, "budget"),  # a prefill pool: tokens per GPU, its limit the budget
    ("decode_output", 1500.0, 96, "slo"),
])
def test_deployment_rows(monkeypatch, fakes, metric, value, batch, limit):
    r = _dep_row(metric)
    monkeypatch.setattr(V, "load_published", lambda: _published([r]))
    rows = V.validation_rows()
    (model, gpu, w, dep, dtype, runs), = fakes["deployment"]
    assert (model, gpu, dep, dtype, runs) == ("deepseek-v3", "h800", "deepseek-v3-day6", "fp8", None)
    assert (w.input_len, w.output_len, w.prefix_cache_hit, w.tpot_ms, w.ttft_ms, w.count) == \
        (4383, 1211, 0.5625, 47.6, 1e9, "total" if metric == "total" else "output")
    assert fakes["project"] == []
    assert rows == [{"source": "deepseek-day6", "model": "deepseek-v3", "gpu": "h800", "dtype": "fp8",
                     "tp": "deepseek-v3-day6", "isl_osl": "4383/1211 h0.56", "published_per_gpu": 500.0,
                     "projected_per_gpu": value, "batch": batch, "batch_limit": limit,
                     "command": V.command(r, None), "metric": metric, "tolerance": 0.2, "expected_miss": None,
                     "prefill_fraction": 0.25, "ratio": value / 500.0}]


def test_deployment_row_with_runs_and_no_prefix_hit(monkeypatch, fakes):
    r = _dep_row("decode_output", hit=0.0, gpus=None)
    monkeypatch.setattr(V, "load_published", lambda: _published([r]))
    row, = V.validation_rows(["run9"])
    first, second = fakes["deployment"]
    assert first[5] is None and second == (*first[:5], ["run9"])  # the same row, with the runs
    assert (row["isl_osl"], row["published_per_gpu"], row["projected_per_gpu"]) == ("4383/1211", 8000.0, 1500.0)
    assert (row["calibrated_per_gpu"], row["calibrated_source"], row["calibrated_ratio"]) == \
        (3000.0, "calibrated", 0.375)


def test_metric_falls_back_to_the_mixed_pool():
    res = {"output_tokens_per_s_per_gpu": 7.0, "total_tokens_per_s_per_gpu": 9.0,
           "pools": {"mixed": {"batch_per_gpu": 5}}}
    assert V._metric(res, "output") == (7.0, {"batch_per_gpu": 5})
    assert V._metric(res, "total") == (9.0, {"batch_per_gpu": 5})
    both = {**res, "pools": {"mixed": {"m": 1}, "decode": {"d": 1}}}
    assert V._metric(both, "output") == (7.0, {"d": 1})


# ---- the table and the ratio file ----------------------------------------------------------------------------
def _row(**kw):
    base = {"source": "trtllm", "model": "llama-3.1-8b", "gpu": "h200", "dtype": "fp8", "tp": 1,
            "isl_osl": "128/2048", "published_per_gpu": 26221.0, "projected_per_gpu": 27000.4567, "batch": 2048,
            "batch_limit": "cap", "command": "cmd", "metric": "output", "tolerance": 0.2, "expected_miss": None,
            "ratio": 27000.4567 / 26221.0}
    return {**base, **kw}


def test_markdown():
    assert V.markdown([_row(published_per_gpu=1234.5, projected_per_gpu=2345.5, ratio=1.005)]) == (
        "| source | model | GPU | dtype | tp / deployment | ISL/OSL | metric | published tok/s/GPU | projected | ratio "
        "| batch (limit) |\n|---|---|---|---|---|---|---|---|---|---|---|\n"
        "| trtllm | llama-3.1-8b | h200 | fp8 | 1 | 128/2048 | output | 1,234 | 2,346 | 1.00 | 2048 (cap) |")
    two = V.markdown([_row(calibrated_ratio=0.876, calibrated_source="calibrated"),
                      _row(tp="dep", calibrated_ratio=1.5, calibrated_source="measured")]).split("\n")
    assert two[0].endswith("| batch (limit) | calibrated ratio |") and two[1] == "|" + "---|" * 12
    assert two[2] == ("| trtllm | llama-3.1-8b | h200 | fp8 | 1 | 128/2048 | output | 26,221 | 27,000 | 1.03 | "
                      "2048 (cap) | 0.88 (calibrated) |")
    assert two[3].startswith("| trtllm | llama-3.1-8b | h200 | fp8 | dep |") and two[3].endswith("| 1.50 (measured) |")


def test_ratio_record():
    rec = V.ratio_record(_row(isl_osl="4383/1211 h0.56", tp="dep", ratio=1.234567891, expected_miss="why",
                              tolerance=0.25, published_per_gpu=1.23456, calibrated_ratio=0.987654))
    assert rec == {"source": "trtllm", "model": "llama-3.1-8b", "gpu": "h200", "dtype": "fp8", "tp": "dep",
                   "input_len": 4383, "output_len": 1211, "metric": "output", "published_per_gpu": 1.235,
                   "projected_per_gpu": 27000.457, "ratio": 1.2346, "within_20pct": False, "tolerance": 0.25,
                   "within_tolerance": True, "expected_miss": True, "batch": 2048, "batch_limit": "cap",
                   "command": "cmd", "calibrated_ratio": 0.9877}
    rec = V.ratio_record(_row())
    assert (rec["input_len"], rec["output_len"], rec["ratio"], rec["expected_miss"]) == (128, 2048, 1.0297, False)
    assert "calibrated_ratio" not in rec


@pytest.mark.parametrize("ratio, within", [(0.8, True), (1.2, True), (0.7999999, False), (1.2000001, False),
                                          (1.0, True)])
def test_goal_and_tolerance_are_inclusive(ratio, within):
    rec = V.ratio_record(_row(ratio=ratio, tolerance=0.2))
    assert rec["within_20pct"] is within and rec["within_tolerance"] is within
    rec = V.ratio_record(_row(ratio=ratio, tolerance=0.1))
    assert rec["within_tolerance"] is (0.9 <= ratio <= 1.1)


def test_tolerance_is_the_rows_own():
    assert V.ratio_record(_row(ratio=1.24, tolerance=0.25))["within_tolerance"] is True
    assert V.ratio_record(_row(ratio=0.76, tolerance=0.25))["within_tolerance"] is True
    assert V.ratio_record(_row(ratio=1.26, tolerance=0.25))["within_tolerance"] is False


def test_ratio_file(monkeypatch):
    monkeypatch.setattr(V, "git_sha", lambda: "0123456789abcdef")
    rows = [_row(ratio=1.1, calibrated_ratio=1.25, calibrated_source="c"),  # trtllm: fp8 KV
            _row(source="gptfast", dtype="bf16", isl_osl="5/200", ratio=0.7, calibrated_ratio=0.8,
                 calibrated_source="c"),  # bf16 KV: no kv sensitivity
            _row(source="deepseek-day6", tp="dep", isl_osl="4383/1211 h0.56", metric="total", ratio=1.6257,
                 tolerance=0.25, expected_miss="known", calibrated_ratio=1.7, calibrated_source="c"),
            _row(ratio=1.3, calibrated_ratio=1.0, calibrated_source="c", expected_miss="x", tolerance=0.25)]
    bf16 = [_row(ratio=0.512345), _row(ratio=0.9), _row(tp="dep", ratio=0.1), _row(ratio=0.954321)]
    f = V.ratio_file(rows, bf16, ["results/runs/r1"], "python -m tokenfleet.capacity.validate --write x")
    assert f["command"] == "python -m tokenfleet.capacity.validate --write x"
    assert f["date"] == datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    assert (f["commit"], f["runs"], f["published"]) == ("0123456", ["results/runs/r1"],
                                                        "configs/validation/published.yaml")
    assert f["commit_note"] == "the checkout's HEAD when written; the file is committed after it"
    assert f["device"] == ("none: `ratio` projected from datasheets with the default efficiencies; `calibrated_ratio` "
                           "with the efficiencies of the runs named in `runs`")
    assert [x.get("ratio_kv_bf16") for x in f["rows"]] == [0.5123, None, None, 0.9543]
    assert [x["ratio"] for x in f["rows"]] == [1.1, 0.7, 1.6257, 1.3]
    assert f["summary"] == {
        "rows": 4, "within_20pct": 1, "within_tolerance": 1, "expected_miss": 2, "dense_rows": 3,
        "dense_within_20pct": 1, "ratio_min": 0.7, "ratio_max": 1.6257,
        "outside_20pct": ["gptfast llama-3.1-8b h200 tp 1 5/200 output: 0.70",
                          "deepseek-day6 llama-3.1-8b h200 tp dep 4383/1211 total: 1.63",
                          "trtllm llama-3.1-8b h200 tp 1 128/2048 output: 1.30"],
        "kv_bf16_ratio_min": 0.5123, "kv_bf16_ratio_max": 0.9543, "calibrated_within_20pct": 2}


def test_ratio_file_without_kv_rows_or_runs(monkeypatch):
    monkeypatch.setattr(V, "git_sha", lambda: "abc")
    f = V.ratio_file([_row(ratio=1.0)])
    assert (f["command"], f["runs"], f["commit"]) == ("", [], "abc")
    s = f["summary"]
    assert (s["kv_bf16_ratio_min"], s["kv_bf16_ratio_max"], s["calibrated_within_20pct"], s["outside_20pct"]) == \
        (None, None, 0, [])
    assert "ratio_kv_bf16" not in f["rows"][0]


def test_ratio_file_date_is_utc(monkeypatch):
    """The date is UTC's: in a time zone whose date differs from UTC's now, the file still says UTC's date."""
    now = datetime.datetime.now(datetime.timezone.utc)
    monkeypatch.setenv("TZ", "Etc/GMT+12" if now.hour < 12 else "Etc/GMT-14")  # UTC-12 / UTC+14: another date
    time.tzset()
    try:
        assert datetime.datetime.now().date() != now.date()  # the zone is on another date
        f = V.ratio_file([_row(ratio=1.0)])
        assert f["date"] == datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    finally:
        monkeypatch.undo()
        time.tzset()


def test_rows_after_a_deployment_row_are_projected(monkeypatch, fakes):
    monkeypatch.setattr(V, "load_published", lambda: _published([_dep_row("output"), ROW_A, _dep_row("total")]))
    rows = V.validation_rows()
    assert [r["tp"] for r in rows] == ["deepseek-v3-day6", 2, "deepseek-v3-day6"]
    assert len(fakes["project"]) == 1 and len(fakes["deployment"]) == 2


def test_ratio_file_counts_dense_rows_and_calibrated_edges(monkeypatch):
    monkeypatch.setattr(V, "git_sha", lambda: "abc")
    rows = [_row(source="gptfast", dtype="bf16", ratio=1.0, calibrated_ratio=1.2, calibrated_source="c"),
            _row(source="sglang-ep", tp="dep", ratio=1.0, calibrated_ratio=0.8, calibrated_source="c"),
            _row(ratio=1.0, calibrated_ratio=1.2001, calibrated_source="c")]
    s = V.ratio_file(rows)["summary"]
    assert (s["rows"], s["dense_rows"], s["within_20pct"], s["dense_within_20pct"]) == (3, 2, 3, 2)
    assert s["calibrated_within_20pct"] == 2  # 1.2 and 0.8 count (inclusive), 1.2001 does not
