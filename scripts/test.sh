#!/usr/bin/env bash
# Set everything up, then run the whole test suite (Triton kernels under TRITON_INTERPRET=1
# when no GPU is present). pytest exits non-zero when it collects no test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/python -m pytest -q -ra tests "$@"
# smoke test of the credit comparison: delta-train compare --quick (3 arms x 2 seeds, a tiny model)
smoke=$(mktemp -d)
trap 'rm -rf "$smoke"' EXIT
.venv/bin/python -m delta_kernels.trainer compare --task sparse --quick --out "$smoke/compare" > "$smoke/log" \
    || { cat "$smoke/log"; exit 1; }
echo "compare --quick smoke test: ok"
