"""Model parts: `prefill` (batch × prompt length -> TTFT, prefill tokens/s, MFU) and `decode` (batch × context ->
step time, decode tokens/s, MBU), over `tokenfleet.model.decoder` with seeded random weights at the real shapes.

Backends (`tokenfleet.model.decoder`): `triton` (our kernels), `torch` (PyTorch eager with the vendor ops), `compile`
(the torch model under torch.compile; its compile time lands in the point's `first_call_ms`, never in its samples).
Per model and dtype the weights are built once on the device (one model held at a time) and every backend is checked
before anything is timed: its logits (prefill, then one decode step with the KV cache) against a full recompute by
the `reference` backend (fp32 math), the oracle that is never timed. A model that does not fit (or `layers: N`) is
built with N real layers; its time is scaled to the full layer count, with embedding + final norm + LM head timed
once (`scaled_from_layers`). `tp: p` builds one GPU's shard (heads/p, kv_heads/p, intermediate/p, vocab/p); the
all-reduces are not in the time. On CPU triton points are `skipped` (Triton's interpreter is not a timing tool).

This module holds the sections (`PrefillSpec`, `DecodeSpec`, their fp8 grid), the session (building a model,
checking its backends, the device's memory) and the plans; the timed points are `tokenfleet.measure.parts.model_points`.

MoE models (`qwen3_moe`, `deepseek_v3`): built whole or by a layer subset (every layer alike; or DeepSeek-V3's dense
layers first, then MoE: the subset holds every dense layer and at least one MoE layer, the dense layers timed apart
and each kind scaled to its own count; interleaved layouts are refused), bf16/fp32/fp16, or fp8: e4m3 routed experts
with DeepSeek-V3's 128x128 block scales (`fp8_scale: block`), bf16 elsewhere (MLA included; `model.fp8`), the key
saying `expert_dtype: fp8`, on triton and torch (torch: torch._scaled_mm with block scales, CUDA sm90+), one GPU
(tp 1). A point states its routing condition (`routing`: the model's own router on its random
weights, nearly uniform; `zipf`: a stated skew on the routers' choice; `replay`: a routing file's per-layer
popularity, `model.replay`) and what it produced: the experts touched
per MoE layer and tokens per expert (`model_points`). `ep: p` times one GPU of an expert-parallel pool
(`decoder.ep_slice`: E/p experts held, the pool's tokens routed; key `ep`; its routed-expert time `expert_ms`, which
the capacity model's EP pools read). `more` lists further grids of a section (other models, other
batches) beside its main one, e.g. a tiny MoE decode next to a dense grid.
"""

from __future__ import annotations

import functools
import gc
import itertools
import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import Field, NonNegativeInt, PositiveInt, field_validator, model_validator
from tokenfleet.config import Strict, known_names
from tokenfleet.dtypes import dtype_bytes
from tokenfleet.kernels import rel_error
from tokenfleet.measure.context import CPU_TRITON_NOTE, Job, RunContext
from tokenfleet.measure.device import meminfo
from tokenfleet.measure.parts.model_points import _decode_point, _prefill_point
from tokenfleet.model import decoder as M
from tokenfleet.model import fp8 as F8
from tokenfleet.model import moe as E
from tokenfleet.model import replay as R
from tokenfleet.model.spec import ModelConfig, load_model_config, tp_problem

