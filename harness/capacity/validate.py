"""The capacity model against published serving results (`configs/validation/published.yaml`): each row projected
with its source's deployment (a tensor-parallel replica's engine settings, or a deployment file: expert parallelism,
data-parallel attention, prefill/decode pools) and its source's latency limit (none: offline), the row's metric per
GPU (output tokens/s by default), and the ratio to the published figure.
`python -m tokenfleet.capacity.validate [--run FOLDER ...]` prints the README's table (with runs: a second
column calibrated from them); `--write FILE` (no runs) writes every row's ratio as JSON with the command, date and
commit (the committed `results/validation/ratios.json`, which README's count and tests/test_validation_data.py
read)."""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path
from typing import Literal

from pydantic import Field
from tokenfleet.capacity.calibrate import read_runs
from tokenfleet.capacity.config import Workload
from tokenfleet.capacity.pools import project_deployment
from tokenfleet.capacity.project import project
from tokenfleet.config import Strict, config_dir, load_yaml
from tokenfleet.provenance import git_sha

NO_LIMIT_MS = 1e9  # offline: requests at infinite rate, no TTFT/TPOT limit
GOAL = 0.2  # the goal every row is reported against (README): projected within ±20% of the published figure


class Deploy(Strict):
    batch: int = Field(gt=0)
    max_batched_tokens: int = Field(gt=0)
    kv_dtype: Literal["bf16", "fp16", "fp8"]
    chunked_prefill: bool = Field(True, description="False: whole prompts per step, the token budget raised to the "
                                                    "prompt + batch (trtllm-bench without chunking)")

    def budget(self, input_len: int) -> int:
        """The step's token budget for prompts of `input_len`: without chunked prefill trtllm-bench raises
        max_num_tokens to the longest prompt + max_batch_size (tensorrt_llm/bench/benchmark/utils/general.py)."""
        return self.max_batched_tokens if self.chunked_prefill else max(self.max_batched_tokens, input_len + self.batch)


METRICS = ("output", "total", "prefill_input", "decode_output")


class Row(Strict):
    source: str
    model: str
    gpu: str
    dtype: str
    tp: int = Field(1, gt=0)
    deployment: str | None = Field(None, description="a configs/deployments file: the source's pools")
    input_len: int = Field(gt=0)
    output_len: int = Field(gt=0)
    prefix_cache_hit: float = Field(0.0, ge=0, lt=1)
    tpot_ms: float | None = Field(None, gt=0, description="the source's per-request speed as a limit; none: offline")
    metric: Literal["output", "total", "prefill_input", "decode_output"] = "output"
    published: float = Field(gt=0, description="tokens/s (of `metric`) of `published_gpus` GPUs together")
    published_gpus: int | None = Field(None, gt=0, description="GPUs the published figure covers; default tp")
    tolerance: float = Field(0.2, gt=0, lt=1)
    expected_miss: str | None = Field(None, description="why this row is known to fall outside its tolerance")
    note: str | None = None


class Published(Strict):
    sources: dict[str, str]
    deployments: dict[str, Deploy]
    rows: list[Row]


def load_published() -> Published:
    return load_yaml(config_dir("validation") / "published.yaml", Published)


def command(r: Row, d: Deploy | None) -> str:
    if r.deployment:
        return (f"tokenfleet project -m {r.model} -g {r.gpu} --dtype {r.dtype} --deployment {r.deployment} "
                f"--input-len {r.input_len} --output-len {r.output_len} --prefix-cache-hit {r.prefix_cache_hit:g} "
                + (f"--tpot-ms {r.tpot_ms:g} --ttft-ms {NO_LIMIT_MS:g} " if r.tpot_ms else "--offline ") + "-f json")
    return (f"tokenfleet project -m {r.model} -g {r.gpu} --dtype {r.dtype} --tp {r.tp} --input-len {r.input_len} "
            f"--output-len {r.output_len} --tpot-ms {NO_LIMIT_MS:g} --ttft-ms {NO_LIMIT_MS:g} --batch {d.batch} "
            f"--max-batched-tokens {d.budget(r.input_len)} --kv-dtype {d.kv_dtype} "
            + ("" if d.chunked_prefill else "--no-chunked-prefill ") + "-f json")


