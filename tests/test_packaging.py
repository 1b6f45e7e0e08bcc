"""tokenfleet installs beside the libraries its users already have: one import package, `tokenfleet`, and no generic
top-level names. transformers 5 depends on Hugging Face's `kernels`, whose import name a top-level `kernels` would take.

The wheel test builds the project as a wheel (not editable), installs it into a fresh venv that sees this venv's
libraries (torch, transformers and Hugging Face's `kernels`) but not its editable install, and runs it from a folder
outside the repository."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from conftest import REPO

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]


def test_every_package_folder_is_installed_under_tokenfleet():
    """A new subpackage of harness/ is added to pyproject's list, or a wheel would silently leave it out."""
    dirs = SETUPTOOLS["package-dir"]
    assert dirs == {"tokenfleet": "harness", "tokenfleet.kernels": "kernels", "tokenfleet.configs": "configs"}
    found = {"tokenfleet.kernels", "tokenfleet.configs"}
    for init in (REPO / "harness").rglob("__init__.py"):
        found.add(".".join(["tokenfleet", *init.parent.relative_to(REPO / "harness").parts]))
    assert set(SETUPTOOLS["packages"]) == found
    assert all(p == "tokenfleet" or p.startswith("tokenfleet.") for p in SETUPTOOLS["packages"])


def test_the_checkout_root_shadows_no_kernels_package():
    """From the checkout's root (on sys.path under `python -m`/`python -c`), the folder kernels/ hands the name
    `kernels` to Hugging Face's package (transformers 5 imports it to build a model), and with none installed the
    import fails as it would without the folder; the folder is always `tokenfleet.kernels`."""
    code = ("import kernels, tokenfleet.kernels as ours\n"
            "from transformers import LlamaConfig, LlamaForCausalLM\n"
            "LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,\n"
            "                             num_attention_heads=4, num_key_value_heads=2))\n"
            "print(kernels.__file__)\nprint(ours.__file__)\nprint(len(ours.REGISTRY))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs, ours, ops = proc.stdout.splitlines()[-3:]
    assert Path(theirs).parent.parent.name == "site-packages"  # Hugging Face's, installed
    assert Path(ours).resolve() == REPO / "kernels" / "__init__.py"
    assert int(ops) >= 10
    # No site-packages (-S): no other `kernels` anywhere, and the import fails as if the folder were not there.
    bare = subprocess.run([sys.executable, "-S", "-c", "import sys; sys.path.insert(0, '')\n"
                           "try:\n    import kernels\nexcept ModuleNotFoundError as e:\n"
                           "    print(e.name, 'kernels' in sys.modules)"],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert bare.returncode == 0 and bare.stdout.split() == ["kernels", "False"], bare.stdout + bare.stderr


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A wheel of this tree installed into a fresh venv; its python and its folder outside the repository."""
    tmp = tmp_path_factory.mktemp("wheel")
    wheels = tmp / "dist"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(REPO)],
                           capture_output=True, text=True, timeout=300, cwd=tmp)
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next(wheels.glob("tokenfleet-*.whl"))
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # This venv's libraries, appended after the fresh one's own: a path added by a .pth file is not a site folder, so
    # the .pth files there (this checkout's editable install among them) are not run.
    ours = next(p for p in map(Path, sys.path) if p.name == "site-packages" and (p / "torch").is_dir())
    (site / "libraries.pth").write_text(f"{ours}\n")
    inst = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps",
                           "--no-index", str(wheel)], capture_output=True, text=True, timeout=300, cwd=tmp)
    assert inst.returncode == 0, inst.stderr[-2000:]
    work = tmp / "elsewhere"
    work.mkdir()
    return py, site, work


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TOKENFLEET_CONFIGS", "TOKENFLEET_RUNS")}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


def test_the_wheel_installs_only_tokenfleet(installed):
    py, site, _ = installed
    record = next(site.glob("tokenfleet-*.dist-info")) / "RECORD"
    tops = {line.split(",")[0].split("/")[0] for line in record.read_text().splitlines()}
    assert {t for t in tops if not t.endswith(".dist-info") and t != ".."} == {"tokenfleet"}
    assert (site / "tokenfleet" / "kernels" / "gemm.py").is_file()
    assert (site / "tokenfleet" / "configs" / "suites" / "ci-cpu.yaml").is_file()
    assert not (site / "harness").exists()


def test_the_installed_script_runs_outside_the_repository(installed):
    py, _, work = installed
    script = py.parent / "tokenfleet"
    env = _run([str(script), "env", "--format", "json"], work)
    assert env.returncode == 0, env.stderr[-2000:]
    assert json.loads(env.stdout)
    plan = _run([str(script), "bench", "--suite", "ci-cpu", "--plan", "--format", "csv"], work)
    assert plan.returncode == 0, plan.stderr[-2000:]
    assert "ceilings" in plan.stdout
    again = _run([str(py), "-m", "tokenfleet", "bench", "--suite", "ci-cpu", "--plan", "--format", "csv"], work)
    assert again.returncode == 0 and again.stdout == plan.stdout, again.stderr[-2000:]
    assert not (work / "results").exists()  # a plan writes nothing


def test_transformers_and_the_kernel_registry_in_one_process(installed):
    """transformers 5 imports Hugging Face's `kernels`; ours is `tokenfleet.kernels`, and both load side by side."""
    py, site, work = installed
    code = (
        "import kernels, transformers, tokenfleet.kernels as ours\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,\n"
        "                  num_attention_heads=4, num_key_value_heads=2)\n"
        "model = LlamaForCausalLM(cfg)\n"
        "print(kernels.__file__)\nprint(ours.__file__)\nprint(sorted(ours.REGISTRY))\nprint(transformers.__version__)\n")
    proc = _run([str(py), "-c", code], work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs, ours, registry, version = proc.stdout.splitlines()[-4:]
    assert Path(ours).resolve() == (site / "tokenfleet" / "kernels" / "__init__.py").resolve()
    assert "tokenfleet" not in Path(theirs).parts and Path(theirs).parent.name == "kernels"
    assert "gemm" in registry
    assert int(version.split(".")[0]) >= 5, "the index should resolve transformers 5 (the collision this guards)"
