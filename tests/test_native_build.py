"""The native modules: _cuda imports without a driver and fails clearly; csrc/cuda compiles for sm_80 and sm_90."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_cpp_module_builds_and_imports():
    from delta_kernels import _cpp
    assert _cpp.reduction_block_tokens(10) == 64 and _cpp.reduction_block_tokens(1 << 20) == 1024


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU driver")
def test_cuda_module_imports_without_driver_and_raises():
    _cuda = pytest.importorskip("delta_kernels._cuda")
    from delta_kernels.backends import cuda  # noqa: F401  (the backend module imports too)
    with pytest.raises(RuntimeError, match="device_count"):
        _cuda.device_count()
    with pytest.raises(RuntimeError, match="delta_kernels._cuda.row_pass: "):
        _cuda.row_pass(dtype=0, x=0, n_tokens=1, width=4, stream=0)  # fails at the launch, before any memory access


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_sources_compile(arch, tmp_path):
    import pybind11
    for src in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
        cmd = ["nvcc", "-c", "-std=c++17", "-O1", f"-arch={arch}", "--expt-relaxed-constexpr",
               "-I", pybind11.get_include(), str(src), "-o", str(tmp_path / (src.stem + ".o"))]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, f"{src.name} for {arch}:\n{res.stderr}"
