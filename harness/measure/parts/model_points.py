"""The model part's timed points: `_prefill_point` (TTFT, prefill tokens/s) and `_decode_point` (TPOT, decode
tokens/s), one point each of a `tokenfleet.measure.parts.model` grid, and how a point is timed and reported.

A point is handed its model built and checked (`parts.model._Session.prepare`: a failed check is the point, never
timed). It refuses a shape whose estimate does not fit (the session's `check_memory`), draws its inputs, keeps its KV
cache in the session (freed before the next point) and times one call: compile / autotune in a first call of its
own (`first_call_ms`, never in the samples), the decode step in a CUDA graph on a GPU when asked. A model built with
n of its layers is timed as built and scaled to the full depth (`_scaled`), with the embedding, final norm and LM
head timed alone once; `flops` and `bytes` are the full model's. This module sees the session only through that
object and imports nothing from `parts.model` (which plans the points and imports this).

An MoE model's point also says how it routed (`_routing`): its routing condition, and, from one eager forward of
the timed inputs after the samples, the distinct experts each MoE layer touched and the tokens each expert got; its
`bytes` count the experts touched (scaled to the full depth), not all of them. A triton point of an MoE / MLA model
names the ops that ran on the torch path in its note (`backends.TRITON_ON_TORCH`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from tokenfleet.dtypes import dtype_bytes
from tokenfleet.measure.context import RunContext
from tokenfleet.model import backends as B
from tokenfleet.model import decoder as M
from tokenfleet.model import fp8 as F8
from tokenfleet.model import moe as E

if TYPE_CHECKING:  # the session and the sections, for annotations only: parts.model imports this module
    from tokenfleet.measure.parts.model import DecodeSpec, PrefillSpec, _Built, _ModelSpec, _Session


def _scaled(t, head, n: int, full: int, prefix: tuple | None = None) -> dict:
    """Timing of n layers (+ embedding/head) scaled to `full` layers: head + (t - head)·full/n, never below t (the
    full depth is no faster than n of its layers). When noise puts the head alone above the n layers, the point is
    `noisy`: its layers were not resolved.

    `prefix` (timing p of the head + the first d layers, d, D): layers of two kinds (DeepSeek-V3: d dense layers,
    then MoE ones), each scaled to its own count: head + (p - head)·D/d + (t - p)·(full - D)/(n - d)."""
    out = t.to_dict()
    if head is None or n == full:
        return out
    h = head.to_dict()
    p, d, dense = (prefix[0].to_dict(), prefix[1], prefix[2]) if prefix else (h, 0, 0)

    def scale(x: float, hx: float, px: float) -> float:
        return max(x, hx + (px - hx) * (dense / d if d else 0.0) + (x - px) * (full - dense) / (n - d))

    unresolved = False
    for k in ("median_ms", "p20_ms", "p80_ms"):
        unresolved |= out[k] <= p[k] or (prefix is not None and p[k] <= h[k])
        out[k] = scale(out[k], h[k], p[k])
    if out.get("samples_ms"):  # scaled alike (about the head's median), so compare's interval matches the median
        out["samples_ms"] = [scale(x, h["median_ms"], p["median_ms"]) for x in out["samples_ms"]]
    out["spread"] = (out["p80_ms"] - out["p20_ms"]) / out["median_ms"] if out["median_ms"] > 0 else math.inf
    out["noisy"] = bool(t.noisy or head.noisy or (prefix is not None and prefix[0].noisy) or unresolved)
    return out


def _measure_step(ctx: RunContext, step, cuda_graph: bool):
    """Time a decode step, in a CUDA graph when asked and on a GPU; a failed capture falls back to eager and says
    why. Returns (Timing, note or None)."""
    if cuda_graph and ctx.on_gpu:
        try:
            return ctx.measure(step, cuda_graph=True), None
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - recorded in the point, timed eager instead
            torch.cuda.synchronize()
            return ctx.measure(step, cuda_graph=False), f"CUDA graph capture failed, timed eager: {e}"[:300]
    return ctx.measure(step, cuda_graph=False), None


def _timed(ctx: RunContext, fn, measure) -> tuple:
    """`measure(fn)` after a first call of its own (`M.first_call`: compile / autotune for this shape, reported as
    first_call_ms); a graph compiled during the samples is an error, not a slow sample."""
    _, first = M.first_call(fn, ctx.torch_device)
    compiled = M.compiled_graphs()
    result = measure(fn)
    if M.compiled_graphs() != compiled:
        raise RuntimeError("torch.compile compiled a graph during the samples (a guard failed after the first call)")
    return result, first


def _widths(dtype: str, spec: _ModelSpec) -> tuple[int, int]:
    """(activation bytes, KV bytes) per element: fp8 points keep bf16 activations and store KV in spec.kv_dtype."""
    return (2, dtype_bytes(spec.kv_dtype)) if dtype == "fp8" else (dtype_bytes(dtype),) * 2


def _common(built: _Built, n: int, backend: str) -> dict:
    out: dict = {"rel_error": built.rel_error.get(backend)}
    if n < built.full_layers:
        out["scaled_from_layers"] = n
    return out


def _notes(*parts: str | None) -> dict:
    text = "; ".join(p for p in parts if p)
    return {"note": text} if text else {}


def _point(built: _Built, m: M.Transformer, backend: str, t, first: dict, time_head, rates, flops: float,
           bytes_: float, note: str | None = None) -> dict:
    """A timed point's fields, the same for prefill and decode: the timing `t` of m's n built layers scaled to the
    full depth when n is short of it (`time_head(h)` times h, m without its layers: embedding, final norm, LM head),
    with the first call; `rates(ms)`, the kind's latency and tokens/s at the scaled median; the full model's
    `flops` and `bytes`; the check's relative error; notes."""
    n, full = m.cfg.num_layers, built.full_layers
    head = time_head(m.with_layers(0)) if n < full else None
    d = dense_prefix(m.cfg)  # layers of two kinds: the leading dense ones timed apart, each kind scaled to its count
    prefix = (time_head(m.with_layers(d)), d, dense_prefix(M.with_layers(m.cfg, full))) if head and d else None
    timing = {**_scaled(t, head, n, full, prefix), **first}
    kinds = f" ({d} dense + {n - d} MoE, scaled to {prefix[2]} + {full - prefix[2]})" if prefix else ""
    return {
        **timing, **rates(timing["median_ms"]), "flops": flops, "bytes": bytes_, **_common(built, n, backend),
        **_notes(note, f"{n} of {full} layers timed{kinds}, embedding+head {head.median_ms:.3f} ms" if head
                 else None),
    }


