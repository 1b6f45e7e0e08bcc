"""One model on one accelerator type serving one workload -> tokens/s per GPU (the equations: `serving`).

    B_mem = floor((tp·M·f_mem − W − tp·reserve) / (kv_gpu·tp·(I+O)))     bytes throughout; kv_gpu counts the KV
            heads (GQA) or latent (MLA) each rank holds, replicated once tp exceeds what can be split
    rows say where their step times come from: `measured` (a run of this device, model, dtype, backend, tp),
    `measured-shard` (tp > 1 from one GPU's shard timed alone, collectives added: `allreduce_source`),
    `calibrated` (efficiencies measured by a named run of another device or model), `projected` (defaults)

Fleet capacity against demand lives in `tokenfleet.capacity.fleet`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from tokenfleet.capacity.calibrate import Efficiency, efficiency_from_runs, measured_allreduce, measured_for, read_runs
from tokenfleet.capacity.config import Workload, load_workload
from tokenfleet.capacity.families import efficiency_for
from tokenfleet.capacity.serving import Projector, Steps, serve
from tokenfleet.config import ConfigError
from tokenfleet.dtypes import dtype_bytes
from tokenfleet.hardware import Hardware, load_hardware
from tokenfleet.model.spec import ModelConfig, load_model_config, tp_problem
from tokenfleet.results import Run

F_MEM = 0.9  # fraction of device memory the server may use: vLLM's default gpu_memory_utilization
RESERVE_BYTES_PER_GPU = 2 * 2**30  # activations, CUDA graphs, NCCL buffers, allocator slack (assumption)
SECONDS_PER_DAY = 86400
TP_CHOICES = (1, 2, 4, 8, 16)
KV_DTYPES = ("bf16", "fp16", "fp8")


@dataclass(frozen=True)
class Deployment:
    """Engine settings a deployment chooses. Defaults are vLLM V1's for its OpenAI server (vllm/engine/arg_utils.py,
    checked by tests/engine/test_arg_utils.py): on GPUs with >= 70 GiB (not A100) max_num_seqs 1024 and
    max_num_batched_tokens 8192, else 256 and 2048; TensorRT-LLM's max_num_tokens and SGLang's chunked prefill
    size default to 8192 too. KV cache dtype `auto` = the activation dtype, bf16. Chunked prefill: vLLM V1 and
    SGLang chunk by default; TensorRT-LLM's `enable_chunked_prefill` defaults to off (`serving.serve`)."""

    batch_cap: int
    max_batched_tokens: int
    kv_dtype: str = "bf16"
    source: str = "given"
    chunked_prefill: bool = True


def check_deployment(batch_cap: int | None, max_batched_tokens: int | None, kv_dtype: str | None) -> None:
    """Deployment parameters given on the command line: one ConfigError naming the flag."""
    for name, v in (("--batch", batch_cap), ("--max-batched-tokens", max_batched_tokens)):
        if v is not None and v < 1:
            raise ConfigError(name, None, f"must be >= 1, got {v}")
    if kv_dtype is not None and kv_dtype not in KV_DTYPES:
        raise ConfigError("--kv-dtype", None, f"unknown KV dtype {kv_dtype!r}; known: {', '.join(KV_DTYPES)}")


def default_deployment(hw: Hardware, batch_cap: int | None = None, max_batched_tokens: int | None = None,
                       kv_dtype: str | None = None, chunked_prefill: bool = True) -> Deployment:
    big = hw.memory_bytes >= 70 * 2**30 and not hw.id.startswith("a100")
    cap, budget = (1024, 8192) if big else (256, 2048)
    given = [k for k, v in (("batch_cap", batch_cap), ("max_batched_tokens", max_batched_tokens),
                            ("kv_dtype", kv_dtype)) if v is not None]
    check_deployment(batch_cap, max_batched_tokens, kv_dtype)
    kv = kv_dtype or "bf16"
    src = (f"vLLM V1 server defaults for {'>= 70 GiB' if big else 'smaller'} GPUs: max_num_seqs {cap}, "
           f"max_num_batched_tokens {budget}, kv auto (bf16)") + (f"; given: {', '.join(given)}" if given else "")
    src += "" if chunked_prefill else "; no chunked prefill (whole prompts per step)"
    return Deployment(batch_cap or cap, max_batched_tokens or budget, kv, src, chunked_prefill)


