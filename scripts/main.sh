#!/usr/bin/env bash
# Set everything up, then run the main job on the embedded default.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m delta_kernels.demo "$@"
