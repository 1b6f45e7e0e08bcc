"""The one timing function for everything the harness measures.

GPU: CUDA events around each sample and one synchronize at the end; warm-up by time, with the first call
(compile/autotune) timed and reported separately; an optional L2 flush between samples (a buffer of at least
twice the L2 written outside the timed region); optional CUDA-graph replay. CPU: `time.perf_counter_ns`, and the
flush writes twice the last-level cache instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

DEFAULT_L2_BYTES = 64 << 20  # used when the device does not report its L2 (larger than any current GPU's)


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    n_samples: int
    first_call_ms: float  # includes compile / autotune: never part of the samples
    noisy: bool
    spread: float  # (p80 - p20) / median
    cuda_graph: bool = False
    threads: int | None = None  # CPU: torch intra-op threads the samples ran with

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(samples_ms: list[float], noise_limit: float) -> dict:
    a = np.asarray(samples_ms, dtype=np.float64)
    med = float(np.median(a))
    p20, p80 = (float(x) for x in np.percentile(a, [20, 80]))
    spread = (p80 - p20) / med if med > 0 else float("inf")
    return dict(median_ms=med, p20_ms=p20, p80_ms=p80, n_samples=len(a), spread=spread, noisy=spread > noise_limit)


def _sample_count(per_call_s: float, min_samples: int, min_time_s: float, max_samples: int) -> int:
    want = int(np.ceil(min_time_s / max(per_call_s, 1e-9)))
    return int(min(max(min_samples, want), max(max_samples, min_samples)))


def measure(
    fn: Callable[[], object],
    *,
    device: str | torch.device = "cpu",
    min_samples: int = 10,
    min_time_s: float = 0.2,
    warmup_s: float = 0.1,
    max_samples: int = 1000,
    flush_l2: bool = False,
    l2_bytes: int | None = None,
    cuda_graph: bool = False,
    noise_limit: float = 0.1,
) -> Timing:
    """Time `fn()` (no arguments; its result is ignored) and return median/p20/p80 over the samples."""
    kind = torch.device(device).type
    if min_samples < 1:
        raise ValueError("min_samples must be at least 1")
    if kind == "cuda":
        return _measure_cuda(fn, min_samples, min_time_s, warmup_s, max_samples, flush_l2, l2_bytes, cuda_graph,
                             noise_limit)
    return _measure_cpu(fn, min_samples, min_time_s, warmup_s, max_samples, noise_limit, flush_l2, l2_bytes)


def _measure_cpu(fn, min_samples, min_time_s, warmup_s, max_samples, noise_limit, flush_l2=False,
                 l2_bytes=None) -> Timing:
    t0 = time.perf_counter_ns()
    fn()
    first_ms = (time.perf_counter_ns() - t0) / 1e6
    calls, start = 0, time.perf_counter()
    while calls == 0 or time.perf_counter() - start < warmup_s:
        fn()
        calls += 1
    per_call = (time.perf_counter() - start) / calls
    # On a CPU the last-level cache plays the L2's part: writing twice its size evicts the previous sample's data.
    flush = torch.empty(2 * (l2_bytes or DEFAULT_L2_BYTES) // 4, dtype=torch.int32) if flush_l2 else None
    samples = []
    for _ in range(_sample_count(per_call, min_samples, min_time_s, max_samples)):
        if flush is not None:
            flush.zero_()
        t = time.perf_counter_ns()
        fn()
        samples.append((time.perf_counter_ns() - t) / 1e6)
    return Timing(first_call_ms=first_ms, threads=torch.get_num_threads(), **summarize(samples, noise_limit))


def _measure_cuda(fn, min_samples, min_time_s, warmup_s, max_samples, flush_l2, l2_bytes, cuda_graph,
                  noise_limit) -> Timing:
    first_start, first_end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    first_start.record()
    fn()  # compile / autotune happen here
    first_end.record()
    torch.cuda.synchronize()
    first_ms = first_start.elapsed_time(first_end)

    call = fn
    if cuda_graph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm the allocator on the capture stream
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        call = graph.replay

    calls, start = 0, time.perf_counter()
    while calls == 0 or time.perf_counter() - start < warmup_s:
        call()
        calls += 1
        torch.cuda.synchronize()
    per_call = (time.perf_counter() - start) / calls

    flush = None
    if flush_l2:
        # Writing 2x the L2 evicts whatever the previous sample left there, so each sample reads from HBM.
        flush = torch.empty(2 * (l2_bytes or DEFAULT_L2_BYTES) // 4, dtype=torch.int32, device="cuda")
    n = _sample_count(per_call, min_samples, min_time_s, max_samples)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for s, e in zip(starts, ends, strict=True):
        if flush is not None:
            flush.zero_()
        s.record()
        call()
        e.record()
    torch.cuda.synchronize()  # the one synchronize: samples queue back to back
    samples = [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]
    return Timing(first_call_ms=first_ms, cuda_graph=cuda_graph, **summarize(samples, noise_limit))
