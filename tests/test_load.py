"""Runs that know when the machine was not their own (issue 24): what else used the CPU (fake /proc) and the GPU (fake
NVML) around each point, `contended` points (not usable, measured again on --resume), and the manifest's summary.
The live demonstration (a CPU-bound neighbour started halfway through a run) needs a quiet machine: these tests use
fake readings, whatever else runs beside them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from tokenfleet import results
from tokenfleet.measure import load

PID = 4242
HZ = 100.0


class FakeProc:
    """A /proc with a machine's CPU ticks (stat), a load average, this process (PID) and one child of it."""

    def __init__(self, root: Path):
        self.root = root
        self.busy = self.steal = self.idle = 0
        self.ours = self.child = 0
        self.write()

    def tick(self, seconds: float, ours_cores: float = 1.0, others_cores: float = 0.0, steal_cores: float = 0.0,
             cpus: int = 2, child_cores: float = 0.0) -> None:
        t = seconds * HZ
        self.ours += round(ours_cores * t)
        self.child += round(child_cores * t)
        self.busy += round((ours_cores + child_cores + others_cores) * t)
        self.steal += round(steal_cores * t)
        self.idle += max(0, round(cpus * t) - round((ours_cores + child_cores + others_cores + steal_cores) * t))
        self.write()

    def write(self) -> None:
        r = self.root
        # user nice system idle iowait irq softirq steal guest guest_nice
        (r / "stat").write_text(f"cpu  {self.busy} 0 0 {self.idle} 0 0 0 {self.steal} 0 0\ncpu0 0 0 0 0 0 0 0 0 0 0\n")
        (r / "loadavg").write_text("0.42 0.30 0.20 1/100 4300\n")
        for pid, ppid, ticks in ((PID, 1, self.ours), (PID + 1, PID, self.child)):
            d = r / str(pid)
            (d / "task" / str(pid)).mkdir(parents=True, exist_ok=True)
            # pid (comm) state ppid ... utime(14) stime(15) cutime(16) cstime(17): the name holds a space and a ')'
            fields = ["S", str(ppid)] + ["0"] * 9 + [str(ticks), "0", "0", "0"] + ["0"] * 5
            (d / "stat").write_text(f"{pid} (py thon) x) {' '.join(fields)}\n")
            kids = f"{PID + 1} " if pid == PID else ""
            (d / "task" / str(pid) / "children").write_text(kids)


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def fake(tmp_path, monkeypatch):
    proc = FakeProc(tmp_path)
    clock = Clock()
    monkeypatch.setattr(load.time, "monotonic", clock)
    monkeypatch.setattr(load.os, "getpid", lambda: PID)
    monkeypatch.setenv(load.IGNORE_ENV, "0")
    return proc, clock


def _point(meter: load.Meter, proc: FakeProc, clock: Clock, seconds: float, **tick) -> dict:
    meter.begin()
    clock.t += seconds
    proc.tick(seconds, **tick)
    return meter.end()


def test_quiet_machine_is_never_contended(fake):
    proc, clock = fake
    m = load.Meter("cpu", proc=proc.root, hz=HZ)
    # This process and its compile worker busy on both cores, daemons at 2% of a core: nothing marked.
    rec = [_point(m, proc, clock, s, ours_cores=1.5, child_cores=0.45, others_cores=0.02) for s in (0.05, 2.0, 0.3)]
    assert all(r["contended"] == [] for r in rec)
    assert rec[1]["others_cpu_cores"] == pytest.approx(0.02, abs=0.01) and rec[1]["loadavg_1m"] == 0.42
    assert rec[1]["steal_share"] == 0.0