def validation_rows(runs=None, kv_dtype: str | None = None) -> list[dict]:
    """One dict per published row: projected (defaults) and, with runs, calibrated output tokens/s per GPU.
    `kv_dtype` replaces the sources' KV dtype in the tensor-parallel rows (a sensitivity, never the table)."""
    pub, runs = load_published(), read_runs(runs)
    out = []
    for r in pub.rows:
        w = Workload(id="validation", description=r.source, input_len=r.input_len, output_len=r.output_len,
                     prefix_cache_hit=r.prefix_cache_hit, ttft_ms=NO_LIMIT_MS, tpot_ms=r.tpot_ms or NO_LIMIT_MS,
                     count="total" if r.metric == "total" else "output")
        if r.deployment:
            out.append(_deployment_row(r, w, runs))
            continue
        d = pub.deployments[r.source]
        kw = dict(tp=r.tp, batch_cap=d.batch, max_batched_tokens=d.budget(r.input_len),
                  kv_dtype=kv_dtype or d.kv_dtype, chunked_prefill=d.chunked_prefill)
        proj = project(r.model, r.gpu, w, r.dtype, **kw)
        row = {"source": r.source, "model": r.model, "gpu": r.gpu, "dtype": r.dtype, "tp": r.tp,
               "isl_osl": f"{r.input_len}/{r.output_len}",
               "published_per_gpu": r.published / (r.published_gpus or r.tp),
               "projected_per_gpu": proj["output_tokens_per_s_per_gpu"], "batch": proj["batch"],
               "batch_limit": proj["batch_limit"], "command": command(r, d), "metric": r.metric,
               "tolerance": r.tolerance, "expected_miss": r.expected_miss}
        row["ratio"] = row["projected_per_gpu"] / row["published_per_gpu"]
        if runs:
            cal = project(r.model, r.gpu, w, r.dtype, runs=runs, **kw)
            row.update(calibrated_per_gpu=cal["output_tokens_per_s_per_gpu"], calibrated_source=cal["source"],
                       calibrated_ratio=cal["output_tokens_per_s_per_gpu"] / row["published_per_gpu"])
        out.append(row)
    return out


def _metric(res: dict, metric: str) -> tuple[float, dict]:
    """The row's figure per GPU from a deployment projection, and the pool it comes from."""
    pools = res["pools"]
    if metric == "prefill_input":
        return pools["prefill"]["input_tokens_per_s_per_gpu"], pools["prefill"]
    if metric == "decode_output":
        return pools["decode"]["output_tokens_per_s_per_gpu"], pools["decode"]
    key = "total_tokens_per_s_per_gpu" if metric == "total" else "output_tokens_per_s_per_gpu"
    return res[key], pools.get("decode") or pools.get("mixed")


def _deployment_row(r: Row, w: Workload, runs) -> dict:
    res = project_deployment(r.model, r.gpu, w, r.deployment, r.dtype)
    value, pool = _metric(res, r.metric)
    row = {"source": r.source, "model": r.model, "gpu": r.gpu, "dtype": r.dtype, "tp": r.deployment,
           "isl_osl": f"{r.input_len}/{r.output_len}" + (f" h{r.prefix_cache_hit:.2f}" if r.prefix_cache_hit else ""),
           "published_per_gpu": r.published / (r.published_gpus or r.tp), "projected_per_gpu": value,
           "batch": pool.get("batch_per_gpu", pool.get("tokens_per_gpu")),
           "batch_limit": pool.get("batch_limit", "budget"),
           "command": command(r, None), "metric": r.metric, "tolerance": r.tolerance, "expected_miss": r.expected_miss,
           "prefill_fraction": res.get("prefill_fraction")}
    row["ratio"] = value / row["published_per_gpu"]
    if runs:
        cal = project_deployment(r.model, r.gpu, w, r.deployment, r.dtype, runs=runs)
        c, _ = _metric(cal, r.metric)
        row.update(calibrated_per_gpu=c, calibrated_source=cal["source"], calibrated_ratio=c / row["published_per_gpu"])
    return row


def markdown(rows: list[dict]) -> str:
    cal = "calibrated_ratio" in rows[0]
    head = ("| source | model | GPU | dtype | tp / deployment | ISL/OSL | metric | published tok/s/GPU | projected | "
            "ratio | batch (limit) |")
    head += " calibrated ratio |" if cal else ""
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        line = (f"| {r['source']} | {r['model']} | {r['gpu']} | {r['dtype']} | {r['tp']} | {r['isl_osl']} | "
                f"{r['metric']} | "
                f"{r['published_per_gpu']:,.0f} | {r['projected_per_gpu']:,.0f} | {r['ratio']:.2f} | "
                f"{r['batch']} ({r['batch_limit']}) |")
        lines.append(line + (f" {r['calibrated_ratio']:.2f} ({r['calibrated_source']}) |" if cal else ""))
    return "\n".join(lines)


