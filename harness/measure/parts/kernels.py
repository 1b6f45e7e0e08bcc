"""Kernels: each op x shape x dtype x backend of `kernels.REGISTRY`, checked against its reference, then timed.

Backends: `triton` (ours), `torch` (the op's vendor `baseline` in the input dtype: cuBLAS through F.linear,
FlashAttention through SDPA, F.rms_norm, ...) and `compile` (that baseline under torch.compile; its compile time is
the point's `first_call_ms`). On the CPU Triton's interpreter runs one program at a time in numpy and is a correctness
tool, so Triton points there are `skipped` with that reason; and torch._scaled_mm's e4m3 matmul has no fast path on
every CPU, so gemm_fp8's torch and compile points there are checked at a small shape (CPU_CHECK_ONLY) and `skipped`
with why (CPU_FP8_NOTE), never timed at the suite's shape. Shapes come from model configs (`models:` with the grid
the op's `model_shapes` takes: `tokens`, or `batch` and `context`) or are given literally (`shapes:`).

Inputs: the op's `make_inputs` draws them on the device, once per point: the backends of one (op, shape, dtype) are
consecutive jobs and take the same tensors from `RunContext.inputs` (one entry, freed when the next point draws, or
after the point's last backend). No op writes into its inputs (tests/test_kernel_part.py checks every registered
op's Triton launcher, baseline and reference), so each backend still runs, and is checked, on fresh random data.
The check's reference output is computed once per point too, by its first backend that runs, and held in the same
entry; `kernels.rel_error` compares on the device (no host copy), one host sync per output.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import torch
from pydantic import Field, PositiveInt, ValidationInfo, field_validator, model_validator
from tokenfleet.config import Strict
from tokenfleet.dtypes import to_dtype
from tokenfleet.measure.context import CPU_FP8_NOTE, CPU_TRITON_NOTE, Job, RunContext
from tokenfleet.model.decoder import compile_step, compiled_graphs, first_call
from tokenfleet.model.replay import load_replay, replay_skew
from tokenfleet.model.spec import load_model_config

# The ops whose make_inputs take dtype fp8 (e4m3 operands, KV cache, experts).
FP8_OPS = ("gemm_fp8", "attention_decode", "attention_mla", "moe")
BACKENDS = ("triton", "torch", "compile")  # every op's; an op may add vendor paths of its own (KernelOp.baselines)
# On a CPU: ops checked, not timed, at their shape capped to these sizes (gemm_fp8's baseline is torch._scaled_mm;
# attention_decode's fp8 baseline dequantizes its cache and runs at float speed, so it stays timed).
CPU_CHECK_ONLY = {"gemm_fp8": {"m": 16, "n": 128, "k": 128}}


class OpCase(Strict):
    op: str
    # fp8: gemm_fp8 (e4m3 operands, bf16 activations in and out), attention_decode / attention_mla over an e4m3
    # cache, moe with e4m3 experts (128x128 block scales).
    dtypes: list[Literal["fp32", "bf16", "fp16", "fp8"]] = Field(min_length=1)
    backends: list[str] = Field(["triton", "torch"], description="triton, torch, compile, or an op's own vendor "
                                                                 "path (moe: loop)")
    shapes: list[dict[str, Any]] = Field(default_factory=list, description="literal shape dicts")
    models: list[str] = Field(default_factory=list, description="derive shapes from these model configs")
    tokens: list[PositiveInt] = Field(default_factory=list, description="model shapes: tokens of a step (rows, M, "
                                                                         "sequence)")
    batch: list[PositiveInt] = Field(default_factory=list, description="model shapes: sequences (decode attention)")
    context: list[PositiveInt] = Field(default_factory=list, description="model shapes: context (decode attention)")
    scales: list[Literal["tensor", "block"]] = Field(["tensor"], description="gemm_fp8: scale layouts")
    routing: list[str] = Field(["uniform"], description="moe at model shapes: routings, 'uniform', "
                                                        "'zipf:<exponent>' (experts by popularity 1/rank^s) or "
                                                        "'replay:<routing file>' (its first layer's popularity)")

    @field_validator("op")
    @classmethod
    def _known(cls, v: str) -> str:
        from tokenfleet.kernels import REGISTRY

        if v not in REGISTRY:
            raise ValueError(f"unknown op {v!r}; known: {', '.join(sorted(REGISTRY))}")
        return v

    @field_validator("shapes")
    @classmethod
    def _sizes(cls, v: list[dict[str, Any]], info: ValidationInfo) -> list[dict[str, Any]]:
        from tokenfleet.kernels import REGISTRY

        op = REGISTRY.get(info.data.get("op"))
        need = op.shape_fields if op else ()  # each op says which sizes its make_inputs reads
        for i, shape in enumerate(v):
            missing = [f for f in need if f not in shape]
            if missing:
                raise ValueError(f"shape {i}: missing {missing[0]!r} ({info.data['op']} needs {', '.join(need)})")
            for name, size in shape.items():
                sizes = size if isinstance(size, list) else [size]
                if any(not isinstance(s, bool) and isinstance(s, int | float) and not s > 0 for s in sizes):
                    raise ValueError(f"shape {i}: {name} = {size} is not a size (> 0)")
        return v

    @model_validator(mode="after")
    def _some_shape(self) -> OpCase:
        from tokenfleet.kernels import REGISTRY

        if not self.shapes and not self.models:
            grid = " and ".join(f"`{g}`" for g in REGISTRY[self.op].model_grid)
            raise ValueError(f"give `shapes` or `models` (+ {grid})")
        for name in self.models:
            load_model_config(name)  # unknown model names fail here, listing the known ones
        missing = [g for g in REGISTRY[self.op].model_grid if self.models and not getattr(self, g)]
        if missing:
            raise ValueError(f"{self.op} at model shapes needs `{missing[0]}`")
        if "fp8" in self.dtypes and self.op not in FP8_OPS:
            raise ValueError(f"dtype fp8 is for {', '.join(FP8_OPS)}; {self.op} takes fp32, bf16, fp16")
        known = BACKENDS + tuple(REGISTRY[self.op].baselines)
        unknown = [b for b in self.backends if b not in known]
        if unknown:
            raise ValueError(f"backend {unknown[0]!r}: {self.op} runs {', '.join(known)}")
        if self.op == "moe":
            from tokenfleet.kernels.moe import parse_routing

            for r in [*self.routing, *(s["routing"] for s in self.shapes if "routing" in s)]:
                parse_routing(r)
                if r.startswith("replay:"):
                    load_replay(r.removeprefix("replay:"))  # a bad file: one line naming it and its field
        return self


class Spec(Strict):
    cases: list[OpCase] = Field(min_length=1)
    flush_l2: bool = Field(True, description="flush L2 between samples on GPU so every sample reads from HBM")


def case_shapes(case: OpCase) -> list[dict]:
    from tokenfleet.kernels import REGISTRY

    shapes = [dict(s) for s in case.shapes]
    make = REGISTRY[case.op].model_shapes  # the op says which shapes a model gives it
    for name in case.models:
        shapes += make(load_model_config(name), tokens=case.tokens, batch=case.batch, context=case.context)
    if case.op == "gemm_fp8":  # one point per scale layout (a literal shape may name its own)
        shapes = [{**s, "scale": sc} for s in shapes for sc in ([s["scale"]] if "scale" in s else case.scales)]
    if case.op == "moe":  # one point per routing (a literal shape may name its own)
        shapes = [_routed(s, r) for s in shapes for r in ([s["routing"]] if "routing" in s else case.routing)]
    return shapes


def _routed(shape: dict, routing: str) -> dict:
    """A moe shape under `routing`; a replayed one names the file's id and hash (`replay:<id>@<sha256[:12]>`) and
    carries its first layer's pairs per expert (`routing_hist`), the file checked against the shape's experts and
    top-k (a ConfigError naming the file)."""
    if not routing.startswith("replay:"):
        return {**shape, "routing": routing}
    rep = load_replay(routing.removeprefix("replay:"))
    replay_skew(rep, 1, shape["experts"], shape["topk"], "cpu")  # the sizes must match
    return {**shape, "routing": rep.label, "routing_hist": [int(c) for c in rep.histograms()[0].tolist()]}


def _upcast(args: tuple, dtype: torch.dtype) -> tuple:
    return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def _reference(entry: Any, inputs: tuple, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """The op's reference outputs on `inputs` upcast to `dtype`. The upcast copies live only for the reference's call
    (freed when it returns): the point then holds its inputs and this reference, never the upcast copies beside them
    (a large decode attention's cache in fp32 is 2-4x its bf16 or e4m3 draw)."""
    return entry.outputs(entry.reference(*_upcast(inputs, dtype)))


def kernel_job(op: str, shape: dict, dtype: str, backend: str, flush_l2: bool, last: bool = True) -> Job:
    """One backend's point. `last`: the point's last backend in the plan, after which its shared inputs are freed."""
    key = {"kind": "kernel", "op": op, "backend": backend, "dtype": dtype, **shape}
    args_shape = {k: v for k, v in shape.items() if k != "source"}

    def run(ctx: RunContext) -> dict:
        try:
            return _measure(ctx, op, args_shape, dtype, backend, flush_l2)
        finally:
            if last:
                ctx.inputs.clear()

    label = f"{op} {backend} {dtype} " + " ".join(f"{k}={v}" for k, v in args_shape.items())
    return Job(key, run, label)


def inputs_key(op: str, shape: dict, dtype: str, seed: int) -> str:
    """What one set of kernel inputs is drawn for: the backends of a point share it (`source` is not in `shape`)."""
    return json.dumps([op, shape, dtype, seed], sort_keys=True, default=str)


def _measure(ctx: RunContext, op: str, args_shape: dict, dtype: str, backend: str, flush_l2: bool) -> dict:
    from tokenfleet.kernels import REGISTRY, rel_error

    entry = REGISTRY[op]
    if backend == "triton" and not ctx.on_gpu:
        return {"status": "skipped", "note": CPU_TRITON_NOTE}
    if (dtype == "fp8" or op == "gemm_fp8") and ctx.datasheet and not ctx.datasheet.has_fp8:
        return {"status": "skipped", "note": ctx.datasheet.fp8_refusal()}
    dt = to_dtype(dtype)
    if not ctx.on_gpu and op in CPU_CHECK_ONLY:
        return _check_only(ctx, op, args_shape, dt, backend)
    inputs = ctx.inputs.get(inputs_key(op, args_shape, dtype, ctx.seed),
                            lambda: entry.make_inputs(args_shape, dt, ctx.torch_device, ctx.seed))
    if backend == "compile":
        fn = compile_step(entry.baseline, ctx.torch_device)
    else:
        fn = {"triton": entry.triton, "torch": entry.baseline, **entry.baselines}[backend]
    # What the drawn inputs are (moe: the experts its routing touched, tokens per expert): recorded, and counted
    # (flops and bytes of the slots and experts the draw gave).
    drawn = entry.point_fields(args_shape, inputs) if entry.point_fields else {}
    # Correct before fast: the reference runs in fp32 (fp64 on the CPU) on the same fresh random inputs, once per
    # point (its backends share it with the inputs), before this backend's output exists: the peak is the inputs,
    # their upcast copies and the reference's own temporaries, not those and an output too. The checked call is the
    # first (compile / autotune happen in it): its time is the point's first_call_ms.
    refs = ctx.inputs.reference(lambda: _reference(entry, inputs, torch.float32 if ctx.on_gpu else torch.float64))
    out, first = first_call(lambda: fn(*inputs), ctx.torch_device)
    outs = entry.outputs(out)
    tol = entry.tolerance(dt)
    errs = [rel_error(o, r) for o, r in zip(outs, refs, strict=True)]
    err = max(errs)
    if not err <= tol:  # also catches NaN
        return {"status": "incorrect", "rel_error": err, "error": f"relative error {err:.3g} > tolerance {tol:g}"}
    del out, outs, refs
    graphs = compiled_graphs()
    # args=: on a GPU, CUDA-graph replays over input copies beyond 2x L2 (cold), launch_us beside.
    t = ctx.measure(fn, args=inputs, flush_l2=flush_l2)
    if compiled_graphs() != graphs:
        raise RuntimeError("torch.compile compiled a graph during the samples")
    return {**t.to_dict(), **first, **drawn, "rel_error": err, "flops": entry.flops({**args_shape, **drawn}),
            "bytes": entry.bytes_moved({**args_shape, **drawn}, dt), **_op_fields(op, backend, dtype, ctx)}


def _op_fields(op: str, backend: str, dtype: str, ctx: RunContext) -> dict:
    """What an op records about how it was timed: gemm_fp8's accumulation (the same on every backend) and how each
    backend quantized its activations; the fused MoE's e4m3 experts accumulate in gemm_fp8's mode."""
    from tokenfleet.kernels import gemm_fp8

    if op == "gemm_fp8":
        return gemm_fp8.timing_fields(backend, ctx.device.kind)
    return {"fp8_accum": gemm_fp8.ACCUMULATION} if op == "moe" and dtype == "fp8" else {}


def _check_only(ctx: RunContext, op: str, args_shape: dict, dt: torch.dtype, backend: str) -> dict:
    """A CPU point of a CPU_CHECK_ONLY op: its backend checked against the fp64 reference at the shape capped to the
    op's small sizes, on inputs drawn for that shape alone (never the suite's), and not timed."""
    from tokenfleet.kernels import REGISTRY, rel_error

    entry = REGISTRY[op]
    small = {k: min(v, CPU_CHECK_ONLY[op].get(k, v)) if isinstance(v, int) else v for k, v in args_shape.items()}
    inputs = entry.make_inputs(small, dt, ctx.torch_device, ctx.seed)
    fn = compile_step(entry.baseline, ctx.torch_device) if backend == "compile" else entry.baseline
    refs = _reference(entry, inputs, torch.float64)
    err = max(rel_error(o, r) for o, r in zip(entry.outputs(fn(*inputs)), refs, strict=True))
    tol = entry.tolerance(dt)
    where = " ".join(f"{k}={v}" for k, v in small.items())
    fields = _op_fields(op, backend, "fp8", ctx)
    if not err <= tol:  # also catches NaN
        return {"status": "incorrect", "rel_error": err, "error": f"relative error {err:.3g} > tolerance {tol:g} "
                f"at {where}", **fields}
    return {"status": "skipped", "rel_error": err, "note": f"{CPU_FP8_NOTE}; checked against fp64 at {where}",
            **fields}


def plan(spec: Spec, ctx: RunContext) -> list[Job]:
    jobs = []
    for case in spec.cases:
        for shape in case_shapes(case):
            for dtype in case.dtypes:
                for backend in case.backends:  # side by side: they share the point's inputs
                    jobs.append(kernel_job(case.op, shape, dtype, backend, spec.flush_l2,
                                           last=backend == case.backends[-1]))
    return jobs
