"""What every benchmark records beside its numbers: the machine and the commit."""
from __future__ import annotations

import os
import platform
import re
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def machine_name(device=None) -> str:
    """A file-name-safe machine tag: the GPU's name on CUDA, else cpu-<arch>-<cores>c."""
    on_gpu = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    name = torch.cuda.get_device_name() if on_gpu else f"cpu-{platform.machine()}-{os.cpu_count()}c"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
