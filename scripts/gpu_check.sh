#!/usr/bin/env bash
# make gpu-check OUT_DIR=DIR — on one GPU, in 6 minutes by its own clock, installing nothing from the network, into a
# fresh folder DIR/check-<UTC time> each time (a second check into the same DIR measures anew and shows its own run):
#   1. correctness tests on the GPU, what has never run on one first (FP8, then CUDA-graph timing and the compiled
#      kernels, then the kernels' and the model's tests), cut at GPU_CHECK_TESTS_S (`--durations=15` in the log),
#   2. the gpu-check suite into CHECK/run, in value order (ceilings, decode, prefill, kernels, the ceilings again:
#      `tokenfleet bench --suite gpu-check --plan`, which tests/test_plan.py holds to the time this script leaves it),
#      stopped when the total budget is spent: what was measured stays, and its tables are written from it,
#   3. one screen for the README (CHECK/headline.md, printed last), the logs, and CHECK/gpu-check.tar.gz.
# Needs the repo, torch, Triton, numpy, pandas, pytest, nvidia-ml-py, pyyaml, rich, typer; pydantic may come from
# wheels: WHEELS_DIR=.whl installs every *.whl there into a private folder (no index, no network).
# Both halves share one Triton cache with autotune results kept on disk (TRITON_CACHE_AUTOTUNING, Triton >= 3.2;
# older Tritons ignore it), and one Inductor cache.
# The time split (seconds): SETUP_S for the environment check before the tests (an allowance the plan's test counts),
# TESTS_S for the tests (+ 5 s for pytest to stop), the suite what is left but RESERVE_S, and RESERVE_S covers the
# bench's GRACE_S to stop after its interrupt (it writes its tables then) plus at most TABLES_S for the tables of a
# cut run, the screen and the archive: the check ends by TOTAL_S.
# Overrides (tests/test_gpu_check.py runs this on a CPU with a tiny suite): GPU_CHECK_TOTAL_S, GPU_CHECK_TESTS_S,
# GPU_CHECK_RESERVE_S, GPU_CHECK_GRACE_S, GPU_CHECK_SUITE, GPU_CHECK_TESTS, GPU_CHECK_DEVICE.
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
OUT_DIR=${OUT_DIR:?set OUT_DIR to the folder the run is written to}
PY=${PYTHON:-python3}
TOTAL_S=${GPU_CHECK_TOTAL_S:-360}
SETUP_S=${GPU_CHECK_SETUP_S:-20}
TESTS_S=${GPU_CHECK_TESTS_S:-80}
GRACE_S=${GPU_CHECK_GRACE_S:-10}
RESERVE_S=${GPU_CHECK_RESERVE_S:-30}
TABLES_S=$((RESERVE_S - GRACE_S))
SUITE=${GPU_CHECK_SUITE:-gpu-check}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
# What has never run on a GPU first (a cut leaves the rest): FP8, CUDA-graph timing, compiled kernels; then the
# kernels' and the model's tests (Triton's decode and prefill ran on the H200 before).
read -r -a TESTS <<<"${GPU_CHECK_TESTS:-tests/test_fp8.py tests/test_timing.py tests/test_kernels_compile.py tests/test_kernels_moe.py tests/test_kernels.py tests/test_model.py}"
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
# A fresh folder per check: an earlier check's run, logs and headline are never taken for this one's.
CHECK=$OUT_DIR/check-$(date -u +%Y%m%dT%H%M%SZ)
n=1
while ! mkdir "$CHECK" 2>/dev/null; do CHECK=${CHECK%-[0-9]}-$n; n=$((n + 1)); done
elapsed() { echo $(($(date +%s) - start)); }