def test_cpu_bound_neighbour_marks_points_contended(fake):
    proc, clock = fake
    m = load.Meter("cpu", proc=proc.root, hz=HZ)
    quiet = _point(m, proc, clock, 1.0, ours_cores=1.0, others_cores=0.01)
    busy = _point(m, proc, clock, 1.0, ours_cores=1.0, others_cores=1.0)  # a neighbour started halfway
    assert quiet["contended"] == []
    assert busy["others_cpu_cores"] == pytest.approx(1.0, abs=0.02)
    assert busy["contended"] and "1.00 CPU cores" in busy["contended"][0]


def test_short_point_is_judged_over_the_second_before_it(fake):
    proc, clock = fake
    m = load.Meter("cpu", proc=proc.root, hz=HZ)
    _point(m, proc, clock, 2.0, ours_cores=1.0, others_cores=1.0)
    short = _point(m, proc, clock, 0.05, ours_cores=1.0, others_cores=1.0)
    assert short["window_s"] >= load.MIN_WINDOW_S and short["contended"]
    # The first point of a run has no second before it: a few ticks of others over 50 ms are not enough.
    first = _point(load.Meter("cpu", proc=proc.root, hz=HZ), proc, clock, 0.05, ours_cores=1.0, others_cores=1.0)
    assert first["window_s"] < load.MIN_WINDOW_S and first["contended"] == []


def test_steal_marks_points_contended(fake):
    proc, clock = fake
    m = load.Meter("cpu", proc=proc.root, hz=HZ)
    r = _point(m, proc, clock, 2.0, ours_cores=1.0, steal_cores=0.5)
    assert r["steal_share"] == pytest.approx(0.25) and "hypervisor" in r["contended"][0]


def test_gpu_other_compute_process_marks_points_contended(fake):
    proc, clock = fake
    readings = {"pids": [PID], "util": 97.0}
    m = load.Meter("cuda", gpu_index=0, proc=proc.root, hz=HZ, nvml=lambda i: (readings["pids"], readings["util"]))
    alone = _point(m, proc, clock, 1.0, ours_cores=1.0, others_cores=0.9)  # the CPU is not what a GPU point uses
    assert alone["gpu_other_processes"] == 0 and alone["gpu_util_pct"] == 97.0 and alone["contended"] == []
    readings["pids"] = [PID, 999]
    shared = _point(m, proc, clock, 1.0)
    assert shared["gpu_other_processes"] == 1 and "1 other compute process" in shared["contended"][0]
    # In a container NVML lists the host's pids, none of them ours: one of them is this process.
    readings["pids"] = [77]
    assert _point(m, proc, clock, 1.0)["contended"] == []
    readings["pids"] = [77, 78]
    assert _point(m, proc, clock, 1.0)["gpu_other_processes"] == 1
    # No NVML: nothing said about the GPU, nothing marked.
    none = load.Meter("cuda", gpu_index=0, proc=proc.root, hz=HZ, nvml=lambda i: None)
    assert "gpu_other_processes" not in _point(none, proc, clock, 1.0)


def test_ranks_of_one_run_are_not_each_others_neighbours(fake, monkeypatch):
    """Under torchrun the ranks are siblings under the launcher: the run's tree starts there."""
    proc, clock = fake
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setattr(load.os, "getppid", lambda: PID)  # this rank is the fake's child, PID the launcher
    assert load.run_root() == PID and load.tree_pids(proc.root) == {PID, PID + 1}
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    assert load.run_root() == PID  # getpid, patched to PID by the fixture


def test_a_rank_measured_on_a_shared_gpu_makes_the_point_contended():
    from tokenfleet.measure.launch import merge

    ok = {"status": "ok", "error": None, "median_ms": 1.0, "raised": False}
    shared = {**ok, "status": "contended", "error": "measured on a shared machine: 1 other compute process"}
    point, stop = merge({"kind": "decode", "status": "ok", "median_ms": 1.0}, [ok, shared])
    assert point["status"] == "contended" and point["error"].startswith("rank 1: measured on a shared machine")
    assert not stop
    point, _ = merge({"kind": "decode", "status": "error", "error": "boom"}, [ok, shared])
    assert point["status"] == "error"  # a failure stays a failure


