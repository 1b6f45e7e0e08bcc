"""Tensor-parallel model points: prefill and decode grids of `tokenfleet.model.tp` at tp = the run's world size.

Points are `kind: prefill|decode` with `tp` and `world_size`, so tables and capacity read them beside the
one-GPU grids. Per model, dtype and backend, before anything is timed, the sharded model is checked against the
unsharded one on the same full weights (the first 2 layers, real shapes): the next-token logits of a prefill and of
one decode step (`rel_error_prefill`, `rel_error_decode`). The timed model is one shard per rank with seeded random
weights (never the whole model on one device); layers that do not fit are scaled as in the one-GPU part.

Every step is timed in lockstep (`distributed.lockstep_measure`: all ranks call it the same number of times), the
decode step in a CUDA graph on GPU with its collectives inside (used only when every rank captured it). The same
step without its collectives (`TPTransformer.with_comm(False)`) is timed too: `comm_ms` = with − without,
`comm_fraction` = comm_ms / step. `flops` and `bytes` are one rank's (its shard), so MFU/MBU are per GPU;
`tokens_per_s` is the replica's (all p GPUs). Local work that fails on any rank (building, allocating) fails the
point on every rank together (`distributed.agree`).
"""

from __future__ import annotations

import math
import os
from typing import Literal

import torch
from pydantic import Field, PositiveInt
from tokenfleet.dtypes import dtype_bytes
from tokenfleet.kernels import rel_error
from tokenfleet.measure import distributed as D
from tokenfleet.measure.context import CPU_TRITON_NOTE, Job, RunContext
from tokenfleet.measure.parts import model as P
from tokenfleet.measure.parts.model_points import _scaled
from tokenfleet.model import decoder as M
from tokenfleet.model import tp as T
from tokenfleet.model.spec import load_model_config

CHECK_LAYERS = 2


class Spec(P._ModelSpec):
    """The model part's fields (models, every backend it times, dtypes, batch, layers, check) and both grids."""

    tp: None = Field(None, description="not set here: tp is the run's world size (`--nproc N`)")
    dtypes: list[Literal["fp32", "bf16", "fp16"]] = Field(default_factory=lambda: ["bf16"], min_length=1)  # no fp8
    fp8: None = Field(None, description="not here: the sharded model has no fp8 path")
    prompt_len: list[PositiveInt] = Field(default_factory=list, description="prefill grid (empty: none)")
    context: list[PositiveInt] = Field(default_factory=list, description="decode grid (empty: none)")
    cuda_graph: bool = Field(True, description="capture the decode step (collectives included) on GPU")


def _check_models(ctx: RunContext, name: str, dtype: str, backend: str, g: D.Group):
    """The unsharded model (torch backend) of CHECK_LAYERS real layers and this rank's shard of it (`backend`)."""
    cfg = load_model_config(name)
    cfg = M.with_layers(cfg, min(CHECK_LAYERS, cfg.num_layers))
    full = M.Transformer(cfg, M.random_weights(cfg, dtype, ctx.torch_device, ctx.seed + 11), "torch")
    return full, T.tp_from_full(full, g.rank, g.world).with_backend(backend)


@torch.no_grad()
def check_tp(ctx: RunContext, full: M.Transformer, sharded: T.TPTransformer, g: D.Group) -> tuple[float, float]:
    """(prefill, decode) relative L2 error of the sharded model's next-token logits against the unsharded model's
    on the same full weights and a fresh random prompt."""
    gen = torch.Generator(device=ctx.torch_device).manual_seed(ctx.seed + 12)
    b, s = P.CHECK_BATCH, P.CHECK_LEN
    tokens = torch.randint(0, full.cfg.vocab_size, (b, s + 1), generator=gen, device=ctx.torch_device)

    def run(m):
        cache = m.new_cache(b, s + 1)
        return M.prefill(m, tokens[:, :s], cache), M.decode_one_token(m, tokens[:, s], cache)

    (want_p, want_d), (got_p, got_d) = run(full), run(sharded)
    # Every rank holds the gathered logits; the max makes the verdict one verdict.
    return g.max(rel_error(got_p, want_p)), g.max(rel_error(got_d, want_d))