# Relative L2 error of logits allowed against the reference. The check runs the full stack of real-shaped layers, so
# rounding compounds: bf16 (8 mantissa bits) rounds each layer's output to ~0.4%; fp32 is looser than its epsilon
# because Triton's tl.dot runs fp32 as tf32 on sm80+ (10 mantissa bits).
# fp8: every backend's fp8 model against the bf16 model's reference logits (same seed, before quantizing), with
# tokenfleet.model.fp8.TOLERANCE: e4m3 rounding, not a backend's error, dominates it.
TOLERANCE = {"fp32": 1e-2, "bf16": 6e-2, "fp16": 2e-2, "fp8": F8.TOLERANCE}
# MoE models in 16-bit: a token whose k-th and (k+1)-th router scores nearly tie picks another expert in bf16 than
# in the fp32 reference, which moves its logits more than rounding does, and more so with depth and expert count.
# Measured on the CPU (torch backend, bf16, seed 0, vocab cut to 4096): qwen3-30b-a3b 4 layers 0.018; 16 layers with
# 32 experts 0.039; 48 layers with 16 experts 0.027 (48 layers of 128 experts did not fit the CPU: expected above
# 0.04). A broken expert path on the tiny fp32 models: equal routing weights 0.12 (tiny-qwen3-moe) / 0.40
# (tiny-deepseek-v3), another token's experts 0.56 / 0.84.
# fp8 MoE models (e4m3 experts) against the bf16 model's reference: model.fp8.MOE_TOLERANCE (a stated multiple of the
# measured error).
MOE_TOLERANCE = {"bf16": 0.1, "fp16": 0.1, "fp8": F8.MOE_TOLERANCE}
MEMORY_FRACTION = 0.85  # of the free memory the points may plan for
WEIGHT_FRACTION = 0.6  # of that, for weights, when choosing how many layers fit
CHECK_BATCH, CHECK_LEN = 2, 8
Backend = Literal["triton", "torch", "compile"]


def _known_models(v: list[str] | None) -> list[str] | None:
    known = known_names("models")
    unknown = [m for m in v or [] if m not in known]
    if unknown:
        raise ValueError(f"unknown model {unknown[0]!r}; known: {', '.join(known)}")
    return v


class Fp8Grid(Strict):
    """fp8 points beside a section's grid (e4m3 layer projections, bf16 elsewhere); unset lists take the section's."""

    models: list[str] | None = None
    backends: list[Backend] | None = None
    batch: list[PositiveInt] | None = None
    context: list[PositiveInt] | None = Field(None, description="decode")
    prompt_len: list[PositiveInt] | None = Field(None, description="prefill")
    kv_dtype: Literal["bf16", "fp8"] = "bf16"
    scale: Literal["tensor", "block"] = "tensor"

    _models = field_validator("models")(classmethod(lambda cls, v: _known_models(v)))


class Routing(Strict):
    """The routing an MoE point runs: `router`, the model's own routers on its seeded random weights (random weights
    route almost uniformly); `zipf`, a bias -exponent·ln(rank) on each expert's choice score (`moe.routing_skew`;
    ranks a seeded permutation), which skews the choice as real routers' is skewed; `replay`, a routing file's
    per-layer expert popularity (`file`: a name under configs/routing/ or a path; `model.replay`), the label naming
    the file's id and the sha256 of its bytes. Dense models ignore it."""

    kind: Literal["router", "zipf", "replay"] = "router"
    exponent: float = Field(1.0, gt=0, description="zipf")
    file: str | None = Field(None, description="replay: the routing file (configs/routing/<name>.yaml or a path)")

    @model_validator(mode="after")
    def _file(self) -> Routing:
        if (self.kind == "replay") != (self.file is not None):
            raise ValueError("routing: `file` goes with kind replay, and replay needs one")
        if self.file is not None:
            self.replay  # noqa: B018 - loads and validates the file now: a bad one is a ConfigError naming it
        return self

    @property
    def replay(self) -> R.Replay | None:
        return _replay(self.file) if self.file is not None else None

    @property
    def label(self) -> str:
        if self.kind == "replay":
            return self.replay.label
        return "router" if self.kind == "router" else f"zipf-{self.exponent:g}"


@functools.lru_cache(maxsize=16)
def _replay(file: str) -> R.Replay:
    return R.load_replay(file)


class MoreGrid(Strict):
    """A further grid beside a section's own, in its settings but for the fields given (unset: the section's)."""

    models: list[str] = Field(min_length=1)
    backends: list[Backend] | None = None
    dtypes: list[Literal["fp32", "bf16", "fp16", "fp8"]] | None = None
    fp8_scale: Literal["tensor", "block"] | None = Field(None, description="fp8 points (MoE: block, e4m3 experts)")
    batch: list[PositiveInt] | None = None
    context: list[PositiveInt] | None = Field(None, description="decode")
    prompt_len: list[PositiveInt] | None = Field(None, description="prefill")
    layers: PositiveInt | None = None
    routing: Routing | None = None
    ep: PositiveInt | None = None
    ep_rank: NonNegativeInt | None = None

    _models = field_validator("models")(classmethod(lambda cls, v: _known_models(v)))


