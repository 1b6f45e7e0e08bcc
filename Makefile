# `make run` and `make test` set up .venv from nothing when it is missing or older than pyproject.toml.
# With no NVIDIA GPU, torch's CPU build is installed first (TORCH_SPEC), so set-up stays small and fast.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_SPEC ?= torch==2.13.0
SUITE ?=
FLEET ?= china-2026-mix
OUT_DIR ?= results/runs/gpu-check
MODULES ?=

.PHONY: setup run test bench lint gpu-check mutate clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if ! command -v nvidia-smi >/dev/null 2>&1 && ! $(PY) -c "import torch" 2>/dev/null; then \
		echo "no NVIDIA GPU: installing the CPU build of torch ($(TORCH_SPEC))"; \
		$(PY) -m pip install -q "$(TORCH_SPEC)"; fi
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

# The headline (coverage of 14T and 140T tokens/day, GPUs needed) comes last, so it is what the terminal shows.
run: $(STAMP)
	$(VENV)/bin/tokenfleet bench $(if $(SUITE),--suite $(SUITE)) --quiet
	$(VENV)/bin/tokenfleet report results/runs/latest --fleet $(FLEET)
	$(VENV)/bin/tokenfleet capacity --fleet $(FLEET) --run results/runs/latest --quiet

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	@mkdir -p results/runs
	$(PY) -m pytest benchmarks --benchmark-only --benchmark-json=results/runs/bench-$$(git rev-parse --short HEAD 2>/dev/null || echo local).json

lint: $(STAMP)
	$(PY) -m ruff check kernels harness tests benchmarks

# On a GPU machine, offline, in 6 minutes: every kernel's and the model's GPU tests (<= 2 min), then the quick suite
# in value order in the time left, into OUT_DIR/run; ends with one screen for the README (OUT_DIR/headline.md).
# WHEELS_DIR=.whl installs carried wheels (scripts/fetch_gpu_wheels.sh). Plan first: tokenfleet bench --suite quick --plan
gpu-check:
	OUT_DIR=$(OUT_DIR) ./scripts/gpu_check.sh

# Mutation testing of the modules that compute numbers (mutmut, installed on demand; not in CI or `make test`: slow).
# MODULES="model/spec.py ..." (under harness/) narrows it; the report goes to results/mutation/ (scripts/mutate.sh).
mutate: $(STAMP)
	PY=$(PY) ./scripts/mutate.sh $(MODULES)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