def test_no_proc_records_nothing_and_marks_nothing(tmp_path):
    m = load.Meter("cpu", proc=tmp_path / "absent", hz=HZ)
    m.begin()
    assert m.end() == {"contended": []}


def test_judge_marks_only_usable_points_and_respects_the_switch(monkeypatch):
    rec = {"others_cpu_cores": 1.2, "contended": ["other processes used 1.20 CPU cores"]}
    monkeypatch.setenv(load.IGNORE_ENV, "0")
    p = load.judge({"status": "ok", "median_ms": 2.0}, rec, results.USABLE)
    assert p["status"] == "contended" and p["median_ms"] == 2.0 and "shared machine" in p["error"]
    assert load.judge({"status": "error", "error": "boom"}, rec, results.USABLE)["status"] == "error"
    monkeypatch.setenv(load.IGNORE_ENV, "1")
    assert load.judge({"status": "ok"}, rec, results.USABLE)["status"] == "ok"


def test_contended_is_a_status_that_is_not_usable_and_is_measured_again():
    assert "contended" in results.STATUSES
    assert "contended" not in results.USABLE and "contended" not in results.FINAL


def _neighbour(monkeypatch, from_point: int):
    """Every Meter reads as if a CPU-bound neighbour ran from the `from_point`-th point of the run on."""
    state = {"n": 0}

    def end(self):
        state["n"] += 1
        busy = state["n"] >= from_point
        return {"window_s": 1.0, "others_cpu_cores": 1.0 if busy else 0.01, "others_cpu_s": 1.0 if busy else 0.01,
                "steal_share": 0.0, "contended": ["other processes used 1.00 CPU cores (limit 0.5)"] if busy else []}

    monkeypatch.setattr(load.Meter, "end", end)
    monkeypatch.setenv(load.IGNORE_ENV, "0")


def test_run_with_a_neighbour_halfway_has_contended_points_and_resume_measures_them_again(tmp_path, monkeypatch):
    from conftest import TINY_CEILINGS_SUITE
    from tokenfleet.measure.runner import run_suite

    suite = tmp_path / "tiny.yaml"
    suite.write_text(TINY_CEILINGS_SUITE.format(id="tiny").replace("copy_mb: 8", "copy_mb: 8\n  end_probe: false"))
    _neighbour(monkeypatch, from_point=4)
    run = run_suite(str(suite), out=tmp_path / "run", progress=False)
    manifest, points = results.read_run(run)
    statuses = [p["status"] for p in points]
    assert set(statuses[:3]) <= results.USABLE and set(statuses[3:]) == {"contended"}, statuses  # ok, or noisy
    assert all(p["load"]["others_cpu_cores"] is not None for p in points)
    assert manifest["load"]["judged"] is True and manifest["load"]["contended"] == len(points) - 3
    assert manifest["load"]["limits"]["cpu_cores"] == load.CPU_CORES_LIMIT
    # A contended probe sets no ceiling: the copy probe (first) does, the mat-vec probe (last) does not.
    assert [p["op"] for p in points][0] == "copy" and points[-1]["op"] == "matvec"
    assert manifest["ceilings"]["copy_gbps"] and manifest["ceilings"]["matvec_gbps"] == {}

    _neighbour(monkeypatch, from_point=10**6)  # the neighbour has gone: the resume measures them again, ok
    run_suite(None, resume=run, progress=False)
    _, again = results.read_run(run)
    assert len(again) == len(points) and {p["status"] for p in again} <= results.USABLE
    lines = (run / "points.jsonl").read_text().splitlines()
    assert len(lines) == len(points)  # compacted: one record per key