# ---- one projection ------------------------------------------------------------------------------------------
@functools.cache
def _model(name: str) -> ModelConfig:
    return load_model_config(name)


@functools.cache
def _hw(name: str) -> Hardware:
    return load_hardware(name)


@functools.cache
def _workload(name: str) -> Workload:
    return load_workload(name)


def resolve_workload(workload: str | Workload | None, input_len: int | None = None, output_len: int | None = None,
                     tpot_ms: float | None = None, ttft_ms: float | None = None) -> Workload:
    """A named workload, with explicit lengths/SLOs overriding; or an ad-hoc one from lengths alone. A length or
    limit <= 0 is a ConfigError naming its flag (checked before anything is built from it)."""
    given = dict(input_len=input_len, output_len=output_len, tpot_ms=tpot_ms, ttft_ms=ttft_ms)
    for k, v in given.items():
        if v is not None and not v > 0:
            raise ConfigError(f"--{k.replace('_', '-')}", None, f"must be positive, got {v}")
    if isinstance(workload, str):
        workload = _workload(workload)
    if workload is None:
        if input_len is None or output_len is None:
            raise ConfigError("--workload", None, "give --workload, or both --input-len and --output-len")
        workload = Workload(id="custom", description="from the command line", input_len=input_len,
                            output_len=output_len, ttft_ms=ttft_ms or 2000, tpot_ms=tpot_ms or 50, count="total",
                            assumption="default SLOs ttft 2000 ms, tpot 50 ms unless given")
    upd = {k: v for k, v in given.items() if v is not None}
    return workload.model_copy(update=upd)


def check_context(m: ModelConfig, w: Workload, field: str = "--input-len") -> None:
    """Prompt + output must fit the model's context window (max_position_embeddings)."""
    if w.input_len + w.output_len > m.max_position_embeddings:
        raise ConfigError(field, None, f"{w.input_len} prompt + {w.output_len} output tokens exceed {m.id}'s "
                                       f"context of {m.max_position_embeddings}")


def check_tp(m: ModelConfig, tp: int, file=None, field: str | None = None) -> None:
    problem = tp_problem(m, tp)
    if problem:
        raise ConfigError(file or "--tp", field, problem)


def kv_bytes_per_gpu(m: ModelConfig, tp: int, kv_dtype: str) -> float:
    return m.kv_bytes_per_token_per_gpu(tp, dtype_bytes(kv_dtype))


def refuse_fp8(model: str | ModelConfig, gpu: str | Hardware, dtype: str | None, kv_dtype: str | None = None) -> None:
    """ConfigError (one line naming the datasheet field) for fp8 weights or KV on a GPU without FP8 tensor cores."""
    m = _model(model) if isinstance(model, str) else model
    hw = _hw(gpu) if isinstance(gpu, str) else gpu
    if "fp8" in (dtype or m.native_dtype, kv_dtype):
        hw.check_fp8()


def b_mem(m: ModelConfig, hw: Hardware, dtype: str, tp: int, seq_tokens: int, kv_dtype: str = "bf16") -> int:
    """Sequences of `seq_tokens` whose KV fits beside the weights on each of `tp` GPUs (<= 0: does not fit)."""
    free = hw.memory_bytes * F_MEM - m.weight_bytes(dtype_bytes(dtype)) / tp - RESERVE_BYTES_PER_GPU
    return math.floor(free / (kv_bytes_per_gpu(m, tp, kv_dtype) * seq_tokens))


def source_of(meas, eff: Efficiency) -> str:
    if meas and meas.decode:
        return "measured-shard" if meas.shard else "measured"
    return "calibrated" if eff.run_id else "projected"


def efficiency_source(meas, eff: Efficiency) -> str:
    """What a row's step times rest on: measured (a grid of this device), calibrated, family or global default."""
    return "measured" if meas and meas.decode else eff.kind


def _base(m, hw, w, dtype, tp, count, utilization, proj, dep) -> dict:
    return {"model": m.id, "gpu": hw.id, "dtype": dtype, "tp": tp, "workload": w.id, "input_len": w.input_len,
            "output_len": w.output_len, "prefix_cache_hit": w.prefix_cache_hit, "count": count,
            "utilization": utilization, "weight_bytes": m.weight_bytes(proj.wb),
            "kv_bytes_per_token_per_gpu": kv_bytes_per_gpu(m, tp, dep.kv_dtype), "kv_dtype": dep.kv_dtype,
            "batch_cap": dep.batch_cap, "max_batched_tokens": dep.max_batched_tokens,
            "chunked_prefill": dep.chunked_prefill, "deployment": dep.source,
            "allreduce_source": proj.allreduce_source, "alltoall_source": proj.alltoall_source}