class _Session:
    """One model's shard on each rank at a time, and each backend's check."""

    def __init__(self):
        self.key, self.model, self.full_layers, self.checked = None, None, 0, {}

    def drop(self, device: torch.device) -> None:
        """The shard freed (P._released_after: after the part's last job); the checks' results are kept."""
        self.key, self.model = None, None
        P._free(device)

    def prepare(self, ctx: RunContext, spec: Spec, name: str, dtype: str, backend: str, g: D.Group):
        """(model on backend, check fields, None) or (None, None, the failed point)."""
        if spec.check and (name, dtype, backend) not in self.checked:
            models, failed = D.agree(lambda: _check_models(ctx, name, dtype, backend, g))
            if failed:
                return None, {}, failed
            self.checked[(name, dtype, backend)] = check_tp(ctx, *models, g)
            del models
            P._free(ctx.torch_device)
        errs = self.checked.get((name, dtype, backend))
        fields = {"rel_error_prefill": errs[0], "rel_error_decode": errs[1], "rel_error": max(errs)} if errs else {}
        tol = P.TOLERANCE[dtype]
        if errs and not (math.isfinite(max(errs)) and max(errs) <= tol):
            return None, fields, {**fields, "status": "incorrect",
                                  "error": f"tp {g.world} logits vs unsharded: relative error {max(errs):.3g} > {tol}"}
        key = (name, dtype, spec.layers)
        if key != self.key:
            self.key, self.model = None, None
            P._free(ctx.torch_device)
            n, failed = D.agree(lambda: _layers_here(ctx, spec, name, dtype, g))
            if failed:
                return None, fields, failed
            n = int(-g.max(-n))  # every rank builds as many layers as the tightest rank can hold
            built, failed = D.agree(lambda: T.build_tp_model(load_model_config(name), g.rank, g.world, "torch",
                                                             dtype, ctx.torch_device, ctx.seed, n))
            if failed:
                return None, fields, failed
            self.key, self.model = key, built
            self.full_layers = M.shard_config(load_model_config(name), g.world).num_layers
        return self.model.with_backend(backend), fields, None


def _layers_here(ctx: RunContext, spec: Spec, name: str, dtype: str, g: D.Group) -> int:
    """How many layers of the shard this rank can hold (ranks of one host share its CPU memory)."""
    shard = M.shard_config(load_model_config(name), g.world)
    avail = P._available_bytes(ctx.torch_device)
    if not ctx.on_gpu:
        avail //= int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return P.layers_to_build(shard, dtype_bytes(dtype), avail, spec.layers)


def _timed(ctx: RunContext, m: T.TPTransformer, full_layers: int, step_of, graph: bool):
    """Timing of step_of(model) with and without collectives, each scaled from the built layers with the
    embedding/head-only model timed alike. Returns (with, without, note)."""
    notes, out = [], []
    for comm in (True, False):
        mc = m.with_comm(comm)
        parts = [mc] + ([mc.with_layers(0)] if m.cfg.num_layers < full_layers else [])
        timings = []
        for part in parts:
            step = step_of(part)
            if graph and ctx.on_gpu:
                replay, why = D.agreed_graph(step)
                if replay is None:
                    notes.append(f"CUDA graph capture failed, timed eager: {why}"[:300])
                step = replay or step
            timings.append(D.lockstep_measure(ctx, step))
        t = _scaled(timings[0], timings[1] if len(timings) > 1 else None, m.cfg.num_layers, full_layers)
        t["cuda_graph"] = bool(graph and ctx.on_gpu and not notes)
        out.append(t)
    return out[0], out[1], "; ".join(dict.fromkeys(notes)) or None


def _comm_fields(t: dict, t0: dict) -> dict:
    ms, ms0 = t["median_ms"], t0["median_ms"]
    return {"median_ms_no_comm": ms0, "comm_ms": ms - ms0, "comm_fraction": (ms - ms0) / ms if ms > 0 else None}


def _cache(ctx: RunContext, m: T.TPTransformer, batch: int, length: int, seed: int | None) -> M.KVCache:
    P._point_memory_check(ctx, batch * length * m.cfg.kv_bytes_per_token(m.dtype.itemsize), "KV cache")
    cache = m.new_cache(batch, length)
    return cache if seed is None else cache.fill_random(seed)


