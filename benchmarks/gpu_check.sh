#!/usr/bin/env bash
# The GPU check: every verdict of the project in one run of at most 8 minutes on a lent, offline
# GPU machine (H100/H200; CUDA 13, torch 2.11, triton 3.6, Python 3.12).
#
#   bash benchmarks/gpu_check.sh          # on the GPU machine, from anywhere in the repo
#   bash benchmarks/gpu_check.sh --dry    # on any machine: the same steps, compile-only or skipped
#                                         # with the reason in the log (no GPU needed)
#
# Before: on a networked machine, benchmarks/fetch_peer_wheels.sh fills .whl/ (gitignored), and
# .whl travels with the run. Steps, in order of what the verdicts need; each has a time cap, the
# whole run a deadline, and a failing step does not stop the next:
#   env       versions; the build's needs (Python.h, nvcc, CUDA headers, pybind11, cmake, ninja)
#   wheels    pip install --no-index --no-deps --target /tmp/gpu_check_site from .whl (the peers;
#             the build and test tools only where the machine lacks them)
#   build     the native modules in place (cpp + cuda)          [dry: cpp only]
#   tests     the conformance suite on the GPU backends (cuda, triton), test_triton,
#             test_fused_linear, ... on the GPU, one JUnit file each
#             [dry: the sm_90 compile tests]
#   bench_*   coefficients (+ the CUDA-graph variant), per-pass timings, fused LM head, trainer,
#             each in its short mode, writing its rows as it goes  [dry: CPU short modes]
#   verdicts  each target against its floor -> $OUT/results/verdicts.md
# Output under $OUT (default /tmp/gpu_check_out): gpu_check.log, results/ (every result file,
# the JUnit XML of the tests, verdicts.md). GPU_CHECK_ONLY="env verdicts" runs only those steps.
set -u
cd "$(dirname "$0")/.."
DRY=0
[[ ${1:-} == --dry ]] && DRY=1
OUT="${OUT:-/tmp/gpu_check_out}"
RES="$OUT/results"
mkdir -p "$RES"
LOG="$OUT/gpu_check.log"
: > "$LOG"
PY=${PYTHON:-python3}
DEADLINE=$((SECONDS + ${GPU_CHECK_SECONDS:-470}))  # 8 minutes less a margin for the verdicts
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
(( DRY )) || unset TRITON_INTERPRET

say() { echo "$*" | tee -a "$LOG"; }
selected() { [[ -z ${GPU_CHECK_ONLY:-} || " $GPU_CHECK_ONLY " == *" $1 "* ]]; }

# step NAME MAX_SECONDS CMD...: run with a timeout capped by the time left; log rc and duration.
step() {
  local name=$1 max=$2; shift 2
  if ! selected "$name"; then say "== $name: skipped (not in GPU_CHECK_ONLY)"; return 0; fi
  local left=$((DEADLINE - SECONDS))
  local limit=$(( max < left ? max : left ))
  if (( limit < 10 )); then say "== $name: skipped (no time left)"; return 0; fi
  say "== $name (timeout ${limit}s): $(printf '%s ' "$@" | head -1 | cut -c1-160)"
  local t0=$SECONDS
  timeout --kill-after=5 "$limit" "$@" >> "$LOG" 2>&1
  local rc=$?
  say "== $name: rc=$rc in $((SECONDS - t0))s"
}
skip() { selected "$1" && say "== $1: skipped ($2)"; return 0; }

# ---------------------------------------------------------------- env: what the build needs
check_env() {
  echo "date: $(date -u); commit: $(git rev-parse --short HEAD 2>/dev/null); dry: $DRY"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  else
    echo "nvidia-smi: none"
  fi
  "$PY" - <<'EOF'
import os, shutil, subprocess, sysconfig
import torch
print("python", sysconfig.get_python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "gpu", torch.cuda.is_available())
try:
    import triton
    print("triton", triton.__version__)
except ImportError as e:
    print("triton: missing", e)
inc = sysconfig.get_paths()["include"]
print("Python.h:", "ok" if os.path.exists(os.path.join(inc, "Python.h")) else f"MISSING in {inc}")
nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
print("nvcc:", subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
      if nvcc else "MISSING")
homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
         nvcc and os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))]
found = [h for h in homes if h and os.path.exists(os.path.join(h, "include", "cuda_runtime.h"))]
print("cuda_runtime.h:", f"ok in {found[0]}/include" if found else f"MISSING (looked in {[h for h in homes if h]})")
for mod in ("pybind11", "pytest", "hypothesis"):
    try:
        print(mod + ":", __import__(mod).__version__)
    except ImportError:
        print(mod + ": MISSING (the .whl copy is used)")
for tool in ("cmake", "ninja"):
    print(tool + ":", shutil.which(tool) or "MISSING (the .whl copy is used)")
EOF
}
if selected env; then say "== env"; check_env 2>&1 | tee -a "$LOG"; fi