def project(model: str | ModelConfig, gpu: str | Hardware, workload: str | Workload, dtype: str | None = None,
            tp: int = 1, batch_cap: int | None = None, runs: list[Run] | None = None, utilization: float = 1.0,
            eff: Efficiency | None = None, kv_dtype: str | None = None, count: str | None = None,
            max_batched_tokens: int | None = None, weight_only_fp8: bool = False, chunked_prefill: bool = True) -> dict:
    """Tokens/s per GPU of `model` on `gpu` for `workload` (one flat dict; the equations: `serving`).
    fp8 on a device without FP8 tensor cores is a ConfigError naming the datasheet field, unless
    `weight_only_fp8` (fleets: such GPUs serve an fp8 checkpoint with 8-bit weights and bf16 math).
    `chunked_prefill` False: whole prompts per step, each within the token budget (TensorRT-LLM's default)."""
    m = _model(model) if isinstance(model, str) else model
    hw = _hw(gpu) if isinstance(gpu, str) else gpu
    if not weight_only_fp8:
        refuse_fp8(m, hw, dtype, kv_dtype)
    w = _workload(workload) if isinstance(workload, str) else workload
    dtype = dtype or m.native_dtype or "bf16"
    check_tp(m, tp)
    if not 0 < utilization <= 1:
        raise ConfigError("--utilization", None, f"must be in (0, 1], got {utilization}")
    dep = default_deployment(hw, batch_cap, max_batched_tokens, kv_dtype, chunked_prefill)
    new_tokens = math.ceil(w.input_len * (1 - w.prefix_cache_hit))
    if not chunked_prefill and new_tokens > dep.max_batched_tokens:
        raise ConfigError("--max-batched-tokens", None, f"{dep.max_batched_tokens} is below the prompt's "
                          f"{new_tokens} new tokens: without chunked prefill a whole prompt is one step")
    runs = read_runs(runs)
    meas = measured_for(runs, hw.id, m.id, dtype, tp)
    eff = eff or efficiency_for(runs, hw.id, dtype)
    proj = Projector(m, hw, dtype, tp, eff, dep.kv_dtype, allreduce=measured_allreduce(runs, hw.id, tp))
    count = count or w.count
    out = _base(m, hw, w, dtype, tp, count, utilization, proj, dep)
    source = source_of(meas, eff)
    out["efficiency_source"] = efficiency_source(meas, eff)
    bm = b_mem(m, hw, dtype, tp, w.input_len + w.output_len, dep.kv_dtype)
    too_long = w.input_len + w.output_len > m.max_position_embeddings
    if bm < 1 or too_long:
        why = (f"{w.input_len}+{w.output_len} tokens exceed the {m.max_position_embeddings}-token context"
               if too_long else f"does not fit: {m.weight_bytes(proj.wb) / 2**30:.0f} GiB of weights on {tp}x "
               f"{hw.memory_bytes / 2**30:.0f} GiB at f_mem {F_MEM}")
        out.update(fits=False, batch=0, batch_limit="context" if too_long else "memory", b_mem=bm, b_slo=None,
                   tpot_ms=None, tpot_limit_ms=w.tpot_ms, tpot_ok=False, ttft_ms=None, ttft_limit_ms=w.ttft_ms,
                   ttft_ok=False, **{k: 0.0 for k in RATE_FIELDS}, joules_per_token=None, power_w_per_gpu=None,
                   source=source, decode_source=source, prefill_source=source, efficiency=eff.to_dict(),
                   notes=proj.notes + [why])
        return out
    steps = Steps(proj, meas)
    s = serve(steps, w.input_len, w.output_len, w.prefix_cache_hit, w.tpot_ms, w.ttft_ms, bm, dep.batch_cap,
              dep.max_batched_tokens, dep.chunked_prefill)
    out.update(_rates(s, w, tp, count, utilization, hw, meas, eff, source, bm, proj.notes))
    _notes(out, s, steps, w)
    return out


