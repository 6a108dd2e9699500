"""The credit-sensitive tasks (decisive positions, rewards, options), the credit metrics
(credit AUC against a hand-computed case, the oracle coefficients, the gradient cosine) and a
trainer run that logs them, plus the warm-start cache (loading it changes nothing)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from delta_kernels.trainer.__main__ import build_parser, parse_config
from delta_kernels.trainer.config import TrainerConfig
from delta_kernels.trainer.credit_metrics import credit_auc, gradient_cosine, oracle_coefficients
from delta_kernels.trainer.loop import deterministic_view, run
from delta_kernels.trainer.report import read_metrics
from delta_kernels.trainer.task import PathStarTask, Problem, SparseAnswerTask, TASKS, build_task

EOS = "<eos>"


def tiny(tmp_path, name, **kw) -> TrainerConfig:
    base = dict(task="sparse", filler_len=3, steps=3, prompts_per_step=4, group_size=4, minibatches=2, hidden_size=32,
                num_layers=1, num_heads=2, sft_max_steps=25, heldout_size=16, html_samples=6, progress=False,
                out=str(tmp_path / name), lr=1e-3, warmup_steps=1, align_every=1, eval_every=1, final_evals=2)
    base.update(kw)
    return TrainerConfig(**base)


def test_credit_auc_matches_a_hand_computed_case():
    # valid tokens: decisive coefs {2, 1}, others {1, 0.5}; pairs: 2>1, 2>0.5, 1=1 (1/2), 1>0.5 -> 3.5 / 4
    coef = torch.tensor([[2.0, 1.0, 1.0, 0.5, 9.0]])
    decisive = torch.tensor([[True, False, True, False, False]])
    mask = torch.tensor([[True, True, True, True, False]])  # the padded 9.0 does not count
    assert credit_auc(coef, decisive, mask) == pytest.approx(0.875, abs=1e-12)
    assert credit_auc(-coef, decisive, mask) == pytest.approx(0.125, abs=1e-12)
    assert credit_auc(torch.ones_like(coef), decisive, mask) == 0.5  # uniform: all ties
    assert credit_auc(coef, mask.clone(), mask) is None  # every valid token decisive: no pair
    with pytest.raises(ValueError, match="one shape"):
        credit_auc(coef[:, :3], decisive, mask)


def test_credit_auc_against_pairwise_count_on_random_input():
    g = torch.Generator().manual_seed(5)
    coef = torch.randint(0, 4, (6, 9), generator=g).float()  # many ties
    decisive = torch.rand(6, 9, generator=g) < 0.3
    mask = torch.rand(6, 9, generator=g) < 0.8
    pos, neg = coef[mask & decisive], coef[mask & ~decisive]
    want = ((pos[:, None] > neg[None]).double() + 0.5 * (pos[:, None] == neg[None]).double()).mean().item()
    assert credit_auc(coef, decisive, mask) == pytest.approx(want, abs=1e-12)


def test_oracle_coefficients():
    decisive = torch.tensor([[False, False, True, False], [True, False, False, False]])
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    coef = oracle_coefficients(decisive, mask, floor=0.25)
    assert coef[mask].mean().item() == pytest.approx(1.0)
    assert (coef[~mask] == 0).all()
    assert coef[0, 2].item() == pytest.approx(4 * coef[0, 0].item())
    assert credit_auc(coef, decisive, mask) == 1.0
    assert torch.equal(oracle_coefficients(torch.zeros_like(mask), mask, 0.1), mask.float())


def test_gradient_cosine():
    a = [torch.tensor([1.0, 0.0]), None, torch.tensor([[2.0]])]
    b = [torch.tensor([1.0, 1.0]), torch.tensor([3.0]), torch.tensor([[0.0]])]
    assert gradient_cosine(a, b) == pytest.approx(1.0 / (5 ** 0.5 * 11 ** 0.5))
    assert gradient_cosine(a, [None, None, None]) is None


def test_sparse_task_reward_and_decisive_tokens():
    t = SparseAnswerTask(filler_len=4, n_heldout=32)
    p = t.heldout[0]
    a, b = map(int, p.prompt[:-1].split("+"))
    assert p.answer == str(a + b)
    demo = t.demonstration(p, torch.Generator().manual_seed(0))
    assert len(demo) == 5 + len(p.answer) and demo[4] == "|" and t.reward(demo, p) == 1.0
    assert t.reward("zz" + demo, p) == 1.0 and t.reward(demo[:4], p) == 0.0  # filler free; no "|": wrong
    assert t.decisive(list(demo) + [EOS], p, EOS) == [False] * 5 + [True] * (len(p.answer) + 1)
    assert not set(p.prompt for p in t.sample(200, torch.Generator().manual_seed(1))) & {q.prompt for q in t.heldout}
    with pytest.raises(ValueError, match="--filler-len"):
        SparseAnswerTask(filler_len=-1)
    with pytest.raises(ValueError, match="--filler-chars"):
        SparseAnswerTask(filler_chars=17)


def test_pathstar_decisive_tokens_are_the_choice_and_copy_errors():
    t = PathStarTask(branches=3, path_len=4, n_heldout=8)
    p = Problem(prompt="3141,5926,7358>6=", answer="5926")
    assert t.reward("5926", p) == 1.0 and t.reward("7358", p) == 0.0
    assert t.decisive(list("5926") + [EOS], p, EOS) == [True, False, False, False, False]
    assert t.decisive(list("7358") + [EOS], p, EOS) == [True, False, False, False, False]  # wrong arm, copied
    assert t.decisive(list("7318") + [EOS], p, EOS) == [True, False, True, False, False]  # a copy error
    assert t.decisive(list("73589"), p, EOS) == [True, False, False, False, True]  # no eos where due
    assert t.decisive(list("0926"), p, EOS) == [True, False, False, False]  # no arm starts with 0
    for q in t.heldout:
        arms = q.prompt.split(">")[0].split(",")
        assert q.answer in arms and q.prompt.endswith(f">{q.answer[-1]}=")
        assert len({x[0] for x in arms}) == 3 and len({x[-1] for x in arms}) == 3
    with pytest.raises(ValueError, match="--branches"):
        PathStarTask(branches=7)


def test_task_choices_in_help_and_bad_task():
    assert "{" + ",".join(TASKS) + "}" in build_parser().format_help()
    with pytest.raises(ValueError, match="--task: unknown task 'chess'"):
        build_task(TrainerConfig(task="chess"))
    with pytest.raises(SystemExit):
        parse_config(["--task", "chess"])


@pytest.mark.parametrize("task, credit", [("sparse", "oracle"), ("pathstar", "none")])
def test_run_logs_credit_auc_and_alignment(tmp_path, task, credit):
    s = run(tiny(tmp_path, f"{task}_{credit}", task=task, credit=credit, path_len=3))
    rows = read_metrics(os.path.join(s["out"], "metrics.jsonl"))
    assert all(r["forwards_alignment"] == 1 for r in rows)
    for r in rows:
        assert 0 < r["decisive_frac"] < 1
        aligned = r["grad_alignment"]
        assert aligned != aligned or -1.0 <= aligned <= 1.0 + 1e-9  # NaN when the step has no gradient
    if credit == "oracle":
        assert all(r["credit_auc"] == 1.0 for r in rows)
    else:
        assert all(r["credit_auc"] == 0.5 for r in rows)
    summary = json.load(open(os.path.join(s["out"], "summary.json")))
    assert summary["task"] == task and summary["credit_auc_mean"] == rows[0]["credit_auc"]
    late = [r["heldout_accuracy"] for r in rows][-2:]
    assert summary["final_heldout_accuracy"] == pytest.approx(sum(late) / 2)
    assert summary["mean_train_reward"] == pytest.approx(sum(r["reward"] for r in rows) / len(rows))
    assert 'class="tok dec"' in open(os.path.join(s["out"], "responses.html")).read()


def test_warm_start_cache_changes_nothing(tmp_path):
    cache = str(tmp_path / "warm.pt")
    plain = run(tiny(tmp_path, "plain", steps=2, seed=7))
    first = run(tiny(tmp_path, "writes", steps=2, seed=7, warm_start_cache=cache))
    assert os.path.exists(cache)
    second = run(tiny(tmp_path, "reads", steps=2, seed=7, warm_start_cache=cache, credit="oracle"))
    rows = [read_metrics(os.path.join(s["out"], "metrics.jsonl")) for s in (plain, first, second)]
    assert deterministic_view(rows[0]) == deterministic_view(rows[1])
    assert rows[2][0]["reward"] == rows[0][0]["reward"]  # same weights, same prompts and samples at step 0
    assert second["accuracy_before_rl"] == plain["accuracy_before_rl"]
    with pytest.raises(ValueError, match="--warm-start-cache: .* other settings \\(filler_len\\)"):
        run(tiny(tmp_path, "other", steps=1, seed=7, warm_start_cache=cache, filler_len=5))
    # --warm-start-seed: seed 8 starts from seed 7's warm start (the cached file), with its own RL stream
    shared = run(tiny(tmp_path, "shared", steps=1, seed=8, warm_start_seed=7, warm_start_cache=cache))
    assert shared["accuracy_before_rl"] == plain["accuracy_before_rl"]
    own = read_metrics(os.path.join(shared["out"], "metrics.jsonl"))[0]
    assert deterministic_view([own]) != deterministic_view(rows[1][:1])