def test_ignored_load_is_recorded_in_the_manifest(tmp_path, monkeypatch):
    from conftest import TINY_CEILINGS_SUITE
    from tokenfleet.measure.runner import run_suite

    suite = tmp_path / "tiny.yaml"
    suite.write_text(TINY_CEILINGS_SUITE.format(id="tiny").replace("copy_mb: 8", "copy_mb: 8\n  end_probe: false"))
    _neighbour(monkeypatch, from_point=1)
    monkeypatch.setenv(load.IGNORE_ENV, "1")
    run = run_suite(str(suite), out=tmp_path / "run", progress=False)
    manifest, points = results.read_run(run)
    assert {p["status"] for p in points} <= results.USABLE and manifest["load"]["judged"] is False
    assert manifest["load"]["over_limits"] == len(points)


def test_live_snapshot_reads_this_machine():
    """On Linux the real /proc parses: this process is in its own tree, and the numbers are finite."""
    if not Path("/proc/stat").exists():
        pytest.skip("no /proc")
    s = load.cpu_snapshot()
    assert s is not None and s.total >= s.busy >= 0 and s.ours >= 0
    assert os.getpid() in load.tree_pids()
    json.dumps(load.summary([]), allow_nan=False)


def test_nvml_reader_inits_once_and_reads_processes(monkeypatch):
    """The NVML reading with a fake pynvml: one nvmlInit for many points, the handle by index where torch gives no
    UUID (no GPU here), compute processes' pids and the utilization."""
    import sys
    import types

    calls = {"init": 0}
    fake = types.SimpleNamespace(
        nvmlInit=lambda: calls.__setitem__("init", calls["init"] + 1),
        nvmlDeviceGetHandleByUUID=lambda u: (_ for _ in ()).throw(RuntimeError("no uuid")),
        nvmlDeviceGetHandleByIndex=lambda i: f"h{i}",
        nvmlDeviceGetComputeRunningProcesses=lambda h: [types.SimpleNamespace(pid=1), types.SimpleNamespace(pid=2)],
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=55))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    read = load.NvmlReader()
    assert read(0) == ([1, 2], 55.0) and read(0) == ([1, 2], 55.0) and calls["init"] == 1
    monkeypatch.setattr(fake, "nvmlDeviceGetComputeRunningProcesses", lambda h: 1 / 0)
    assert read(0) is None and not read.unavailable  # one failed reading, not a dead reader
    broken = types.SimpleNamespace(nvmlInit=lambda: 1 / 0)
    monkeypatch.setitem(sys.modules, "pynvml", broken)
    dead = load.NvmlReader()
    assert dead(0) is None and dead.unavailable


def test_steal_limit_is_the_drift_limit():
    from tokenfleet.measure.parts.ceilings import DRIFT_LIMIT

    assert load.STEAL_LIMIT == DRIFT_LIMIT


# --- the CPU's own speed (a host that gives another guest a share of our cores) -----------------------------------


class FakeSpeed:
    """Speed-probe readings in us, one per call, the last repeated."""

    def __init__(self, *readings: float):
        self.readings, self.calls = list(readings), 0

    def __call__(self) -> float:
        self.calls += 1
        return self.readings.pop(0) if len(self.readings) > 1 else self.readings[0]


