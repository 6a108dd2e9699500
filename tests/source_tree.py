"""The install tests' helpers: a copy of the git checkout's sources, and commands run without this
process's PYTHONPATH / virtualenv (what a user's shell has)."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(extra)
    return env


def run(cmd, cwd, timeout=600, **env):
    res = subprocess.run([str(c) for c in cmd], cwd=cwd, env=clean_env(**env), capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, f"{' '.join(map(str, cmd))} failed ({res.returncode}):\n{res.stdout[-3000:]}\n" \
                                f"{res.stderr[-3000:]}"
    return res


def source_copy(dest: Path) -> Path:
    ls = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                        capture_output=True)
    if ls.returncode != 0:
        pytest.skip("not a git checkout: the sources to package are unknown")
    for rel in filter(None, ls.stdout.decode().split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest
