#!/usr/bin/env bash
# Set everything up (scripts/setup_env.sh: VENV, TORCH_SPEC, WITH_VERL), then run the whole test suite (Triton
# kernels under TRITON_INTERPRET=1 when no GPU is present). pytest exits non-zero when it collects no test.
#   bash scripts/test.sh                                                  # .venv, torch 2.13.0
#   VENV=.venv-torch2.14 TORCH_SPEC='torch==2.14.1' bash scripts/test.sh  # the same suite on another torch
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
VENV=${VENV:-.venv}
if ! "$VENV/bin/python" -c "import verl" >/dev/null 2>&1; then
  echo "test.sh: verl is not installed (WITH_VERL=0?): the verl integration tests skip" >&2
fi
"$VENV/bin/python" -m pytest -q -ra tests "$@"
# smoke test of the credit comparison: delta-train compare --quick (3 arms x 2 seeds, a tiny model)
smoke=$(mktemp -d)
trap 'rm -rf "$smoke"' EXIT
"$VENV/bin/python" -m delta_kernels.trainer compare --task sparse --quick --out "$smoke/compare" > "$smoke/log" \
    || { cat "$smoke/log"; exit 1; }
echo "compare --quick smoke test: ok"
