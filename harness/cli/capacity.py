"""`tokenfleet project` and `tokenfleet capacity`: the capacity model at the command line.

Both verbs are added to the app in `tokenfleet.cli.common`. Bad input raises ConfigError, printed as one line with
exit code 2.
"""

from __future__ import annotations

from typing import Annotated

import typer
from tokenfleet.capacity.fleet import CAPACITY_COLUMNS
from tokenfleet.capacity.headline import headline, headline_lines
from tokenfleet.cli.common import FormatOpt, QuietOpt, app, check_finite, check_format, user_errors
from tokenfleet.config import ConfigError
from tokenfleet.output import emit, to_json

PROJECT_COLUMNS = ["model", "gpu", "dtype", "tp", "workload", "input_len", "output_len", "prefix_cache_hit", "fits",
                   "batch", "batch_limit", "b_mem", "b_slo", "b_budget", "tpot_ms", "decode_step_ms", "tpot_limit_ms",
                   "tpot_ok", "ttft_ms", "ttft_limit_ms", "ttft_ok", "prefill_tokens_per_s_per_gpu",
                   "decode_tokens_per_s_per_gpu", "output_tokens_per_s_per_gpu", "total_tokens_per_s_per_gpu", "count",
                   "tokens_per_day_per_gpu", "utilization", "weight_bytes", "kv_bytes_per_token_per_gpu", "kv_dtype",
                   "batch_cap", "max_batched_tokens", "power_w_per_gpu", "joules_per_token", "source",
                   "decode_source", "prefill_source", "allreduce_source", "alltoall_source"]
# A terminal is narrow: the table view leaves out the per-model TP list and the flags (md/csv/json keep them).
CAPACITY_TABLE_COLUMNS = ["gpu", "count", "tokens_per_s_per_gpu", "tokens_per_day", "capacity_over_demand",
                          "coverage_vs_china_reported", "coverage_vs_china_nda", "gpus_needed_alone", "power_mw",
                          "joules_per_token", "source"]


DEFAULT_FLEET = "china-2026-mix"  # the Makefile's FLEET: `make run` and `capacity` without --fleet agree
BATCH_HELP = "batch cap, sequences per replica (default: vLLM V1's max_num_seqs, 1024 on >= 70 GiB GPUs, else 256)"
BUDGET_HELP = "token budget per engine step, chunked prefill (default: vLLM V1's max_num_batched_tokens 8192/2048)"
KV_HELP = "KV-cache dtype bf16 | fp16 | fp8 (default bf16: vLLM's kv_cache_dtype auto)"
RUN_HELP = "run folder (repeatable): measured grids for its device, efficiencies for the rest"
DEPLOYMENT_HELP = ("deployment id (configs/deployments) or YAML: expert parallelism, data-parallel attention, "
                   "prefill/decode pools, MTP, overlap; --batch (per GPU), --max-batched-tokens, --kv-dtype "
                   "override it")
NO_CHUNK_HELP = "whole prompts per engine step, no chunked prefill (TensorRT-LLM's default)"
OFFLINE_HELP = "no latency limit (MLPerf Offline, trtllm-bench at infinite rate): TTFT/TPOT limits lifted"
POOL_COLUMNS = ["pool", "gpus", "batch_per_gpu", "tokens_per_gpu", "batch_limit", "rate_per_gpu", "tpot_ms",
                "ttft_ms", "step_ms", "attention_ms", "moe_ms", "other_ms", "expert_read_ms", "kv_read_ms",
                "dispatch_ms", "combine_ms", "hidden_ms", "imbalance_ms"]
DEFAULT_WORKLOAD = "chat"  # `project` without --workload (or both lengths): named in its output


def _kv_rows(d: dict) -> list[dict]:
    return [{"field": k, "value": v if not isinstance(v, (list, dict)) else to_json(v).replace("\n", " ")}
            for k, v in d.items()]


