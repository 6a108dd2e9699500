#!/usr/bin/env bash
# Set everything up, then run the whole test suite (Triton kernels under TRITON_INTERPRET=1
# when no GPU is present). pytest exits non-zero when it collects no test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest -q -ra tests "$@"