def ratio_record(r: dict) -> dict:
    """One row of the ratio file: what identifies the row, the two figures per GPU, the ratio and how it stands."""
    lo, hi = 1 - GOAL, 1 + GOAL
    isl, osl = r["isl_osl"].split()[0].split("/")
    return {"source": r["source"], "model": r["model"], "gpu": r["gpu"], "dtype": r["dtype"], "tp": r["tp"],
            "input_len": int(isl), "output_len": int(osl), "metric": r["metric"],
            "published_per_gpu": round(r["published_per_gpu"], 3),
            "projected_per_gpu": round(r["projected_per_gpu"], 3),
            "ratio": round(r["ratio"], 4), "within_20pct": lo <= r["ratio"] <= hi,
            "tolerance": r["tolerance"], "within_tolerance": 1 - r["tolerance"] <= r["ratio"] <= 1 + r["tolerance"],
            "expected_miss": bool(r["expected_miss"]), "batch": r["batch"], "batch_limit": r["batch_limit"],
            "command": r["command"],
            **({"calibrated_ratio": round(r["calibrated_ratio"], 4)} if "calibrated_ratio" in r else {})}


def ratio_file(rows: list[dict], bf16_kv: list[dict] | None = None, runs=(), command: str = "") -> dict:
    """The committed ratio file: every row (`ratio_record`), with `bf16_kv` (the same rows with a bf16 KV cache) the
    ratio each FP8-KV row would have with bf16 KV (`ratio_kv_bf16`), with runs each row's calibrated ratio, and a
    summary of the ±20% goal."""
    recs = [ratio_record(r) for r in rows]
    kv = {i: b["ratio"] for i, b in enumerate(bf16_kv or []) if not isinstance(b["tp"], str)}
    pub = load_published()
    for i, x in enumerate(recs):
        if i in kv and pub.deployments[x["source"]].kv_dtype == "fp8":
            x["ratio_kv_bf16"] = round(kv[i], 4)
    bf = [x["ratio_kv_bf16"] for x in recs if "ratio_kv_bf16" in x]
    out = [f"{x['source']} {x['model']} {x['gpu']} tp {x['tp']} {x['input_len']}/{x['output_len']} {x['metric']}: "
           f"{x['ratio']:.2f}" for x in recs if not x["within_20pct"]]
    cal = [x["calibrated_ratio"] for x in recs if "calibrated_ratio" in x]
    return {"command": command, "date": datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
            "commit": git_sha()[:7], "commit_note": "the checkout's HEAD when written; the file is committed after it",
            "device": "none: `ratio` projected from datasheets with the default efficiencies; `calibrated_ratio` "
                      "with the efficiencies of the runs named in `runs`",
            "runs": [str(r) for r in runs],
            "published": "configs/validation/published.yaml",
            "summary": {"rows": len(recs), "within_20pct": sum(x["within_20pct"] for x in recs),
                        "within_tolerance": sum(x["within_tolerance"] for x in recs),
                        "expected_miss": sum(x["expected_miss"] for x in recs),
                        "dense_rows": sum(x["source"] in ("trtllm", "gptfast") for x in recs),
                        "dense_within_20pct": sum(x["within_20pct"] for x in recs
                                                  if x["source"] in ("trtllm", "gptfast")),
                        "ratio_min": min(x["ratio"] for x in recs), "ratio_max": max(x["ratio"] for x in recs),
                        "outside_20pct": out,
                        "kv_bf16_ratio_min": min(bf, default=None), "kv_bf16_ratio_max": max(bf, default=None),
                        "calibrated_within_20pct": sum(1 - GOAL <= c <= 1 + GOAL for c in cal)},
            "rows": recs}


if __name__ == "__main__":
    args = sys.argv[1:]
    runs = [args[i + 1] for i, a in enumerate(args) if a == "--run"]
    if "--write" in args:
        path = Path(args[args.index("--write") + 1])
        path.parent.mkdir(parents=True, exist_ok=True)
        data = ratio_file(validation_rows(runs), validation_rows(kv_dtype="bf16"), runs,
                          " ".join(["python -m tokenfleet.capacity.validate", *args]))
        path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {path}")
        sys.exit(0)
    rows = validation_rows(runs)
    print(markdown(rows))
    print()
    for r in rows:
        print(f"- {r['model']} {r['gpu']} {r['isl_osl']}: `{r['command']}`")