@app.command("project")
@user_errors
def project_cmd(
    model: Annotated[str, typer.Option("--model", "-m", metavar="MODEL", help="model id (configs/models) or YAML")],
    gpu: Annotated[str, typer.Option("--gpu", "-g", metavar="GPU", help="accelerator id (configs/hardware) or YAML")],
    dtype: Annotated[str | None, typer.Option(metavar="bf16|fp16|fp8",
                                              help="default: the model's native dtype, else bf16")] = None,
    tp: Annotated[int | None, typer.Option(metavar="N", help="GPUs per replica (default: the best of 1,2,4,8,16 "
                                                             "that fits)")] = None,
    workload: Annotated[str | None, typer.Option("--workload", "-w", metavar="WORKLOAD",
                                                 help=f"workload id (configs/workloads); default {DEFAULT_WORKLOAD}, "
                                                      "or ad hoc from --input-len and --output-len")] = None,
    input_len: Annotated[int | None, typer.Option(metavar="TOKENS", help="prompt tokens (overrides the workload's)")
                         ] = None,
    output_len: Annotated[int | None, typer.Option(metavar="TOKENS", help="output tokens (overrides the workload's)")
                          ] = None,
    tpot_ms: Annotated[float | None, typer.Option(metavar="MS", help="TPOT limit, ms")] = None,
    ttft_ms: Annotated[float | None, typer.Option(metavar="MS", help="TTFT limit, ms")] = None,
    batch: Annotated[int | None, typer.Option(metavar="B", help=BATCH_HELP)] = None,
    max_batched_tokens: Annotated[int | None, typer.Option(metavar="TOKENS", help=BUDGET_HELP)] = None,
    kv_dtype: Annotated[str | None, typer.Option(metavar="bf16|fp16|fp8", help=KV_HELP)] = None,
    run: Annotated[list[str] | None, typer.Option("--run", metavar="RUN", help=RUN_HELP)] = None,
    utilization: Annotated[float, typer.Option(metavar="U", help="fraction of the day serving, for tokens/day")] = 1.0,
    deployment: Annotated[str | None, typer.Option(metavar="NAME|FILE", help=DEPLOYMENT_HELP)] = None,
    prefix_cache_hit: Annotated[float | None, typer.Option(
        metavar="H", help="fraction of the prompt already cached (overrides the workload's), [0, 1)")] = None,
    offline: Annotated[bool, typer.Option("--offline", help=OFFLINE_HELP)] = False,
    no_chunked_prefill: Annotated[bool, typer.Option("--no-chunked-prefill", help=NO_CHUNK_HELP)] = False,
    fmt: FormatOpt = "table",
) -> None:
    """Project one model on one accelerator for a workload: batch, TTFT/TPOT, tokens/s and tokens/day per GPU."""
    from tokenfleet.capacity.project import auto_tp, check_deployment, project, read_runs, refuse_fp8

    check_format(fmt)
    check_finite({"--tpot-ms": tpot_ms, "--ttft-ms": ttft_ms, "--utilization": utilization},
                 no_limit=("--tpot-ms", "--ttft-ms"))
    refuse_fp8(model, gpu, dtype, kv_dtype)  # before the workload: the device, not the request, is what refuses
    if deployment and tp is not None:
        raise ConfigError("--tp", None, "give --tp or --deployment, not both (a deployment sets its own parallelism)")
    if deployment and no_chunked_prefill:
        raise ConfigError("--no-chunked-prefill", None, "applies to a tensor-parallel replica, not to --deployment")
    w, defaulted = _project_workload(model, workload, input_len, output_len, tpot_ms, ttft_ms, tp)
    w = _adjust_workload(w, prefix_cache_hit, offline)
    check_deployment(batch, max_batched_tokens, kv_dtype)  # before any run is read
    runs = read_runs(run)
    if deployment:
        from tokenfleet.capacity.pools import project_deployment

        res = project_deployment(model, gpu, w, deployment, dtype, runs=runs, utilization=utilization, batch=batch,
                                 max_batched_tokens=max_batched_tokens, kv_dtype=kv_dtype)
        if defaulted:
            res["notes"] = [f"workload {w.id}: the default (choose one with --workload)"] + res["notes"]
        _print_pools(res, defaulted, fmt)
        return
    kw = dict(batch_cap=batch, runs=runs, utilization=utilization, kv_dtype=kv_dtype,
              max_batched_tokens=max_batched_tokens, chunked_prefill=not no_chunked_prefill)
    res = project(model, gpu, w, dtype, tp=tp, **kw) if tp is not None else auto_tp(model, gpu, w, dtype, **kw)
    if defaulted:
        res["notes"] = [f"workload {w.id}: the default (choose one with --workload)"] + list(res.get("notes") or [])
    _print_projection(res, defaulted, fmt)


