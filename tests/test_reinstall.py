"""Installing twice from one clone, as the README does: ``pip install .`` then ``pip install '.[trainer]'``
(or again after ``git pull``), and ``pip install -e .`` after ``pip install .``. Each pip install builds in
its own temporary build environment (build isolation), which pip deletes afterwards; the native build
in the clone's build/ must not reuse a CMake cache that names tools from a deleted environment.

The venv reaches the running torch and numpy through a .pth file (no torch install), and pip installs
with --no-deps: what is under test is the build. DELTA_KERNELS_CUDA=0. Three compiles of delta_kernels._cpp:
468 s on the 2-core dev machine at load average 10 (2026-12-07), a few minutes when idle.
"""
from __future__ import annotations

import site
import sys
from pathlib import Path

import pytest

from source_tree import run, source_copy

pytestmark = pytest.mark.slow


def where_it_imports(py: Path, cwd: Path) -> Path:
    res = run([py, "-c", "import delta_kernels as dk; assert 'cpp' in dk.available_backends(), "
                         "dk.available_backends(); print(dk.__file__)"], cwd=cwd)
    return Path(res.stdout.strip().splitlines()[-1]).resolve().parent


def test_second_install_and_editable_install_from_one_clone(tmp_path):
    src = source_copy(tmp_path / "src")
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", venv], cwd=tmp_path)
    py = venv / "bin" / "python"
    venv_site = Path(run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         cwd=tmp_path).stdout.strip())
    (venv_site / "running_torch.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    elsewhere = tmp_path / "elsewhere"  # not the clone, so that the import is the installed package
    elsewhere.mkdir()

    for attempt in ("first", "second"):
        res = run([py, "-m", "pip", "install", "--no-deps", "."], cwd=src, timeout=900, DELTA_KERNELS_CUDA="0")
        assert "Successfully installed delta-kernels" in res.stdout, (attempt, res.stdout[-2000:])
        assert where_it_imports(py, elsewhere) == venv_site / "delta_kernels", attempt
    run([py, "-m", "pip", "install", "--no-deps", "-e", "."], cwd=src, timeout=900, DELTA_KERNELS_CUDA="0")
    assert where_it_imports(py, elsewhere) == src / "delta_kernels"
