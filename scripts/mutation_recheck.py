"""Re-run the surviving mutants of a `scripts/mutate.sh` run against the oracle tests (tests/test_mutants_*.py)
alone, without mutmut's stats and clean-test passes: one warm process (pytest and torch imported once), a fork per
mutant with MUTANT_UNDER_TEST set (mutmut's trampolines read it), a wall-clock limit per mutant. A survivor the
oracles kill is written back into its .meta as killed (exit 1), and the killing test into
STAGE/recheck.json (then `scripts/mutation_report.py --stage STAGE` writes the modules' result
files). Adding tests can only kill more, so the other verdicts stand; a full `make mutate`
gives the same verdicts from scratch.

    python scripts/mutation_recheck.py [--stage .mutate] [--timeout 60]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", type=Path, default=ROOT / ".mutate")
    ap.add_argument("--timeout", type=int, default=60)
    a = ap.parse_args()
    mutants = a.stage.resolve() / "mutants"
    tests = sorted(glob.glob(str(ROOT / "tests" / "test_mutants_*.py")))
    for t in tests:  # the oracles as committed now
        shutil.copy2(t, mutants / "tests")
    os.chdir(mutants)
    sys.path.insert(0, str(mutants))
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENFLEET_IGNORE_LOAD="1")
    import pytest  # noqa: F401  (warm: imported once, before the forks)

    metas = sorted(mutants.glob("**/*.py.meta"), key=lambda m: ("ceilings" in m.name, str(m)))  # the cheap ones first
    todo = [(m, k) for m in metas for k, c in json.loads(m.read_text())["exit_code_by_key"].items() if c == 0]
    opts = ["-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly"]
    args = [f"tests/{Path(t).name}" for t in tests] + opts
    # a mutant runs its own module's oracle file when there is one (tests/test_mutants_<module>.py), else all of them
    own = {Path(t).stem.removeprefix("test_mutants_"): [f"tests/{Path(t).name}"] + opts for t in tests}
    # the set-up works only if a mutant that raises everywhere fails the oracles (mutmut's own forced-fail check)
    if run_one("fail", args, a.timeout)[0] == 0:
        sys.exit("mutation_recheck: the forced-fail mutant passed: the tests do not import the mutated copy")
    out_file = mutants.parent / "recheck.json"
    done = json.loads(out_file.read_text()) if out_file.is_file() else {}
    start = time.time()
    # Every survivor, each time: one the oracles killed is no longer one (its .meta says 1), and one that survived an
    # earlier recheck may fall to oracles added since.
    for meta_path, key in todo:
        module = key.partition(".x")[0].rpartition(".")[2]  # tokenfleet.model.spec.x_... -> spec
        code, test = run_one(key, own.get(module, args), a.timeout)
        done[key] = {"result": "killed" if code != 0 else "survived", "by": test}
        if code != 0:
            meta = json.loads(meta_path.read_text())
            meta["exit_code_by_key"][key] = 1
            meta_path.write_text(json.dumps(meta))
        print(f"{done[key]['result']:8} {key} {test or ''}", flush=True)
        out_file.write_text(json.dumps(done, indent=1, ensure_ascii=False) + "\n")
    killed = sum(1 for k in (k for _, k in todo) if done[k]["result"] == "killed")
    print(f"{killed} of {len(todo)} survivors killed by {len(tests)} oracle files in {time.time() - start:.0f} s")
    seconds_file = mutants.parent / "seconds.json"
    seconds = json.loads(seconds_file.read_text()) if seconds_file.is_file() else {}
    seconds["recheck wall"] = seconds.get("recheck wall", 0) + round(time.time() - start)
    seconds_file.write_text(json.dumps(seconds) + "\n")


def run_one(mutant: str, args: list[str], timeout: int) -> tuple[int, str | None]:
    """pytest on the oracles in a forked child with `mutant` active: (exit code, the first failing test)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.environ["MUTANT_UNDER_TEST"] = mutant
        signal.alarm(timeout)
        failed = []

        class Record:
            def pytest_runtest_logreport(self, report):
                if report.failed and not failed:
                    failed.append(report.nodeid)

        import pytest

        sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115
        code = int(pytest.main(args, plugins=[Record()]))
        os.write(w, (failed[0] if failed else "").encode())
        os._exit(code)
    os.close(w)
    test = os.read(r, 4096).decode() or None
    os.close(r)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status), "timeout" if os.WTERMSIG(status) == signal.SIGALRM else "signal"
    return os.WEXITSTATUS(status), test


if __name__ == "__main__":
    main()
