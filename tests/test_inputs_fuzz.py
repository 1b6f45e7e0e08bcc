"""Property-style check of the input boundary (issue 24): each config kind and each run file, fed random bytes,
Latin-1 text, inf/NaN in every numeric field and a wrong type in every field, ends in exit 0 or exit 2 with one line,
never a traceback. Seeded and bounded (a fixed sample of each kind's mutations), in process (invoke_cli)."""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import TINY_CEILINGS_SUITE, invoke_cli
from test_report import make_run, synthetic_points
from tokenfleet.config import CONFIG_ROOT

SEED = 24
PER_KIND = 28  # mutations tried per run file (of a few hundred), the same ones every run
# Config kinds read by a fast command take every mutation (24-68 each); the slower ones a fixed sample.
CONFIG_SAMPLE = {"suite": 40, "fleet": 30}


def _paths(obj, prefix: tuple = ()) -> Iterator[tuple[tuple, object]]:
    if prefix:
        yield prefix, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _set(obj, path: tuple, value):
    out = copy.deepcopy(obj)
    node = out
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return out


def _wrong(v):
    """A value of another type than `v`."""
    if isinstance(v, bool):
        return "yes please"
    if isinstance(v, str):
        return 12345
    if isinstance(v, (int, float)):
        return "x"
    if isinstance(v, list):
        return "x"
    if isinstance(v, dict):
        return ["x"]
    return {"x": 1}


def mutations(data) -> list[tuple[str, object]]:
    """(label, mutated data) for every field: a wrong type; for numbers, inf, -inf and NaN too."""
    out = []
    for path, v in _paths(data):
        name = ".".join(map(str, path))
        out.append((f"{name}=wrong", _set(data, path, _wrong(v))))
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out += [(f"{name}={x}", _set(data, path, float(x))) for x in ("inf", "-inf", "nan")]
    return out


def sample(items: list, k: int = PER_KIND) -> list:
    return random.Random(SEED).sample(items, min(k, len(items)))


def raw_cases(text: str) -> list[tuple[str, bytes]]:
    rng = random.Random(SEED)
    return [("random-bytes", bytes(rng.randrange(256) for _ in range(400))),
            ("random-bytes-2", rng.randbytes(64) + text.encode()),
            ("latin-1", text.replace("description:", "description: \xe9t\xe9", 1).encode("latin-1", "replace"))]


def assert_clean_exit(r, label: str) -> None:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("warning: ")]
    assert r.exit_code in (0, 2), (label, r.exit_code, r.stderr[-2000:], repr(r.exception))
    assert r.exception is None or isinstance(r.exception, SystemExit), (label, repr(r.exception))
    assert "Traceback" not in r.stderr + r.stdout, (label, r.stderr[-2000:])
    if r.exit_code == 2:
        assert len(lines) == 1 and lines[0].startswith("error: "), (label, r.stderr)


SUITE = TINY_CEILINGS_SUITE.format(id="fuzz") + """
decode: {models: [tiny-qwen3], backends: [torch], dtypes: [fp32], batch: [1], context: [16]}
kernels:
  cases:
    - {op: gemm, dtypes: [fp32], backends: [torch], shapes: [{m: 8, n: 16, k: 16}]}
"""

# kind -> (the base file's text, the command that reads it, given its path)
CONFIGS = {
    "suite": (SUITE, lambda p: ["bench", "--suite", p, "--plan", "-f", "json"]),
    "fleet": ((CONFIG_ROOT / "fleets" / "h100-node.yaml").read_text(),
              lambda p: ["capacity", "--fleet", p, "-f", "json"]),
    "model": ((CONFIG_ROOT / "models" / "qwen3-8b.yaml").read_text(),
              lambda p: ["project", "-m", p, "-g", "h100-sxm", "-f", "json"]),
    "hardware": ((CONFIG_ROOT / "hardware" / "h100-sxm.yaml").read_text(),
                 lambda p: ["project", "-m", "qwen3-8b", "-g", p, "-f", "json"]),
    "workload": ((CONFIG_ROOT / "workloads" / "chat.yaml").read_text(),
                 lambda p: ["project", "-m", "qwen3-8b", "-g", "h100-sxm", "-w", p, "-f", "json"]),
    "demand": ((CONFIG_ROOT / "demand" / "china-reported.yaml").read_text(),
               lambda p: ["capacity", "--fleet", "h100-node", "--demand", p, "-f", "json", "--quiet"]),
}


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_config_files_exit_0_or_2(tmp_path: Path, kind: str):
    text, command = CONFIGS[kind]
    base = yaml.safe_load(text)
    cases = raw_cases(text) + [(label, yaml.safe_dump(d, sort_keys=False).encode())
                               for label, d in sample(mutations(base), CONFIG_SAMPLE.get(kind, 10**6))]
    for i, (label, data) in enumerate(cases):
        f = tmp_path / f"{kind}-{i}.yaml"
        f.write_bytes(data)
        assert_clean_exit(invoke_cli(*command(str(f))), f"{kind} {label}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("runs")
    pts = synthetic_points()  # ceilings, then points of each kind: kernel, prefill, decode
    pts = pts[:3] + [next(p for p in pts if p["kind"] == k and p["status"] == "ok") for k in ("kernel", "prefill",
                                                                                                "decode")]
    return make_run(d / "a", pts, run_id="a"), make_run(d / "b", pts, run_id="b")


def _readers(run: Path, other: Path, i: int) -> list[list[str]]:
    """The commands that read a run: capacity and compare always; report (a second each) and resume on some."""
    cmds = [["capacity", "--fleet", "h100-node", "--run", str(run), "-f", "json", "--quiet"],
            ["compare", str(other), str(run), "-f", "json"]]
    if i % 2 == 0:
        cmds.append(["report", str(run)])
    if i % 3 == 1:
        cmds.append(["bench", "--resume", str(run), "--plan", "-f", "json"])
    return cmds


def _copy(run: Path, to: Path) -> Path:
    to.mkdir()
    for f in ("manifest.json", "points.jsonl"):
        (to / f).write_bytes((run / f).read_bytes())
    return to


def test_manifest_exits_0_or_2(tmp_path: Path, runs):
    a, b = runs
    text = (a / "manifest.json").read_text()
    base = json.loads(text)
    cases = raw_cases(text) + [(label, json.dumps(d).encode()) for label, d in sample(mutations(base))]
    for i, (label, data) in enumerate(cases):
        run = _copy(a, tmp_path / f"m{i}")
        (run / "manifest.json").write_bytes(data)
        for cmd in _readers(run, b, i):
            assert_clean_exit(invoke_cli(*cmd), f"manifest {label}: {cmd[0]}")


def test_points_exit_0_or_2(tmp_path: Path, runs):
    a, b = runs
    lines = (a / "points.jsonl").read_text().splitlines()
    cases = []  # (line index, label, the line's new bytes): each point's fields, one mutation at a time
    for j, ln in enumerate(lines):
        cases += [(j, label, json.dumps(d).encode()) for label, d in mutations(json.loads(ln))]
        cases += [(j, label, data) for label, data in raw_cases(ln)]
    for i, (line, label, data) in enumerate(sample(cases, 2 * PER_KIND)):
        run = _copy(a, tmp_path / f"p{i}")
        raw = b"\n".join(data if j == line else ln.encode() for j, ln in enumerate(lines)) + b"\n"
        (run / "points.jsonl").write_bytes(raw)
        for cmd in _readers(run, b, i):
            assert_clean_exit(invoke_cli(*cmd), f"points line {line + 1} {label}: {cmd[0]}")