# This tree as the import package `tokenfleet` without building or installing it (offline, and always this tree):
# a folder of links laid out as pyproject.toml installs it (harness/ is the package, kernels/ its subpackage).
src=${GPU_CHECK_SRC:-${TMPDIR:-/tmp}/tokenfleet-src-$$}/tokenfleet
rm -rf "$src" && mkdir -p "$src"
for f in harness/* kernels configs; do ln -s "$PWD/$f" "$src/$(basename "$f")"; done
export PYTHONUNBUFFERED=1 PYTHONPATH="$(dirname "$src")${PYTHONPATH:+:$PYTHONPATH}"
cache=${GPU_CHECK_CACHE:-${TMPDIR:-/tmp}/tokenfleet-gpu-check-cache}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$cache/triton} TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$cache/inductor}
export TRITON_CACHE_AUTOTUNING=${TRITON_CACHE_AUTOTUNING:-1}
if [ -n "${WHEELS_DIR:-}" ] && compgen -G "$WHEELS_DIR/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/tokenfleet-site \
        "$WHEELS_DIR"/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/tokenfleet-site"
fi
"$PY" - "$DEVICE" >"$CHECK/env.txt" 2>&1 <<'EOF'
import inspect, sys
import pandas, pydantic, rich, torch, triton, typer, yaml  # noqa: F401 - each one the run needs
if sys.argv[1] == "cuda":
    assert torch.cuda.is_available(), "no CUDA GPU"
cached = "cache_results" in inspect.signature(triton.autotune).parameters
print(f"torch {torch.__version__}, triton {triton.__version__}, autotune results cached on disk: {cached}")
EOF
env_rc=$?
cat "$CHECK/env.txt"
[ "$env_rc" = 0 ] || { echo "gpu-check: a dependency or the GPU is missing (see above)" >&2; exit 2; }
nvidia-smi >"$CHECK/nvidia-smi.txt" 2>&1 || true

# The plan, with its estimates, beside the tests (host work only): the log then shows estimate against reality.
timeout 60 "$PY" -m tokenfleet bench --suite "$SUITE" --device "$DEVICE" --plan --format csv >"$CHECK/plan.csv" 2>&1 &
plan_pid=$!

echo "gpu-check: set up in $(elapsed) s (SETUP_S=$SETUP_S allowed)"
echo "== correctness on the device ($TESTS_S s at most)"
timeout -s INT -k 5 "$TESTS_S" "$PY" -m pytest -q -p no:cacheprovider --durations=15 "${TESTS[@]}" 2>&1 \
    | tee "$CHECK/tests.log"
tests_rc=${PIPESTATUS[0]}
wait "$plan_pid" 2>/dev/null
planned=$(grep -c '^[0-9]' "$CHECK/plan.csv" 2>/dev/null)

suite_s=$((TOTAL_S - $(elapsed) - RESERVE_S))
echo "== $SUITE suite ($suite_s s at most, ${planned:-?} jobs planned)"
bench_rc=124
if [ "$suite_s" -gt 0 ]; then
    timeout -s INT -k "$GRACE_S" "$suite_s" "$PY" -m tokenfleet bench --suite "$SUITE" --device "$DEVICE" --out "$CHECK/run" \
        --quiet 2>&1 | tee "$CHECK/bench.log"
    bench_rc=${PIPESTATUS[0]}
fi
if [ -f "$CHECK/run/manifest.json" ]; then
    measured=$(grep -c . "$CHECK/run/points.jsonl" 2>/dev/null)
    note=""  # Out of time or failed: what was measured stays, and the tables are written from it.
    [ "$bench_rc" = 0 ] || note="Partial: the $SUITE suite stopped (exit $bench_rc) after ${measured:-0} of ${planned:-?} planned points."
    # At most what the reserve leaves after the bench's grace (a reserve overridden below that: a minute).
    timeout -k 2 "$((TABLES_S > 13 ? TABLES_S - 3 : 60))" "$PY" - "$CHECK/run" "$note" >"$CHECK/headline.md" <<'EOF' || true
import sys
from tokenfleet.report.screen import screen
from tokenfleet.report.tables import write_tables
run, note = sys.argv[1], sys.argv[2]
if note:
    write_tables(run)
print(screen(run, note or None))
EOF
fi
tar -czf "$CHECK/gpu-check.tar.gz" -C "$CHECK" --exclude gpu-check.tar.gz . 2>/dev/null || true
echo
if [ -f "$CHECK/run/manifest.json" ]; then  # the archive holds the rest; the folder keeps what is committed
    find "$CHECK/run" -type f ! -name manifest.json ! -name points.jsonl ! -name summary.md -delete 2>/dev/null
    rm -f "$CHECK/bench.log"
    cat "$CHECK/headline.md" 2>/dev/null
else
    echo "gpu-check: no run was written (see $CHECK/bench.log)"
fi
rm -rf "$(dirname "$src")"
echo "gpu-check: tests rc=$tests_rc, bench rc=$bench_rc, $(elapsed) s of $TOTAL_S; run in $CHECK/run"
exit $((tests_rc || bench_rc))
