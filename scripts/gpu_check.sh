#!/usr/bin/env bash
# make gpu-check OUT_DIR=DIR — on one GPU, in 6 minutes wall, installing nothing from the network:
#   1. the kernels', the model's and FP8's correctness tests on the GPU (pytest, at most GPU_CHECK_TESTS_S = 120 s;
#      `--durations=15` in the log shows where the time went),
#   2. the quick suite into DIR/run, in value order (ceilings, decode, prefill, kernels: `tokenfleet bench --plan`),
#      stopped when the total budget is spent: what was measured stays, and its tables are written from it,
#   3. one screen for the README (DIR/headline.md, printed last), the logs, and DIR/gpu-check.tar.gz with everything.
# Needs the repo, torch, Triton, numpy, pandas, pytest, nvidia-ml-py, pyyaml, rich, typer; pydantic may come from
# wheels: WHEELS_DIR=.whl installs every *.whl there into a private folder (no index, no network).
# Both halves share one Triton cache with autotune results kept on disk (TRITON_CACHE_AUTOTUNING, Triton >= 3.2;
# older Tritons ignore it), and one Inductor cache.
# Overrides (tests/test_gpu_check.py runs this on a CPU with a tiny suite): GPU_CHECK_TOTAL_S, GPU_CHECK_TESTS_S,
# GPU_CHECK_RESERVE_S (kept for the tables, screen and archive), GPU_CHECK_SUITE, GPU_CHECK_TESTS, GPU_CHECK_DEVICE.
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
OUT_DIR=${OUT_DIR:?set OUT_DIR to the folder the run is written to}
PY=${PYTHON:-python3}
TOTAL_S=${GPU_CHECK_TOTAL_S:-360}
TESTS_S=${GPU_CHECK_TESTS_S:-120}
RESERVE_S=${GPU_CHECK_RESERVE_S:-15}
SUITE=${GPU_CHECK_SUITE:-quick}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
# The model's tests first: its Triton backend is what the decode and prefill points time (a cut run keeps them).
read -r -a TESTS <<<"${GPU_CHECK_TESTS:-tests/test_model.py tests/test_kernels.py tests/test_fp8.py}"
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
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
"$PY" - "$DEVICE" >"$OUT_DIR/env.txt" 2>&1 <<'EOF'
import inspect, sys
import pandas, pydantic, rich, torch, triton, typer, yaml  # noqa: F401 - each one the run needs
if sys.argv[1] == "cuda":
    assert torch.cuda.is_available(), "no CUDA GPU"
cached = "cache_results" in inspect.signature(triton.autotune).parameters
print(f"torch {torch.__version__}, triton {triton.__version__}, autotune results cached on disk: {cached}")
EOF
env_rc=$?
cat "$OUT_DIR/env.txt"
[ "$env_rc" = 0 ] || { echo "gpu-check: a dependency or the GPU is missing (see above)" >&2; exit 2; }
nvidia-smi >"$OUT_DIR/nvidia-smi.txt" 2>&1 || true

# The plan, with its estimates, beside the tests (host work only): the log then shows estimate against reality.
timeout 60 "$PY" -m tokenfleet bench --suite "$SUITE" --device "$DEVICE" --plan --format csv >"$OUT_DIR/plan.csv" 2>&1 &
plan_pid=$!

echo "== correctness on the device ($TESTS_S s at most)"
timeout -s INT -k 15 "$TESTS_S" "$PY" -m pytest -q -p no:cacheprovider --durations=15 "${TESTS[@]}" 2>&1 \
    | tee "$OUT_DIR/tests.log"
tests_rc=${PIPESTATUS[0]}
wait "$plan_pid" 2>/dev/null
planned=$(grep -c '^[0-9]' "$OUT_DIR/plan.csv" 2>/dev/null)

suite_s=$((TOTAL_S - $(elapsed) - RESERVE_S))
echo "== $SUITE suite ($suite_s s at most, ${planned:-?} jobs planned)"
bench_rc=124
if [ "$suite_s" -gt 0 ]; then
    timeout -s INT -k 20 "$suite_s" "$PY" -m tokenfleet bench --suite "$SUITE" --device "$DEVICE" --out "$OUT_DIR/run" \
        --quiet 2>&1 | tee "$OUT_DIR/bench.log"
    bench_rc=${PIPESTATUS[0]}
fi
if [ -f "$OUT_DIR/run/manifest.json" ]; then
    measured=$(grep -c . "$OUT_DIR/run/points.jsonl" 2>/dev/null)
    note=""  # Out of time or failed: what was measured stays, and the tables are written from it.
    [ "$bench_rc" = 0 ] || note="Partial: the $SUITE suite stopped (exit $bench_rc) after ${measured:-0} of ${planned:-?} planned points."
    "$PY" - "$OUT_DIR/run" "$note" >"$OUT_DIR/headline.md" <<'EOF' || true
import sys
from tokenfleet.report.screen import screen
from tokenfleet.report.tables import write_tables
run, note = sys.argv[1], sys.argv[2]
if note:
    write_tables(run)
print(screen(run, note or None))
EOF
fi
tar -czf "$OUT_DIR/gpu-check.tar.gz" -C "$OUT_DIR" --exclude gpu-check.tar.gz . 2>/dev/null || true
find "$OUT_DIR/run" -type f ! -name manifest.json ! -name points.jsonl ! -name summary.md -delete 2>/dev/null
rm -f "$OUT_DIR/bench.log"
echo
cat "$OUT_DIR/headline.md" 2>/dev/null
rm -rf "$(dirname "$src")"
echo "gpu-check: tests rc=$tests_rc, bench rc=$bench_rc, $(elapsed) s of $TOTAL_S; run in $OUT_DIR/run"
exit $((tests_rc || bench_rc))
