"""The capacity model against published serving results (`configs/validation/published.yaml`): each row projected
with its source's deployment and no service-level limit, output tokens/s per GPU, and the ratio to the published
figure. `python -m tokenfleet.capacity.validate [--run FOLDER ...]` prints the README's table (with runs: a second
column calibrated from them)."""

from __future__ import annotations

import sys
from typing import Literal

from pydantic import Field
from tokenfleet.capacity.calibrate import read_runs
from tokenfleet.capacity.config import Workload
from tokenfleet.capacity.project import project
from tokenfleet.config import Strict, config_dir, load_yaml

NO_LIMIT_MS = 1e9  # offline: requests at infinite rate, no TTFT/TPOT limit


class Deploy(Strict):
    batch: int = Field(gt=0)
    max_batched_tokens: int = Field(gt=0)
    kv_dtype: Literal["bf16", "fp16", "fp8"]


class Row(Strict):
    source: str
    model: str
    gpu: str
    dtype: str
    tp: int = Field(gt=0)
    input_len: int = Field(gt=0)
    output_len: int = Field(gt=0)
    published: float = Field(gt=0, description="output tokens/s of the tp GPUs together")


class Published(Strict):
    sources: dict[str, str]
    deployments: dict[str, Deploy]
    rows: list[Row]


def load_published() -> Published:
    return load_yaml(config_dir("validation") / "published.yaml", Published)


def command(r: Row, d: Deploy) -> str:
    return (f"tokenfleet project -m {r.model} -g {r.gpu} --dtype {r.dtype} --tp {r.tp} --input-len {r.input_len} "
            f"--output-len {r.output_len} --tpot-ms {NO_LIMIT_MS:g} --ttft-ms {NO_LIMIT_MS:g} --batch {d.batch} "
            f"--max-batched-tokens {d.max_batched_tokens} --kv-dtype {d.kv_dtype} -f json")


def validation_rows(runs=None) -> list[dict]:
    """One dict per published row: projected (defaults) and, with runs, calibrated output tokens/s per GPU."""
    pub, runs = load_published(), read_runs(runs)
    out = []
    for r in pub.rows:
        d = pub.deployments[r.source]
        w = Workload(id="validation", description=r.source, input_len=r.input_len, output_len=r.output_len,
                     ttft_ms=NO_LIMIT_MS, tpot_ms=NO_LIMIT_MS, count="output")
        kw = dict(tp=r.tp, batch_cap=d.batch, max_batched_tokens=d.max_batched_tokens, kv_dtype=d.kv_dtype)
        proj = project(r.model, r.gpu, w, r.dtype, **kw)
        row = {"source": r.source, "model": r.model, "gpu": r.gpu, "dtype": r.dtype, "tp": r.tp,
               "isl_osl": f"{r.input_len}/{r.output_len}", "published_per_gpu": r.published / r.tp,
               "projected_per_gpu": proj["output_tokens_per_s_per_gpu"], "batch": proj["batch"],
               "batch_limit": proj["batch_limit"], "command": command(r, d)}
        row["ratio"] = row["projected_per_gpu"] / row["published_per_gpu"]
        if runs:
            cal = project(r.model, r.gpu, w, r.dtype, runs=runs, **kw)
            row.update(calibrated_per_gpu=cal["output_tokens_per_s_per_gpu"], calibrated_source=cal["source"],
                       calibrated_ratio=cal["output_tokens_per_s_per_gpu"] / row["published_per_gpu"])
        out.append(row)
    return out


def markdown(rows: list[dict]) -> str:
    cal = "calibrated_ratio" in rows[0]
    head = "| source | model | GPU | dtype | tp | ISL/OSL | published tok/s/GPU | projected | ratio | batch (limit) |"
    head += " calibrated ratio |" if cal else ""
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        line = (f"| {r['source']} | {r['model']} | {r['gpu']} | {r['dtype']} | {r['tp']} | {r['isl_osl']} | "
                f"{r['published_per_gpu']:,.0f} | {r['projected_per_gpu']:,.0f} | {r['ratio']:.2f} | "
                f"{r['batch']} ({r['batch_limit']}) |")
        lines.append(line + (f" {r['calibrated_ratio']:.2f} ({r['calibrated_source']}) |" if cal else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    args = sys.argv[1:]
    runs = [args[i + 1] for i, a in enumerate(args) if a == "--run"]
    rows = validation_rows(runs)
    print(markdown(rows))
    print()
    for r in rows:
        print(f"- {r['model']} {r['gpu']} {r['isl_osl']}: `{r['command']}`")
