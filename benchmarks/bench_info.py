"""What every benchmark records beside its numbers (the machine, the commit, the load), and where it writes them."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


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


def parser(doc: str) -> argparse.ArgumentParser:
    """A benchmark's command line: the first line of its docstring, and --out (default benchmarks/results)."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--out", default=str(RESULTS))
    return p


def run_info(device=None) -> dict:
    """The fields every result row starts with: machine, date (UTC), commit, torch, threads, load_average."""
    return dict(machine=machine_name(device),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                commit=git_commit(), torch=torch.__version__, threads=torch.get_num_threads(),
                load_average=os.getloadavg())


def write_result(out_dir: str, stem: str, row: dict, md: str) -> None:
    """<out_dir>/<stem>_<machine>.json (the row) and .md (the table), and the table on stdout."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    out = Path(out_dir) / f"{stem}_{row['machine']}"
    out.with_suffix(".json").write_text(json.dumps(row, indent=2) + "\n")
    out.with_suffix(".md").write_text(md)
    print(md)
