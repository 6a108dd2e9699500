"""benchmarks/gpu_check.sh in its dry mode, restricted to its cheap steps (the full dry run
takes minutes: `bash benchmarks/gpu_check.sh --dry`)."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_reports_environment_and_verdicts(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, GPU_CHECK_ONLY="env verdicts")
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    log = (tmp_path / "gpu_check.log").read_text()
    for line in ("Python.h:", "nvcc:", "cuda_runtime.h:", "torch", "dry: 1"):
        assert line in log, line
    for name in ("wheels", "build", "tests", "bench_coefficients", "bench_fused_linear"):
        assert f"== {name}: skipped (not in GPU_CHECK_ONLY)" in log, name
    assert "== verdicts: rc=0" in log
    verdicts = (tmp_path / "results" / "verdicts.md").read_text()
    # no result files and no tests in this run: every target reports what is missing, none is judged
    assert "no data: no coefficients_*.json" in verdicts and "no data: no JUnit file" in verdicts
    assert "| met |" not in verdicts and "| missed |" not in verdicts
