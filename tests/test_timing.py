"""tokenfleet.measure.timing: structure and invariants, never speed. The CPU path runs on a fake clock that only the
timed function advances, so machine load cannot change a result; the GPU path's pure helpers are checked here and the
path itself by `make gpu-check` (and below, its control flow on fake CUDA objects)."""

import contextlib
import math
import time

import pytest
import torch
from tokenfleet.measure import timing
from tokenfleet.measure.timing import (
    KEEP_SAMPLES,
    calls_per_replay,
    copies_for_cold_l2,
    copy_args,
    kept_samples,
    measure,
    summarize,
    tensor_bytes,
)


class FakeClock:
    """perf_counter_ns that moves only when `advance` is called (by the function under test)."""

    def __init__(self):
        self.ns = 0

    def __call__(self) -> int:
        return self.ns

    def advance(self, ms: float) -> None:
        self.ns += int(ms * 1e6)


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    c = FakeClock()
    monkeypatch.setattr(timing, "_now_ns", c)
    return c


def test_cpu_timing_structure(clock):
    durations = iter([20.0] + [2.0] * 10_000)  # a slow first call (compile/autotune), then 2 ms each
    t = measure(lambda: clock.advance(next(durations)), device="cpu", min_samples=10, min_time_s=0.05,
                warmup_s=0.01)
    assert t.first_call_ms == 20.0  # reported apart, never among the samples
    assert t.median_ms == t.p20_ms == t.p80_ms == 2.0 and t.spread == 0.0 and not t.noisy
    assert t.n_samples == 25  # 50 ms of samples at 2 ms each (the warm-up's estimate), more than min_samples
    assert t.samples_ms == [2.0] * 25 and t.threads == torch.get_num_threads()
    assert not t.cuda_graph and t.launch_us is None


def test_between_samples_hooks_run_after_each_sample_outside_its_time(clock):
    calls = []

    def hook():
        calls.append(clock.ns)
        clock.advance(5.0)  # a hook's own time is in no sample

    with timing.between_samples(hook):
        t = measure(lambda: clock.advance(2.0), device="cpu", min_samples=5, min_time_s=0.0, warmup_s=0.0)
    assert len(calls) == t.n_samples == 5 and t.samples_ms == [2.0] * 5
    measure(lambda: clock.advance(2.0), device="cpu", min_samples=5, min_time_s=0.0, warmup_s=0.0)
    assert len(calls) == 5 and timing._BETWEEN == []  # gone after the block


def test_sample_count_bounds(clock):
    t = measure(lambda: clock.advance(0.2), device="cpu", min_samples=3, min_time_s=0.05, warmup_s=0.0)
    assert t.n_samples == 250  # min_time_s / per-call time
    t = measure(lambda: clock.advance(0.2), device="cpu", min_samples=3, min_time_s=1.0, warmup_s=0.0,
                max_samples=40)
    assert t.n_samples == 40  # capped
    t = measure(lambda: clock.advance(50.0), device="cpu", min_samples=7, min_time_s=0.01, warmup_s=0.0)
    assert t.n_samples == 7  # at least min_samples however slow


