"""Kernels: each op x shape x dtype x backend of `kernels.REGISTRY`, checked against its reference, then timed.

Backends: `triton` (ours) and `torch` (the op's vendor `baseline`: cuBLAS through F.linear, FlashAttention
through SDPA, ...). On the CPU only the
torch backend is timed: Triton's interpreter runs one program at a time in numpy and is a correctness tool,
so Triton points there are `skipped` with that reason. Shapes come from model configs (`models:` + `tokens:`)
or are given literally (`shapes:`).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, PositiveInt, ValidationInfo, field_validator, model_validator

from harness.config import Strict
from harness.dtypes import to_dtype
from harness.measure.context import CPU_TRITON_NOTE, Job, RunContext
from harness.model.spec import ModelConfig, load_model_config

# The sizes each op's make_inputs reads from a literal shape (kernels/<op>.py); a missing one fails at load.
SHAPE_FIELDS = {"gemm": ("m", "n", "k"), "rmsnorm": ("rows", "hidden"), "rope": ("tokens", "q_heads", "kv_heads",
                "head_dim"), "silu_mul": ("rows", "n"), "attention_prefill": ("batch", "q_heads", "kv_heads", "seq",
                "head_dim"), "attention_decode": ("batch", "q_heads", "kv_heads", "context", "head_dim")}


class OpCase(Strict):
    op: str
    dtypes: list[Literal["fp32", "bf16", "fp16"]] = Field(min_length=1)
    backends: list[Literal["triton", "torch"]] = ["triton", "torch"]
    shapes: list[dict[str, Any]] = Field(default_factory=list, description="literal shape dicts")
    models: list[str] = Field(default_factory=list, description="derive shapes from these model configs")
    tokens: list[PositiveInt] = Field(default_factory=list, description="rows (M) / sequence length for model shapes")
    batch: list[PositiveInt] = Field(default_factory=list, description="attention_decode: sequences")
    context: list[PositiveInt] = Field(default_factory=list, description="attention_decode: context length")

    @field_validator("op")
    @classmethod
    def _known(cls, v: str) -> str:
        from kernels import REGISTRY

        if v not in REGISTRY:
            raise ValueError(f"unknown op {v!r}; known: {', '.join(sorted(REGISTRY))}")
        return v

    @field_validator("shapes")
    @classmethod
    def _sizes(cls, v: list[dict[str, Any]], info: ValidationInfo) -> list[dict[str, Any]]:
        need = SHAPE_FIELDS.get(info.data.get("op"), ())
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
        if not self.shapes and not self.models:
            raise ValueError("give `shapes` or `models` (+ `tokens`, or `batch` and `context` for attention_decode)")
        for name in self.models:
            load_model_config(name)  # unknown model names fail here, listing the known ones
        return self


class Spec(Strict):
    cases: list[OpCase] = Field(min_length=1)
    flush_l2: bool = Field(True, description="flush L2 between samples on GPU so every sample reads from HBM")


def model_shapes(case: OpCase, cfg: ModelConfig) -> list[dict]:
    """The shapes `case.op` takes inside model `cfg` (dense layer shapes; tokens = rows of a step)."""
    h, d, hq, hkv, inter = cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size
    out: list[dict] = []
    for t in case.tokens:
        if case.op == "gemm":
            for part, n, k in (("qkv", (hq + 2 * hkv) * d, h), ("o", h, hq * d), ("gate_up", 2 * inter, h),
                               ("down", h, inter)):
                out.append({"m": t, "n": n, "k": k, "source": f"{cfg.id}.{part}"})
        elif case.op == "rmsnorm":
            out.append({"rows": t, "hidden": h, "residual": True, "source": cfg.id})
        elif case.op == "rope":
            out.append({"tokens": t, "q_heads": hq, "kv_heads": hkv, "head_dim": d, "source": cfg.id})
        elif case.op == "silu_mul":
            out.append({"rows": t, "n": inter, "source": cfg.id})
        elif case.op == "attention_prefill":
            out.append({"batch": 1, "q_heads": hq, "kv_heads": hkv, "seq": t, "head_dim": d, "causal": True,
                        "source": cfg.id})
    if case.op == "attention_decode":
        for b in case.batch:
            for c in case.context:
                out.append({"batch": b, "q_heads": hq, "kv_heads": hkv, "context": c, "max_context": c,
                            "head_dim": d, "source": cfg.id})
    return out


def case_shapes(case: OpCase) -> list[dict]:
    shapes = [dict(s) for s in case.shapes]
    for name in case.models:
        shapes += model_shapes(case, load_model_config(name))
    return shapes


def _upcast(args: tuple, dtype: torch.dtype) -> tuple:
    return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def kernel_job(op: str, shape: dict, dtype: str, backend: str, flush_l2: bool) -> Job:
    key = {"kind": "kernel", "op": op, "backend": backend, "dtype": dtype, **shape}

    def run(ctx: RunContext) -> dict:
        from kernels import REGISTRY, rel_error

        entry = REGISTRY[op]
        if backend == "triton" and not ctx.on_gpu:
            return {"status": "skipped", "note": CPU_TRITON_NOTE}
        args_shape = {k: v for k, v in shape.items() if k != "source"}
        dt = to_dtype(dtype)
        inputs = entry.make_inputs(args_shape, dt, ctx.torch_device, ctx.seed)
        fn = entry.triton if backend == "triton" else entry.baseline
        # Correct before fast: the reference runs in fp32 (fp64 on the CPU) on the same fresh random inputs.
        ref_dtype = torch.float32 if ctx.on_gpu else torch.float64
        outs = entry.outputs(fn(*inputs))
        refs = entry.outputs(entry.reference(*_upcast(inputs, ref_dtype)))
        tol = entry.tolerance(dt)
        errs = [rel_error(o, r) for o, r in zip(outs, refs, strict=True)]
        err = max(errs)
        if not err <= tol:  # also catches NaN
            return {"status": "incorrect", "rel_error": err, "error": f"relative error {err:.3g} > tolerance {tol:g}"}
        del outs, refs
        # args=: on a GPU, CUDA-graph replays over input copies beyond 2x L2 (cold), launch_us beside.
        t = ctx.measure(fn, args=inputs, flush_l2=flush_l2)
        return {**t.to_dict(), "rel_error": err, "flops": entry.flops(args_shape),
                "bytes": entry.bytes_moved(args_shape, dt)}

    label = f"{op} {backend} {dtype} " + " ".join(f"{k}={v}" for k, v in shape.items() if k != "source")
    return Job(key, run, label)


def plan(spec: Spec, ctx: RunContext) -> list[Job]:
    jobs = []
    for case in spec.cases:
        for shape in case_shapes(case):
            for dtype in case.dtypes:
                for backend in case.backends:
                    jobs.append(kernel_job(case.op, shape, dtype, backend, spec.flush_l2))
    return jobs
