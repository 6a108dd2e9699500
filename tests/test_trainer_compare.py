"""delta-train compare: the compare.json shape, pairing by seed (one warm start per seed, the
same step-0 rollouts in every arm), --resume, a failing run, the bad-input errors, and the
statistics (t quantiles, intervals, paired differences) recomputed from the runs' files."""
from __future__ import annotations

import json
import math
import os

import pytest

from delta_kernels.trainer import compare
from delta_kernels.trainer.__main__ import main as cli_main
from delta_kernels.trainer.compare import mean_ci, t975
from delta_kernels.trainer.report import read_metrics
from delta_kernels.trainer.task import TASKS

TINY = ["--task", "sparse", "--filler-len", "2", "--heldout-size", "16", "--quick", "--steps", "2", "--eval-every",
        "1", "--sft-max-steps", "5", "--jobs", "2"]


def load(out):
    return json.load(open(os.path.join(out, "compare.json")))


@pytest.fixture(scope="module")
def tiny_compare(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cmp") / "c")
    code = compare.main(TINY + ["--arms", "dapo,oracle", "--seeds", "2", "--out", out])
    return out, code


def test_compare_json_shape_and_files(tiny_compare):
    out, code = tiny_compare
    assert code == 0
    c = load(out)
    assert c["task"] == "sparse" and c["seeds"] == [0, 1] and c["failed"] == []
    assert "Student-t" in c["settings"]["interval"] and c["settings"]["filler_len"] == 2
    for arm in ("dapo", "oracle"):
        a = c["arms"][arm]
        assert len(a["final_accuracy"]) == 2 and len(a["ci95"]) == 2 and len(a["credit_auc"]) == 2
        assert a["mean"] == pytest.approx(sum(a["final_accuracy"]) / 2)
        for seed in (0, 1):
            s = json.load(open(os.path.join(out, c["runs"][arm][str(seed)])))
            assert s["final_heldout_accuracy"] == a["final_accuracy"][seed]
            assert s["mean_train_reward"] == a["train_reward"][seed]
    assert c["arms"]["oracle"]["credit_auc"] == [1.0, 1.0] and c["arms"]["dapo"]["credit_auc"] == [0.5, 0.5]
    p = c["paired"]
    assert p["baseline"] == "dapo" and set(p) == {"baseline", "oracle"}
    want = [o - d for o, d in zip(c["arms"]["oracle"]["final_accuracy"], c["arms"]["dapo"]["final_accuracy"])]
    assert p["oracle"]["diff"] == pytest.approx(want) and len(p["oracle"]["ci95"]) == 2
    for name in ("compare.md", "compare.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    assert "| oracle |" in open(os.path.join(out, "compare.md")).read()


def test_arms_of_a_seed_are_paired(tiny_compare):
    """One warm start per seed, loaded by each arm: same weights before RL, same step-0 rollouts."""
    out, _ = tiny_compare
    assert sorted(os.listdir(os.path.join(out, "warm"))) == ["seed0.pt", "seed1.pt"]
    first = {}
    for arm in ("dapo", "oracle"):
        for seed in (0, 1):
            run = os.path.join(out, "runs", f"{arm}_seed{seed}")
            s = json.load(open(os.path.join(run, "summary.json")))
            row0 = read_metrics(os.path.join(run, "metrics.jsonl"))[0]
            first.setdefault(seed, []).append((s["accuracy_before_rl"], row0["reward"], row0["response_len"]))
    assert first[0][0] == first[0][1] and first[1][0] == first[1][1]


def test_resume_skips_finished_runs(tiny_compare, capsys):
    out, _ = tiny_compare
    stamp = os.path.getmtime(os.path.join(out, "runs", "dapo_seed0", "summary.json"))
    with pytest.raises(SystemExit):  # without --resume an existing folder is refused
        compare.main(TINY + ["--arms", "dapo,oracle", "--seeds", "2", "--out", out])
    assert "already holds runs; pass --resume" in capsys.readouterr().err
    assert compare.main(TINY + ["--arms", "dapo,oracle", "--seeds", "2", "--out", out, "--resume"]) == 0
    assert "4 finished run(s) kept" in capsys.readouterr().err
    assert os.path.getmtime(os.path.join(out, "runs", "dapo_seed0", "summary.json")) == stamp


def test_a_failing_run_is_reported_and_the_others_finish(tmp_path, monkeypatch, capsys):
    empty = tmp_path / "not_a_checkpoint"
    empty.mkdir()
    monkeypatch.setitem(compare.ARMS, "broken", ["--credit", "none", "--model", str(empty)])
    out = str(tmp_path / "c")
    code = compare.main(TINY + ["--arms", "dapo,broken", "--seeds", "1", "--out", out])
    assert code == 1
    err = capsys.readouterr().err
    assert "broken_seed0: FAILED (exit 1)" in err and "dapo_seed0: done" in err
    c = load(out)
    assert c["failed"] == ["broken_seed0"] and c["arms"]["broken"]["final_accuracy"] == [None]
    assert c["arms"]["dapo"]["final_accuracy"][0] is not None
    assert c["arms"]["dapo"]["ci95"] is None and "one seed" in c["arms"]["dapo"]["reason"]  # --seeds 1
    assert c["paired"]["broken"]["diff"] == [None] and c["paired"]["broken"]["ci95"] is None


@pytest.mark.parametrize("argv, message", [
    (["--task", "chess"], "argument --task: invalid choice: 'chess'"),
    (["--arms", "dapo,shapley"], "--arms: unknown arm 'shapley'; expected some of dapo, delta, oracle"),
    (["--task", "sparse", "--arms", ""], "--arms: expected distinct arms"),
    (["--arms", "dapo,dapo"], "--arms: expected distinct arms"),
    (["--seeds", "0"], "--seeds: must be >= 1"),
    (["--jobs", "0"], "--jobs: must be >= 1"),
    (["--lr", "-1"], "arm 'dapo': --lr and --sft-lr must be > 0"),
    (["--no-such-option", "3"], "unrecognized arguments: --no-such-option 3"),
])
def test_bad_input_one_line(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        compare.main(["--out", str(tmp_path / "x")] + argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("options, message", [
    (["--credit", "shapley"], "arm 'later'"),  # an unknown credit (refused by argparse choices or the registry)
    (["--credit", "delta", "--no-such-vectors", "head"], "--arms: arm 'later' needs option --no-such-vectors"),
])
def test_arm_whose_option_is_missing(tmp_path, monkeypatch, capsys, options, message):
    monkeypatch.setitem(compare.ARMS, "later", options)
    with pytest.raises(SystemExit):
        compare.main(["--arms", "dapo,later", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert message in err and "shapley" in err or "no-such-vectors" in err
    assert len(err.strip().splitlines()[-1]) > 0


def test_help_lists_tasks(capsys):
    with pytest.raises(SystemExit):
        cli_main(["compare", "--help"])
    text = capsys.readouterr().out
    assert "{" + ",".join(TASKS) + "}" in text and "--arms" in text and "--resume" in text


def test_t_quantiles_and_intervals():
    assert t975(1) == 12.706 and t975(10) == 2.228 and t975(30) == 2.042
    assert t975(40) == pytest.approx(2.0211, abs=1e-3) and t975(120) == pytest.approx(1.9799, abs=1e-3)
    xs = [0.1, 0.4, 0.2, None, 0.5]
    st = mean_ci(xs)
    vals = [0.1, 0.4, 0.2, 0.5]
    m = sum(vals) / 4
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / 3)
    assert st["n"] == 4 and st["mean"] == pytest.approx(m)
    assert st["ci95"] == pytest.approx([m - 3.182 * sd / 2, m + 3.182 * sd / 2])
    assert mean_ci([0.3])["ci95"] is None and mean_ci([])["mean"] is None