def _project_workload(model: str, workload: str | None, input_len: int | None, output_len: int | None,
                      tpot_ms: float | None, ttft_ms: float | None, tp: int | None):
    """`project`'s workload (DEFAULT_WORKLOAD unless --workload or both lengths are given) and whether it was the
    default, checked against the model's context; and --tp, when given, against the model's shapes."""
    from tokenfleet.capacity.project import _model, check_context, check_tp, resolve_workload

    defaulted = workload is None and not (input_len and output_len)
    w = resolve_workload(DEFAULT_WORKLOAD if defaulted else workload, input_len, output_len, tpot_ms, ttft_ms)
    m = _model(model)
    check_context(m, w, "--input-len" if input_len is not None or workload is None else "--workload")
    if tp is not None:
        check_tp(m, tp)
    return w, defaulted


def _adjust_workload(w, prefix_cache_hit: float | None, offline: bool):
    """--prefix-cache-hit and --offline over the workload (one ConfigError naming the flag)."""
    from tokenfleet.capacity.fleet import NO_LIMIT_MS

    upd: dict = {}
    if prefix_cache_hit is not None:
        if not 0 <= prefix_cache_hit < 1:
            raise ConfigError("--prefix-cache-hit", None, f"must be in [0, 1), got {prefix_cache_hit}")
        upd["prefix_cache_hit"] = prefix_cache_hit
    if offline:
        upd.update(tpot_ms=NO_LIMIT_MS, ttft_ms=NO_LIMIT_MS)
    return w.model_copy(update=upd) if upd else w


PROJECTION_FIELDS = ["model", "gpu", "dtype", "deployment", "workload", "input_len", "output_len", "prefix_cache_hit",
                     "fits", "prefill_fraction", "batch", "tpot_ms", "tpot_ok", "ttft_ms", "ttft_ok", "kv_dtype",
                     "output_tokens_per_s_per_gpu", "total_tokens_per_s_per_gpu", "count", "tokens_per_s_per_gpu",
                     "tokens_per_day_per_gpu", "utilization", "source"]


def pool_rows(res: dict) -> list[dict]:
    """One row per pool: its batch per GPU, rate and where the step's time goes (ms)."""
    rows = []
    for name, p in res["pools"].items():
        if not p.get("fits"):
            rows.append({"pool": name, "batch_limit": p.get("batch_limit")})
            continue
        rate = p.get("output_tokens_per_s_per_gpu", p.get("input_tokens_per_s_per_gpu"))
        rows.append({"pool": name, **{k: p.get(k) for k in POOL_COLUMNS if k in p}, "rate_per_gpu": rate,
                     "other_ms": p["dense_ms"] + p["head_ms"] + p["allreduce_ms"],
                     "batch_limit": p.get("batch_limit", "budget")})
    return rows


def _print_pools(res: dict, defaulted: bool, fmt: str) -> None:
    """A deployment's projection: the fields, one row per pool (rates, per-GPU batch, the step's parts), sources."""
    if fmt == "json":
        print(to_json({**res, "workload_defaulted": defaulted}))
        return
    fields = {k: res[k] for k in PROJECTION_FIELDS if k in res}
    if fmt == "csv":
        emit(pool_rows(res), fmt, None, POOL_COLUMNS)
        return
    emit(_kv_rows(fields), fmt, f"{res['model']} on {res['gpu']}, deployment {res['deployment']}, "
                               f"workload {res['workload']} ({res['source']})")
    emit(pool_rows(res), fmt, "Pools, per GPU: rate = output tokens/s (decode, mixed) or input tokens/s incl. cache "
                              "hits (prefill); the step in ms: attention, MoE and other compute (expert and KV reads "
                              "are inside them), the all-to-all, what two micro-batches hide, the expert imbalance",
         POOL_COLUMNS)
    a2a = {p.get("alltoall_source") for p in res["pools"].values() if p.get("alltoall_source")}
    e = res["efficiency"]
    eff = f"efficiency: {res['efficiency_source']}, e_c {e['compute']:.3g}, e_m {e['memory']:.3g} ({e['from']})"
    routed = {p["experts_source"] for p in res["pools"].values() if p.get("experts_source", "roofline") != "roofline"}
    lines = [eff, *[f"all-to-all: {s}" for s in sorted(a2a)], *[f"routed experts: {s}" for s in sorted(routed)],
             *[f"source {k}: {v}" for k, v in res["sources"].items()]]
    for line in lines:
        typer.echo(" ".join(line.split()))
    for n in res["notes"]:
        typer.echo(f"note: {n}")


