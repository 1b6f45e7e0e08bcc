"""The one timing function for everything the harness measures: `measure`.

CPU: `time.perf_counter_ns` around each call; warm-up by time; the first call (compile/autotune) timed and reported
apart; with `flush_l2`, a buffer of twice the last-level cache is written before each sample (and each warm-up call).
The flush is outside the samples but inside the budget, as `triton.testing.do_bench` counts its cache clearing: the
sample count is sized from the time of one flush plus one call, so a point's wall time is its first call, about
`warmup_s`, and about `max(min_time_s, min_samples x (flush + call))`, whatever the cache's size (a 2x-LLC flush
took ~75 ms on a Sapphire Rapids Xeon, 100x a small kernel's call).

GPU, three ways, all with the first call reported apart and never in the samples:
- kernel points (`args=` given): the semantics of `triton.testing.do_bench_cudagraph` — many calls captured in one
  CUDA graph, each sample one replay timed by CUDA events and divided by its calls, so the Python launch is not in
  the time. The calls rotate over copies of the inputs that together exceed 2x the L2 (`flush_l2`), so each call
  reads cold from HBM. Beside it, `launch_us`: the host time of one eager call, what launching costs a user.
  (Not `do_bench_cudagraph` itself: it takes 10 samples of one graph without input rotation or a warm-up by time.)
- `cuda_graph=True` without `args` (a decode step): the same graph replays, without rotation.
- otherwise: CUDA events around each eager call, one synchronize at the end, an optional L2 flush between samples.

On a CPU the hooks of `between_samples` run after each sample, outside its time (the runner reads the machine's
speed there, tokenfleet.measure.load: a host can slow a VM for part of a point).
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

DEFAULT_L2_BYTES = 64 << 20  # used when the device does not report its L2 (larger than any current GPU's)
KEEP_SAMPLES = 200  # samples stored with a point; beyond this, that many evenly spaced quantiles of them
GRAPH_REPLAY_S = 1e-3  # a replay spans at least this much GPU time, so its launch is a small part of it
MAX_GRAPH_CALLS = 8192  # calls captured in one graph (capture time and graph memory stay small)
LAUNCH_CALLS = 20  # eager calls timed on the host for `launch_us`
# A sustained probe's burst rate is its warm-up's first BURST_S: as long as a point of the quick and gpu-check suites
# is timed (0.05 s of warm-up and 0.1 s of samples), so points are compared with a roof measured as they are.
BURST_S = 0.15

_now_ns = time.perf_counter_ns  # the CPU clock; tests replace it with a fake one to check the logic, not the speed


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    n_samples: int
    first_call_ms: float  # includes compile / autotune: never part of the samples
    noisy: bool
    spread: float  # (p80 - p20) / median
    samples_ms: list[float]  # the samples (at most KEEP_SAMPLES; quantiles of them beyond), for compare's interval
    cuda_graph: bool = False
    threads: int | None = None  # CPU: torch intra-op threads the samples ran with
    launch_us: float | None = None  # GPU kernels: host time of one eager call (launch cost), beside the graph time
    graph_calls: int | None = None  # GPU graphs: calls per replay (one sample = one replay / graph_calls)
    l2_copies: int | None = None  # GPU kernels: input copies rotated so each call reads cold (1: warm L2)
    timing_note: str | None = None  # why a faster path was not taken (graph capture failed, copies out of memory)
    energy_j: float | None = None  # GPU: the device's energy counter over the samples (`energy=` given), joules
    energy_s: float | None = None  # ... over this many seconds of wall time (the samples, queued back to back)
    burst_ms: float | None = None  # GPU, a warm-up >= 2 BURST_S (a probe): ms per call over its first BURST_S
    flush_ms: float | None = None  # CPU with flush_l2: one cache flush (warm-up's mean), paid before each sample

    def to_dict(self) -> dict:
        return asdict(self)


def kept_samples(samples_ms: Sequence[float], keep: int = KEEP_SAMPLES) -> list[float]:
    """At most `keep` values, 5 significant digits: all samples, or evenly spaced quantiles of them."""
    a = np.sort(np.asarray(samples_ms, dtype=np.float64))
    if len(a) > keep:
        a = np.quantile(a, (np.arange(keep) + 0.5) / keep)
    return [float(f"{x:.5g}") for x in a]


def summarize(samples_ms: Sequence[float], noise_limit: float) -> dict:
    a = np.asarray(samples_ms, dtype=np.float64)
    med = float(np.median(a))
    p20, p80 = (float(x) for x in np.percentile(a, [20, 80]))
    spread = (p80 - p20) / med if med > 0 else float("inf")
    return dict(median_ms=med, p20_ms=p20, p80_ms=p80, n_samples=len(a), spread=spread, noisy=spread > noise_limit,
                samples_ms=kept_samples(a))


def _sample_count(per_sample_s: float, min_samples: int, min_time_s: float, max_samples: int) -> int:
    """Samples that fill `min_time_s`, within [min_samples, max_samples]. `per_sample_s`: the wall time one sample
    costs, everything done for it included (on a CPU, the cache flush before it as well as the call)."""
    want = int(np.ceil(min_time_s / max(per_sample_s, 1e-9)))
    return int(min(max(min_samples, want), max(max_samples, min_samples)))


def measure(
    fn: Callable[..., object],
    *,
    device: str | torch.device = "cpu",
    args: Sequence | None = None,
    min_samples: int = 10,
    min_time_s: float = 0.2,
    warmup_s: float = 0.1,
    max_samples: int = 1000,
    flush_l2: bool = False,
    l2_bytes: int | None = None,
    cuda_graph: bool = False,
    noise_limit: float = 0.1,
    energy: Callable[[], float] | None = None,
) -> Timing:
    """Time `fn(*args)` (`fn()` without args; its result is ignored): median/p20/p80 and the samples.

    `args`: a kernel's inputs. On a GPU this selects kernel timing (CUDA-graph replays over rotated input copies,
    cold L2 when `flush_l2`, `launch_us` beside); on a CPU `fn(*args)` is timed as `fn()` would be.
    `energy`: on a GPU, a reader of the device's energy counter in joules, read just before and just after the
    samples (`energy_j` over `energy_s`; the first call, warm-up and capture are outside it)."""
    kind = torch.device(device).type
    if min_samples < 1:
        raise ValueError("min_samples must be at least 1")
    call = (lambda: fn(*args)) if args is not None else fn
    if kind != "cuda":
        return _measure_cpu(call, min_samples, min_time_s, warmup_s, max_samples, noise_limit, flush_l2, l2_bytes)
    counts = (min_samples, min_time_s, warmup_s, max_samples)
    l2 = l2_bytes or DEFAULT_L2_BYTES
    if args is not None:
        return _measure_kernel_cuda(fn, tuple(args), counts, flush_l2, l2, noise_limit, energy)
    return _measure_cuda(fn, counts, flush_l2, l2, cuda_graph, noise_limit, energy)


def _zero(buf: torch.Tensor) -> None:
    buf.zero_()  # the CPU flush; tests replace it to give the flush a cost on the fake clock


@functools.lru_cache(maxsize=1)
def _cpu_flush_buffer(nbytes: int) -> torch.Tensor:
    """The CPU flush buffer, kept between points: a fresh one would fault in its pages again at every point."""
    return torch.zeros(nbytes // 4, dtype=torch.int32)  # zeros: its pages faulted in here, not in a sample


_BETWEEN: list[Callable[[], object]] = []  # run after each CPU sample, outside its time (`between_samples`)


@contextlib.contextmanager
def between_samples(hook: Callable[[], object]) -> Iterator[None]:
    """Within the block, `hook()` runs after each sample of a CPU measurement (not in the sample's time)."""
    _BETWEEN.append(hook)
    try:
        yield
    finally:
        _BETWEEN.remove(hook)


def _measure_cpu(fn, min_samples, min_time_s, warmup_s, max_samples, noise_limit, flush_l2=False,
                 l2_bytes=None) -> Timing:
    # On a CPU the last-level cache plays the L2's part: writing twice its size evicts the previous call's data.
    flush = _cpu_flush_buffer(2 * (l2_bytes or DEFAULT_L2_BYTES)) if flush_l2 else None

    def flushed() -> int:
        """Flush (when asked), then return the clock: the flush's time is counted apart from the call's."""
        if flush is not None:
            _zero(flush)
        return _now_ns()

    t0 = _now_ns()
    fn()
    first_ms = (_now_ns() - t0) / 1e6
    calls, call_ns, start = 0, 0, _now_ns()
    while calls == 0 or (_now_ns() - start) / 1e9 < warmup_s:  # flushes included: the warm-up's wall time is bounded
        t = flushed()
        fn()
        call_ns += _now_ns() - t
        calls += 1
    per_sample = (_now_ns() - start) / 1e9 / calls  # a flush and a call
    samples = []
    for _ in range(_sample_count(per_sample, min_samples, min_time_s, max_samples)):
        t = flushed()
        fn()
        samples.append((_now_ns() - t) / 1e6)
        for hook in _BETWEEN:
            hook()
    flush_ms = (per_sample - call_ns / 1e9 / calls) * 1e3 if flush is not None else None
    return Timing(first_call_ms=first_ms, threads=torch.get_num_threads(), flush_ms=flush_ms,
                  **summarize(samples, noise_limit))


def tensor_bytes(args: Sequence) -> int:
    """Bytes of the tensors among `args` (their storage as the kernel sees it: numel x element size)."""
    return sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor))