class _ModelSpec(Strict):
    models: list[str] = Field(min_length=1)
    backends: list[Backend] = Field(default_factory=lambda: list(M.TIMED_BACKENDS), min_length=1)
    dtypes: list[Literal["fp32", "bf16", "fp16", "fp8"]] = Field(default_factory=lambda: ["bf16"], min_length=1)
    # fp8 points only (e4m3 layer projections, bf16 elsewhere): the KV cache's dtype and the scale layout.
    kv_dtype: Literal["bf16", "fp8"] = "bf16"
    fp8_scale: Literal["tensor", "block"] = "tensor"
    fp8: Fp8Grid | None = Field(None, description="fp8 points beside this grid")
    batch: list[PositiveInt] = Field(default_factory=lambda: [1], min_length=1)
    layers: PositiveInt | None = Field(None, description="build this many real layers and scale to the full count")
    tp: PositiveInt = Field(1, description="tensor-parallel degree: time one GPU's shard of every projection")
    check: bool = Field(True, description="check logits before timing (off only for debugging)")
    routing: Routing = Field(default_factory=Routing, description="MoE models: the routing condition")
    ep: PositiveInt = Field(1, description="MoE models: time one GPU of an expert-parallel pool of ep GPUs (E/ep "
                            "experts held, the pool's tokens routed; decoder.ep_slice)")
    ep_rank: NonNegativeInt = Field(0, description="which GPU of the pool (its experts [rank·E/ep, (rank+1)·E/ep))")
    more: list[MoreGrid] = Field(default_factory=list, description="further grids beside this one")

    _models = field_validator("models")(classmethod(lambda cls, v: _known_models(v)))

    @model_validator(mode="after")
    def _rank(self):
        if self.ep_rank >= self.ep:
            raise ValueError(f"ep_rank {self.ep_rank} must be below ep {self.ep}")
        return self

    def fp8_spec(self, length_key: str):
        """This section narrowed to its fp8 grid: dtype fp8, the grid's models, batch, lengths, KV dtype, scales."""
        g = self.fp8
        upd = dict(models=g.models or self.models, backends=g.backends or self.backends, dtypes=["fp8"],
                   batch=g.batch or self.batch, kv_dtype=g.kv_dtype, fp8_scale=g.scale, fp8=None)
        if getattr(g, length_key):
            upd[length_key] = getattr(g, length_key)
        return self.model_copy(update=upd)

    def more_specs(self, length_key: str) -> list:
        """This section narrowed to each of its `more` grids (without fp8 or further grids of their own)."""
        out = []
        for g in self.more:
            upd = {k: v for k, v in g.model_dump(exclude_none=True).items() if k in ("models", "backends", "dtypes",
                                                                               "batch", length_key, "layers",
                                                                               "ep", "ep_rank", "fp8_scale")}
            upd.update(fp8=None, more=[], routing=g.routing or self.routing)
            out.append(self.model_copy(update=upd))
        return out


class PrefillSpec(_ModelSpec):
    prompt_len: list[PositiveInt] = Field(default_factory=lambda: [128, 512, 2048], min_length=1)


class DecodeSpec(_ModelSpec):
    context: list[PositiveInt] = Field(default_factory=lambda: [128, 1024, 4096], min_length=1)
    cuda_graph: bool = Field(True, description="capture the decode step in a CUDA graph on GPU")


# ---------------------------------------------------------------------------------------------------------------


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return meminfo("MemAvailable") or 1 << 62  # unknown: do not refuse


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@dataclass
class _Built:
    """One model's weights (the n built layers) and, per backend, the model on it and its check."""

    model: M.Transformer  # torch backend
    full_layers: int
    backends: dict = field(default_factory=dict)  # backend -> Transformer (compiled functions kept with it)
    rel_error: dict = field(default_factory=dict)  # backend -> relative error of its check (None: not checked)
    failed: dict = field(default_factory=dict)  # backend -> the incorrect-point dict
    want: torch.Tensor | None = None  # fp8: the bf16 model's reference check logits, before it was quantized