def _print_projection(res: dict, defaulted: bool, fmt: str) -> None:
    """One projection: JSON (with `workload_defaulted`), one CSV table, or the fields, efficiencies and notes."""
    if fmt == "json":
        print(to_json({**res, "workload_defaulted": defaulted}))
        return
    fields = {k: res[k] for k in PROJECT_COLUMNS if k in res}
    effs = {f"efficiency.{k}": v for k, v in res["efficiency"].items()}
    if fmt == "csv":  # one table: CSV has room for one
        emit(_kv_rows({**fields, **effs, **{f"note.{i}": n for i, n in enumerate(res["notes"])}}), fmt)
        return
    emit(_kv_rows(fields), fmt, f"{res['model']} on {res['gpu']}, workload {res['workload']} ({res['source']})")
    emit(_kv_rows(effs), fmt, "Efficiencies")
    for n in res["notes"]:
        typer.echo(f"note: {n}")


@app.command("capacity")
@user_errors
def capacity_cmd(
    fleet: Annotated[str, typer.Option("--fleet", metavar="FLEET", help="fleet id (configs/fleets) or YAML path")
                     ] = DEFAULT_FLEET,
    demand: Annotated[str | None, typer.Option(metavar="SCENARIO",
                                               help="demand scenario (configs/demand); default china-reported")] = None,
    demand_tokens_per_day: Annotated[float | None, typer.Option(metavar="N",
                                                                help="a fixed demand instead of a scenario")] = None,
    run: Annotated[list[str] | None, typer.Option("--run", metavar="RUN", help=RUN_HELP)] = None,
    utilization: Annotated[float | None, typer.Option(metavar="U", help="override the fleet's utilization, (0, 1]")
                           ] = None,
    peak_factor: Annotated[float | None, typer.Option(metavar="F", help="override the fleet's peak factor, ≥ 1")
                           ] = None,
    batch: Annotated[int | None, typer.Option(metavar="B", help=BATCH_HELP + "; overrides the fleet's batch_cap")
                     ] = None,
    max_batched_tokens: Annotated[int | None, typer.Option(metavar="TOKENS",
                                                           help=BUDGET_HELP + "; overrides the fleet's")] = None,
    kv_dtype: Annotated[str | None, typer.Option(metavar="bf16|fp16|fp8", help=KV_HELP + "; overrides the fleet's")
                        ] = None,
    deployment: Annotated[str | None, typer.Option(metavar="NAME|FILE", help="serve the deployment's model (every "
                                                   "MoE model when it names none) this way; overrides the fleet's")
                          ] = None,
    offline: Annotated[bool, typer.Option("--offline", help=OFFLINE_HELP)] = False,
    do_sweep: Annotated[bool, typer.Option("--sweep", help="sensitivity over utilization, workload and dtype")] = False,
    fmt: FormatOpt = "table",
    quiet: QuietOpt = False,
) -> None:
    """Fleet capacity in tokens/day against demand, per accelerator type and in total (default fleet: the one
    `make run` uses), ending with the headline: coverage of the reported 14T and the primary 140T tokens/day and
    the GPUs each would take."""
    from tokenfleet.capacity.fleet import capacity_table, fleet_of, sweep
    from tokenfleet.capacity.project import check_deployment, read_runs

    check_format(fmt)
    check_finite({"--demand-tokens-per-day": demand_tokens_per_day, "--utilization": utilization,
                  "--peak-factor": peak_factor})
    if demand and demand_tokens_per_day is not None:
        raise ConfigError("--demand", None, "give --demand or --demand-tokens-per-day, not both")
    f, _ = fleet_of(fleet)
    given = dict(batch_cap=batch, max_batched_tokens=max_batched_tokens, kv_dtype=kv_dtype)
    check_deployment(batch, max_batched_tokens, kv_dtype)
    if any(v is not None for v in given.values()):
        f = f.model_copy(update={k: v for k, v in given.items() if v is not None})
    if deployment:
        f = _with_deployment(f, deployment)
    fleet = f
    runs = read_runs(run)
    kw = dict(demand=demand, runs=runs, peak_factor=peak_factor, demand_tokens_per_day=demand_tokens_per_day)
    rows, summary = capacity_table(fleet, utilization=utilization, offline=offline, **kw)
    head = headline(rows, summary, runs)
    sweep_rows = sweep(fleet, **kw) if do_sweep and not quiet else None
    if fmt == "json":
        out = {"headline": head} if quiet else {"rows": rows, "summary": summary, "headline": head}
        print(to_json({**out, **({"sweep": sweep_rows} if sweep_rows else {})}))
        return
    if quiet:
        _print_headline(head, fmt, [r.path for r in runs])
        return
    title = (f"{summary['fleet']}: tokens/day vs {summary['demand']} "
             f"({summary['demand_tokens_per_day']:.3g}/day, {summary['demand_date']})")
    emit(rows, fmt, title, CAPACITY_TABLE_COLUMNS if fmt == "table" else CAPACITY_COLUMNS)
    if fmt == "csv":
        return
    emit(_summary_rows(summary), fmt, "Summary")
    if sweep_rows:
        emit(sweep_rows, fmt, "Sensitivity")
    _print_headline(head, fmt, [r.path for r in runs])