@pytest.mark.parametrize("flush_ms", [0.05, 2.0, 75.0, 2000.0])
def test_cpu_flush_counts_in_the_points_wall_budget(clock, monkeypatch, flush_ms):
    """The flush before each sample is paid in wall time, so it is counted when the samples are sized (as do_bench
    counts its cache clearing): with a small cache the samples fill min_time_s; with a large one (75 ms: a 2x-LLC
    flush measured on a Sapphire Rapids Xeon; 2 s: a far larger cache) the point takes min_samples of them, not
    max_samples. The flush itself never enters a sample."""
    flushes = []

    def zero(buf):
        flushes.append(buf.numel())
        clock.advance(flush_ms)

    monkeypatch.setattr(timing, "_zero", zero)
    call_ms, min_samples, min_time_s, warmup_s = 0.5, 5, 0.1, 0.03
    t = measure(lambda: clock.advance(call_ms), device="cpu", min_samples=min_samples, min_time_s=min_time_s,
                warmup_s=warmup_s, max_samples=200, flush_l2=True, l2_bytes=1 << 20)  # a small buffer, a faked cost
    wall_ms = clock.ns / 1e6
    sample_ms = flush_ms + call_ms
    # The budget: the first call, the warm-up (its last flush + call may cross warmup_s), then the samples' time or
    # min_samples of them, each with its flush.
    budget_ms = call_ms + (warmup_s * 1e3 + sample_ms) + max(min_time_s * 1e3, min_samples * sample_ms)
    assert wall_ms <= budget_ms
    assert t.median_ms == call_ms and t.samples_ms == [call_ms] * t.n_samples  # the flush is outside the samples
    assert t.flush_ms == pytest.approx(flush_ms)
    assert t.n_samples == max(min_samples, math.ceil(min_time_s * 1e3 / sample_ms - 1e-9))
    assert len(flushes) >= t.n_samples + 1 and set(flushes) == {2 * (1 << 20) // 4}  # 2x the cache, before each
    # Without a flush the budget is the call's alone: min_time_s of samples.
    clock.ns = 0
    warm = measure(lambda: clock.advance(call_ms), device="cpu", min_samples=min_samples, min_time_s=min_time_s,
                   warmup_s=warmup_s, max_samples=200)
    assert warm.n_samples == 200 and warm.flush_ms is None and clock.ns / 1e6 <= 2 * call_ms + 1e3 * (
        warmup_s + min_time_s)


def test_args_are_passed_and_quantiles_ordered(clock):
    seen = []

    def fn(x, k):
        seen.append((x, k))
        clock.advance(1.0 + len(seen) % 3)  # 1, 2, 3 ms in turn

    t = measure(fn, args=("x", 4), device="cpu", min_samples=30, min_time_s=0.0, warmup_s=0.0)
    assert set(seen) == {("x", 4)}
    assert t.p20_ms <= t.median_ms <= t.p80_ms and t.median_ms == 2.0
    assert t.samples_ms == sorted(t.samples_ms) and len(t.samples_ms) == t.n_samples == 30


def test_noisy_flag_logic():
    quiet = summarize([1.0, 1.01, 0.99, 1.0, 1.0], noise_limit=0.1)
    assert not quiet["noisy"] and quiet["spread"] < 0.1
    loud = summarize([0.5, 3.0] * 10, noise_limit=0.1)
    assert loud["noisy"] and loud["spread"] > 0.1
    assert not summarize([0.5, 3.0] * 10, noise_limit=10.0)["noisy"]  # the limit is the suite's


def test_kept_samples_bounded():
    assert kept_samples([3.0, 1.0, 2.0]) == [1.0, 2.0, 3.0]
    many = [float(i) for i in range(10_000)]
    kept = kept_samples(many)
    assert len(kept) == KEEP_SAMPLES and kept == sorted(kept)
    assert kept[0] < 50 and kept[-1] > 9_950  # quantiles spanning the whole range
    assert abs(sorted(kept)[KEEP_SAMPLES // 2] - 5_000) < 60
    assert kept_samples([1.234567891]) == [1.2346]  # 5 significant digits


def test_bad_min_samples():
    with pytest.raises(ValueError):
        measure(lambda: None, min_samples=0)


def test_real_clock_smoke():
    """The real clock (no fake): structure only, whatever the machine's load."""
    t = measure(lambda: time.sleep(0.001), device="cpu", min_samples=3, min_time_s=0.0, warmup_s=0.0)
    assert t.n_samples == 3 and len(t.samples_ms) == 3 and t.median_ms > 0 and t.first_call_ms > 0


# --- the GPU path's pieces ------------------------------------------------------------------------------------------


def test_copies_for_cold_l2():
    l2 = 50 << 20
    assert copies_for_cold_l2(1 << 20, l2) == 100  # 100 x 1 MiB = 2x L2
    assert copies_for_cold_l2(3 << 20, l2) == 34  # rounded up: together at least 2x L2
    assert copies_for_cold_l2(200 << 20, l2) == 1  # one set already beyond 2x L2
    assert copies_for_cold_l2(16, l2, max_copies=512) == 512
    assert copies_for_cold_l2(0, l2) == 1


def test_calls_per_replay():
    assert calls_per_replay(1e-6, 1) == 1000  # 1 ms of 1 us calls
    assert calls_per_replay(1e-6, 3) % 3 == 0  # each copy read equally often
    assert calls_per_replay(5e-3, 4) == 4  # long calls: each copy once
    assert calls_per_replay(1e-9, 1, max_calls=100) == 100


def test_copy_args_keeps_strides_and_values():
    base = torch.randn(8, 6)
    view = base[:, 1:5]  # a strided view, as a kernel may be given
    args = (view, torch.arange(4), 1e-6, "x")
    copied = copy_args(args)
    assert copied[0].stride() == view.stride() and torch.equal(copied[0], view)
    assert copied[0].data_ptr() != view.data_ptr() and copied[2:] == args[2:]
    assert tensor_bytes(args) == 4 * 8 * 4 + 4 * 8


class _FakeEvent:
    def __init__(self, enable_timing=False):
        self.t = None

    def record(self):
        self.t = time.perf_counter()

    def elapsed_time(self, other):
        return (other.t - self.t) * 1e3


class _FakeGraph:
    """Records the calls made while capturing; replay makes them again."""
    capturing = None

    def __init__(self):
        self.fns = []

    def replay(self):
        for f in self.fns:
            f()


def _fake_cuda(monkeypatch) -> dict:
    """Fake CUDA objects; returns the current-stream holder. The fake graph, as torch.cuda.graph, makes its capture
    stream current and, when the capture fails, raises on exit without restoring the previous stream."""
    class Stream:
        def wait_stream(self, other):
            pass

    default, capture = Stream(), Stream()
    current = {"stream": default, "default": default}

    @contextlib.contextmanager
    def graph(g):
        prev, current["stream"] = current["stream"], capture
        _FakeGraph.capturing = g
        try:
            yield
        except Exception as e:
            raise RuntimeError("capture_end: operation failed due to a previous error during capture") from e
        else:
            current["stream"] = prev
        finally:
            _FakeGraph.capturing = None

    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: current["stream"])
    monkeypatch.setattr(torch.cuda, "set_stream", lambda s: current.update(stream=s))
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    return current


def test_gpu_kernel_path_control_flow(monkeypatch):
    """The CUDA-graph kernel path on fake CUDA objects: copies rotated, calls per replay, launch_us, samples."""
    launches = []
    _fake_cuda(monkeypatch)
    x = torch.ones(1024)  # 4 KiB: 16 copies exceed 2x a 32 KiB "L2"

    def kernel(t):
        g = _FakeGraph.capturing
        if g is not None:  # captured: the replay makes this call again, on the same copy
            g.fns.append(lambda t=t: launches.append(t.data_ptr()))
        else:
            launches.append(t.data_ptr())
        return t + 1

    t = measure(kernel, args=(x,), device="cuda", min_samples=5, min_time_s=0.0, warmup_s=0.0, flush_l2=True,
                l2_bytes=16 << 10)
    assert t.cuda_graph and t.l2_copies == 8 and t.graph_calls % 8 == 0 and t.graph_calls >= 8
    assert len(set(launches)) == 8  # every copy launched, each at its own address
    assert t.launch_us is not None and t.launch_us > 0 and t.n_samples >= 5 and t.timing_note is None
    warm = measure(kernel, args=(x,), device="cuda", min_samples=5, min_time_s=0.0, warmup_s=0.0, flush_l2=False)
    assert warm.l2_copies == 1  # no flush asked: the same inputs every call


def test_gpu_capture_failure_falls_back_to_eager(monkeypatch):
    current = _fake_cuda(monkeypatch)

    def syncs_inside(t):
        if _FakeGraph.capturing is not None:
            raise RuntimeError("operation not permitted when stream is capturing")
        return t * 2

    monkeypatch.setattr(torch, "empty", lambda *a, **k: torch.zeros(4, dtype=torch.int32))  # the flush buffer
    t = measure(syncs_inside, args=(torch.ones(4),), device="cuda", min_samples=3, min_time_s=0.0, warmup_s=0.0,
                flush_l2=True, l2_bytes=1 << 10)
    assert not t.cuda_graph and "capture failed" in t.timing_note and t.launch_us > 0 and t.n_samples == 3
    # The failed capture left its stream current (torch.cuda.graph's exit raised first): the stream is put back.
    assert current["stream"] is current["default"]