def test_a_point_on_a_slowed_cpu_is_contended_against_the_runs_fastest_reading(fake):
    proc, clock = fake
    m = load.Meter("cpu", proc=proc.root, hz=HZ, speed=FakeSpeed(5.0, 5.2, 5.1, 6.2, 7.5, 7.6))
    quiet = _point(m, proc, clock, 1.0, ours_cores=1.0)
    assert quiet["speed_us"] == [5.0, 5.2] and quiet["speed_fastest_us"] == 5.0 and quiet["contended"] == []
    edge = _point(m, proc, clock, 1.0, ours_cores=1.0)  # 6.2 / 5.0 = x1.24: within SPEED_LIMIT
    assert edge["contended"] == [] and load.slowdown(edge) == pytest.approx(1.24)
    slow = _point(m, proc, clock, 1.0, ours_cores=1.0)
    assert load.slowdown(slow) == pytest.approx(7.6 / 5.0) and len(slow["contended"]) == 1
    assert slow["contended"][0].startswith("the CPU ran x1.52 slower than its fastest in this run (speed probe 7.6 us")
    # A GPU meter and a meter without a probe read no speed; a probe that fails or reads nonsense says nothing.
    assert "speed_us" not in _point(load.Meter("cuda", proc=proc.root, hz=HZ, speed=FakeSpeed(5.0)), proc, clock, 1.0)
    assert "speed_us" not in _point(load.Meter("cpu", proc=proc.root, hz=HZ), proc, clock, 1.0)
    for bad in (float("nan"), -1.0, 0.0, float("inf")):
        assert "speed_us" not in _point(load.Meter("cpu", proc=proc.root, hz=HZ, speed=FakeSpeed(bad)), proc, clock,
                                        1.0)

    def broken():
        raise RuntimeError("no torch here")

    assert "speed_us" not in _point(load.Meter("cpu", proc=proc.root, hz=HZ, speed=broken), proc, clock, 1.0)


def test_slowdown_reads_only_what_is_there():
    assert load.slowdown({}) is None and load.slowdown({"speed_us": [5.0]}) is None
    assert load.slowdown({"speed_us": ["x", None], "speed_fastest_us": 5.0}) is None
    assert load.slowdown({"speed_us": [6.0, 9.0], "speed_fastest_us": 6.0}) == 1.5
    assert load.slowdown({"speed_us": [6.0, 9.0], "speed_fastest_us": 6.0}, fastest=4.5) == 2.0
    assert load.cpu_reasons({"speed_us": [6.0, 7.4], "speed_fastest_us": 6.0}) == []  # x1.23
    assert load.cpu_reasons({"speed_us": [6.0, 7.6], "speed_fastest_us": 6.0})  # x1.27


def test_the_real_speed_probe_reads_a_finite_time():
    v = load.SpeedProbe()()
    assert 0 < v < 1e5


def test_retry_budget_and_recovery(fake, monkeypatch):
    proc, clock = fake
    speed = FakeSpeed(5.0, 9.0, 9.0, 5.1)
    m = load.Meter("cpu", proc=proc.root, hz=HZ, speed=speed)
    assert not m.may_retry()  # no time spent yet: no budget
    clock.t += 4.0
    assert m.may_retry()
    m.retry_s = 1.33  # of 4 s, 2.67 s measuring and 1.33 s of retries: just under half
    assert m.may_retry()
    m.retry_s = 1.34  # over half of the rest of the run (2.66 s)
    assert not m.may_retry()
    monkeypatch.setenv(load.IGNORE_ENV, "1")
    m.retry_s = 0.0
    assert not m.may_retry()  # not judging: never measured again
    monkeypatch.setattr(load.time, "sleep", lambda s: setattr(clock, "t", clock.t + s))
    m.fastest = None
    assert m.recover() and m.fastest == 5.0  # the first reading sets the fastest
    assert m.recover() and speed.calls == 4  # 9.0, 9.0 waited out, 5.1 within the limit
    speed.readings = [9.0]
    t0 = clock.t
    assert not m.recover() and clock.t - t0 >= load.RECOVER_S  # gives up after RECOVER_S
    assert load.Meter("cpu", proc=proc.root, hz=HZ).recover()  # no probe: nothing to wait for


def _speed_run(tmp_path, monkeypatch, speed):
    from conftest import TINY_CEILINGS_SUITE
    from tokenfleet.measure.runner import run_suite

    suite = tmp_path / "tiny.yaml"
    suite.write_text(TINY_CEILINGS_SUITE.format(id="tiny").replace("copy_mb: 8", "copy_mb: 8\n  end_probe: false"))
    monkeypatch.setenv(load.IGNORE_ENV, "0")
    monkeypatch.setattr(load, "RECOVER_S", 0.0)
    monkeypatch.setattr(load, "RETRY_SHARE", 1e9)  # tests: the budget is tested above
    monkeypatch.setattr(load, "CPU_CORES_LIMIT", 1e9)  # whatever else runs beside the tests
    monkeypatch.setattr(load, "STEAL_LIMIT", 1e9)
    monkeypatch.setattr(load.meter("cpu"), "speed", speed)
    run = run_suite(str(suite), out=tmp_path / "run", progress=False)
    return results.read_run(run)