def dense_prefix(cfg) -> int:
    """The leading dense layers of an MoE config whose other layers are all MoE (DeepSeek-V3's first_k_dense_replace),
    else 0 (every layer alike)."""
    if not cfg.moe or cfg.num_moe_layers in (0, cfg.num_layers):
        return 0
    return cfg.moe.dense_layers


def _routing(spec: _ModelSpec, built: _Built, m: M.Transformer, backend: str, run) -> tuple[dict, float | None,
                                                                                       str | None]:
    """An MoE point's routing fields, the distinct routed experts touched summed over the full depth's MoE layers
    (the built layers' mean scaled), and its note; ({}, None, note) for a dense model (the note: MLA's ops on the
    triton backend)."""
    cfg = m.cfg
    triton = None
    if backend == "triton" and not cfg.is_dense:
        ops = [op for op in B.TRITON_ON_TORCH if ("MLA" in op and cfg.mla) or ("moe" in op and cfg.moe)]
        triton = f"triton backend: {', '.join(ops)} on the torch path (no Triton kernel plugged in yet)" if ops \
            else None
    if not cfg.moe:
        return {}, None, triton
    counts = M.expert_counts(m, run)  # [MoE layers built, E]
    mw = next(lw.moe for lw in m.weights.layers if lw.moe is not None)
    ep = E.ep_degree(mw)
    if ep > 1:  # an EP slice: the experts it holds, of the pool's tokens' choices
        lo = int(torch.nonzero(mw.expert_map == 0)[0, 0])  # its first global expert
        counts = counts[:, lo:lo + mw.w13.shape[0]]
    touched = (counts > 0).sum(1)
    full_moe = M.with_layers(cfg, built.full_layers).num_moe_layers
    impl = E.experts_impl(m.experts) + (" under torch.compile" if m.ops.compiled else "")
    if ep > 1:
        held = mw.w13.shape[0]
        impl += (f"; EP slice: {held} of {cfg.moe.num_experts} experts held (ep {ep}, rank {lo // held}), routing "
                 f"this GPU's tokens and {ep - 1} GPUs' stand-ins, no all-to-all")
    if mw.w13_scale is not None:
        impl += ", e4m3 with 128x128 block scales (bf16 elsewhere)"
    # (the routing condition itself is the point's key field `routing`: spec.routing.label)
    fields = {"experts_touched": touched.tolist(), "tokens_per_expert": counts.sum(0).tolist(),
              "tokens_per_expert_max": counts.max(1).values.tolist()}
    mean = float(touched.double().mean())
    held = f"{counts.shape[1]} held" if ep > 1 else f"{cfg.moe.num_experts}"
    seen = f"routing: {spec.routing.label}, {mean:.1f} of {held} experts touched per layer"
    return fields, mean * full_moe, "; ".join(x for x in (f"experts: {impl}", seen, triton) if x)


def _expert_time(ctx: RunContext, m: M.Transformer, run, cuda_graph: bool) -> tuple[dict, str | None]:
    """An EP slice's routed-expert time (`expert_ms`, one MoE layer): the expert layer of its first MoE layer built,
    timed alone on the inputs the timed step gave it (the pool's tokens, their routing), in a CUDA graph when the
    step was; the capacity model's EP pools read it (capacity.expert.measured_experts). ({}, None): not a slice."""
    mw = next((lw.moe for lw in m.weights.layers if lw.moe is not None), None)
    if mw is None or E.ep_degree(mw) == 1:
        return {}, None
    mm = m.with_backend(m.backend)
    mm.expert_inputs = []
    with torch.no_grad():
        run(mm)
    x, ids, weights, mw = mm.expert_inputs[0]

    def experts():
        with torch.no_grad():
            return E.run_kernel_experts(m.experts, x, mw, ids, weights)

    M.first_call(experts, ctx.torch_device)  # the kernel compiled / autotuned for these shapes, not in the samples
    t, note = _measure_step(ctx, experts, cuda_graph)
    return {"expert_ms": t.median_ms}, note and f"expert layer: {note}"


