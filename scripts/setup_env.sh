#!/usr/bin/env bash
# Create (or reuse) a venv and install what the package, its tests and its trainer need, at the versions of
# constraints.txt. The native modules are built by `pip install -e .`.
#
# VENV        the venv (default .venv; created with the system's site-packages visible)
# TORCH_SPEC  the torch to test against, e.g. TORCH_SPEC='torch==2.14.1' VENV=.venv-torch2.14 (installed or
#             replaced in that venv). Unset: torch is installed only when none imports: on a machine without a
#             GPU the CPU build torch==2.13.0 from PyTorch's CPU index, falling back to `pip install torch==2.13.0`
#             (on PyPI the CUDA build, several GB) when that index cannot be reached; with a GPU, `pip install torch`.
# WITH_VERL   1 (default) installs verl 0.9.1 as the last step; 0 skips it (the verl tests then skip, and
#             scripts/test.sh says so).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv --system-site-packages "$VENV"
fi
VPY=$VENV/bin/python
PIP=("$VPY" -m pip install -q -c constraints.txt)
if [ -n "${TORCH_SPEC:-}" ]; then
  "$VPY" -m pip install -q "$TORCH_SPEC"
elif ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "$VPY" -m pip install -q torch
  elif ! "$VPY" -m pip install -q --timeout 20 --retries 1 --index-url https://download.pytorch.org/whl/cpu \
      torch==2.13.0; then
    echo "setup_env: PyTorch's CPU index could not be reached; installing torch==2.13.0 from the default index" \
         "(on PyPI that is the CUDA build, several GB)" >&2
    "$VPY" -m pip install -q torch==2.13.0
  fi
fi
# A CUDA build of torch requires its own triton; the pinned one only where none imports (the CPU torch).
"$VPY" -c "import triton" >/dev/null 2>&1 || "${PIP[@]}" triton
"${PIP[@]}" setuptools wheel pybind11 ninja cmake numpy pytest hypothesis build transformers matplotlib tqdm trl peft \
  tensordict omegaconf hydra-core codetiming dill ray torchdata cachetools uvicorn fastapi
"$VPY" -m pip install -q --no-build-isolation --no-deps -e .
if [ "${WITH_VERL:-1}" = 1 ]; then
  # verl 0.9.1 pins transformers<5.11 and a GPU stack, which conflict with the versions above; the tests use only
  # its algorithm, data and driver modules (installed above), so verl goes in last, without its dependency list.
  # pip then lists verl's unmet pins as "dependency conflicts": expected, so they are counted here, not printed.
  log=$("${PIP[@]}" --no-deps verl 2>&1) || { echo "$log" >&2; exit 1; }
  echo "$log" | grep -v -e "^verl .* requires " -e "dependency resolver does not currently" \
    -e "^$" >&2 || true
  echo "setup_env: verl 0.9.1 installed with --no-deps; $(echo "$log" | grep -c "^verl .* requires ") of its pins" \
       "are not met on purpose (pip reports them as conflicts; README, Install)"
fi
"$VPY" -c "import delta_kernels as dk, torch; print(f'delta_kernels on torch {torch.__version__}:', dk._backends.describe_backends())"