def _point(ctx: RunContext, session: _Session, spec: Spec, kind: str, name: str, dtype: str, backend: str,
           batch: int, length: int) -> dict:
    g = D.current()
    m, fields, failed = session.prepare(ctx, spec, name, dtype, backend, g)
    if failed:
        return failed
    n, full_layers = m.cfg.num_layers, session.full_layers
    db, dev = dtype_bytes(dtype), ctx.torch_device
    gen = torch.Generator(device=dev).manual_seed(ctx.seed + batch * 7919 + length)  # the same tokens on every rank
    if kind == "prefill":
        tokens = torch.randint(0, m.vocab_size, (batch, length), generator=gen, device=dev)  # [B, S]
        cache, failed = D.agree(lambda: _cache(ctx, m, batch, length, None))

        def step_of(x):
            return lambda: x.forward_prefill(tokens, cache)
    else:
        tokens = torch.randint(0, m.vocab_size, (batch,), generator=gen, device=dev)  # [B]
        pos = torch.full((batch,), length, dtype=torch.int32, device=dev)  # every sample does the same work
        cache, failed = D.agree(lambda: _cache(ctx, m, batch, length + 1, ctx.seed + batch + length))

        def step_of(x):
            return lambda: x.forward_decode(tokens, pos, cache)
    if failed:
        return {**fields, **failed}
    with torch.no_grad():
        t, t0, note = _timed(ctx, m, full_layers, step_of, kind == "decode" and spec.cuda_graph)
    full = M.with_layers(m.cfg, full_layers)  # one rank's shard, all layers
    ms, out = t["median_ms"], {**t, **fields, **_comm_fields(t, t0)}
    if kind == "prefill":
        out.update(ttft_ms=ms, tokens_per_s=batch * length / (ms / 1e3), flops=M.prefill_flops(full, batch, length),
                   bytes=M.prefill_bytes(full, batch, length, db))
    else:
        out.update(tpot_ms=ms, tokens_per_s=batch / (ms / 1e3), tokens_per_s_per_seq=1e3 / ms,
                   flops=M.decode_flops(full, batch, length), bytes=M.decode_bytes(full, batch, length, db))
    if n < full_layers:
        out["scaled_from_layers"] = n
    return {**out, **({"note": note} if note else {})}


def _why_not(name: str, world: int, on_gpu: bool, backend: str) -> str | None:
    cfg = load_model_config(name)
    if world < 2:
        return "one process: tensor-parallel points need `tokenfleet bench --nproc N` (or torchrun)"
    if not cfg.is_dense:  # the decode / prefill parts measure them on one GPU
        return f"{name}: tensor-parallel shards of MoE / MLA models are not built (tokenfleet.model.tp: dense only)"
    if backend == "triton" and not on_gpu:
        return CPU_TRITON_NOTE
    if backend == "compile":  # its collectives would have to be traced into the compiled layer graph: not built yet
        return "compile: tensor-parallel points run the eager backends (triton, torch) only"
    try:
        M.shard_config(cfg, world)
    except ValueError as e:
        return str(e)
    return None


def plan(spec: Spec, ctx: RunContext) -> list[Job]:
    session, world, jobs = _Session(), D.world_size(), []
    grids = [("prefill", "prompt_len", spec.prompt_len), ("decode", "context", spec.context)]
    for name in spec.models:
        for dtype in spec.dtypes:
            for backend in spec.backends:
                why = _why_not(name, world, ctx.on_gpu, backend)
                for kind, length_key, lengths in grids:
                    for batch in spec.batch:
                        for length in lengths:
                            key = {"kind": kind, "model": name, "backend": backend, "dtype": dtype, "batch": batch,
                                   length_key: length, "tp": world, "world_size": world, "layers": spec.layers}
                            if why:
                                run = P._skipped(why)
                            else:
                                def run(c: RunContext, a=(kind, name, dtype, backend, batch, length)) -> dict:
                                    return _point(c, session, spec, *a)
                            label = f"tp{world} {kind} {name} {backend} {dtype} b{batch} {length_key}{length}"
                            jobs.append(Job(key=key, run=run, label=label))
    return P._released_after(jobs, session)
