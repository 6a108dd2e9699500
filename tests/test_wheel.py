"""The distribution a user installs: sdist -> wheel -> a fresh venv with only the declared
dependencies -> smoke test (tests/wheel_smoke.py) and the delta-train entry point.

``python -m build`` builds the sdist, then the wheel from the unpacked sdist, so a source file
missing from the sdist (MANIFEST.in) fails the wheel build. The sources are copied from the
git checkout first (tracked and untracked-but-not-ignored files), so a stale egg-info or a
locally built .so cannot hide a missing file. The wheel is built with DELTA_KERNELS_CUDA=0
(the CUDA module has its own compile test); torch in the venv is the exact version of the
running torch's distribution, which pip takes from its local wheel cache. 1-2 minutes on the 2-core
CI machine (isolated builds: the build requirements are installed twice, for the sdist and the wheel).
"""
from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import zipfile

import pytest

from source_tree import ROOT, clean_env, run, source_copy

pytestmark = pytest.mark.slow


def test_wheel_from_sdist_installs_and_runs(tmp_path):
    src = source_copy(tmp_path / "src")
    dist = tmp_path / "dist"
    run([sys.executable, "-m", "build", "--outdir", dist, src], cwd=src, DELTA_KERNELS_CUDA="0")
    sdists, wheels = sorted(dist.glob("*.tar.gz")), sorted(dist.glob("*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, list(dist.iterdir())
    with zipfile.ZipFile(wheels[0]) as whl:  # verl's `import verl` loads this entry point
        points = [n for n in whl.namelist() if n.endswith(".dist-info/entry_points.txt")]
        assert len(points) == 1, whl.namelist()
        text = whl.read(points[0]).decode()
        metadata = whl.read(points[0].replace("entry_points.txt", "METADATA")).decode()
        licenses = [n for n in whl.namelist() if n.endswith(".dist-info/licenses/LICENSE")]
    assert "[verl.plugins]\ndelta_kernels = delta_kernels.integrations.verl" in text, text
    assert "License-Expression: Apache-2.0" in metadata and len(licenses) == 1, (metadata[:800], licenses)

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", venv], cwd=tmp_path)
    py = venv / "bin" / "python"
    run([py, "-m", "pip", "install", "-q", f"torch=={importlib.metadata.version('torch')}", wheels[0]], cwd=tmp_path)
    smoke = run([py, ROOT / "tests" / "wheel_smoke.py"], cwd=tmp_path)
    assert "wheel smoke test ok" in smoke.stdout

    # The trainer's dependencies are an extra, not installed here: --help works without it, a run
    # says in one line which extra to install.
    help_text = run([venv / "bin" / "delta-train", "--help"], cwd=tmp_path).stdout
    assert help_text.startswith("usage: delta-train") and "--backend" in help_text, help_text
    res = subprocess.run([venv / "bin" / "delta-train", "--steps", "1"], cwd=tmp_path, env=clean_env(),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and res.stdout == "", res
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install '.[trainer]'" in lines[0], res.stderr
