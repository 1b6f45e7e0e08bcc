"""Shared test set-up: small, fast suites written to tmp folders; the CLI run in-process or as a subprocess."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


# The tests share their machine with other jobs: points record its load but are not marked `contended` for it
# (tests/test_load.py sets its own readings).
os.environ.setdefault("TOKENFLEET_IGNORE_LOAD", "1")

# Triton runs under its interpreter on a machine without CUDA; this must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# A 1 MiB cache (tokenfleet.measure.device): the bandwidth probes grow to 8x the cache reported, and the tests' suites
# keep theirs small (a 32 MiB LLC would make every test run's probes 128-256 MB). Tests that need a size set their own.
os.environ.setdefault("TOKENFLEET_CACHE_BYTES", str(1 << 20))

TINY_CEILINGS_SUITE = """
id: {id}
description: tiny suite for tests
noise_limit: 0.5
timing: {{min_samples: 3, min_time_s: 0.01, warmup_s: 0.0, max_samples: 20}}
ceilings:
  copy_mb: 8
  read_mb: 16  # tests: small (a run's default is 8x the last-level cache)
  matmul: {{fp32: 256, bf16: 256}}
  matvec: {{n: 512, k: 512, dtypes: [fp32]}}
"""


@pytest.fixture(scope="session", autouse=True)
def _unfreeze_at_exit():
    yield
    gc.unfreeze()  # the interpreter's shutdown then frees them as usual (frozen, native bindings report leaks)


@pytest.fixture(scope="module", autouse=True)
def _freeze_long_lived_objects(_unfreeze_at_exit):
    """Before each test file: collect, then freeze what survived (imported modules, torch, Triton, Inductor, other
    files' caches) so that later collections skip it. The model part calls gc.collect() before every point, and with
    ~600k objects from the files before it each collection took ~0.5 s: 20-30 s of the suite in test_model_parts.py
    alone. Only objects alive at a file's start are frozen; what the tests make is collected as before."""
    gc.collect()
    gc.freeze()
    yield


@pytest.fixture
def tiny_suite(tmp_path: Path) -> Path:
    p = tmp_path / "tiny.yaml"
    p.write_text(TINY_CEILINGS_SUITE.format(id="tiny"))
    return p


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m tokenfleet ARGS` in a subprocess (exit codes and stderr exactly as a user sees them)."""
    return subprocess.run([sys.executable, "-m", "tokenfleet", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env={**os.environ, "COLUMNS": "200"})


def invoke_cli(*args: str):
    """`tokenfleet ARGS` in this process (typer's CliRunner): exit_code, stdout and stderr apart, and no Python and
    torch start-up (seconds each on 2 cores). Tests that need the process as a user's shell sees it use run_cli."""
    from tokenfleet.cli.main import app
    from typer.testing import CliRunner

    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def ctx():
    """A CPU run context for a part's jobs: few, short samples (tests check structure, not speed) and fixed ceilings.
    (Imported here: the environment above is set before anything imports Triton.)"""
    from tokenfleet.measure.context import RunContext
    from tokenfleet.measure.device import detect
    from tokenfleet.measure.suite import Suite, SuiteFile, TimingSpec

    file = SuiteFile(id="test", description="test", noise_limit=10.0,
                     timing=TimingSpec(min_samples=2, min_time_s=0.005, warmup_s=0.0, max_samples=5))
    return RunContext(device=detect("cpu"), suite=Suite(file, {}, "test"), datasheet=None,
                      ceilings={"copy_gbps": 10.0, "matvec_gbps": {"fp32": 10.0}, "matmul_tflops": {"fp32": 0.1}})
