"""What delta-train prints: a banner naming the backends that run here (backend_report's words),
progress as a bar on a terminal or one line per N steps under a pipe / CI, and the summary,
which --no-progress does not hide."""
from __future__ import annotations

import io

import pytest
import torch

from delta_kernels import backend_report
from delta_kernels.trainer.__main__ import main, parse_config
from delta_kernels.trainer.progress import StepProgress

TINY = ["--steps", "4", "--prompts-per-step", "2", "--group-size", "4", "--minibatches", "2", "--hidden-size", "32",
        "--num-layers", "1", "--num-heads", "2", "--sft-max-steps", "0", "--heldout-size", "8", "--eval-every", "0",
        "--credit", "none"]


def test_piped_progress_is_one_line_per_n_steps():
    out = io.StringIO()  # not a terminal
    p = StepProgress(10, "RL (delta)", stream=out, every=3)
    for step in range(10):
        p.update(step, reward=f"{step / 10:.3f}")
    p.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert lines == [f"RL (delta) step {s}/10: reward {(s - 1) / 10:.3f}" for s in (3, 6, 9, 10)], lines
    assert StepProgress(400, "x", stream=io.StringIO()).every == 20  # default: 20 lines a run
    quiet = io.StringIO()
    off = StepProgress(10, "x", enabled=False, stream=quiet, every=1)
    off.update(0, reward="1")
    assert quiet.getvalue() == ""


def test_ci_gets_lines_even_on_a_terminal(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True
    monkeypatch.setenv("CI", "true")
    out = Tty()
    p = StepProgress(2, "RL", stream=out, every=1)
    p.update(0, acc="0.5")
    p.update(1, acc="0.6")
    assert p.bar is None and out.getvalue().splitlines() == ["RL step 1/2: acc 0.5", "RL step 2/2: acc 0.6"]


@pytest.mark.parametrize("progress", [True, False], ids=["progress", "no_progress"])
def test_cli_prints_banner_progress_lines_and_summary(tmp_path, capsys, progress):
    argv = TINY + ["--out", str(tmp_path / "run")] + ([] if progress else ["--no-progress"])
    assert main(argv) == 0
    captured = capsys.readouterr()  # neither stream is a terminal here
    first = captured.out.splitlines()[0]
    assert first.startswith("delta-train: --backend auto on cpu; backends: runs here: torch"), first
    for name, why in backend_report().items():
        assert (name in first.split("; ")[1]) if why == "runs here" else f"{name}: {why}" in first, (name, first)
    assert "held-out greedy accuracy: before RL" in captured.out  # the summary, with or without --no-progress
    progress_lines = [line for line in captured.err.splitlines() if line.startswith("RL (none) step ")]
    assert [line.split(":")[0] for line in progress_lines] == \
        ([f"RL (none) step {s}/4" for s in (1, 2, 3, 4)] if progress else [])
    assert "\r" not in captured.err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the words on a machine without a GPU")
def test_backend_that_cannot_run_here_is_refused_with_the_report_words(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_config(["--backend", "cuda"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"--backend cuda: cannot run here: {backend_report()['cuda']}" in err, err
