"""One screen of a run, in markdown a person can paste into the README: the device and its clocks, the measured
ceilings, decode at batch 1 (tokens/s, MBU), the best decode throughput, prefill MFU, and each kernel op against the
vendor baseline (`torch`) and `compile`. `make gpu-check` prints it at the end.

Tolerant of what a run lacks (a kind never reached, a backend not timed, a run cut short): a section with nothing
to show says so in one line, and a cut-short run is labelled partial by whoever knows (the caller passes `note`).
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from tokenfleet.output import markdown_table
from tokenfleet.report.tables import pair_key
from tokenfleet.results import Run, load_run, usable

NONE = "_(none measured)_"


def _num(v) -> float | None:
    """A finite number or None (the table printer formats it)."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return None
    return float(v)


def _table(rows: list[dict]) -> str:
    return markdown_table(pd.DataFrame(rows)) if rows else NONE


def device_lines(run: Run) -> list[str]:
    env = run.manifest.get("environment") or {}
    dev, nvml = env.get("device") or {}, (env.get("device") or {}).get("nvml") or {}
    mem = dev.get("memory_bytes")
    lines = [f"- device: {run.device}" + (f", {mem / 2**30:.0f} GiB" if mem else "")
             + (f", datasheet `{run.hardware_id}`" if run.hardware_id else ""),
             f"- software: torch {dev.get('torch_version')}, triton {dev.get('triton_version')}, "
             f"CUDA {dev.get('cuda_version')}, driver {dev.get('driver_version')}"]
    if nvml:
        lines.append(f"- clocks: SM max {nvml.get('sm_clock_max_mhz')} MHz, memory max {nvml.get('mem_clock_max_mhz')}"
                     f" MHz, power limit {nvml.get('power_limit_w')} W")
    seen = [p["telemetry"] for p in run.points if isinstance(p.get("telemetry"), dict)]
    # A point's telemetry is one reading; a probe's is polled, {min, median, max} of each number.
    sm = [v for t in seen for c in [t.get("sm_clock_mhz")] if c
          for v in ((c.get("min"), c.get("max")) if isinstance(c, dict) else (c,)) if isinstance(v, (int, float))]
    if sm:
        reasons = sorted({r for t in seen for r in t.get("clock_event_reasons") or [] if r != "GpuIdle"})
        lines.append(f"- during the run: SM clock {min(sm)}-{max(sm)} MHz over {len(sm)} points; clock events: "
                     f"{', '.join(reasons) or 'none'}")
    m = run.manifest
    lines.append(f"- run `{run.run_id}`, suite `{m.get('suite')}`, {m.get('created')}, tokenfleet "
                 f"{m.get('tokenfleet_version')}, git {m.get('git_sha')}")
    return lines


def ceiling_rows(run: Run) -> list[dict]:
    return [{"ceiling": p.get("op"), "dtype": p.get("dtype"), "value": _num(p.get("value")), "unit": p.get("unit"),
             "of datasheet": _num(p.get("datasheet_ratio"))}
            for p in run.usable("ceiling")]


def _model_row(p: dict, *fields: str) -> dict:
    row = {"model": p.get("model"), "backend": p.get("backend"), "dtype": p.get("dtype")}
    return {**row, **{f: _num(p.get(f)) if isinstance(p.get(f), float) else p.get(f) for f in fields}}


def decode_rows(run: Run) -> tuple[list[dict], list[dict]]:
    """Batch 1 (tokens/s, MBU) per model/dtype/backend/context, and each model/dtype/backend's best tokens/s."""
    points = run.usable("decode")
    batch1 = [_model_row(p, "context", "tpot_ms", "tokens_per_s", "mbu") for p in points if p.get("batch") == 1]
    best: dict = {}
    for p in points:
        k = (p.get("model"), p.get("dtype"), p.get("backend"))
        if (p.get("tokens_per_s") or 0) > (best.get(k, {}).get("tokens_per_s") or 0):
            best[k] = p
    return batch1, [_model_row(p, "batch", "context", "tokens_per_s", "mbu") for p in best.values()]


def prefill_rows(run: Run) -> list[dict]:
    return [_model_row(p, "batch", "prompt_len", "tokens_per_s", "tflops", "mfu") for p in run.usable("prefill")]


def _geomean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x and x > 0]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else None


def kernel_rows(run: Run) -> list[dict]:
    """Per op: triton points, and the geometric mean (min-max) of the other backend's time over triton's, paired by
    job key (> 1: triton is faster)."""
    by_key: dict[str, dict] = {}
    for p in run.usable("kernel"):
        by_key.setdefault(pair_key(p), {})[p.get("backend")] = p
    ops: dict[str, dict[str, list[float]]] = {}
    for pair in by_key.values():
        t = pair.get("triton")
        if not t or not t.get("median_ms"):
            continue
        per_op = ops.setdefault(t.get("op"), {"triton": []})
        per_op["triton"].append(t["median_ms"])
        for other in ("torch", "compile"):
            if pair.get(other, {}).get("median_ms"):
                per_op.setdefault(other, []).append(pair[other]["median_ms"] / t["median_ms"])
    rows = []
    for op, r in ops.items():
        row = {"op": op, "shapes": len(r["triton"])}
        for other, label in (("torch", "vs vendor"), ("compile", "vs compile")):
            xs = r.get(other) or []
            g = _geomean(xs)
            row[label] = f"{g:.2f} ({min(xs):.2f}-{max(xs):.2f}, n={len(xs)})" if g else None
        rows.append(row)
    return rows


def screen(run_dir: str | Path | Run, note: str | None = None) -> str:
    """The run's one screen (markdown). `note`: a line shown under the title (e.g. that the run was cut short)."""
    run = load_run(run_dir)
    batch1, best = decode_rows(run)
    counts = pd.Series([p.get("status") for p in run.points]).value_counts().to_dict() if run.points else {}
    unusable = sum(v for k, v in counts.items() if not usable({"status": k}))
    parts = [f"### {run.device}: {run.manifest.get('suite')} suite, {str(run.manifest.get('created'))[:10]}", ""]
    if note:
        parts += [f"**{note}**", ""]
    parts += device_lines(run)
    parts += [f"- points: {len(run.points)} ({', '.join(f'{v} {k}' for k, v in sorted(counts.items()))})"
              + (f"; {unusable} without a number (see summary.md)" if unusable else ""), ""]
    parts += ["**Ceilings**", "", _table(ceiling_rows(run)), ""]
    parts += ["**Decode, batch 1**", "", _table(batch1), ""]
    parts += ["**Decode, best tokens/s**", "", _table(best), ""]
    parts += ["**Prefill**", "", _table(prefill_rows(run)), ""]
    parts += ["**Kernels: other backend's time / Triton's (> 1: Triton faster), geometric mean over shapes**", "",
              _table(kernel_rows(run)), ""]
    return "\n".join(parts)
