"""torch.distributed for a run on N ranks: the process groups, and what a part needs to measure in lockstep.

A run on several ranks is started by torchrun (`torch.distributed.run`: `tokenfleet bench --nproc N` launches it,
see `measure.launch`; `torchrun --nproc-per-node N -m tokenfleet bench ...` or any launcher setting torchrun's
variables RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT comes in the same way: `under_launcher`). Each rank joins
the default group (NCCL on CUDA, one GPU per local rank; gloo on CPU) and a gloo group for control messages (so a
control message never pairs with a model collective), both bounded by TOKENFLEET_DIST_TIMEOUT_S (default 600 s):
a collective whose peer is gone fails within that time, never hangs.

For the parts: `current()` (None in a one-process run), `lockstep_measure` (every rank calls the timed function
the same number of times, so its collectives pair), `agree` (local work that fails on one rank fails the point on
all together) and `agreed_graph` (a CUDA graph with collectives, used only when every rank captured it).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist

TIMEOUT_ENV, DEFAULT_TIMEOUT_S = "TOKENFLEET_DIST_TIMEOUT_S", 600.0


def under_launcher() -> bool:
    """True when torchrun (or a launcher setting its variables) started this process as one of several ranks."""
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def timeout_s() -> float:
    return float(os.environ.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT_S)


# ---------------------------------------------------------------------------------------------------------------
# The group


class Group:
    """This rank's place in the run: rank, world, the default group's backend and a gloo group for control."""

    def __init__(self, backend: str, control):
        self.rank, self.world, self.backend, self.control = dist.get_rank(), dist.get_world_size(), backend, control
        self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank))

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def gather(self, obj) -> list:
        """obj of every rank, on every rank (control group)."""
        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.control)
        return out

    def broadcast(self, obj=None):
        """Rank 0's obj, on every rank (control group)."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def max(self, x: float) -> float:
        t = torch.tensor([float(x)], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control)
        return float(t.item())

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


_GROUP: Group | None = None


def current() -> Group | None:
    """The group this process runs in, or None in a one-process run."""
    return _GROUP


def world_size() -> int:
    return _GROUP.world if _GROUP else 1


def init(device_kind: str) -> Group:
    """Join the run's process groups (NCCL on CUDA with this rank's GPU, gloo on CPU), bounded by timeout_s()."""
    global _GROUP
    timeout = timedelta(seconds=timeout_s())
    backend = "nccl" if device_kind == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timeout)
    control = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else None
    _GROUP = Group(backend, control)
    return _GROUP


# ---------------------------------------------------------------------------------------------------------------
# Lockstep timing: every rank calls fn the same number of times (a collective in fn pairs with its peers')


def lockstep_measure(ctx, fn, **overrides):
    """`ctx.measure(fn)` with the call count agreed across ranks: the slowest rank's per-call time sets the
    warm-up and sample counts, and measure runs with warmup_s=0 and min_samples=max_samples (1 first call, 1
    warm-up call, n samples on every rank). `first_call_ms` is the very first call's (compile, autotune), timed on
    the host around a synchronize. One process: plain ctx.measure."""
    g = current()
    if g is None:
        return ctx.measure(fn, **overrides)
    t = ctx.suite.file.timing
    sync = torch.cuda.synchronize if ctx.on_gpu else (lambda: None)
    start = time.perf_counter()
    fn()  # compile / autotune happen here: reported as first_call_ms, as measure does
    sync()
    first_ms = (time.perf_counter() - start) * 1e3
    start = time.perf_counter()
    for _ in range(3):
        fn()
    sync()
    per_call = g.max((time.perf_counter() - start) / 3)
    for _ in range(max(0, math.ceil(t.warmup_s / max(per_call, 1e-9)) - 2)):
        fn()
    n = int(min(max(t.min_samples, math.ceil(t.min_time_s / max(per_call, 1e-9))), max(t.max_samples, t.min_samples)))
    timing = ctx.measure(fn, **{**overrides, "warmup_s": 0.0, "min_samples": n, "max_samples": n})
    return dataclasses.replace(timing, first_call_ms=first_ms)


def agree(fn):
    """Run fn (local work: no collective inside) on every rank; (result, None), or (None, the same failure dict on
    every rank) when it raised on any: ranks then skip the point together instead of pairing wrong collectives."""
    try:
        res, err = fn(), None
    except Exception as e:  # noqa: BLE001 - becomes the point's status on every rank
        oom = isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()
        res, err = None, ("oom" if oom else "error", f"{type(e).__name__}: {e}".splitlines()[0][:400])
    g = current()
    bad = [(r, e) for r, e in enumerate(g.gather(err) if g else [err]) if e]
    if bad:
        r, (status, msg) = bad[0]
        return None, {"status": status, "error": f"rank {r}: {msg}" if g else msg}
    return res, None


def agreed_graph(fn, iters: int = 1):
    """GPU: `iters` calls of fn (collectives included) captured in one CUDA graph, used only if every rank captured
    it (a rank timing eager while another replays would pair the wrong collectives). Returns (replay, None) or
    (None, why). Every rank calls fn once, eagerly, on a side stream first (warm-up, as torch's docs ask)."""
    err = None
    stream = torch.cuda.current_stream()
    try:
        side = torch.cuda.Stream()
        side.wait_stream(stream)
        with torch.cuda.stream(side):
            fn()
        stream.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the NCCL watchdog thread's event queries must not invalidate this thread's capture.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            for _ in range(iters):
                fn()
    except Exception as e:  # noqa: BLE001 - recorded in the point; timed eager instead
        err = f"{type(e).__name__}: {e}".splitlines()[0]
        # As timing._capture: torch.cuda.graph's exit ends an invalidated capture before it restores the stream, so
        # the capture stream would stay current for the eager fallback and every later point of the process.
        torch.cuda.set_stream(stream)
        torch.cuda.synchronize()
    g = current()
    if (g.max(1.0 if err else 0.0) if g else (1.0 if err else 0.0)) > 0:
        return None, err or "another rank's capture failed"
    return graph.replay, None