class _Session:
    """The model on the device, shared by the jobs of one grid: it holds the last model built (one at a time) and
    the last point's KV cache. Jobs may run in any order (a resumed run skips some): each asks for its model by
    key and gets the same weights, check and result whichever ran before; plan order only saves rebuilds."""

    def __init__(self):
        self.key: tuple | None = None
        self.built: _Built | None = None
        self.cache: M.KVCache | None = None

    def drop(self, device: torch.device, everything: bool = True) -> None:
        self.cache = None
        if everything:
            if self.built is not None and "compile" in self.built.backends:
                torch.compiler.reset()  # the compiled graphs of this model's shapes
            self.key, self.built = None, None
        _free(device)

    def get(self, ctx: RunContext, name: str, dtype: str, spec: _ModelSpec) -> _Built:
        key = (name, dtype, spec.tp, spec.layers, ctx.seed, spec.kv_dtype, spec.fp8_scale, spec.routing.label,
               spec.ep, spec.ep_rank)
        if key == self.key:
            return self.built
        self.drop(ctx.torch_device)
        cfg = M.shard_config(load_model_config(name), spec.tp)
        wdt = "bf16" if dtype == "fp8" else dtype  # fp8 is built in bf16 and quantized: sized at 2 bytes
        n = layers_to_build(cfg, dtype_bytes(wdt), _available_bytes(ctx.torch_device), spec.layers)
        model = M.build_model(cfg, "torch", wdt, ctx.torch_device, seed=ctx.seed, layers=n)
        if cfg.moe and spec.routing.kind == "zipf":
            model = model.with_routing(E.routing_skew(cfg.moe.num_experts, spec.routing.exponent, ctx.seed,
                                                      ctx.torch_device))
        elif cfg.moe and spec.routing.kind == "replay":  # one skew per MoE layer built
            model = model.with_routing(R.replay_skew(spec.routing.replay, model.cfg.num_moe_layers,
                                                     cfg.moe.num_experts, cfg.moe.experts_per_token, ctx.torch_device))
        model = M.ep_slice(model, spec.ep, spec.ep_rank)  # (ep 1: the model itself)
        _free(ctx.torch_device)  # the experts it does not hold
        want = None
        if dtype == "fp8":  # (an EP slice: the bf16 slice's reference, then only its experts quantized)
            want = reference_logits(model, seed=ctx.seed + 1) if spec.check else None
            model = F8.quantize(model, spec.fp8_scale, spec.kv_dtype)
        self.key, self.built = key, _Built(model, cfg.num_layers, want=want)
        return self.built

    def prepare(self, ctx: RunContext, spec: _ModelSpec, name: str, dtype: str, backend: str
                ) -> tuple[_Built, M.Transformer, dict | None]:
        """The model for a point on `backend`, checked, with the previous point's cache freed; or the
        `incorrect` point when the check failed."""
        built = self.get(ctx, name, dtype, spec)
        self.drop(ctx.torch_device, everything=False)
        if backend not in built.backends:
            built.backends[backend] = built.model.with_backend(backend)
        bad = self.check(ctx, built, backend, dtype, spec.check)
        return built, built.backends[backend], bad

    def check(self, ctx: RunContext, built: _Built, backend: str, dtype: str, enabled: bool) -> dict | None:
        """None when the backend's logits check out (once per model/dtype/backend), else the incorrect point."""
        if not enabled or backend in built.rel_error or backend in built.failed:
            return built.failed.get(backend)
        err = check_logits(built.backends[backend], seed=ctx.seed + 1, want=built.want)
        built.rel_error[backend] = err
        tol = MOE_TOLERANCE.get(dtype, TOLERANCE[dtype]) if built.model.cfg.moe else TOLERANCE[dtype]
        if not math.isfinite(err) or err > tol:
            what = "the bf16 model's reference" if built.want is not None else "the reference"
            built.failed[backend] = {
                "status": "incorrect", "rel_error": err if math.isfinite(err) else None,
                "error": f"logits vs {what} (fp32 math, full recompute): relative error {err:.3g} > {tol}"}
        return built.failed.get(backend)

    def check_memory(self, ctx: RunContext, need: float, what: str) -> None:
        """A point's refusal of an allocation of `need` bytes that would not fit (`_point_memory_check`)."""
        _point_memory_check(ctx, need, what)


