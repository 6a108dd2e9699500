"""The trainer under torchrun: two CPU ranks (gloo) finish a short run, only rank 0 writes the
outputs, the metrics are those of the global batch, and both ranks end with bit-identical
parameters (the gradients are averaged and every rank takes the same optimizer step)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from delta_kernels.trainer.report import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, args, timeout=150):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "delta_kernels.trainer", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


TINY = ["--steps", "3", "--prompts-per-step", "8", "--group-size", "4", "--digits", "1", "--minibatches", "2", "--hidden-size", "32",
        "--num-layers", "1", "--num-heads", "2", "--sft-max-steps", "25", "--heldout-size", "16", "--eval-every", "0",
        "--lr", "1e-3", "--warmup-steps", "1", "--seed", "5"]


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "run"
    res = torchrun(2, TINY + ["--out", str(out)])
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    return out, res


def test_two_ranks_finish_and_rank0_writes_outputs(two_rank_run):
    out, res = two_rank_run
    rows = read_metrics(str(out / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [0, 1, 2]  # one row per step: rank 1 wrote nothing
    for r in rows:
        assert r["forwards_old_logprob"] == 1 and r["forwards_coefficients"] == 0 and r["forwards_update"] == 2
        assert r["coef_min"] <= 1.0 <= r["coef_max"] and r["loss"] == r["loss"]
    assert any(r["grad_norm"] > 0 for r in rows)  # the updates moved the parameters
    assert (out / "curves.png").exists() and (out / "responses.html").exists()
    assert sorted(os.listdir(out)) == ["curves.png", "metrics.jsonl", "responses.html", "summary.json"]
    assert res.stdout.count("held-out greedy accuracy: before RL") == 1  # the summary is printed once


def test_parameters_identical_on_both_ranks(two_rank_run):
    out, _ = two_rank_run
    s = json.load(open(out / "summary.json"))
    assert s["world_size"] == 2
    sums = s["parameter_checksums_by_rank"]
    assert len(sums) == 2 and len(sums[0]) == 64 and sums[0] == sums[1]
    assert 0.0 <= s["accuracy_before_rl"] <= 1.0 and 0.0 <= s["accuracy_after_rl"] <= 1.0


def test_parameters_changed_by_training_and_differ_from_one_process(two_rank_run, tmp_path):
    """The checksum is sensitive: a one-process run of the same seed ends elsewhere (other
    response samples), and so does one without the RL steps."""
    out, _ = two_rank_run
    two = json.load(open(out / "summary.json"))["parameter_checksum"]
    from delta_kernels.trainer.__main__ import parse_config
    from delta_kernels.trainer.loop import run
    one = run(parse_config(TINY + ["--out", str(tmp_path / "one"), "--no-progress"]))
    assert one["world_size"] == 1 and one["parameter_checksums_by_rank"] == [one["parameter_checksum"]]
    assert one["parameter_checksum"] != two
