"""Run folders: `manifest.json` + `points.jsonl`, and the Point schema of DESIGN.md.

A point is one measurement, a flat JSON object, identified by its key (`point_key`: every field that is not a
measurement). `RunWriter` is a run's one writer (it holds the folder's lock): it appends and fsyncs one record per
point, so a kill loses at most the point in flight, and a point measured again on `--resume` is appended as a
replacement record, the file compacted atomically to one record per key when the run ends. Readers keep the last
record of each key, skip a damaged last line with a one-line warning, and refuse an unknown `schema_version` or
`status` with a ConfigError naming the file, the line and the field.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError
from tokenfleet.config import CHECKOUT_ROOT, ConfigError, decode, read_text, validation_error
from tokenfleet.files import (
    LOCK_NAME,
    RunLock,
    append_record,
    atomic_write,
    ensure_dir,
    open_append,
    remove_stale_temps,
)

SCHEMA_VERSION = 1
STATUSES = ("ok", "oom", "error", "incorrect", "noisy", "above_ceiling", "contended", "skipped")
# The statuses whose numbers may enter tables, plots, ratios, ceilings and capacity: a noisy point is a real
# measurement, only less certain; every other status has no number to use (`above_ceiling`: faster than this run's
# measured ceiling by > 3%, so its count or the ceiling is wrong; `contended`: measured while other work used the
# machine, tokenfleet.measure.load). One set, used by every reader.
USABLE = frozenset({"ok", "noisy"})
# The statuses `--resume` does not measure again: `ok`, and `skipped` (decided by the device and the suite, which a
# resume keeps, not by chance). Every other status (noisy, error, oom, incorrect, and any added later) is measured
# again, and its new record replaces the old one.
FINAL = frozenset({"ok", "skipped"})
KINDS = ("ceiling", "kernel", "prefill", "decode", "collective")
# Runs land in the checkout's results/runs/; an installed wheel writes to results/runs/ under the folder it is run from
# (TOKENFLEET_RUNS overrides both).
RUNS_ROOT = Path(os.environ.get("TOKENFLEET_RUNS") or (CHECKOUT_ROOT or Path.cwd()) / "results" / "runs")


class RunWarning(UserWarning):
    """Something a reader skipped and says so (a damaged last line); the CLI prints it as one line."""

# Fields that identify a point (the rest are measurements): used to match points for --resume and compare.
MEASURED_FIELDS = {
    "schema_version", "run_id", "status", "error", "median_ms", "p20_ms", "p80_ms", "n_samples", "first_call_ms",
    "spread", "noisy", "threads", "cuda_graph", "flops", "bytes", "tflops", "gbps", "tokens_per_s", "mfu", "mbu",
    "mfu_datasheet", "mbu_datasheet", "mbu_matvec", "datasheet_value", "datasheet_ratio", "device", "rel_error",
    "telemetry", "note", "warning", "ttft_ms", "tpot_ms", "tokens_per_s_per_seq", "value", "unit", "label",
    "scaled_from_layers", "elapsed_s", "timestamp",
    # distributed runs (tokenfleet.measure.distributed, parts/collective.py, parts/tp.py)
    "median_ms_by_rank", "telemetry_by_rank", "algbw_gbps", "busbw_gbps", "comm_ms", "comm_fraction",
    "median_ms_no_comm", "rel_error_prefill", "rel_error_decode", "graph_iters",
    # timing (tokenfleet.measure.timing.Timing) and judging against the ceilings (tokenfleet.measure.context)
    "samples_ms", "launch_us", "graph_calls", "l2_copies", "timing_note", "mbu_read", "ceiling_ratio", "ceiling_name",
    "flush_ms",  # CPU: one cache flush before each sample (timing)
    "reduction", "reductions_gbps",  # the read-only probe (parts/ceilings.py)
    "graphs_compiled",  # torch.compile graphs built in a first call (tokenfleet.model.backends.first_call)
    "load",  # what else used the machine while the point ran (tokenfleet.measure.load)
    "fp8_accum", "quantization",  # how an fp8 GEMM accumulated and quantized its input (kernels/gemm_fp8.py)
    "energy_j", "energy_s", "power_w_measured", "joules_per_token",  # NVML's energy counter over the samples
    "burst_ms", "ceiling_basis",  # a probe's burst rate; which roof a point's fractions are of (measure.context)
    "experts_touched", "tokens_per_expert",  # what a moe kernel or model point's routing produced
    "tokens_per_expert_max",  # MoE model points (parts/model_points.py)
    "expert_ms",  # an EP-slice model point's routed-expert layer timed alone (parts/model_points.py)
    "tuned_config",  # the tuned block-size file a Triton kernel point ran (configs/tuned/<device>.json)
}


# --- the records' schema: what the writer writes and every reader accepts -------------------------------------------
# Strict types (a string is not a number, a float not an int), finite numbers, unknown fields kept (a part may add
# fields; those a reader uses are typed here). The writer validates every record with these models before writing
# it, and `read_manifest` / `parse_points` validate what they read with the same ones.

class _Record(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


Num = float | None  # strict float also takes an int; never a string, a bool or a non-finite number
Int = int | None


class Telemetry(_Record):
    """NVML telemetry: read once after a point (numbers), or polled through a probe (min/median/max of each)."""

    sm_clock_mhz: float | dict[str, float] | None = None
    clock_event_reasons: list[str] | None = None


class Load(_Record):
    """What else used the machine while a point ran (tokenfleet.measure.load)."""

    window_s: Num = None
    others_cpu_cores: Num = None
    steal_share: Num = None
    loadavg_1m: Num = None
    gpu_other_processes: Int = None
    gpu_util_pct: Num = None
    contended: list[str] | None = None
    speed_us: list[float] | None = None  # the CPU's speed probe before and after the point
    speed_during_us: list[float] | None = None  # and between its samples
    speed_fastest_us: Num = None  # the run's fastest reading by then
    retries: Int = None  # times the point was measured again on a slowed CPU


class PointRecord(_Record):
    schema_version: int
    run_id: str | None = None
    kind: str
    status: Literal[STATUSES]  # type: ignore[valid-type]
    error: str | None = None
    note: str | None = None
    device: str | None = None
    op: str | None = None
    model: str | None = None
    backend: str | None = None
    dtype: str | None = None
    phase: str | None = None
    unit: str | None = None
    ceiling_name: str | None = None
    # the shape: part of the point's key (tokenfleet.report.tables.SHAPE_FIELDS and the other sizes)
    m: Int = None
    n: Int = None
    k: Int = None
    rows: Int = None
    hidden: Int = None
    tokens: Int = None
    batch: Int = None
    seq: Int = None
    prompt_len: Int = None
    context: Int = None
    max_context: Int = None
    q_heads: Int = None
    kv_heads: Int = None
    head_dim: Int = None
    mb: Num = None  # a ceiling probe's size, MiB (may be fractional)
    tp: Int = None
    layers: Int = None
    world_size: Int = None
    scaled_from_layers: Int = None
    # measurements
    median_ms: Num = None
    p20_ms: Num = None
    p80_ms: Num = None
    spread: Num = None
    n_samples: Int = None
    samples_ms: list[float] | None = None
    first_call_ms: Num = None
    noisy: bool | None = None
    flops: Num = None
    bytes: Num = None
    tflops: Num = None
    gbps: Num = None
    tokens_per_s: Num = None
    tokens_per_s_per_seq: Num = None
    ttft_ms: Num = None
    tpot_ms: Num = None
    value: Num = None
    mfu: Num = None
    mbu: Num = None
    mbu_read: Num = None
    mbu_matvec: Num = None
    mfu_datasheet: Num = None
    mbu_datasheet: Num = None
    datasheet_value: Num = None
    datasheet_ratio: Num = None
    ceiling_ratio: Num = None
    rel_error: Num = None
    comm_fraction: Num = None
    elapsed_s: Num = None
    telemetry: Telemetry | None = None
    load: Load | None = None


class DeviceRecord(_Record):
    name: str | None = None
    kind: str | None = None
    memory_bytes: Int = None
    datasheet: str | None = None
    nvml: dict[str, Any] | None = None


class Environment(_Record):
    device: DeviceRecord | None = None
    datasheet: dict[str, Any] | str | None = None


class Ceilings(_Record):
    copy_gbps: Num = None
    read_gbps: Num = None
    matvec_gbps: dict[str, Num] | None = None
    matmul_tflops: dict[str, Num] | None = None


class Drift(_Record):
    limit: float
    ratios: dict[str, float]
    flagged: list[str]


class ManifestRecord(_Record):
    schema_version: int
    run_id: str
    suite: str | None = None
    command: str | None = None
    created: str | None = None
    finished: str | None = None
    git_sha: str | None = None
    tokenfleet_version: str | None = None
    config: dict[str, Any] | None = None
    environment: Environment | None = None
    ceilings: Ceilings | None = None
    ceilings_end: Ceilings | None = None
    ceiling_drift: Drift | None = None
    load: dict[str, Any] | None = None


def _check(cls: type[BaseModel], obj: dict, file: Path, where: str | None = None) -> None:
    """Validate `obj` as `cls`; a problem is a ConfigError naming the file, the place (a line) and the field."""
    try:
        cls.model_validate(obj)
    except ValidationError as e:
        err = validation_error(file, e)  # the first error: its file, field and message
        raise ConfigError(err.file, ".".join(p for p in (where, err.field) if p) or None, err.message) from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def _finite(number: str) -> float:
    value = float(number)
    if not math.isfinite(value):  # 1e999: too large for a float, read as infinity
        _no_constant(number)
    return value


def loads(text: str | bytes):
    """JSON as the writer writes it: no NaN or Infinity, nor a number too large for a float (json.loads would take
    them, the last as infinity)."""
    return json.loads(text, parse_constant=_no_constant, parse_float=_finite)


def point_key(point: dict) -> str:
    """The identity of a point: every field that is not a measurement, as canonical JSON."""
    return json.dumps({k: v for k, v in point.items() if k not in MEASURED_FIELDS}, sort_keys=True, default=str)


def make_run_id(device_name: str, suite: str) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")[:40] or "device"
    return f"{stamp}-{slug}-{suite}"


def check_schema(obj: dict, file: Path) -> None:
    v = obj.get("schema_version")
    if v != SCHEMA_VERSION:
        raise ConfigError(file, "schema_version",
                          f"unknown schema_version {v!r}; this tokenfleet reads {SCHEMA_VERSION}")


def manifest_json(run_dir: str | Path) -> dict:
    """A run's manifest.json as a JSON object, its schema not yet checked; a problem names the file."""
    path = Path(run_dir) / "manifest.json"
    if not Path(run_dir).is_dir():
        raise ConfigError(run_dir, None, "run folder not found")
    if not path.is_file():
        raise ConfigError(path, None, "file not found (not a run folder?)")
    text = read_text(path)
    try:
        manifest = loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(path, f"line {e.lineno}", f"not valid JSON ({e.msg})") from None
    except (ValueError, RecursionError) as e:
        raise ConfigError(path, None, f"not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise ConfigError(path, None, "expected a JSON object")
    return manifest


def read_manifest(run_dir: str | Path) -> dict:
    """A run's manifest, validated by the model the writer uses (ManifestRecord)."""
    manifest = manifest_json(run_dir)
    path = Path(run_dir) / "manifest.json"
    check_schema(manifest, path)
    _check(ManifestRecord, manifest, path)
    return manifest


def check_point(p: object, file: Path, line: int) -> None:
    """A record of points.jsonl as readers accept it: an object of this schema with a kind and a known status."""
    where = f"line {line}"
    if not isinstance(p, dict):
        raise ConfigError(file, where, "expected a JSON object")
    v = p.get("schema_version")
    if v != SCHEMA_VERSION:
        raise ConfigError(file, f"{where}.schema_version",
                          f"unknown schema_version {v!r}; this tokenfleet reads {SCHEMA_VERSION}")
    if not isinstance(p.get("kind"), str):
        raise ConfigError(file, f"{where}.kind", "missing" if "kind" not in p else f"not a name: {p['kind']!r}")
    if p.get("status") not in STATUSES:
        what = "missing" if "status" not in p else f"unknown status {p['status']!r}"
        raise ConfigError(file, f"{where}.status", f"{what}; known: {', '.join(STATUSES)}")
    _check(PointRecord, p, file, where)


def parse_points(path: Path, data: bytes) -> tuple[list[dict], int, str | None]:
    """Every record of a points file's bytes in order, the byte offset where the good records end, and what is
    wrong with the last line when it is damaged (a write cut off by a kill, or garbage), else None. A damaged
    line anywhere before the last is an error naming its line."""
    lines = data.split(b"\n")
    last = max((i for i, ln in enumerate(lines) if ln.strip()), default=None)  # None: no line to compare
    records: list[dict] = []
    pos = good_end = 0
    for i, raw in enumerate(lines):
        start, pos = pos, pos + len(raw) + 1
        if not raw.strip():
            continue
        try:
            p = loads(decode(path, raw, f"line {i + 1}"))
        except (ValueError, RecursionError, ConfigError) as e:  # not UTF-8, not JSON, or NaN/Infinity
            if i == last:
                return records, good_end, f"line {i + 1}: damaged last line ({len(data) - start} bytes)"
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(path, f"line {i + 1}", "not valid JSON") from None
        check_point(p, path, i + 1)
        records.append(p)
        good_end = min(pos, len(data))
    return records, good_end, None


def latest(records: list[dict]) -> list[dict]:
    """One point per key: the last record of each key, at the place of its first (a resumed run may hold a
    point and its later re-measurement). Every reader sees a run through this."""
    return list({point_key(p): p for p in records}.values())


def read_points(run_dir: str | Path) -> list[dict]:
    """The points of a run, one per key (`latest`); a damaged last line is skipped with a one-line RunWarning."""
    path = Path(run_dir) / "points.jsonl"
    records, _, damaged = parse_points(path, read_bytes(path))
    if damaged:
        warnings.warn(f"{path}: {damaged} ignored", RunWarning, stacklevel=2)
    return latest(records)


def read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise ConfigError(path, None, "file not found")
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(path, None, f"cannot read: {e.strerror or e}") from None


def read_run(run_dir: str | Path) -> tuple[dict, list[dict]]:
    """(manifest, points) of a run folder; ConfigError naming file and field on anything unreadable."""
    return read_manifest(run_dir), read_points(run_dir)


def save_manifest(run_dir: str | Path, manifest: dict) -> None:
    try:
        ManifestRecord.model_validate(jsonable(manifest))
    except ValidationError as e:  # a bug in the writer, not the user's input
        raise ValueError(f"manifest to write does not validate: {e}") from None
    atomic_write(Path(run_dir) / "manifest.json", json.dumps(manifest, indent=2, default=str, allow_nan=False) + "\n")


def update_manifest(run_dir: str | Path, **fields) -> None:
    """Set top-level manifest fields of a run no writer holds (e.g. the launcher's `failure` after torchrun),
    holding the run's lock meanwhile: a writer that holds it refuses this."""
    with RunLock(run_dir):
        save_manifest(run_dir, {**read_manifest(run_dir), **fields})


def resolve_run(run: str | Path) -> Path:
    """A run given as a folder path or as a run id under results/runs/."""
    p = Path(run)
    if p.is_dir():
        return p
    if (RUNS_ROOT / str(run)).is_dir():
        return RUNS_ROOT / str(run)
    raise ConfigError(run, None, "run folder not found")


def usable(point: dict) -> bool:
    return point.get("status") in USABLE


def empty_ceilings() -> dict:
    return {"copy_gbps": None, "read_gbps": None, "matvec_gbps": {}, "matmul_tflops": {}}


def add_ceiling(ceilings: dict, point: dict, replace: bool = True, phase: str | None = None) -> None:
    """Fold one ceiling point into a ceilings dict (copy_gbps, read_gbps, matvec_gbps[dtype], matmul_tflops[dtype];
    matmul is the best of its shapes and layouts). replace=False keeps a value already there (the manifest's, when
    rebuilding a cut-short run's ceilings). Only points of `phase` fold: None, the start; "end", the re-probe.
    A probe that kept its burst rate (`burst_ms`, the first moments of its warm-up) folds it too, as `burst_<name>`:
    the roof for points timed as briefly (tokenfleet.measure.context.RunContext.roof)."""
    if point.get("kind", "ceiling") != "ceiling" or not usable(point) or point.get("value") is None:
        return
    if point.get("phase") != phase:
        return
    op, value = point.get("op"), point["value"]
    ms, burst_ms = point.get("median_ms"), point.get("burst_ms")
    rates = [("", value)]
    if ms and burst_ms and phase is None:  # the end-of-run drift compares sustained probes only
        rates.append(("burst_", value * ms / burst_ms))
    for prefix, v in rates:
        if op in ("copy", "read"):
            name = f"{prefix}{op}_gbps"
            if replace or not ceilings.get(name):
                ceilings[name] = v
        elif op == "matvec":
            per_dtype = ceilings.setdefault(f"{prefix}matvec_gbps", {})
            if replace:
                per_dtype[point["dtype"]] = v
            else:
                per_dtype.setdefault(point["dtype"], v)
        elif op == "matmul":  # several shapes per dtype: the best one is the ceiling
            per_dtype = ceilings.setdefault(f"{prefix}matmul_tflops", {})
            per_dtype[point["dtype"]] = max(v, per_dtype.get(point["dtype"]) or 0.0)


def flat_ceilings(ceilings: dict) -> dict[str, float]:
    """{'copy_gbps': v, 'read_gbps': v, 'matmul_tflops.bf16': v, ...}: every measured value under one name."""
    out = {}
    for name, v in ceilings.items():
        if isinstance(v, dict):
            out.update({f"{name}.{dt}": x for dt, x in v.items() if x})
        elif v:
            out[name] = v
    return out


def ceilings_of(manifest: dict, points: list[dict]) -> dict:
    """A run's measured ceilings: the manifest's, completed from its ceiling points when the run was cut short."""
    c = {**empty_ceilings(), **(manifest.get("ceilings") or {})}
    for p in points:
        add_ceiling(c, p, replace=False)
    return c


@dataclass
class Run:
    """One run folder as every reader sees it (capacity, compare, report): manifest and points, the last record of
    each point key standing (a resumed run may hold a failed point and its later retry under one key)."""

    path: Path
    manifest: dict
    points: list[dict]

    @property
    def run_id(self) -> str:
        return str(self.manifest.get("run_id") or self.path.name)

    @property
    def device(self) -> str:
        dev = (self.manifest.get("environment") or {}).get("device") or {}
        if dev.get("name"):
            return str(dev["name"])
        names = {p.get("device") for p in self.points if p.get("device")}
        return ", ".join(sorted(names)) or "unknown device"

    @property
    def hardware_id(self) -> str | None:
        """The datasheet id (configs/hardware) of the device the run measured; the runner stores the whole datasheet."""
        sheet = (self.manifest.get("environment") or {}).get("datasheet")
        return sheet.get("id") if isinstance(sheet, dict) else sheet

    def by_key(self) -> dict[str, dict]:
        return {point_key(p): p for p in self.points}

    def usable(self, kind: str) -> list[dict]:
        return [p for p in self.points if p.get("kind") == kind and usable(p)]

    @property
    def ceilings(self) -> dict:
        return ceilings_of(self.manifest, self.points)


def load_run(run: str | Path | Run) -> Run:
    """A run folder (path or run id under results/runs/) read once; a `Run` passes through."""
    if isinstance(run, Run):
        return run
    folder = resolve_run(run)
    manifest, points = read_run(folder)
    return Run(folder, manifest, points)


def check_out(folder: str | Path) -> None:
    """Where a new run may go: a new folder, an empty one, or a run folder with no points yet; nothing else, so a
    user's own files are never overwritten."""
    p = Path(folder)
    if p.exists() and not p.is_dir():
        raise ConfigError(p, None, "exists and is not a folder: give --out a new or empty folder")
    if not p.is_dir():
        return
    if (p / "points.jsonl").exists():
        raise ConfigError(p, None, "run folder already has points; use --resume or another --out")
    others = sorted(e.name for e in p.iterdir() if e.name != LOCK_NAME)
    if others and not (p / "manifest.json").is_file():
        more = f" and {len(others) - 1} more" if len(others) > 1 else ""
        raise ConfigError(p, None, f"folder is not empty ({others[0]}{more}) and is not a tokenfleet run: "
                          "give --out a new or empty folder")
    if others:
        read_manifest(p)  # a run folder of a schema we know


class RunWriter:
    """The one writer of a run folder: it holds the folder's lock (`tokenfleet.files.RunLock`) from open to `close`.

    `append` writes one record per point and fsyncs it. A point measured again (on resume) is appended as a
    replacement record; `finish` writes the manifest and compacts points.jsonl to one record per key, atomically.
    Opening a run to resume cuts a damaged last line off first, so nothing is ever appended after garbage."""

    def __init__(self, run_dir: Path, manifest: dict, resume: bool = False):
        self.dir = Path(run_dir)
        self.points_path = self.dir / "points.jsonl"
        if resume:
            read_manifest(self.dir)  # a readable run before anything is locked or written
        else:
            check_out(self.dir)
            ensure_dir(self.dir)
        self._lock = RunLock(self.dir).acquire()
        try:
            self._open(manifest, resume)
        except BaseException:
            self._lock.release()
            raise

    def _open(self, manifest: dict, resume: bool) -> None:
        remove_stale_temps(self.dir)
        if resume:
            self.manifest = read_manifest(self.dir)
            records = self._repair_tail() if self.points_path.exists() else []
            self.manifest.setdefault("resumed", []).append(manifest.get("command"))
        else:
            check_out(self.dir)  # again, now under the lock
            self.manifest = {"schema_version": SCHEMA_VERSION, **manifest}
            records = []
        self.points = {point_key(p): p for p in records}  # key -> its latest record, in first-seen order
        self.last: dict | None = None  # the record this writer appended last
        self._records = len(records)
        self.write_manifest()
        self._fd: int | None = open_append(self.points_path)

    def _repair_tail(self) -> list[dict]:
        data = read_bytes(self.points_path)
        records, good_end, damaged = parse_points(self.points_path, data)
        if damaged or (good_end and not data[:good_end].endswith(b"\n")):
            good = data[:good_end]
            atomic_write(self.points_path, good + (b"\n" if good and not good.endswith(b"\n") else b""))
        if damaged:
            warnings.warn(f"{self.points_path}: {damaged} cut off before resuming (a point it held is measured again)",
                          RunWarning, stacklevel=4)  # the caller of RunWriter(...)
        return records

    def final_keys(self) -> set[str]:
        """Keys of the points a resume does not measure again (status in FINAL)."""
        return {k for k, p in self.points.items() if p.get("status") in FINAL}

    def write_manifest(self) -> None:
        save_manifest(self.dir, self.manifest)

    def append(self, point: dict) -> None:
        point = {"schema_version": SCHEMA_VERSION, "run_id": self.manifest["run_id"], **point}
        line = json.dumps(point, default=_json_safe, allow_nan=False) + "\n"
        try:
            PointRecord.model_validate(json.loads(line))
        except ValidationError as e:  # a bug in a part, not the user's input
            raise ValueError(f"point to write does not validate: {e}") from None
        append_record(self._fd, self.points_path, line.encode())
        self.last = self.points[point_key(point)] = json.loads(line)  # as it reads back
        self._records += 1

    def finish(self, **manifest_fields) -> None:
        """Record `manifest_fields` in the manifest and compact points.jsonl to one record per key."""
        self.manifest.update(manifest_fields)
        self.write_manifest()
        if self._records > len(self.points):
            # every record passed append's dump (allow_nan=False) or `loads`: no NaN or infinity left to refuse
            atomic_write(self.points_path, "".join(json.dumps(p) + "\n" for p in self.points.values()))
            self._records = len(self.points)
            os.close(self._fd)  # the rename left this descriptor on the old file
            self._fd = open_append(self.points_path)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._lock.release()

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def jsonable(v):
    """`v` as it reads back from JSON (tuples become lists), so keys compare equal after a round trip."""
    return json.loads(json.dumps(v, default=_json_safe))


def _json_safe(o):
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def clean_floats(d: dict) -> dict:
    """NaN/inf are not JSON: store them as null."""
    out = {}
    for k, v in d.items():
        if isinstance(v, float) and not math.isfinite(v):
            v = None
        out[k] = v
    return out
