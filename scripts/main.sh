#!/usr/bin/env bash
# Set everything up, then run the main job: the reference trainer (GRPO/DAPO with DelTA) on the
# embedded default (a small Qwen3-architecture model and 2-digit addition), on the CPU when no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec "${VENV:-.venv}/bin/python" -m delta_kernels.trainer "$@"
