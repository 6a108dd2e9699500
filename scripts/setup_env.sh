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
# verl is installed without its own pins (last step, below); pip then lists them as "dependency conflicts" whenever it
# installs something verl depends on. Those lines are expected: quiet runs them and drops just those lines.
quiet() {
  local log
  log=$("$@" 2>&1) || { echo "$log" >&2; return 1; }
  echo "$log" | grep -v -e "^verl .* requires " -e "dependency resolver does not currently" -e "^$" >&2 || true
}
if [ -n "${TORCH_SPEC:-}" ]; then
  quiet "$VPY" -m pip install -q "$TORCH_SPEC"
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
# A CUDA build of torch requires its own triton (torch 2.14.1: triton 3.8.0). The constraints' triton pin (for the
# CPU torch, which requires none) would make pip's resolver swap such a torch for another build: drop the pin there.
if "$VPY" -c "import importlib.metadata as m, sys; sys.exit(not any(r.startswith('triton') for r in m.requires('torch') or []))"; then
  CONSTRAINTS=$(mktemp)
  trap 'rm -f "$CONSTRAINTS"' EXIT
  grep -v '^triton==' constraints.txt > "$CONSTRAINTS"
  PIP=("$VPY" -m pip install -q -c "$CONSTRAINTS")
fi
"$VPY" -c "import triton" >/dev/null 2>&1 || quiet "${PIP[@]}" triton
quiet "${PIP[@]}" setuptools wheel pybind11 ninja cmake numpy pytest hypothesis build transformers matplotlib tqdm trl peft \
  tensordict omegaconf hydra-core codetiming dill ray torchdata cachetools uvicorn fastapi transferqueue aiohttp \
  deepspeed pylatexenc einops jsonlines optree torchmetrics loralib
quiet "$VPY" -m pip install -q --no-build-isolation --no-deps -e .
if [ "${WITH_VERL:-1}" = 1 ]; then
  # verl 0.9.1 pins transformers<5.11 and a GPU stack, which conflict with the versions above; the tests use only
  # its algorithm, data and driver modules (installed above), so verl goes in last, without its dependency list.
  quiet "${PIP[@]}" --no-deps verl
  # OpenRLHF 0.11.2 pins flash-attn (a CUDA build), deepspeed and transformers 5.15: without its dependency list too
  # (its PPO modules' imports are installed above; vllm and flash-attn cannot install here, the tests stand in).
  quiet "${PIP[@]}" --no-deps openrlhf
  echo "setup_env: verl 0.9.1 installed with --no-deps: its own pins (transformers<5.11, a GPU stack) are left unmet" \
       "on purpose; pip lists them as dependency conflicts when it installs something else (README, Two commands)"
fi
"$VPY" -c "import delta_kernels as dk, torch; print(f'delta_kernels on torch {torch.__version__}:', dk._backends.describe_backends())"
