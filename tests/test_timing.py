import time

import pytest

from harness.measure.timing import measure, summarize


def busy(ms: float):
    """A known amount of work: spin for `ms` milliseconds of wall time."""
    end = time.perf_counter() + ms / 1e3
    while time.perf_counter() < end:
        pass


def test_cpu_timing_matches_known_work():
    t = measure(lambda: busy(2.0), device="cpu", min_samples=10, min_time_s=0.05, warmup_s=0.01)
    assert 1.9 <= t.median_ms <= 2.6
    assert t.p20_ms <= t.median_ms <= t.p80_ms
    assert t.n_samples >= 10
    assert t.threads is not None and t.threads >= 1
    assert not t.noisy


def test_min_time_raises_sample_count():
    t = measure(lambda: busy(0.2), device="cpu", min_samples=3, min_time_s=0.05, warmup_s=0.0)
    assert t.n_samples >= 100  # 50 ms of samples at 0.2 ms each


def test_first_call_reported_separately():
    calls = []

    def fn():
        busy(20.0 if not calls else 0.5)  # a slow first call, like a compile or an autotune
        calls.append(1)

    t = measure(fn, device="cpu", min_samples=5, min_time_s=0.0, warmup_s=0.0)
    assert t.first_call_ms >= 19.0
    assert t.median_ms < 2.0


def test_noisy_flag():
    state = {"i": 0}

    def alternating():
        state["i"] += 1
        busy(0.5 if state["i"] % 2 else 3.0)

    t = measure(alternating, device="cpu", min_samples=20, min_time_s=0.0, warmup_s=0.0, noise_limit=0.1)
    assert t.noisy and t.spread > 0.1
    quiet = summarize([1.0, 1.01, 0.99, 1.0, 1.0], noise_limit=0.1)
    assert not quiet["noisy"]


def test_bad_min_samples():
    with pytest.raises(ValueError):
        measure(lambda: None, min_samples=0)
