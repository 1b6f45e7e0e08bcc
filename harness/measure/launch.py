"""A run on N ranks: the torchrun launch (`tokenfleet bench --nproc N`), rank 0 leading, the others following.

`launch` re-runs the command as `python -m torch.distributed.run --standalone --nproc-per-node N -m tokenfleet ...`.
Under it, every rank calls `run_suite`. Rank 0 leads: it alone writes the run folder (through the runner, as a
one-device run does, so `--resume` works unchanged), decides which jobs are left, and names them to the others
one at a time; every rank runs the job (collectives need all of them) and sends back its outcome; the point rank 0
writes carries the first failing rank's error, every rank's median (`median_ms_by_rank`) and, on GPU, telemetry
(`telemetry_by_rank`). The manifest lists every rank's device as it started (`environment.ranks`, NVML included)
and its telemetry at the end (`environment.telemetry_end_by_rank`).

Failures end the run, never hang it: ranks that disagree about a job raising (the collective sequence can no
longer be trusted), a control message that fails (a rank died: gloo sees the closed socket at once, NCCL after
the timeout), or SIGTERM (torchrun's agent stops the survivors when a worker dies) make rank 0 write the point in
flight as `error` and the manifest's `failure`, and exit 1; `--resume` measures what is left. Were rank 0 itself
to die, the launcher writes the manifest's `failure` after torchrun returns.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tokenfleet import results
from tokenfleet.config import ConfigError
from tokenfleet.measure import distributed as D
from tokenfleet.measure.context import Job, RunContext

RUN_DIR_FILE_ENV = "TOKENFLEET_RUN_DIR_FILE"  # where rank 0 tells the launcher which run folder it writes
STOP, ABORT = -1, -2  # job indices that end a follower's loop: the run is done / failed


class RunFailed(Exception):
    """The distributed run stopped: a rank failed or died. Its point and the manifest say which."""


class RankLost(KeyboardInterrupt):
    """SIGTERM on rank 0 (torchrun stopping the survivors): a KeyboardInterrupt, so no job swallows it."""


def _rank_info(info) -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "local_rank": int(os.environ.get("LOCAL_RANK", 0)),
            "device": info.to_dict()}


def _telemetry(ctx: RunContext) -> dict | None:
    if not ctx.on_gpu:
        return None
    from tokenfleet.measure.device import telemetry

    return telemetry(torch.cuda.current_device())


def _outcome(point: dict, raised: bool, ctx: RunContext) -> dict:
    out = {k: point.get(k) for k in ("status", "error", "median_ms")}
    return {**out, "raised": raised, "telemetry": _telemetry(ctx)}


def _execute(job: Job, ctx: RunContext) -> tuple[dict, bool]:
    """runner.execute, and whether the job raised (the runner made its row) rather than returned a status."""
    from tokenfleet.measure.runner import execute

    raised = [False]

    def run(c):
        try:
            return job.run(c)
        except KeyboardInterrupt:
            raise
        except BaseException:
            raised[0] = True
            raise

    return execute(Job(key=job.key, run=run, label=job.label), ctx), raised[0]


def merge(point: dict, outcomes: list[dict]) -> tuple[dict, bool]:
    """Rank 0's point with every rank's outcome; True when the ranks disagree about raising (the run must stop)."""
    point = dict(point)
    failed = [(r, o) for r, o in enumerate(outcomes) if o["status"] in ("error", "oom")]
    if failed and point["status"] not in ("error", "oom"):
        r, o = failed[0]
        point.update(status=o["status"], error=f"rank {r}: {o['error']}")
    shared = [(r, o) for r, o in enumerate(outcomes) if o["status"] == "contended"]  # tokenfleet.measure.load
    if shared and point["status"] in results.USABLE:
        r, o = shared[0]
        point.update(status="contended", error=f"rank {r}: {o['error']}")
    point["median_ms_by_rank"] = [o.get("median_ms") for o in outcomes]
    tele = [o.get("telemetry") for o in outcomes]
    if any(tele):
        point["telemetry_by_rank"] = tele
    return point, len({o["raised"] for o in outcomes}) > 1


class Leader:
    """What the runner calls on rank 0 of a distributed run (`run_suite(..., group=Leader(g))`)."""

    def __init__(self, g: D.Group):
        self.g, self.prepared = g, False

    def prepare(self, suite, writer, info) -> None:
        """Once the run folder exists: the suite to the others; every rank's device into the manifest."""
        env = writer.manifest["environment"]
        if env.get("world_size", self.g.world) != self.g.world:  # resumed: its tp points need the same world
            raise ConfigError(writer.dir / "manifest.json", "environment.world_size",
                              f"the run has {env['world_size']} ranks; resume it with --nproc {env['world_size']}")
        self.g.broadcast(suite.resolved())
        self.prepared = True
        if os.environ.get(RUN_DIR_FILE_ENV):
            Path(os.environ[RUN_DIR_FILE_ENV]).write_text(str(writer.dir.resolve()))
        env.update(ranks=self.g.gather(_rank_info(info)), world_size=self.g.world, distributed_backend=self.g.backend)
        writer.write_manifest()

    def run_jobs(self, jobs, ctx, writer, done, progress, on_point) -> None:
        from tokenfleet.measure.runner import is_done

        g, job = self.g, None
        todo = [i for i, j in enumerate(jobs) if not is_done(j, done)]
        prev = signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            for n, i in enumerate(todo):
                job = jobs[i]
                if progress:
                    print(f"[{n + 1}/{len(todo)}] {job.label or job.key.get('kind')}", file=sys.stderr, flush=True)
                g.broadcast(i)
                point, raised = _execute(job, ctx)
                point, disagree = merge(point, g.gather(_outcome(point, raised, ctx)))
                writer.append(point)
                job = None
                if point["kind"] == "ceiling":
                    ctx.record_ceiling(point)
                if on_point:
                    on_point(point)
                if disagree:
                    raise RunFailed(f"ranks disagree on {point.get('kind')} point: {point.get('error')}")
            g.broadcast(STOP)
            writer.manifest["environment"]["telemetry_end_by_rank"] = g.gather(_telemetry(ctx))
        except (RankLost, Exception) as e:  # a job's own errors never get here (execute makes them rows)
            # From here on a second SIGTERM must not cut the record short (torchrun SIGKILLs after its grace).
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            _record_failure(writer, job, e)
            if isinstance(e, RunFailed):  # the control group still works: release the others
                _try(g.broadcast, ABORT)
            raise RunFailed(f"{type(e).__name__}: {e}".splitlines()[0][:500]) from None
        signal.signal(signal.SIGTERM, prev)


