#!/usr/bin/env bash
# Wheels an offline GPU box may lack (the device image here has torch, Triton, pandas, pytest, typer, rich,
# pyyaml, nvidia-ml-py, but not pydantic, and maybe an older typing-extensions than pydantic needs): downloaded
# HERE, where PyPI is reachable, into DIR (default .whl,
# git-ignored), for CPython 3.12 on x86-64 Linux. Then, there: WHEELS_DIR=.whl make gpu-check OUT_DIR=...
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.whl}
PY=${PYTHON:-python3}
mkdir -p "$DIR"
pydantic_version=$("$PY" -c "import pydantic; print(pydantic.VERSION)" 2>/dev/null || echo 2.12.5)
plat=(); for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
    plat+=(--platform "$p"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
    -d "$DIR" "pydantic==$pydantic_version"
core=$(unzip -p "$DIR"/pydantic-"$pydantic_version"-*.whl '*/METADATA' | sed -n 's/^Requires-Dist: pydantic-core==\([^ ;]*\).*/\1/p')
# typing-extensions too: pydantic 2.14 needs >= 4.16, newer than the one torch's image may carry (torch asks >= 4.10);
# the carried folder comes first on PYTHONPATH, so torch sees the newer one as well (it is backward compatible).
te_version=$("$PY" -c "from importlib.metadata import version; print(version('typing_extensions'))" 2>/dev/null \
    || echo 4.16.0)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
    -d "$DIR" "pydantic-core==$core" "annotated-types>=0.6" "typing-inspection>=0.4" "typing-extensions==$te_version"
ls "$DIR"