def _rates(s: dict, w: Workload, tp: int, count: str, utilization: float, hw: Hardware, meas, eff, source: str,
           bm: int, notes: list[str]) -> dict:
    output, total = s["output_per_s"] / tp, s["total_per_s"] / tp
    counted = total if count == "total" else output
    power, power_source = meas.power_at(s["batch"]) if meas else (None, None)
    if power is None:
        power, power_source = hw.tdp_w, "datasheet TDP" if hw.tdp_w else None
    label = f"measured ({meas.label})" if meas else None
    calib = f"calibrated (run {eff.run_id})" if eff.run_id else "projected"
    return dict(
        fits=True, batch=s["batch"], batch_limit=s["batch_limit"], b_mem=bm, b_slo=s["b_slo"],
        b_budget=s["b_budget"], tpot_ms=s["step_s"] * 1e3, decode_step_ms=s["decode_step_s"] * 1e3,
        prefill_tokens_per_step=s["prefill_tokens_per_step"], tpot_limit_ms=w.tpot_ms, tpot_ok=s["tpot_ok"],
        ttft_ms=s["ttft_s"] * 1e3, ttft_limit_ms=w.ttft_ms, ttft_ok=s["ttft_ok"],
        prefill_tokens_per_s_per_gpu=s["new_tokens"] / s["ttft_s"] / tp,
        decode_tokens_per_s_per_gpu=s["batch"] / s["decode_step_s"] / tp,
        output_tokens_per_s_per_gpu=output, total_tokens_per_s_per_gpu=total,
        tokens_per_s_per_gpu=counted, tokens_per_day_per_gpu=counted * SECONDS_PER_DAY * utilization,
        power_w_per_gpu=power,
        # Energy per counted token while serving: GPU board power (measured: the run's energy counter at the nearest
        # decode batch, else its NVML power reading; else TDP), no PUE, no host. power_source says which.
        joules_per_token=power / counted if power else None,
        power_source=power_source,
        source=source, decode_source=label if meas and meas.decode else calib,
        prefill_source=label if meas and meas.prefill else calib,
        efficiency=eff.to_dict(), notes=list(notes),
    )


def _notes(out: dict, s: dict, steps: Steps, w: Workload) -> None:
    if not out["tpot_ok"]:
        out["notes"].append(f"TPOT limit {w.tpot_ms:g} ms not met even at batch 1 ({s['tpot_at_1_s'] * 1e3:.1f} ms)")
    if not out["ttft_ok"]:
        out["notes"].append(f"TTFT limit {w.ttft_ms:g} ms not met: the prefill alone takes {out['ttft_ms']:.0f} ms")
    if steps.extrapolated(s["batch"], s["context"]):
        out["extrapolated"] = True
        out["notes"].append(f"decode at batch {s['batch']}, context {s['context']:g} is outside the measured grid: "
                            "the nearest measured ratio is held (extrapolated)")


RATE_FIELDS = ("prefill_tokens_per_s_per_gpu", "decode_tokens_per_s_per_gpu", "output_tokens_per_s_per_gpu",
               "total_tokens_per_s_per_gpu", "tokens_per_s_per_gpu", "tokens_per_day_per_gpu")


def valid_tps(m: ModelConfig, choices: tuple[int, ...] = TP_CHOICES) -> list[int]:
    return [p for p in choices if tp_problem(m, p) is None]


def auto_tp(model: str | ModelConfig, gpu: str | Hardware, workload: str | Workload, dtype: str | None = None,
            choices: tuple[int, ...] = TP_CHOICES, **kw) -> dict:
    """`project` at the valid tensor-parallel degree with the most counted tokens/s per GPU, preferring degrees
    that meet both SLOs over those that miss one (more GPUs per replica buy KV room and a faster prefill at the
    price of all-reduces); the last tried if none fits."""
    m = _model(model) if isinstance(model, str) else model
    best, res = None, None
    for p in valid_tps(m, choices):
        res = project(m, gpu, workload, dtype, tp=p, **kw)
        rank = (res["tpot_ok"] and res["ttft_ok"], res["tokens_per_s_per_gpu"])
        if res["fits"] and (best is None or rank > best[0]):
            best = (rank, res)
    return best[1] if best else res


__all__ = ["Deployment", "Efficiency", "Projector", "Run", "auto_tp", "b_mem", "check_context", "check_tp",
           "default_deployment", "efficiency_for", "efficiency_from_runs", "efficiency_source", "project", "read_runs",
           "refuse_fp8", "resolve_workload"]
