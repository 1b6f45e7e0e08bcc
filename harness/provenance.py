"""Where a run came from: the package version, the commit of this project's repository, the command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent  # the source tree this package was imported from


def version() -> str:
    """The installed package's version, else the source tree's pyproject.toml version (a tree run through
    PYTHONPATH, as `make gpu-check` does), else "0+unknown"."""
    try:
        from importlib.metadata import version as v

        return v("tokenfleet")
    except Exception:  # noqa: BLE001 - running from a source tree without installing
        pass
    try:
        import tomllib

        with open(REPO_ROOT / "pyproject.toml", "rb") as f:
            project = tomllib.load(f)["project"]
        return str(project["version"]) if project.get("name") == "tokenfleet" else "0+unknown"
    except Exception:  # noqa: BLE001 - Python 3.10 (no tomllib), or no pyproject beside the package
        return "0+unknown"


def git_sha(root: Path = REPO_ROOT) -> str:
    """The commit checked out in this project's repository, or "unknown". Only when the repository's top level is
    the package's own source tree: a tree exported without `.git` inside another repository would otherwise record
    that repository's commit (the H200 run of 2026-11-28 did)."""
    try:
        def git(*args: str) -> str:
            out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5, cwd=root)
            return out.stdout.strip() if out.returncode == 0 else ""

        top = git("rev-parse", "--show-toplevel")
        if not top or Path(top).resolve() != Path(root).resolve():
            return "unknown"
        return git("rev-parse", "HEAD") or "unknown"
    except Exception:  # noqa: BLE001 - no git, or a timeout: provenance unknown, never a crash
        return "unknown"


def command_line() -> str:
    prog = Path(sys.argv[0]).name
    prog = "tokenfleet" if prog in ("__main__.py", "tokenfleet") else prog
    return " ".join([prog, *sys.argv[1:]])
