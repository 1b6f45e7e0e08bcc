#!/usr/bin/env bash
# Mutation testing of the modules that compute numbers (`make mutate`; not in CI, not in `make test`: too slow).
# MUTATE_RESUME=1 continues the run in .mutate/ (its modules and config), keeping the verdicts so far.
# Usage: scripts/mutate.sh [MODULE ...]   MODULE relative to harness/, e.g. model/spec.py (default: the list below).
#
# mutmut 3 names a mutant after its file's path and swaps it in only when the tests import the copy under mutants/
# by that dotted name. Here harness/ is imported as `tokenfleet` (pyproject's package-dir), so mutmut runs in a
# staging folder (.mutate/, gitignored) laid out as the package is imported: .mutate/tokenfleet = harness/ with
# kernels/ inside it, configs/, tests/ and pyproject.toml beside it. mutmut copies that into .mutate/mutants/, puts
# mutants/ first on sys.path (ahead of the editable install's finder) and runs each mutant's covering tests there.
# Each mutant runs only the tests that reached its function in the stats run, one worker, niced, with
# TOKENFLEET_IGNORE_LOAD=1 and a CPU-time limit per mutant (timeout_multiplier/constant below).
# MUTATE_TESTS="tests/a.py tests/b.py" replaces the test selection (e.g. a module's oracle file and its unit tests).
# Results: .mutate/mutants/**/*.meta, written by scripts/mutation_report.py into results/mutation/modules/<module>.json
# (one file per module), then report.md and summary.json over all of them.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-$ROOT/.venv/bin/python}
MUTMUT_SPEC=${MUTMUT_SPEC:-mutmut==3.8.1}
STAGE=${MUTATE_STAGE:-$ROOT/.mutate}
JOBS=${MUTATE_JOBS:-1}

DEFAULT_MODULES="model/spec.py measure/parts/ceilings.py capacity/project.py capacity/calibrate.py
capacity/fleet.py capacity/expert.py capacity/pools.py capacity/routing.py capacity/serving.py capacity/headline.py
capacity/validate.py results.py report/compare.py"
MODULES=${*:-$DEFAULT_MODULES}

# The tests that exercise these modules (stats run: which test reaches which function). The rest of the suite
# (kernels, model parity, packaging, GPU scripts) does not reach them and would only cost time.
TESTS="tests/test_modelspec.py tests/test_model_parts.py tests/test_ceilings.py tests/test_runs.py
tests/test_headline.py tests/test_capacity.py tests/test_capacity_moe.py tests/test_capacity_moe_runs.py
tests/test_capacity_runs.py tests/test_capacity_tp.py tests/test_compare.py tests/test_tables.py tests/test_energy.py
tests/test_burst.py tests/test_load.py tests/test_boundary.py tests/test_cli.py $(ls tests/test_mutants_*.py 2>/dev/null || true)"
TESTS=${MUTATE_TESTS:-$TESTS}
# Each mutant runs every selected test that reaches its function, so the slow end-to-end tests (whole runs, the CLI in
# a subprocess, every config loaded: over 1 s each in the stats run of 2026-12-04, 28 of 279) would dominate: a
# function most of them reach (param_count) has ~90 tests. They are left out here (their figures are checked by the
# fast ones); the CPU-time limit per mutant is (its tests' time + timeout_constant) x timeout_multiplier x 2.
DESELECT="test_headline.py::test_make_run_steps_on_the_cpu test_capacity.py::test_every_config_validates
test_capacity.py::test_cli_capacity_formats test_capacity_runs.py::test_capacity_without_fleet_uses_the_default
test_capacity_moe.py::test_cli_capacity_deployment_and_offline test_capacity.py::test_sweep_rows
test_runs.py::test_interrupted_decode_grid_resumes_without_repeats test_compare.py::test_slowed_point_fails_over_threshold
test_cli.py::test_unknown_suite_lists_known test_model_parts.py::test_prefill_grid test_cli.py::test_env_json
test_load.py::test_run_with_a_neighbour_halfway_has_contended_points_and_resume_measures_them_again
test_runs.py::test_bench_writes_run_and_metrics test_ceilings.py::test_run_reprobes_at_the_end
test_capacity_moe.py::test_cli_project_deployment_shows_pools test_capacity.py::test_coverage_against_both_figures
test_cli.py::test_project_without_workload_names_the_default test_model_parts.py::test_check_catches_a_broken_cache_path
test_model_parts.py::test_a_compile_during_the_samples_is_an_error test_load.py::test_ignored_load_is_recorded_in_the_manifest
test_compare.py::test_bootstrap_shift_is_claimed_and_gated test_capacity_moe.py::test_china_mix_serves_moe_with_its_deployments
test_model_parts.py::test_jobs_run_in_any_order test_compare.py::test_a_contended_point_is_not_judged_and_does_not_pass_the_gate
test_ceilings.py::test_bandwidth_ceiling_above_the_copy_is_flagged test_cli.py::test_env_ceilings_json
test_capacity_runs.py::test_cli_capacity_with_run_is_calibrated test_capacity_tp.py::test_curve_applies_only_to_its_device_and_world
test_model_parts.py::test_compile_points_put_the_compile_in_first_call_ms"
deselect=(); for t in $DESELECT; do deselect+=("--deselect" "tests/$t"); done