def _on_sigterm(signum, frame):
    raise RankLost(f"signal {signum}: torchrun stopped this rank (another rank failed or died)")


def _record_failure(writer, job: Job | None, exc: BaseException) -> None:
    msg = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:500]
    last = writer.last or {}
    written = all(last.get(k) == results.jsonable(v) for k, v in job.key.items()) if job is not None else True
    if not written:  # the point in flight (a signal may land between its append and `job = None`)
        _try(writer.append, {**job.key, "status": "error", "error": f"run stopped during this point: {msg}"})
    writer.manifest["failure"] = {"error": msg, "by": "rank 0", "time": time.time()}


def _try(fn, *args) -> None:
    try:
        fn(*args)
    except Exception:  # noqa: BLE001, S110 - best effort on a failing run
        pass


def follow(g: D.Group, device: str | None = None) -> None:
    """A non-zero rank: plan rank 0's suite, run the jobs it names, send back each outcome, until STOP."""
    from tokenfleet.hardware import load_hardware
    from tokenfleet.measure.device import detect
    from tokenfleet.measure.runner import plan_all
    from tokenfleet.measure.suite import suite_from_dict

    info = detect(device)
    data = g.broadcast()
    if data is None:
        raise RunFailed("rank 0 stopped before the run started (its error is above)")
    suite = suite_from_dict(data, "rank 0's suite")
    g.gather(_rank_info(info))
    ctx = RunContext(device=info, suite=suite, datasheet=load_hardware(info.datasheet) if info.datasheet else None)
    jobs = plan_all(suite, ctx)
    while (i := g.broadcast()) != STOP:
        if i == ABORT:
            raise RunFailed(f"rank {g.rank}: rank 0 stopped the run (its manifest says why)")
        point, raised = _execute(jobs[i], ctx)
        if point["kind"] == "ceiling":
            ctx.record_ceiling(point)
        g.gather(_outcome(point, raised, ctx))
    g.gather(_telemetry(ctx))  # the manifest's telemetry_end_by_rank


def run_suite(suite: str | None, out, resume, device: str | None, progress: bool) -> Path | None:
    """This rank's part of a distributed run: rank 0 returns the run folder, the others None. RunFailed when
    the run stopped (rank 0 has recorded why)."""
    from tokenfleet.measure.device import pick
    from tokenfleet.measure.runner import run_suite as run_one

    g = D.init(pick(device))
    ok = False
    try:
        if g.leader:
            leader = Leader(g)
            try:
                run_dir = run_one(suite, out=out, resume=resume, device=device, progress=progress, group=leader)
            except BaseException:
                if not leader.prepared:  # e.g. a bad suite: the others wait for it
                    _try(g.broadcast, None)
                raise
        else:
            follow(g, device)
            run_dir = None
        ok = True
        return run_dir
    except (RankLost, RuntimeError) as e:  # a follower whose leader is gone: nothing to write
        raise RunFailed(f"rank {g.rank}: {type(e).__name__}: {e}".splitlines()[0][:500]) from None
    finally:
        if ok:  # after a failure the group may be broken: the process exit releases it
            g.close()


# ---------------------------------------------------------------------------------------------------------------
# The launcher


def launch(nproc: int, args: list[str]) -> int:
    """`python -m tokenfleet ARGS` on nproc ranks of this node through torchrun's launcher (a free port); returns
    its exit code. When rank 0 died before recording why, the run folder's manifest gets the failure here."""
    with tempfile.TemporaryDirectory() as tmp:
        note = Path(tmp) / "run_dir"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "tokenfleet", *args]
        rc = subprocess.run(cmd, env={**os.environ, RUN_DIR_FILE_ENV: str(note)}).returncode
        run_dir = Path(note.read_text()) if note.exists() else None
    if rc != 0 and run_dir is not None:
        mark_failed(run_dir, f"torchrun exited with code {rc}: a rank failed or died (its log is above)")
    return rc


def mark_failed(run_dir: Path, error: str) -> None:
    """The manifest's `failure`, unless rank 0 already wrote one."""
    try:
        manifest = results.read_manifest(run_dir)
    except Exception:  # noqa: BLE001 - nothing readable to mark
        return
    if not manifest.get("failure"):
        results.update_manifest(run_dir, failure={"error": error, "by": "launcher", "time": time.time()})
