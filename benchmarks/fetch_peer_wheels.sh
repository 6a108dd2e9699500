#!/usr/bin/env bash
# Run on a machine with network access (PyPI), from anywhere in the repo: downloads into .whl/
# (gitignored) the wheels a GPU run on an offline machine may need, so that they travel with it:
#   - the peer libraries of bench_fused_linear.py, liger-kernel 0.8.5 and cut-cross-entropy 25.1.1
#     (pure Python; they need only torch and triton, which the GPU machine has: --no-deps);
#   - the build tools of the native extension (pybind11, cmake, ninja) and the test tools (pytest,
#     hypothesis and their pure-Python dependencies, in .whl/test), used there only when the
#     machine lacks them.
# gpu_check.sh installs them with: pip install --no-index --no-deps --target DIR .whl/...whl
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PYVER=${GPU_PYTHON_VERSION:-3.12}   # the GPU machine's Python
mkdir -p .whl
get() { "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" --dest .whl "$@"; }
get "liger-kernel==0.8.5" "cut-cross-entropy==25.1.1" "pybind11==3.1.0"
get --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 "cmake<5" "ninja"
mkdir -p .whl/test
"$PY" -m pip download --quiet --only-binary=:all: --python-version "$PYVER" --dest .whl/test pytest hypothesis
ls -l .whl/*.whl .whl/test/*.whl