"$PY" -c "import mutmut" 2>/dev/null || "$PY" -m pip install -q "$MUTMUT_SPEC"
MUTMUT=$(cd "$(dirname "$PY")" && pwd)/mutmut

toml_list() { printf '['; local sep=""; for x in "$@"; do printf '%s"%s"' "$sep" "$x"; sep=", "; done; printf ']'; }
only=(); for m in $MODULES; do test -f "harness/$m" || { echo "mutate.sh: no module harness/$m" >&2; exit 2; }
  only+=("tokenfleet/$m"); done

if [ "${MUTATE_RESUME:-0}" = 1 ] && [ -f "$STAGE/pyproject.toml" ]; then
  echo "mutate.sh: resuming the run in $STAGE (its modules and config; results so far kept)"
else
rm -rf "$STAGE"; mkdir -p "$STAGE"
cp -r harness "$STAGE/tokenfleet"; cp -r kernels "$STAGE/tokenfleet/kernels"
cp -r configs tests scripts results "$STAGE/"; cp Makefile README.md "$STAGE/"
find "$STAGE" -name __pycache__ -prune -exec rm -rf {} +
cp pyproject.toml "$STAGE/pyproject.toml"
cat >> "$STAGE/pyproject.toml" <<EOF

[tool.mutmut]
source_paths = ["tokenfleet"]
only_mutate = $(toml_list "${only[@]}")
also_copy = ["configs", "scripts", "results", "Makefile", "README.md"]
pytest_add_cli_args_test_selection = $(toml_list $TESTS)
pytest_add_cli_args = $(toml_list -p no:cacheprovider "${deselect[@]}")
timeout_multiplier = 3.0
timeout_constant = 10.0
use_git_change_detection = false
EOF
fi

[ "${MUTATE_RESUME:-0}" = 1 ] && [ -f "$STAGE/run.json" ] || "$PY" -c 'import json, sys; print(json.dumps({"modules": sys.argv[1].split(), "tests": sys.argv[2].split()}))' \
  "${only[*]}" "$TESTS" > "$STAGE/run.json"
cd "$STAGE"
start=$(date +%s)
echo "mutmut run: log in $STAGE/mutmut.log; then scripts/mutation_recheck.py --stage $STAGE and scripts/mutation_report.py --stage $STAGE"
status=0
# One thread: the workers are forked from the process that ran the stats (torch already warm), and an OpenMP pool
# does not survive a fork (a forked test's first parallel op hangs until the timeout); also the machine is shared.
OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENFLEET_IGNORE_LOAD=1 nice -n 10 "$MUTMUT" run --max-children "$JOBS" > "$STAGE/mutmut.log" 2>&1 || status=$?
tr '\r' '\n' < "$STAGE/mutmut.log" | grep -av '^\s*$\|^[⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏] ' | tail -n 8
test "$status" = 0 || { echo "mutate.sh: mutmut exited $status" >&2; exit "$status"; }
echo "mutmut run took $(( $(date +%s) - start )) s"
echo "{\"mutmut wall\": $(( $(date +%s) - start ))}" > "$STAGE/seconds.json"
cd "$ROOT"
"$PY" scripts/mutation_report.py --stage "$STAGE"