def layers_to_build(cfg: ModelConfig, dtype_bytes_: int, available: int, requested: int | None) -> int:
    """`requested` (capped at the model's count), else as many layers as fit in WEIGHT_FRACTION of the free
    memory beside embedding and LM head (at least 1; the first n layers' own sizes: DeepSeek-V3's dense layers are
    smaller than its MoE ones). Raises OutOfMemoryError when not even that fits."""
    counts = M.param_counts(cfg)
    head = (counts["embedding"] + counts["lm_head"] + counts["norm"]) * dtype_bytes_

    def weights(n: int) -> float:  # the first n layers
        return head + (M.param_counts(M.with_layers(cfg, n))["layers"] if n else 0) * dtype_bytes_

    budget = available * MEMORY_FRACTION
    if requested is not None:
        n = min(requested, cfg.num_layers)
    elif cfg.is_dense:
        n = max(1, min(cfg.num_layers, int((budget * WEIGHT_FRACTION - head) // (counts["layer"] * dtype_bytes_))))
    else:
        n = max([1] + [k for k in range(1, cfg.num_layers + 1) if weights(k) <= budget * WEIGHT_FRACTION])
    if n < cfg.num_layers:
        why = subset_problem(cfg, n)
        if why and requested is None:  # memory chose n: too few layers to hold one of each kind
            raise torch.OutOfMemoryError(f"{why} ({available / 1e9:.1f} GB free)")
        if why:
            raise ValueError(why)
    need = weights(n)
    if need > budget:
        raise torch.OutOfMemoryError(f"{cfg.id}: {n} layers + embedding/head need {need / 1e9:.1f} GB of weights; "
                                     f"{available / 1e9:.1f} GB free")
    return n


def subset_problem(cfg: ModelConfig, n: int) -> str | None:
    """Why the first n layers of cfg would not scale to its full depth (None when they do): every layer alike, or
    DeepSeek-V3's layout (dense layers first, MoE after), whose subset must hold all the dense ones and an MoE one
    (each kind is scaled to its own count: model_points._scaled)."""
    if cfg.moe is None or cfg.num_moe_layers in (0, cfg.num_layers):
        return None
    m = cfg.moe
    if m.mlp_only_layers or m.sparse_step != 1:
        return f"{cfg.id}: its dense and MoE layers interleave, so a {n}-layer subset would not scale"
    if n <= m.dense_layers:
        return f"{cfg.id}: a {n}-layer subset holds no MoE layer (the first {m.dense_layers} are dense)"
    return None


def _check_tokens(model: M.Transformer, seed: int, batch: int, prompt_len: int) -> torch.Tensor:
    gen = torch.Generator(device=model.device).manual_seed(seed)
    return torch.randint(0, model.cfg.vocab_size, (batch, prompt_len + 1), generator=gen, device=model.device)


@torch.no_grad()
def reference_logits(model: M.Transformer, seed: int = 0, batch: int = CHECK_BATCH,
                     prompt_len: int = CHECK_LEN) -> torch.Tensor:
    """The `reference` backend's (fp32 math) logits of the check's last prompt token and next token [B, 2, V],
    recomputing the whole sequence without a cache."""
    tokens = _check_tokens(model, seed, batch, prompt_len)
    return model.with_backend("reference").forward(tokens)[:, prompt_len - 1:]


@torch.no_grad()
def check_logits(model: M.Transformer, seed: int = 0, batch: int = CHECK_BATCH, prompt_len: int = CHECK_LEN,
                 want: torch.Tensor | None = None) -> float:
    """Relative L2 error of `model`'s next-token logits for a fresh random prompt (prefill into the KV cache) and one
    decode step, against `reference_logits` of the same model (or `want`: for an fp8 model, the bf16 model's): one
    check of the backend's ops and of its cache path."""
    tokens = _check_tokens(model, seed, batch, prompt_len)
    cache = model.new_cache(batch, prompt_len + 1)
    first = M.prefill(model, tokens[:, :prompt_len], cache)  # [B, V]
    second = M.decode_one_token(model, tokens[:, prompt_len], cache)  # [B, V]
    if want is None:
        want = reference_logits(model, seed, batch, prompt_len)  # [B, 2, V]
    return rel_error(torch.stack([first, second], 1), want)


def _point_memory_check(ctx: RunContext, need: float, what: str) -> None:
    """On CPU an allocation past memory is the kernel's OOM killer, not an exception: refuse it up front."""
    if ctx.torch_device.type == "cpu":
        avail = _available_bytes(ctx.torch_device) * MEMORY_FRACTION
        if need > avail:
            raise torch.OutOfMemoryError(f"{what} needs ~{need / 1e9:.1f} GB; {avail / 1e9:.1f} GB free on the CPU")


def _guard_oom(session: _Session, ctx: RunContext, fn):
    """Run fn; on OOM free the cache (outside the except block, so the traceback no longer pins the tensors)
    and raise a fresh OutOfMemoryError for the runner to record."""
    try:
        return fn()
    except torch.OutOfMemoryError as e:
        msg = str(e).splitlines()[0] if str(e) else "out of memory"
    session.drop(ctx.torch_device, everything=False)
    raise torch.OutOfMemoryError(msg)


def _skipped(note: str):
    """A job's run that records the point as skipped, with why."""
    return functools.partial(_skipped_point, note)


def _skipped_point(note: str, ctx: RunContext) -> dict:
    return {"status": "skipped", "note": note}


def _run(session: _Session, point, spec: _ModelSpec, args: tuple, ctx: RunContext) -> dict:
    """The point of `args` (name, dtype, backend, batch, length): its model prepared and checked, then timed by
    `point`; or the `incorrect` point of a failed check, untimed."""
    name, dtype, backend, batch, length = args

    def prepared_point() -> dict:
        built, m, bad = session.prepare(ctx, spec, name, dtype, backend)
        return bad or point(ctx, session, spec, built, m, dtype, backend, batch, length)

    return _guard_oom(session, ctx, prepared_point)


def _not_buildable(name: str, spec: _ModelSpec, dtype: str, backend: str, on_gpu: bool) -> str | None:
    """Why the decoder cannot build `name` at spec.tp in `dtype` on `backend`, or None."""
    cfg = load_model_config(name)
    return not_buildable(cfg, spec.tp, dtype, spec.layers) or ep_problem(cfg, spec.ep, backend, spec.ep_rank) or (
        moe_fp8_problem(cfg, backend, spec.fp8_scale, spec.kv_dtype, on_gpu) if dtype == "fp8" else None)


def ep_problem(cfg: ModelConfig, ep: int, backend: str, rank: int = 0) -> str | None:
    """Why GPU `rank` of an expert-parallel pool of `ep` GPUs is not built for cfg on `backend` (None: it is)."""
    if ep == 1:
        return None
    if rank >= ep:  # (a `more` grid's, which model_copy does not validate)
        return f"{cfg.id}: ep_rank {rank} must be below ep {ep}"
    if cfg.moe is None:
        return f"{cfg.id}: ep {ep}: a dense model has no experts to hold"
    if cfg.moe.num_experts % ep:
        return f"{cfg.id}: ep {ep} does not divide its {cfg.moe.num_experts} experts"
    if backend == "compile":
        return f"{cfg.id}: expert-parallel slices are not built under torch.compile (moe.kernel_experts)"
    return None


def moe_fp8_problem(cfg: ModelConfig, backend: str, scale: str, kv_dtype: str, on_gpu: bool) -> str | None:
    """Why an fp8 (e4m3 experts) point of an MoE cfg is not built on `backend` (None: it is; dense: None)."""
    if cfg.moe is None:
        return None
    if scale != F8.EXPERT_LAYOUT:
        return f"{cfg.id}: e4m3 MoE experts take DeepSeek-V3's 128x128 block scales (fp8 scale: block), not {scale}"
    if cfg.mla and kv_dtype != "bf16":
        return f"{cfg.id}: the MLA latent cache is built in bf16 only (kv_dtype {kv_dtype})"
    if backend == "compile":
        return f"{cfg.id}: e4m3 experts are not built under torch.compile (moe.kernel_experts)"
    if backend == "torch" and not on_gpu:
        return f"{cfg.id}: e4m3 experts on torch run torch._scaled_mm with block scales, CUDA sm90+ only"
    return None


def not_buildable(cfg: ModelConfig, tp: int, dtype: str, layers: int | None = None) -> str | None:
    """Why tokenfleet.model cannot build cfg for a point (tp ranks, dtype, a requested layer subset), or None."""
    if not cfg.is_dense:
        if tp > 1:
            return f"{cfg.id}: tensor-parallel shards of MoE / MLA models are not built (tp {tp})"
        if dtype == "fp8" and cfg.moe is None:
            return f"{cfg.id}: fp8 MLA without MoE experts is not built"
        if layers is not None and layers < cfg.num_layers and subset_problem(cfg, layers):
            return subset_problem(cfg, layers)
    return tp_problem(cfg, tp)


def _plan(kind: str, spec: _ModelSpec, ctx: RunContext, length_key: str, point, session: _Session) -> list[Job]:
    """One job per point of models × dtypes × backends × batch × lengths, in that order (a model's points
    together, so it is built once); all of them share one explicit session."""
    lengths = getattr(spec, length_key)
    jobs: list[Job] = []
    for name, dtype, backend, batch, length in itertools.product(spec.models, spec.dtypes, spec.backends,
                                                                 spec.batch, lengths):
        key = {"kind": kind, "model": name, "backend": backend, "dtype": dtype, "batch": batch, length_key: length,
               "tp": spec.tp, "layers": spec.layers}
        if dtype == "fp8":
            key.update(kv_dtype=spec.kv_dtype, fp8_scale=spec.fp8_scale)
        cfg = load_model_config(name)
        if cfg.moe:
            key["routing"] = spec.routing.label
            if spec.ep > 1:
                key.update(ep=spec.ep, ep_rank=spec.ep_rank)
            if spec.routing.kind == "replay":  # the file fits the model (at the depth asked): else exit 2 now
                R.replay_skew(spec.routing.replay, M.with_layers(cfg, min(spec.layers or cfg.num_layers,
                                                                          cfg.num_layers)).num_moe_layers,
                              cfg.moe.num_experts, cfg.moe.experts_per_token, "cpu")
            if dtype == "fp8":  # the routed experts are what is e4m3 (bf16 elsewhere)
                key["expert_dtype"] = "fp8"
        no_fp8 = dtype == "fp8" and ctx.datasheet and ctx.datasheet.fp8_refusal()
        cpu_triton = CPU_TRITON_NOTE if backend == "triton" and not ctx.on_gpu else None
        skip = _not_buildable(name, spec, dtype, backend, ctx.on_gpu) or no_fp8 or cpu_triton
        run = _skipped(skip) if skip else functools.partial(_run, session, point, spec,
                                                            (name, dtype, backend, batch, length))
        cond = "".join(f" {k}={key[k]}" for k in ("ep", "ep_rank", "routing")
                       if key.get(k, "router") not in ("router", None))
        jobs.append(Job(key=key, run=run,
                        label=f"{kind} {name} {backend} {dtype} b{batch} {length_key}{length}{cond}"))
    return jobs


def _plan_section(kind: str, spec: _ModelSpec, ctx: RunContext, length_key: str, point) -> list[Job]:
    session = _Session()  # one model on the device at a time, across the grid and its fp8 grid
    jobs = _plan(kind, spec, ctx, length_key, point, session)
    for more in spec.more_specs(length_key):
        jobs += _plan(kind, more, ctx, length_key, point, session)
    if spec.fp8 is not None:  # last: fp8 points follow every bf16 one
        jobs += _plan(kind, spec.fp8_spec(length_key), ctx, length_key, point, session)
    return _released_after(jobs, session)


def _released_after(jobs: list[Job], session: _Session) -> list[Job]:
    """The jobs, the session's model and cache dropped once every one of them has run (in whatever order), so the
    parts after it (kernels, the end-of-run probes) have the device's memory back. A job run again, or a run cut
    or resumed, at worst drops early (the next job rebuilds) or never (as before)."""
    left = [len(jobs)]

    def counted(run):
        def go(ctx: RunContext) -> dict:
            try:
                return run(ctx)
            finally:
                left[0] -= 1
                if left[0] == 0:
                    session.drop(ctx.torch_device)
        return go

    return [Job(j.key, counted(j.run), j.label) for j in jobs]


def plan_prefill(spec: PrefillSpec, ctx: RunContext) -> list[Job]:
    return _plan_section("prefill", spec, ctx, "prompt_len", _prefill_point)


def plan_decode(spec: DecodeSpec, ctx: RunContext) -> list[Job]:
    return _plan_section("decode", spec, ctx, "context", _decode_point)