def copies_for_cold_l2(args_bytes: int, l2_bytes: int, max_copies: int = MAX_GRAPH_CALLS) -> int:
    """How many input sets to rotate over so that together they exceed 2x the L2: one call's inputs were evicted
    by the calls between, so it reads from HBM. One set already that large needs no copy."""
    if args_bytes <= 0:
        return 1
    return int(min(max(1, math.ceil(2 * l2_bytes / args_bytes)), max_copies))


def copy_args(args: Sequence) -> tuple:
    """A copy of `args` in fresh memory: tensors copied with the same shape and strides (a kernel specialised on the
    strides sees the same ones), everything else shared."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            c = torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device=a.device)
            c.copy_(a)
            out.append(c)
        else:
            out.append(a)
    return tuple(out)


def calls_per_replay(per_call_s: float, copies: int, target_s: float = GRAPH_REPLAY_S,
                     max_calls: int = MAX_GRAPH_CALLS) -> int:
    """Calls in one graph: every copy at least once, and enough calls that a replay lasts `target_s`; a multiple
    of `copies` so each copy is read equally often."""
    want = max(copies, math.ceil(round(target_s / max(per_call_s, 1e-9), 6)))  # round: 1e-3/1e-6 is not 1000
    want = math.ceil(want / copies) * copies
    return int(max(copies, min(want, max_calls // copies * copies)))


# --- GPU -------------------------------------------------------------------------------------------------------------


def _first_call_ms(call: Callable[[], object]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    call()  # compile / autotune happen here
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def _warm(call: Callable[[], object], warmup_s: float, burst: list | None = None) -> float:
    """Run `call` for at least `warmup_s` of wall time and return seconds per call (of the last batch). The GPU
    stays busy: a synchronize every ~20 ms of calls, not after each, because a sustained load is what brings on
    the power and clock limits a probe must see. `burst` (a list): when the warm-up lasts at least twice BURST_S,
    seconds per call over its first BURST_S are appended — the rate a point timed as briefly sees."""
    start, batch, calls = time.perf_counter(), 1, 0
    want_burst = burst is not None and warmup_s >= 2 * BURST_S
    while True:
        t = time.perf_counter()
        for _ in range(batch):
            call()
        torch.cuda.synchronize()
        now = time.perf_counter()
        calls += batch
        per_call = (now - t) / batch
        if want_burst and now - start >= BURST_S:
            burst.append((now - start) / calls)
            want_burst = False
        if now - start >= warmup_s:
            return per_call
        batch = max(1, min(10_000, int(0.02 / max(per_call, 1e-7))))


def _event_samples(call: Callable[[], object], n: int, flush: torch.Tensor | None = None) -> list[float]:
    """`n` samples of `call`, each between two CUDA events; queued back to back, one synchronize at the end."""
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for s, e in zip(starts, ends, strict=True):
        if flush is not None:
            flush.zero_()  # outside the events: evicts what the previous sample left in L2
        s.record()
        call()
        e.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]


def _capture(call_i: Callable[[int], object], calls: int) -> torch.cuda.CUDAGraph:
    """One CUDA graph of `call_i(0) … call_i(calls-1)`, warmed on a side stream first (the allocator's pool), with
    the garbage collector off during capture (a collection inside it can free memory the capture uses)."""
    import gc

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(2):
            call_i(i % calls)
    stream = torch.cuda.current_stream()
    stream.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    enabled = gc.isenabled()
    gc.disable()
    try:
        with torch.cuda.graph(graph):
            for i in range(calls):
                call_i(i)
    except BaseException:
        # torch.cuda.graph's __exit__ ends the capture before it restores the stream, and ending an invalidated
        # capture (a sync or a failed allocation inside it) raises: without this the capture stream would stay
        # current for the eager fallback and every later point of the process (torch 2.11, cuda/graphs.py).
        torch.cuda.set_stream(stream)
        raise
    finally:
        if enabled:
            gc.enable()
    torch.cuda.synchronize()
    return graph


def metered(read: Callable[[], float] | None, run: Callable[[], list[float]]) -> tuple[list[float], dict]:
    """`run()` (samples that end in a synchronize) between two reads of an energy counter: (its result, energy_j and
    energy_s, or nothing when there is no counter or a read fails: the samples stand without it)."""
    if read is None:
        return run(), {}
    try:
        t0, e0 = _now_ns(), read()
    except Exception:  # noqa: BLE001 - a counter that cannot be read costs the point its energy, not its time
        return run(), {}
    out = run()
    try:
        e1, t1 = read(), _now_ns()
    except Exception:  # noqa: BLE001
        return out, {}
    return out, {"energy_j": e1 - e0, "energy_s": (t1 - t0) / 1e9}


def _measure_cuda(fn, counts, flush_l2, l2_bytes, cuda_graph, noise_limit, energy=None) -> Timing:
    """A whole call (a model step): events around each eager call, or around each replay of a one-call graph."""
    min_samples, min_time_s, warmup_s, max_samples = counts
    first_ms = _first_call_ms(fn)
    call = fn
    if cuda_graph:
        call = _capture(lambda i: fn(), 1).replay
    burst: list[float] = []
    per_call = _warm(call, warmup_s, burst)
    # Writing 2x the L2 between samples evicts whatever the previous sample left there: each reads from HBM.
    flush = torch.empty(2 * l2_bytes // 4, dtype=torch.int32, device="cuda") if flush_l2 else None
    n = _sample_count(per_call, min_samples, min_time_s, max_samples)
    samples, joules = metered(energy, lambda: _event_samples(call, n, flush))
    return Timing(first_call_ms=first_ms, cuda_graph=cuda_graph, graph_calls=1 if cuda_graph else None,
                  burst_ms=burst[0] * 1e3 if burst else None, **summarize(samples, noise_limit), **joules)


def _launch_us(fn, sets: list[tuple]) -> float:
    """Host time of one eager call (median of LAUNCH_CALLS): what a user's Python launch of the kernel costs."""
    torch.cuda.synchronize()
    host = []
    for i in range(LAUNCH_CALLS):
        t = time.perf_counter_ns()
        fn(*sets[i % len(sets)])
        host.append(time.perf_counter_ns() - t)
    torch.cuda.synchronize()
    return float(np.median(host)) / 1e3


def _input_sets(args: tuple, flush_l2: bool, l2_bytes: int) -> tuple[list[tuple], str | None]:
    """The input sets a kernel's calls rotate over: `args` and copies, together beyond 2x L2 (one set: warm L2)."""
    want = copies_for_cold_l2(tensor_bytes(args), l2_bytes) if flush_l2 else 1
    sets = [args]
    try:
        while len(sets) < want:
            sets.append(copy_args(args))
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return sets, f"{len(sets)} of {want} input copies fit in memory: calls may read from a warm L2"
    return sets, None


def _measure_kernel_cuda(fn, args: tuple, counts, flush_l2, l2_bytes, noise_limit, energy=None) -> Timing:
    """A kernel: replays of one CUDA graph of many calls over rotated input copies; a sample = replay / calls."""
    min_samples, min_time_s, warmup_s, max_samples = counts
    first_ms = _first_call_ms(lambda: fn(*args))
    sets, note = _input_sets(args, flush_l2, l2_bytes)
    n = len(sets)
    for s in sets:  # each copy once, eagerly: anything specialised on its addresses compiles outside the capture
        fn(*s)
    launch_us = _launch_us(fn, sets)
    try:
        # A first graph of one call per copy gives the GPU time per call without the Python launch in it.
        graph = _capture(lambda i: fn(*sets[i % n]), n)
        graph.replay()
        per_call = float(np.median(_event_samples(graph.replay, 3))) / 1e3 / n
        calls = calls_per_replay(per_call, n)
        if calls != n:
            del graph
            graph = _capture(lambda i: fn(*sets[i % n]), calls)
    except Exception as e:  # noqa: BLE001 - not capturable (a host sync inside): timed eagerly, and said so
        t = _measure_cuda(lambda: fn(*args), counts, flush_l2, l2_bytes, False, noise_limit, energy)
        how = "eagerly, the L2 flushed between calls" if flush_l2 else "eagerly"
        why = f"CUDA graph capture failed, timed {how}: {type(e).__name__}: {e}"[:300]
        return Timing(**{**t.to_dict(), "first_call_ms": first_ms, "launch_us": launch_us, "timing_note": why})
    per_replay = _warm(graph.replay, warmup_s)
    replays = _sample_count(per_replay, min_samples, min_time_s, max_samples)
    replay_ms, joules = metered(energy, lambda: _event_samples(graph.replay, replays))
    samples = [ms / calls for ms in replay_ms]
    return Timing(first_call_ms=first_ms, cuda_graph=True, launch_us=launch_us, graph_calls=calls, l2_copies=n,
                  timing_note=note, **summarize(samples, noise_limit), **joules)
