#!/usr/bin/env bash
# One short check on a lent GPU machine (H100/H200; CUDA 13, torch 2.11, triton 3.6, no network).
# From the repo root: build the native modules in place (with CUDA), run the triton and cuda
# tests on the GPU (no interpreter), then the benchmarks in their short configuration.
# Every step has a timeout and a failing step does not stop the next; the whole script stays
# under ~7.5 minutes. Results and one log go to "$OUT" (at most 8 files).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_check_out}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: > "$LOG"
DEADLINE=$((SECONDS + 450))   # 7.5 minutes in all
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1

# step NAME MAX_SECONDS CMD...: run with a timeout capped by the time left; log rc and duration.
step() {
  local name=$1 max=$2; shift 2
  local left=$((DEADLINE - SECONDS - 5))
  local limit=$(( max < left ? max : left ))
  if (( limit < 10 )); then echo "== $name: skipped (no time left)" | tee -a "$LOG"; return 0; fi
  echo "== $name (timeout ${limit}s): $*" | tee -a "$LOG"
  local t0=$SECONDS
  timeout --kill-after=5 "$limit" "$@" >> "$LOG" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $((SECONDS - t0))s" | tee -a "$LOG"
  return 0
}

{
  echo "date: $(date -u)"; echo "commit: $(git rev-parse --short HEAD 2>/dev/null)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)" 2>&1
} >> "$LOG"

# 1. Build (pip editable install; fall back to an in-place build_ext).
step build_pip 150 env DELTA_KERNELS_CUDA=1 python3 -m pip install --no-build-isolation --no-deps -e . -q
if ! python3 -c "import delta_kernels._cuda" >> "$LOG" 2>&1; then
  step build_ext 120 env DELTA_KERNELS_CUDA=1 python3 setup.py build_ext --inplace
fi
python3 -c "import delta_kernels as dk; print('backends:', dk.available_backends())" >> "$LOG" 2>&1

# 2. Tests on the GPU (tests that do not exist yet are left out).
TESTS=()
for t in tests/test_triton.py tests/test_cuda.py; do [[ -f $t ]] && TESTS+=("$t"); done
if (( ${#TESTS[@]} )); then
  step pytest 170 python3 -m pytest -q -x --durations=10 -p no:cacheprovider "${TESTS[@]}"
fi

# 3. Benchmarks: coefficients first, then any other bench_*.py, each in its short configuration.
step bench_coefficients 120 python3 benchmarks/bench_coefficients.py --gpu-budget
for b in benchmarks/bench_*.py; do
  [[ $b == benchmarks/bench_coefficients.py ]] && continue
  help=$(timeout 30 python3 "$b" --help 2>/dev/null || true)
  if [[ $help == *--gpu-budget* ]]; then flag=--gpu-budget; elif [[ $help == *--quick* ]]; then flag=--quick; else flag=; fi
  step "$(basename "$b" .py)" 90 python3 "$b" $flag
done

# 4. Collect: the log, the coefficient results, and every result file as one archive.
# the three coefficient files this run wrote (the newest ones)
for f in $(ls -t benchmarks/results/coefficients_*.md benchmarks/results/coefficients_*.csv \
           benchmarks/results/coefficients_*.json 2>/dev/null | head -3); do
  cp "$f" "$OUT/"
done
tar czf "$OUT/results.tar.gz" benchmarks/results 2>> "$LOG"
echo "== done in ${SECONDS}s" | tee -a "$LOG"
ls -la "$OUT" | tee -a "$LOG"