def _with_deployment(f, name: str):
    """--deployment over the fleet's: for the model the file names, else for every MoE model of the fleet."""
    from tokenfleet.capacity.config import FleetDeployment
    from tokenfleet.capacity.deployment import load_deployment
    from tokenfleet.capacity.project import _model

    d = load_deployment(name)
    models = [ms.model for ms in f.models if (ms.model == d.model if d.model else _model(ms.model).moe)]
    if not models:
        raise ConfigError("--deployment", None, f"{d.id} is for {d.model}, which the fleet {f.id} does not serve")
    keep = [x for x in f.deployments if x.model not in models]
    new = [FleetDeployment(model=m, deployment=name, source="--deployment") for m in models]
    return f.model_copy(update={"deployments": keep + new})


def _print_headline(head: dict, fmt: str, run_paths: list) -> None:
    """The headline last, so it is what a terminal shows; csv has no room for it (json carries it)."""
    if fmt == "csv":
        return
    lines = headline_lines(head) + [f"run folder: {p}" for p in run_paths]
    if fmt == "md":
        print("### Headline\n\n```\n" + "\n".join(lines) + "\n```")
    else:
        print("\n".join(lines))


def _summary_rows(s: dict) -> list[dict]:
    lines = {
        "capacity tokens/day": f"{s['capacity_tokens_per_day']:.3g} (counted: {s['counted_tokens']})",
        "coverage": f"{s['coverage']:.3g} of {s['demand']} × peak factor {s['peak_factor']:g}",
        "coverage vs reported": f"{s['coverage_vs_china_reported']:.3g} (china-reported, "
                                f"{s['china_reported_tokens_per_day']:.3g}/day)",
        "coverage vs primary": f"{s['coverage_vs_china_nda']:.3g} (china-nda, {s['china_nda_tokens_per_day']:.3g}/day)",
        "why they differ": s["why_differs"],
        "demand growth": (f"{s['growth_per_month']:.1%}/month, doubling every {s['doubling_months']:.1f} months "
                          f"({s['growth_fit']})" if s["growth_per_month"] is not None else s["growth_fit"]),
        "demand outgrows fleet": s["demand_outgrows_fleet"],
        "... on china-reported / china-nda fits": f"{s['outgrows_fleet_on_china_reported']} / "
                                                  f"{s['outgrows_fleet_on_china_nda']}",
        "utilization, peak factor, PUE": f"{s['utilization']:g}, {s['peak_factor']:g}, {s['pue']:g}",
        "efficiency": f"e_c {s['efficiency']['compute']:.2f}, e_m {s['efficiency']['memory']:.2f} "
                      f"({s['efficiency']['from']})",
    }
    return [{"field": k, "value": v} for k, v in lines.items()]