# ---------------------------------------------------------------- wheels from .whl
install_wheels() {
  shopt -s nullglob
  local peers=(.whl/liger_kernel-*.whl .whl/cut_cross_entropy-*.whl) tools=()
  "$PY" -c "import pybind11" 2>/dev/null || tools+=(.whl/pybind11-*.whl)
  command -v cmake >/dev/null || tools+=(.whl/cmake-*.whl)
  command -v ninja >/dev/null || tools+=(.whl/ninja-*.whl)
  (( ${#peers[@]} )) || { echo "no peer wheels in .whl (run benchmarks/fetch_peer_wheels.sh on a networked machine)"; return 1; }
  "$PY" -m pip install --quiet --no-index --no-deps --target "$SITE/peers" "${peers[@]}" || return 1
  "$PY" -c "import pytest, hypothesis" 2>/dev/null || tools+=(.whl/test/*.whl)
  PYTHONPATH="$SITE/peers" "$PY" -c "import liger_kernel.chunked_loss, cut_cross_entropy; print('peers import')"
  if (( ${#tools[@]} )); then "$PY" -m pip install --quiet --no-index --no-deps --target "$SITE/tools" "${tools[@]}"; fi
}
SITE=${GPU_CHECK_SITE:-/tmp/gpu_check_site}  # installed wheels: outside the repo and $OUT
step wheels 60 env PY="$PY" SITE="$SITE" bash -c "$(declare -f install_wheels); install_wheels"
export PYTHONPATH="$PWD:$SITE/peers:$SITE/tools${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$PATH:$SITE/tools/bin"

# ---------------------------------------------------------------- build
if (( DRY )); then
  step build 300 env DELTA_KERNELS_CUDA=0 "$PY" setup.py -q build_ext --inplace
  skip build_cuda "dry: nvcc on csrc/cuda takes minutes on a small CPU; tests/test_native_build.py compiles it"
else
  step build 150 env DELTA_KERNELS_CUDA=1 "$PY" setup.py -q build_ext --inplace
fi
if selected build; then "$PY" -c "import delta_kernels as dk; print('backends:', dk.available_backends())" >> "$LOG" 2>&1; fi

# ---------------------------------------------------------------- tests
if (( DRY )); then
  step tests 240 "$PY" -m pytest -q -p no:cacheprovider --junitxml="$RES/tests.xml" \
    tests/test_triton.py tests/test_fused_linear.py tests/test_conformance.py -k "compile_for_sm90 or cuda"
else
  # one step per file: a file that runs out of time loses only its own JUnit report
  step "tests" 90 "$PY" -m pytest -q -p no:cacheprovider --durations=5 --junitxml="$RES/test_conformance.xml" \
    tests/test_conformance.py -k "cuda or triton"  # every phase on the GPU backends (the registry's)
  for t in triton:20 fused_linear:50 accumulator_cuda:20 aggregation_verl:30; do
    step "tests" "${t#*:}" "$PY" -m pytest -q -p no:cacheprovider --durations=5 \
      --junitxml="$RES/test_${t%%:*}.xml" "tests/test_${t%%:*}.py"
  done
fi

# ---------------------------------------------------------------- benchmarks (short modes, rows written as they go)
if (( DRY )); then
  step bench_coefficients 120 "$PY" benchmarks/bench_coefficients.py --quick --out "$RES"
  step bench_passes 120 "$PY" benchmarks/bench_passes.py --quick --out "$RES"
  step bench_fused_linear 150 "$PY" benchmarks/bench_fused_linear.py --quick --out "$RES"
  step bench_trainer_overhead 120 "$PY" benchmarks/bench_trainer_overhead.py --quick --out "$RES"
  step bench_accumulator 90 "$PY" benchmarks/bench_accumulator.py --quick --out "$RES"
else
  step bench_coefficients 90 "$PY" benchmarks/bench_coefficients.py --gpu-budget --out "$RES"
  step bench_passes 40 "$PY" benchmarks/bench_passes.py --out "$RES"
  step bench_fused_linear 80 "$PY" benchmarks/bench_fused_linear.py --quick --out "$RES"
  step bench_trainer_overhead 40 "$PY" benchmarks/bench_trainer_overhead.py --gpu --quick --out "$RES"
  step bench_accumulator 40 "$PY" benchmarks/bench_accumulator.py --budget-s 1 --out "$RES"
fi
skip bench_public_call "a CPU benchmark of the cpp backend; its short mode is --quick"

# ---------------------------------------------------------------- verdicts
DEADLINE=$((DEADLINE + 10))
if (( DRY )); then JUNIT=("$RES/tests.xml"); else JUNIT=("$RES"/test_*.xml); fi
step verdicts 10 "$PY" benchmarks/verdicts.py "$RES" --junit "${JUNIT[@]}"
[[ -f $RES/verdicts.md ]] && cat "$RES/verdicts.md"
say "== done in ${SECONDS}s"
