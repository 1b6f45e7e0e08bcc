"""tokenfleet.report.tables: every row labelled with its whole job key, and vs_torch / vs_compile pairing each row with
the row of the same key on the other backend, one to one."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenfleet import results
from tokenfleet.report.tables import backend_ratios, kind_table, points_frame, shape_of, write_tables


def _attn(backend: str, batch: int, ms: float, status: str = "ok", **extra) -> dict:
    return {"kind": "kernel", "op": "attention_decode", "backend": backend, "dtype": "bf16", "batch": batch,
            "q_heads": 32, "kv_heads": 8, "context": 4096, "head_dim": 128, "status": status, "median_ms": ms,
            "tflops": 1.0, **extra}


def test_two_batches_pair_with_their_own_rows():
    # The H200 case: torch is listed first at batch 1; the old rule divided every Triton row by that one.
    pts = [_attn("torch", 1, 0.080), _attn("torch", 32, 0.900), _attn("triton", 1, 0.050),
           _attn("triton", 32, 0.600), _attn("compile", 1, 0.040), _attn("compile", 32, 1.200)]
    r = backend_ratios(pts)
    assert r["vs_torch"] == pytest.approx([None, None, 0.080 / 0.050, 0.900 / 0.600, 0.080 / 0.040, 0.900 / 1.200])
    assert r["vs_compile"] == pytest.approx([0.040 / 0.080, 1.200 / 0.900, 0.040 / 0.050, 1.200 / 0.600, None, None])
    df = points_frame(pts)
    labels = list(kind_table(df, "kernel")["shape"])
    assert "batch=1 " in labels[0] + " " and "batch=32" in labels[1] and labels[0] != labels[1]
    assert labels[0] == labels[2] == labels[4]  # the same job key on three backends: the same label


def test_pairs_need_the_whole_key_and_usable_rows():
    pts = [_attn("torch", 1, 0.080), _attn("triton", 1, 0.050, causal=True),  # a key field the torch row lacks
           _attn("torch", 8, 0.2, status="error"), _attn("triton", 8, 0.1),  # baseline failed: no ratio
           _attn("torch", 16, 0.3), _attn("triton", 16, 0.05, status="above_ceiling")]  # not usable: no ratio
    assert backend_ratios(pts)["vs_torch"] == [None] * 6


def test_every_key_field_labels_the_row():
    p = {"kind": "decode", "model": "m", "backend": "torch", "dtype": "bf16", "batch": 8, "context": 1024,
         "tp": 2, "layers": None, "status": "ok", "median_ms": 1.0, "tokens_per_s": 5.0}
    assert shape_of(p, ("batch", "context")) == "tp=2"  # shown columns and empty fields left out, measurements too
    k = {"kind": "kernel", "op": "attention_prefill", "backend": "torch", "dtype": "bf16", "batch": 2, "seq": 128,
         "causal": False, "source": "x", "status": "ok", "median_ms": 1.0}
    assert shape_of(k) == "batch=2 seq=128 causal=False source=x"


def test_decode_table_pairs_backends(tmp_path: Path):
    w = results.RunWriter(tmp_path / "run", {"run_id": "t", "suite": "t", "command": "test"})
    for backend, ms in (("torch", 10.0), ("compile", 5.0), ("triton", 4.0)):
        for batch in (1, 8):
            w.append({"kind": "decode", "model": "m", "backend": backend, "dtype": "bf16", "batch": batch,
                      "context": 256, "status": "ok", "median_ms": ms * batch, "tpot_ms": ms * batch})
    w.close()
    text = write_tables(tmp_path / "run").read_text()
    assert "vs_torch" in text and "vs_compile" in text
    df = points_frame(results.load_run(tmp_path / "run").points)
    tri = df[df["backend"] == "triton"].set_index("batch")
    assert tri.loc[1, "vs_torch"] == pytest.approx(2.5) and tri.loc[8, "vs_torch"] == pytest.approx(2.5)
    assert tri.loc[8, "vs_compile"] == pytest.approx(1.25)
