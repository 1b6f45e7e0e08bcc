#!/usr/bin/env bash
# make gpu-check OUT_DIR=DIR — on a machine with a GPU, in under 8 minutes, installing nothing from the network:
#   1. every kernel's correctness check (and the model's) on the GPU in bf16/fp16/fp32 (pytest),
#   2. the quick suite (ceilings, kernels, prefill and decode) into the run folder DIR/run,
#   3. the logs and the whole run packed into DIR/gpu-check.tar.gz (DIR/run keeps manifest, points, summary).
# Needs the repo, torch, Triton, numpy, pandas, pytest, nvidia-ml-py, pyyaml, rich, typer; pydantic may come from
# wheels: WHEELS_DIR=.whl installs every *.whl there into a private folder (no index, no network).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT_DIR:?set OUT_DIR to the folder the run is written to}
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "${WHEELS_DIR:-}" ] && compgen -G "$WHEELS_DIR/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/tokenfleet-site \
        "$WHEELS_DIR"/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/tokenfleet-site"
fi
"$PY" -c "import torch, triton, pydantic, yaml, pandas, typer, rich; assert torch.cuda.is_available(), 'no CUDA GPU'" \
    || { echo "gpu-check: a dependency or the GPU is missing (see above)" >&2; exit 2; }
nvidia-smi >"$OUT_DIR/nvidia-smi.txt" 2>&1 || true
start=$(date +%s)
echo "== correctness on the GPU"
timeout 240 "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_model.py 2>&1 | tee "$OUT_DIR/tests.log"
tests_rc=${PIPESTATUS[0]}
echo "== quick suite"
timeout $((460 - ($(date +%s) - start))) "$PY" -m harness bench --suite quick --out "$OUT_DIR/run" --quiet 2>&1 \
    | tee "$OUT_DIR/bench.log"
bench_rc=${PIPESTATUS[0]}
if [ "$bench_rc" != 0 ] && [ -f "$OUT_DIR/run/manifest.json" ]; then
    # Out of time or interrupted: what was measured stays; the tables are written from it.
    "$PY" -c "from harness.report.tables import write_tables; write_tables('$OUT_DIR/run')" || true
fi
tar -czf "$OUT_DIR/gpu-check.tar.gz" -C "$OUT_DIR" --exclude gpu-check.tar.gz . 2>/dev/null || true
find "$OUT_DIR/run" -type f ! -name manifest.json ! -name points.jsonl ! -name summary.md -delete 2>/dev/null
rm -f "$OUT_DIR/bench.log"
echo "gpu-check: tests rc=$tests_rc, bench rc=$bench_rc, $(($(date +%s) - start)) s; run in $OUT_DIR/run"
exit $((tests_rc || bench_rc))
