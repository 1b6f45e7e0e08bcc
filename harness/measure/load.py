"""What else used the machine while a point ran, and whether that makes the point `contended`.

A within-run spread cannot see a machine that was busy for the whole point, and the end-of-run ceiling re-probe only
sees drift inside a run: a busy machine passes for a slow one. So every point records what else ran around it:

- CPU (from /proc): the machine's busy CPU time (/proc/stat: user, nice, system, irq, softirq) less this run's (this
  process and its descendants, or under torchrun the launcher and every rank it started: `run_root`; utime + stime +
  cutime + cstime of /proc/<pid>/stat, children from /proc/<pid>/task/*/children) is other processes' CPU time, in
  cores over the window (`others_cpu_cores`); the share of CPU time the hypervisor gave to other guests
  (`steal_share`, /proc/stat steal); the 1-minute load average (recorded only: it lags a minute and counts this
  process's own threads).
- GPU (from NVML): other compute processes on this device (`gpu_other_processes`, at the point's start and end) and
  the device's utilization at its end (`gpu_util_pct`, recorded only: it counts this process too).

The window is the point's own, widened back to at least MIN_WINDOW_S through the samples before it, so that a short
point is judged over a second of the machine's life, not over a few scheduler ticks (/proc counts CPU time in ticks
of 10 ms: over 0.1 s its sampling noise alone is near half a core). A point is `contended` (not usable; measured
again on `--resume`, like `noisy`) when, on a CPU device, other processes used more than CPU_CORES_LIMIT cores on
average and at least MIN_OTHER_CPU_S of CPU time, or steal exceeded STEAL_LIMIT; on a GPU device, when another process
computed on it. A quiet machine's background (daemons, kernel threads) uses a few hundredths of a core (0.07 on
the 2-vCPU development machine between other sessions' work, 2 s windows) and no GPU; one CPU-bound neighbour uses a
whole core. TOKENFLEET_IGNORE_LOAD=1 records all this but marks nothing (a shared CI machine, where the tests run
beside other jobs); the manifest says which.

A virtual machine's CPUs can also be slowed from outside, where the guest sees no process and little steal: the host
puts another guest's thread on a hyperthread sibling of ours, or our two vCPUs on different cache complexes. On the
2-vCPU development VM (2026-12-05, results/compare/cpu-amd-epyc-2core-2026-12-05-speed.md) that came and went for
seconds to minutes with no other process in the guest: a fixed elementwise op over both threads took 4.7-5.9 us, then
6.3-9.4 us, and a cold-cache 64x1024x4096 fp32 matmul 1.24x as long with it (3.96 -> 4.91 ms on average).
So on a CPU each point also reads the machine's speed before and after it (`speed_us`: SpeedProbe, ~1 ms each, the
CPU's analogue of polling a GPU's clocks) and between its samples every DURING_S (`speed_during_us`; the timing
function's `between_samples`, outside the samples), against the fastest this run has read (`speed_fastest_us`). A
point whose reading (`speed_reading`: a quarter of its readings may be slower) is more than SPEED_LIMIT slower is
`contended` ("the CPU ran x1.50 slower than its fastest in this run"), and the runner measures it again once the
probe reads fast (as nvbench discards samples taken while a GPU throttles): at most SPEED_RETRIES times, while
retries have cost under RETRY_SHARE of the rest of the run (so a run costs about 1.5x its measuring time at most,
one point's retry over); when the probe still reads slow after RECOVER_S the point waits for the end of the run.
There every point is judged again against the run's fastest reading (a run may start slow, or be slowed for a
minute), and those over the limit are measured again once the probe reads fast, else kept `contended`.
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
CPU_CORES_LIMIT = 0.5  # other processes' CPU time over the window, in cores: half a core of a neighbour
MIN_OTHER_CPU_S = 0.25  # and at least this much of it (25 ticks): over a short window the tick noise alone is larger
# Of the machine's CPU time given to other guests by the hypervisor: the 5% a ceiling may drift within one run
# (measure.parts.ceilings.DRIFT_LIMIT); a guest losing more than that can move its ceilings past the drift limit.
STEAL_LIMIT = 0.05
MIN_WINDOW_S = 1.0  # judge over at least this much of the machine's recent life
HISTORY_S = 10.0  # snapshots older than this are dropped
IGNORE_ENV = "TOKENFLEET_IGNORE_LOAD"
# The speed probe read this much slower than the run's fastest: the point ran on a slowed CPU. In the two quiet runs E
# and F of results/compare/cpu-amd-epyc-2core-2026-12-05-speed.md, 542 of the 549 readings their points kept lie
# within 20% of the run's fastest and the other 7 are 50% or more over it, none between; points under a CPU-bound
# neighbour (run G there) read 1.56-1.82x.
SPEED_LIMIT = 0.25
SPEED_CALLS = 64  # calls per reading, of which the median: ~0.5 ms of probe at 5-8 us a call
GRAIN = 32768  # at::internal::GRAIN_SIZE: torch splits an elementwise op over its threads in chunks of at least this
SPEED_RETRIES = 2  # a slowed point is measured again at most this often
RETRY_SHARE = 0.5  # and only while the retries (their waits included) cost under this share of the rest of the run
RECOVER_S = 2.0  # before a retry, wait up to this long for the probe to read fast again
RECOVER_STEP_S = 0.05  # between readings while waiting
DURING_S = 0.1  # while a point samples, the speed is read between its samples at most this often
# A point's speed: the reading this share of its readings (before, during, after) stay below; a CPU slowed for more
# than a quarter of the point moves its median sample.
SPEED_QUANTILE = 0.75


def judging() -> bool:
    """Whether a point over the limits is marked `contended` (else only recorded)."""
    return os.environ.get(IGNORE_ENV, "") in ("", "0")


def limits() -> dict:
    return {"cpu_cores": CPU_CORES_LIMIT, "min_other_cpu_s": MIN_OTHER_CPU_S, "steal_share": STEAL_LIMIT,
            "gpu_other_processes": 0, "min_window_s": MIN_WINDOW_S, "cpu_speed": SPEED_LIMIT}


@dataclass(frozen=True)
class CpuSnap:
    t: float  # time.monotonic()
    busy: int  # ticks the machine's CPUs spent working (all processes)
    steal: int  # ticks the hypervisor gave to others
    total: int  # all ticks (idle and iowait included)
    ours: int  # ticks of this process and its descendants (reaped children included)
    loadavg: float | None


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _proc_stat(proc: Path) -> tuple[int, int, int] | None:
    text = _read(proc / "stat")
    if not text:
        return None
    for line in text.splitlines():
        f = line.split()
        if f and f[0] == "cpu":
            v = [int(x) for x in f[1:9]] + [0] * max(0, 9 - len(f))
            user, nice, system, idle, iowait, irq, softirq, steal = v[:8]
            return user + nice + system + irq + softirq, steal, sum(v[:8])
    return None


def _pid_stat(proc: Path, pid: int) -> tuple[int, int] | None:
    """(ppid, utime + stime + cutime + cstime) of a process, or None when it is gone."""
    text = _read(proc / str(pid) / "stat")
    if not text or ")" not in text:
        return None
    rest = text[text.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    try:
        return int(rest[1]), sum(int(x) for x in rest[11:15])
    except (IndexError, ValueError):
        return None


def _children(proc: Path, pid: int) -> list[int] | None:
    """The children of `pid` from /proc/<pid>/task/*/children, or None where the kernel does not list them."""
    tasks = proc / str(pid) / "task"
    out: list[int] = []
    try:
        entries = list(tasks.iterdir())
    except OSError:
        return None
    found = False
    for t in entries:
        text = _read(t / "children")
        if text is None:
            continue
        found = True
        out += [int(x) for x in text.split() if x.isdigit()]
    return out if found else None


def _tree(proc: Path, root: int) -> set[int]:
    """`root` and its descendants."""
    seen, todo = {root}, [root]
    parents: dict[int, list[int]] | None = None
    while todo:
        pid = todo.pop()
        kids = _children(proc, pid)
        if kids is None:  # no children files: every process's parent from its stat, once
            if parents is None:
                parents = {}
                for d in proc.iterdir():
                    if d.name.isdigit() and (st := _pid_stat(proc, int(d.name))):
                        parents.setdefault(st[0], []).append(int(d.name))
            kids = parents.get(pid, [])
        for k in kids:
            if k not in seen:
                seen.add(k)
                todo.append(k)
    return seen


def run_root() -> int:
    """The process whose tree is this run: this process, or under torchrun its launcher (the ranks of one run are
    siblings, and each other's CPU time is the run's own, not a neighbour's)."""
    from tokenfleet.measure.distributed import under_launcher

    return os.getppid() if under_launcher() else os.getpid()


def tree_pids(proc: Path = PROC, root: int | None = None) -> set[int]:
    return _tree(proc, root or run_root())


def cpu_snapshot(proc: Path = PROC, pid: int | None = None) -> CpuSnap | None:
    """The machine's and this run's process tree's CPU time now, or None where /proc cannot be read (not Linux)."""
    stat = _proc_stat(proc)
    if stat is None:
        return None
    ours = sum(st[1] for p in _tree(proc, pid or run_root()) if (st := _pid_stat(proc, p)))
    load = _read(proc / "loadavg")
    try:
        la = float(load.split()[0]) if load else None
    except (ValueError, IndexError):
        la = None
    return CpuSnap(time.monotonic(), *stat, ours, la)


def cpu_load(start: CpuSnap, end: CpuSnap, hz: float) -> dict:
    """Other processes' CPU time over start..end in cores, the steal share, the window and the load average."""
    wall = max(end.t - start.t, 1e-9)
    others = max(0, (end.busy - start.busy) - (end.ours - start.ours)) / hz
    total = end.total - start.total
    return {"window_s": round(wall, 3), "others_cpu_cores": round(others / wall, 3), "others_cpu_s": round(others, 3),
            "steal_share": round((end.steal - start.steal) / total, 4) if total > 0 else 0.0,
            "loadavg_1m": end.loadavg}


def cpu_reasons(load: dict) -> list[str]:
    """Why a CPU point is contended (empty: it is not)."""
    out = []
    cores, secs = load.get("others_cpu_cores"), load.get("others_cpu_s")
    if cores is not None and cores > CPU_CORES_LIMIT and (secs or 0) >= MIN_OTHER_CPU_S:
        out.append(f"other processes used {cores:.2f} CPU cores (limit {CPU_CORES_LIMIT:g}) over "
                   f"{load.get('window_s'):.1f} s")
    steal = load.get("steal_share")
    if steal is not None and steal > STEAL_LIMIT:
        out.append(f"the hypervisor gave {steal:.0%} of the CPU time to other guests (limit {STEAL_LIMIT:.0%})")
    slow = slowdown(load)
    if slow is not None and slow > 1 + SPEED_LIMIT:
        out.append(f"the CPU ran x{slow:.2f} slower than its fastest in this run (speed probe "
                   f"{speed_reading(load):.1f} us against {load['speed_fastest_us']:.1f} us; limit "
                   f"x{1 + SPEED_LIMIT:.2f}): another guest shared its cores")
    return out


def speed_reading(load: dict) -> float | None:
    """A point's speed-probe reading in us: of its readings before and after it (`speed_us`) and between its
    samples (`speed_during_us`), the one SPEED_QUANTILE of them stay at or below (nearest rank: of two, the slower;
    of many, a few slow ones do not count), or None where none was read."""
    got = sorted(x for f in ("speed_us", "speed_during_us") for x in (load.get(f) or [])
                 if isinstance(x, (int, float)) and 0 < x < math.inf)
    return got[math.ceil(SPEED_QUANTILE * len(got)) - 1] if got else None


def slowdown(load: dict, fastest: float | None = None) -> float | None:
    """How much slower than `fastest` (default: the fastest the run had read by then) the speed probe read for a
    point (`speed_reading`), or None where it was not read."""
    reading = speed_reading(load)
    fastest = fastest or load.get("speed_fastest_us")
    if reading is None or not isinstance(fastest, (int, float)) or fastest <= 0:
        return None
    return reading / fastest


# --- the CPU's own speed -----------------------------------------------------------------------------------------


class SpeedProbe:
    """One reading of the CPU's speed now: the median time, in us, of SPEED_CALLS calls of one fixed elementwise op
    (a multiply in place) over GRAIN elements per thread of torch's pool, so each call forks to every thread the
    points use and joins them; its data (128 kB a thread) stays in the L2. A hyperthread shared with another guest,
    or threads placed apart, slow it as they slow the points."""

    def __init__(self):
        self.buf = None

    def __call__(self) -> float:
        import torch

        n = GRAIN * torch.get_num_threads()
        if self.buf is None or self.buf.numel() != n:
            self.buf = torch.ones(n)
            self.buf.mul_(1.0)  # its pages touched before any reading
        times = []
        for _ in range(SPEED_CALLS):
            t = time.perf_counter_ns()
            self.buf.mul_(1.0)
            times.append(time.perf_counter_ns() - t)
        times.sort()
        return times[len(times) // 2] / 1e3


speed_probe = SpeedProbe()


# --- GPU, through NVML -------------------------------------------------------------------------------------------


def _nvml_handle(pynvml, index: int):
    """NVML's handle of torch's CUDA device `index`: by UUID (right under CUDA_VISIBLE_DEVICES), else by index."""
    try:
        import torch

        uuid = str(torch.cuda.get_device_properties(index).uuid)
        return pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
    except Exception:  # noqa: BLE001 - an older torch or driver: NVML's own order
        return pynvml.nvmlDeviceGetHandleByIndex(index)


class NvmlReader:
    """(pids of the compute processes on torch's device `index`, its utilization %), or None without NVML. NVML is
    initialised once per process (nvmlInit can take tens of milliseconds: not once per point) and left open."""

    def __init__(self):
        self.nvml = None
        self.handles: dict[int, object] = {}
        self.unavailable = False

    def __call__(self, index: int) -> tuple[list[int], float | None] | None:
        if self.unavailable:
            return None
        try:
            if self.nvml is None:
                import pynvml

                pynvml.nvmlInit()
                self.nvml = pynvml
        except Exception:  # noqa: BLE001 - no NVML: nothing to say about the GPU
            self.unavailable = True
            return None
        nv = self.nvml
        try:
            if index not in self.handles:
                self.handles[index] = _nvml_handle(nv, index)
            h = self.handles[index]
            pids = [p.pid for p in nv.nvmlDeviceGetComputeRunningProcesses(h)]
        except Exception:  # noqa: BLE001 - this reading failed: the point records no GPU load
            return None
        try:
            util = float(nv.nvmlDeviceGetUtilizationRates(h).gpu)
        except Exception:  # noqa: BLE001
            util = None
        return pids, util


nvml_reading = NvmlReader()


def gpu_others(pids: list[int], ours: set[int]) -> int:
    """Compute processes on the device that are not this process tree. In a container NVML may list the host's pids,
    none of them ours: then one of them is this process (it holds a context while it measures)."""
    mine = [p for p in pids if p in ours]
    return len(pids) - len(mine) if mine else max(0, len(pids) - 1)


def gpu_reasons(load: dict) -> list[str]:
    n = load.get("gpu_other_processes")
    return [f"{n} other compute process(es) on this GPU"] if n else []


# --- around one point --------------------------------------------------------------------------------------------


class Meter:
    """Snapshots around each point: `begin()` before it, `end()` after it, which returns the point's `load` record
    (the measures, and `contended`: the reasons it is over the limits, empty when it is not)."""

    def __init__(self, device_kind: str = "cpu", gpu_index: int | None = None, proc: Path = PROC,
                 nvml=nvml_reading, hz: float | None = None, speed=None):
        self.kind, self.gpu_index, self.proc, self.nvml = device_kind, gpu_index, proc, nvml
        self.hz = hz or _clock_ticks()
        self.history: deque[CpuSnap] = deque()
        self._gpu_start: int | None = None
        self.speed = speed if device_kind == "cpu" else None  # a SpeedProbe (None: the CPU's speed is not read)
        self._speed_start: float | None = None
        self._during: list[float] = []
        self._during_t = 0.0
        self.start_run()

    def start_run(self) -> None:
        """A new run: its own fastest speed reading and retry budget."""
        self.fastest: float | None = None
        self.slowest: float | None = None
        self.run_start = time.monotonic()
        self.retry_s = 0.0
        self.retries = 0

    def _read_speed(self) -> float | None:
        if self.speed is None:
            return None
        try:
            v = float(self.speed())
        except Exception:  # noqa: BLE001 - a probe that cannot run says nothing about the machine
            return None
        if v > 0 and math.isfinite(v):
            self.fastest = v if self.fastest is None else min(self.fastest, v)
            self.slowest = v if self.slowest is None else max(self.slowest, v)
            return v
        return None

    def may_retry(self) -> bool:
        """Whether a slowed point may be measured again: judging, and retries so far under RETRY_SHARE of the time
        the run spent on everything else."""
        return (self.speed is not None and judging()
                and self.retry_s < RETRY_SHARE * max(time.monotonic() - self.run_start - self.retry_s, 0.0))

    def recover(self) -> bool:
        """Wait (up to RECOVER_S) for the speed probe to read within SPEED_LIMIT of the run's fastest: whether it
        did (a probe that cannot read: True, nothing to wait for)."""
        deadline = time.monotonic() + RECOVER_S
        while True:
            v = self._read_speed()
            if v is None or self.fastest is None or v <= self.fastest * (1 + SPEED_LIMIT):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(RECOVER_STEP_S)

    def _snap(self, trim: bool = False) -> CpuSnap | None:
        s = cpu_snapshot(self.proc)
        if s is not None:
            while trim and self.history and s.t - self.history[0].t > HISTORY_S:
                self.history.popleft()  # before a point only: its own start snapshot stays until its end
            self.history.append(s)
        return s

    def _gpu(self) -> tuple[int | None, float | None]:
        if self.kind != "cuda" or self.gpu_index is None:
            return None, None
        r = self.nvml(self.gpu_index)
        if r is None:
            return None, None
        pids, util = r
        return gpu_others(pids, tree_pids(self.proc)), util

    def again(self, measure):
        """A slowed point measured again: wait for the probe to read fast (`recover`), then `measure()` and count a
        retry; None (nothing measured) when it stayed slow. The time, waits and any retries inside `measure` included,
        goes to the retry budget once."""
        t, spent = time.monotonic(), self.retry_s
        point = measure() if self.recover() else None
        self.retries += point is not None
        self.retry_s = spent + time.monotonic() - t
        return point

    def during(self) -> None:
        """Between a point's samples (`timing.between_samples`): a speed reading, at most every DURING_S."""
        now = time.monotonic()
        if self.speed is not None and now - self._during_t >= DURING_S:
            v = self._read_speed()
            self._during_t = time.monotonic()
            if v is not None:
                self._during.append(v)

    def begin(self) -> None:
        self._during, self._during_t = [], time.monotonic()
        self._speed_start = self._read_speed()
        self._snap(trim=True)
        self._gpu_start, _ = self._gpu()

    def end(self) -> dict:
        end = self._snap()
        out: dict = {}
        if end is not None:
            older = [s for s in self.history if end.t - s.t >= MIN_WINDOW_S]
            start = older[-1] if older else self.history[0]
            if start is not end:
                out.update(cpu_load(start, end, self.hz))
        others, util = self._gpu()
        if others is not None or self._gpu_start is not None:
            out["gpu_other_processes"] = max(others or 0, self._gpu_start or 0)
            out["gpu_util_pct"] = util
        readings = [v for v in (self._speed_start, self._read_speed()) if v is not None]
        if readings and self.fastest:
            out["speed_us"] = [round(v, 3) for v in readings]
            if self._during:
                out["speed_during_us"] = [round(v, 2) for v in self._during]
            out["speed_fastest_us"] = round(self.fastest, 3)
        out["contended"] = cpu_reasons(out) if self.kind == "cpu" else gpu_reasons(out)
        return out


def _clock_ticks() -> float:
    try:
        return float(os.sysconf("SC_CLK_TCK"))
    except (ValueError, OSError, AttributeError):
        return 100.0


def judge(point: dict, load: dict, usable: frozenset[str]) -> dict:
    """The point with its `load` record; a usable point measured on a shared machine becomes `contended` (when
    judging), its numbers kept beside the reason."""
    point = {**point, "load": load}
    if load.get("contended") and point.get("status") in usable and judging():
        point["status"] = "contended"
        point["error"] = "measured on a shared machine: " + "; ".join(load["contended"])
    return point


def summary(points: list[dict], watch: Meter | None = None) -> dict:
    """The run's load for its manifest: the limits, whether they were applied, how many points they marked, the
    most other processes used around any point, and on a CPU the speed probe's fastest and slowest readings (as
    they compare, the machine's best and worst moments in the run: the meter's, retried points' readings included,
    else those the points kept) and the retries of slowed points."""
    loads = [p["load"] for p in points if isinstance(p.get("load"), dict)]

    def most(field: str):
        vals = [v for x in loads if isinstance(v := x.get(field), (int, float))]
        return max(vals) if vals else None

    speeds = [v for x in loads for f in ("speed_us", "speed_during_us") for v in (x.get(f) or [])
              if isinstance(v, (int, float))]
    out = {"judged": judging(), "limits": limits(), "points": len(loads),
           "contended": sum(p.get("status") == "contended" for p in points),
           "over_limits": sum(bool(x.get("contended")) for x in loads),
           "others_cpu_cores_max": most("others_cpu_cores"), "steal_share_max": most("steal_share"),
           "gpu_other_processes_max": most("gpu_other_processes")}
    if speeds:
        slow = [x for p in points if p.get("status") == "contended" and isinstance(x := p.get("load"), dict)
                and (slowdown(x) or 0.0) > 1 + SPEED_LIMIT]  # judged on its own record, as cpu_reasons did
        out.update(speed_fastest_us=min(speeds), speed_slowest_us=max(speeds), slowed=len(slow))
    if watch is not None and watch.speed is not None:
        out.update(retries=watch.retries, retry_s=round(watch.retry_s, 3))
        if watch.fastest:  # a resumed run: its earlier sessions' readings too
            out.update(speed_fastest_us=round(min(watch.fastest, out.get("speed_fastest_us") or math.inf), 3),
                       speed_slowest_us=round(max(watch.slowest, out.get("speed_slowest_us") or 0.0), 3))
    return out


_METERS: dict[tuple[str, int | None], Meter] = {}


def meter(device_kind: str, gpu_index: int | None = None) -> Meter:
    """The process's one meter for a device: its snapshots span the points, so a short point is judged over the
    second before it too."""
    key = (device_kind, gpu_index)
    if key not in _METERS:
        _METERS[key] = Meter(device_kind, gpu_index, speed=speed_probe)
    return _METERS[key]