def _prefill_point(ctx: RunContext, session: _Session, spec: PrefillSpec, built: _Built, m: M.Transformer, dtype: str,
                   backend: str, batch: int, prompt_len: int) -> dict:
    cfg, full_cfg = m.cfg, M.with_layers(m.cfg, built.full_layers)
    db, kvb = _widths(dtype, spec)
    tokens_n = batch * prompt_len
    # KV cache + a generous bound on live activations (the fused QKV and gate/up outputs, a few [T, D] buffers).
    act = tokens_n * ((cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim + 3 * cfg.intermediate_size
                      + 6 * cfg.hidden_size) * db
    session.check_memory(ctx, tokens_n * cfg.kv_bytes_per_token(kvb) + 2 * act, "prefill")
    gen = torch.Generator(device=ctx.torch_device).manual_seed(ctx.seed + batch * 7919 + prompt_len)
    tokens = torch.randint(0, cfg.vocab_size, (batch, prompt_len), generator=gen, device=ctx.torch_device)
    session.cache = cache = m.new_cache(batch, prompt_len)

    def fn():
        with torch.no_grad():
            return m.forward_prefill(tokens, cache)

    t, first = _timed(ctx, fn, ctx.measure)
    routed, touched, note = _routing(spec, built, m, backend, lambda mm: mm.forward_prefill(tokens, cache))
    expert, expert_note = _expert_time(ctx, m, lambda mm: mm.forward_prefill(tokens, cache), False)
    note = "; ".join(x for x in (note, expert_note) if x) or None
    return {**expert, **_point(built, m, backend, t, first,
                               lambda h: ctx.measure(lambda: h.forward_prefill(tokens, None)),
                     lambda ms: {"ttft_ms": ms, "tokens_per_s": tokens_n / (ms / 1e3)},
                     flops=M.prefill_flops(full_cfg, batch, prompt_len),
                     bytes_=F8.prefill_bytes(full_cfg, batch, prompt_len, kvb, touched) if dtype == "fp8"
                     else M.prefill_bytes(full_cfg, batch, prompt_len, db, touched), note=note), **routed}


def _decode_point(ctx: RunContext, session: _Session, spec: DecodeSpec, built: _Built, m: M.Transformer, dtype: str,
                  backend: str, batch: int, context: int) -> dict:
    cfg, full_cfg = m.cfg, M.with_layers(m.cfg, built.full_layers)
    db, kvb = _widths(dtype, spec)
    session.check_memory(ctx, batch * (context + 1) * cfg.kv_bytes_per_token(kvb), "decode KV cache")
    session.cache = cache = m.new_cache(batch, context + 1).fill_random(ctx.seed + batch + context)
    gen = torch.Generator(device=ctx.torch_device).manual_seed(ctx.seed + batch * 7919 + context)
    tokens = torch.randint(0, cfg.vocab_size, (batch,), generator=gen, device=ctx.torch_device)  # [B]
    # The new token of every sequence goes to position `context`: the step reads context+1 positions. pos is
    # not advanced, so every sample (and CUDA-graph replay) does the same work.
    pos = torch.full((batch,), context, dtype=torch.int32, device=ctx.torch_device)  # [B]

    def step():
        with torch.no_grad():
            return m.forward_decode(tokens, pos, cache)

    (t, graph_note), first = _timed(ctx, step, lambda fn: _measure_step(ctx, fn, spec.cuda_graph))

    def time_head(h):  # as the step was timed: in a CUDA graph if it was
        return _measure_step(ctx, lambda: h.forward_decode(tokens, pos, cache), t.cuda_graph)[0]

    routed, touched, note = _routing(spec, built, m, backend, lambda mm: mm.forward_decode(tokens, pos, cache))
    expert, expert_note = _expert_time(ctx, m, lambda mm: mm.forward_decode(tokens, pos, cache), t.cuda_graph)
    note = "; ".join(x for x in (note, expert_note) if x) or None
    return {**expert, **_point(built, m, backend, t, first, time_head,
                     lambda ms: {"tpot_ms": ms, "tokens_per_s": batch / (ms / 1e3), "tokens_per_s_per_seq": 1e3 / ms},
                     flops=M.decode_flops(full_cfg, batch, context),
                     bytes_=(F8.decode_bytes(full_cfg, batch, context, kvb, touched) if dtype == "fp8"
                             else M.decode_bytes(full_cfg, batch, context, db, touched))
                     + M.padded_kv_bytes(full_cfg, batch, context, kvb, backend),
                     note="; ".join(x for x in (graph_note, note) if x) or None), **routed}
