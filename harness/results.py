"""Run folders: `manifest.json` + append-only `points.jsonl`, and the Point schema of DESIGN.md.

A point is one measurement, a flat JSON object. Writers flush and fsync each line, so an interrupted run loses
at most the point in flight; readers ignore a truncated last line with a warning and refuse an unknown
`schema_version` with a ConfigError naming the file and the field.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from harness.config import ConfigError

SCHEMA_VERSION = 1
STATUSES = ("ok", "oom", "error", "incorrect", "noisy", "skipped")
# The statuses whose numbers may enter tables, plots, ratios, ceilings and capacity: a noisy point is a real
# measurement, only less certain; every other status has no number to use. One set, used by every reader.
USABLE = frozenset({"ok", "noisy"})
KINDS = ("ceiling", "kernel", "prefill", "decode", "collective")
RUNS_ROOT = Path(__file__).resolve().parent.parent / "results" / "runs"

# Fields that identify a point (the rest are measurements): used to match points for --resume and compare.
MEASURED_FIELDS = {
    "schema_version", "run_id", "status", "error", "median_ms", "p20_ms", "p80_ms", "n_samples", "first_call_ms",
    "spread", "noisy", "threads", "cuda_graph", "flops", "bytes", "tflops", "gbps", "tokens_per_s", "mfu", "mbu",
    "mfu_datasheet", "mbu_datasheet", "mbu_matvec", "datasheet_value", "datasheet_ratio", "device", "rel_error",
    "telemetry", "note", "warning", "ttft_ms", "tpot_ms", "tokens_per_s_per_seq", "value", "unit", "label",
    "scaled_from_layers", "elapsed_s", "timestamp",
    # distributed runs (harness.measure.distributed, parts/collective.py, parts/tp.py)
    "median_ms_by_rank", "telemetry_by_rank", "algbw_gbps", "busbw_gbps", "comm_ms", "comm_fraction",
    "median_ms_no_comm", "rel_error_prefill", "rel_error_decode", "graph_iters",
}


def version() -> str:
    try:
        from importlib.metadata import version as v

        return v("tokenfleet")
    except Exception:  # noqa: BLE001 - running from a source tree without installing
        return "0+unknown"


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except Exception:  # noqa: BLE001
        return None


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


def read_manifest(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "manifest.json"
    if not Path(run_dir).is_dir():
        raise ConfigError(run_dir, None, "run folder not found")
    if not path.is_file():
        raise ConfigError(path, None, "file not found (not a run folder?)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(path, f"line {e.lineno}", f"not valid JSON ({e.msg})") from None
    if not isinstance(manifest, dict):
        raise ConfigError(path, None, "expected a JSON object")
    check_schema(manifest, path)
    return manifest


def read_points(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "points.jsonl"
    if not path.is_file():
        raise ConfigError(path, None, "file not found")
    lines = path.read_text().split("\n")
    points = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            p = json.loads(line)
        except json.JSONDecodeError:
            if i >= len(lines) - 1:  # the last line: a write cut off by a kill
                warnings.warn(f"{path}: line {i}: truncated last line ignored", stacklevel=2)
                continue
            raise ConfigError(path, f"line {i}", "not valid JSON") from None
        if not isinstance(p, dict):
            raise ConfigError(path, f"line {i}", "expected a JSON object")
        check_schema(p, path)
        for req in ("kind", "status"):
            if req not in p:
                raise ConfigError(path, f"line {i}.{req}", "missing")
        points.append(p)
    return points


def read_run(run_dir: str | Path) -> tuple[dict, list[dict]]:
    """(manifest, points) of a run folder; ConfigError naming file and field on anything unreadable."""
    return read_manifest(run_dir), read_points(run_dir)


def update_manifest(run_dir: str | Path, **fields) -> None:
    """Set top-level manifest fields of a run no writer holds (e.g. the launcher's `failure` after torchrun)."""
    manifest = read_manifest(run_dir)
    manifest.update(fields)
    tmp = Path(run_dir) / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, default=str, allow_nan=False) + "\n")
    os.replace(tmp, Path(run_dir) / "manifest.json")


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
    return {"copy_gbps": None, "matvec_gbps": {}, "matmul_tflops": {}}


def add_ceiling(ceilings: dict, point: dict, replace: bool = True) -> None:
    """Fold one ceiling point into a ceilings dict (copy_gbps, matvec_gbps[dtype], matmul_tflops[dtype]).
    replace=False keeps a value already there (the manifest's, when rebuilding a cut-short run's ceilings)."""
    if point.get("kind", "ceiling") != "ceiling" or not usable(point) or point.get("value") is None:
        return
    op, value = point.get("op"), point["value"]
    if op == "copy":
        if replace or not ceilings.get("copy_gbps"):
            ceilings["copy_gbps"] = value
    elif op in ("matvec", "matmul"):
        per_dtype = ceilings.setdefault("matvec_gbps" if op == "matvec" else "matmul_tflops", {})
        if replace:
            per_dtype[point["dtype"]] = value
        else:
            per_dtype.setdefault(point["dtype"], value)


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
    return Run(folder, manifest, list({point_key(p): p for p in points}.values()))


class RunWriter:
    """Writes one run folder. Points are appended and flushed (fsync) one at a time."""

    def __init__(self, run_dir: Path, manifest: dict, resume: bool = False):
        self.dir = Path(run_dir)
        self.points_path = self.dir / "points.jsonl"
        if resume:
            self.manifest = read_manifest(self.dir)
            self.existing = read_points(self.dir) if self.points_path.exists() else []
            self._drop_truncated_tail()
            self.manifest.setdefault("resumed", []).append(manifest.get("command"))
        else:
            if self.points_path.exists():
                raise ConfigError(self.dir, None, "run folder already has points; use --resume or another --out")
            self.dir.mkdir(parents=True, exist_ok=True)
            self.manifest = {"schema_version": SCHEMA_VERSION, **manifest}
            self.existing = []
        self.write_manifest()
        self._fh = open(self.points_path, "a")

    def _drop_truncated_tail(self) -> None:
        # Rewrite the file from the points that parsed, so appends never follow a half line.
        if self.points_path.exists():
            text = self.points_path.read_text()
            if text and not text.endswith("\n"):
                good = "".join(json.dumps(p) + "\n" for p in self.existing)
                tmp = self.points_path.with_suffix(".tmp")
                tmp.write_text(good)
                os.replace(tmp, self.points_path)

    def write_manifest(self) -> None:
        tmp = self.dir / "manifest.json.tmp"
        tmp.write_text(json.dumps(self.manifest, indent=2, default=str, allow_nan=False) + "\n")
        os.replace(tmp, self.dir / "manifest.json")

    def append(self, point: dict) -> None:
        point = {"schema_version": SCHEMA_VERSION, "run_id": self.manifest["run_id"], **point}
        if point.get("status") not in STATUSES:
            raise ValueError(f"bad status {point.get('status')!r}")
        self._fh.write(json.dumps(point, default=_json_safe, allow_nan=False) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self.existing.append(point)

    def close(self) -> None:
        self._fh.close()


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
        if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))):
            v = None
        out[k] = v
    return out


def command_line() -> str:
    prog = Path(sys.argv[0]).name
    prog = "tokenfleet" if prog in ("__main__.py", "tokenfleet", "harness") else prog
    return " ".join([prog, *sys.argv[1:]])