def test_a_slowed_point_is_measured_again_once_the_cpu_is_fast(tmp_path, monkeypatch):
    """The second point reads slow after its samples: measured again (after a recovery reading), ok, `retries: 1`."""
    state = {"n": 0}

    def speed():
        state["n"] += 1
        return 9.0 if state["n"] == 4 else 5.0  # begin/end of point 1, begin/end of point 2 (slow at its end)

    manifest, points = _speed_run(tmp_path, monkeypatch, speed)
    assert {p["status"] for p in points} <= results.USABLE
    assert points[1]["load"]["retries"] == 1 and all("retries" not in p["load"] for p in points[:1] + points[2:])
    assert manifest["load"]["retries"] == 1 and manifest["load"]["slowed"] == 0
    assert manifest["load"]["speed_fastest_us"] == 5.0 and manifest["load"]["speed_slowest_us"] == 9.0


def test_a_cpu_slowed_for_good_leaves_contended_points_unmeasured_again(tmp_path, monkeypatch):
    state = {"n": 0}

    def speed():
        state["n"] += 1
        return 5.0 if state["n"] <= 2 else 8.0  # fast for the first point only

    manifest, points = _speed_run(tmp_path, monkeypatch, speed)
    assert points[0]["status"] in results.USABLE
    rest = points[1:]
    assert rest and {p["status"] for p in rest} == {"contended"}
    assert all("retries" not in p["load"] for p in rest)  # the probe never read fast again: no use measuring
    assert manifest["load"]["retries"] == 0
    assert all("the CPU ran x1.60 slower" in p["error"] for p in rest)
    assert manifest["load"]["slowed"] == len(rest) and manifest["load"]["contended"] == len(rest)


def test_a_run_that_starts_slow_measures_its_first_points_again_at_the_end(tmp_path, monkeypatch):
    """The run learns how fast the CPU is only after its first point: that point is judged again at the end, and
    measured again (fast now)."""
    state = {"n": 0}

    def speed():
        state["n"] += 1
        return 8.0 if state["n"] <= 2 else 5.0

    manifest, points = _speed_run(tmp_path, monkeypatch, speed)
    assert {p["status"] for p in points} <= results.USABLE
    assert max(points[0]["load"]["speed_us"]) == 5.0  # the first point's record is the one measured again
    assert manifest["load"]["retries"] == 1
    lines = (tmp_path / "run" / "points.jsonl").read_text().splitlines()
    assert len(lines) == len(points)  # compacted at the end: one record per key


def test_a_slowed_first_point_is_contended_when_it_cannot_be_measured_again(tmp_path, monkeypatch):
    state = {"n": 0}

    def speed():
        state["n"] += 1
        return 8.0 if state["n"] <= 2 else 5.0

    from tokenfleet.measure import runner

    monkeypatch.setattr(runner.load.Meter, "may_retry", lambda self: False)
    manifest, points = _speed_run(tmp_path, monkeypatch, speed)
    assert points[0]["status"] == "contended" and "the CPU ran x1.60 slower" in points[0]["error"]
    assert points[0]["load"]["speed_fastest_us"] == 5.0
    assert {p["status"] for p in points[1:]} <= results.USABLE


def test_a_point_slow_each_time_is_measured_again_at_most_speed_retries_times(tmp_path, monkeypatch):
    """Each point reads slow at its end and fast otherwise: measured SPEED_RETRIES more times in the job loop, and
    again (with as many retries) at the end of the run, then `contended`."""
    phase = {"end": False}

    def speed():
        return 8.0 if phase["end"] else 5.0

    def begin_hook(self, _orig=load.Meter.begin):
        phase["end"] = False
        return _orig(self)

    def end_hook(self, _orig=load.Meter.end):
        phase["end"] = True
        out = _orig(self)
        phase["end"] = False
        return out

    monkeypatch.setattr(load.Meter, "begin", begin_hook)
    monkeypatch.setattr(load.Meter, "end", end_hook)
    manifest, points = _speed_run(tmp_path, monkeypatch, speed)
    assert {p["status"] for p in points} == {"contended"}
    # the job loop's retries, then the end of the run's measurement with its own retries
    assert all(p["load"]["retries"] == load.SPEED_RETRIES for p in points)
    assert manifest["load"]["retries"] == len(points) * (2 * load.SPEED_RETRIES + 1)


def test_speed_reading_lets_a_quarter_of_the_readings_be_slow():
    assert load.speed_reading({}) is None and load.speed_reading({"speed_us": [float("inf"), -2.0]}) is None
    assert load.speed_reading({"speed_us": [5.0, 9.0]}) == 9.0  # of two, the slower
    assert load.speed_reading({"speed_us": [5.0]}) == 5.0
    # 8 readings: the 6th (nearest rank of 0.75): one or two slow ones do not count, three do
    assert load.speed_reading({"speed_us": [5.0, 5.1], "speed_during_us": [5.0] * 4 + [9.0, 9.5]}) == 5.1
    assert load.speed_reading({"speed_us": [5.0, 9.0], "speed_during_us": [5.0] * 3 + [9.0, 9.5, 5.2]}) == 9.0
    assert load.slowdown({"speed_us": [5.0, 5.1], "speed_during_us": [9.0] * 6, "speed_fastest_us": 4.5}) == 2.0


def test_speed_is_read_between_samples_at_most_every_during_s(fake):
    proc, clock = fake
    speed = FakeSpeed(5.0, 5.0, 8.0, 8.1, 8.2, 8.3, 5.0)
    m = load.Meter("cpu", proc=proc.root, hz=HZ, speed=speed)
    m.begin()
    for _ in range(12):  # twelve samples 0.03 s apart: a reading every DURING_S = 0.1 s of them (3)
        clock.t += 0.03
        m.during()
    clock.t += 0.03
    proc.tick(0.39)
    rec = m.end()
    assert rec["speed_during_us"] == [5.0, 8.0, 8.1] and rec["speed_us"] == [5.0, 8.2]
    assert load.speed_reading(rec) == 8.1 and rec["contended"]  # three of five readings slow
    none = load.Meter("cpu", proc=proc.root, hz=HZ)
    none.begin()
    none.during()
    assert "speed_during_us" not in none.end()


def test_again_counts_a_retry_and_its_time_once(fake, monkeypatch):
    """`Meter.again`: measured only when the probe reads fast; its time, a nested retry's included, budgeted once."""
    proc, clock = fake
    monkeypatch.setattr(load.time, "sleep", lambda s: setattr(clock, "t", clock.t + s))
    m = load.Meter("cpu", proc=proc.root, hz=HZ, speed=FakeSpeed(5.0))
    m.fastest = 5.0

    def nested():
        clock.t += 2.0
        m.retry_s += 1.5  # a retry inside, as the end of the run's execute(retry=True) has
        m.retries += 1
        return {"status": "ok"}

    assert m.again(nested) == {"status": "ok"}
    assert m.retries == 2 and m.retry_s == pytest.approx(2.0)
    m.speed = FakeSpeed(9.0)  # stays slow: nothing measured, the wait budgeted
    assert m.again(nested) is None
    assert m.retries == 2 and m.retry_s == pytest.approx(2.0 + load.RECOVER_S, abs=load.RECOVER_STEP_S)
