"""The trainer's --delta-vectors head: DelTA on the LM-head gradient's factors (head_gradient_sketch),
one pass and micro-batched, against the float64 reference on explicit z = u (x) s; a run; the flags' checks."""
from __future__ import annotations

import os

import pytest
import torch

import delta_kernels
from delta_kernels.trainer.__main__ import parse_config
from delta_kernels.trainer.loop import run
from delta_kernels.trainer.model import lm_head_of
from delta_kernels.trainer.report import read_metrics
from delta_kernels.trainer.step import CreditConfig, credit_coefficients, old_logprob_micro_batches, old_logprob_pass
from helpers import TOL, assert_rel
from test_trainer import sampled_rollout, tiny_config


def rollout_and_advantages():
    return sampled_rollout(3, 40, 1, 4, [1, 0, 0, 1, 0, 1, 1, 0, 1, 1, 0, 0])


@pytest.mark.parametrize("vocab_sketch_dim,sketch_dim", [(None, None), (8, 16)])
def test_head_vectors_coefficients_match_float64_reference(vocab_sketch_dim, sketch_dim):
    model, roll, adv = rollout_and_advantages()
    credit = CreditConfig(k=2, vectors="head", vocab_sketch_dim=vocab_sketch_dim, sketch_dim=sketch_dim)
    old = old_logprob_pass(model, roll, 0.9, adv, credit)
    assert old.vectors is None and old.side_sums is None
    coef, stats = credit_coefficients(old, adv, roll.response_mask, credit)
    head = lm_head_of(model)
    u, s = delta_kernels.head_gradient_sketch(old.hidden.double(), head.weight.detach().double(), roll.response_ids,
                                              vocab_sketch_dim=vocab_sketch_dim, sketch_dim=sketch_dim,
                                              temperature=0.9, backend="torch")
    z = (u[..., :, None] * s[..., None, :]).flatten(-2)
    ref = delta_kernels.delta_coefficients(None, old.logp.double(), adv.double(), roll.response_mask, vectors=z, k=2,
                                           backend="torch")
    assert_rel(coef, ref.coef, TOL[torch.float32], "coef")
    assert stats.W.numel() == z.shape[-1]
    for micro_batch in (1, 5):
        mb = CreditConfig(k=2, vectors="head", vocab_sketch_dim=vocab_sketch_dim, sketch_dim=sketch_dim,
                          micro_batch=micro_batch)
        mb_coef, _ = credit_coefficients(old_logprob_micro_batches(model, roll, 0.9, mb), adv, roll.response_mask, mb)
        assert_rel(mb_coef, coef, TOL[torch.float32], f"coef micro_batch={micro_batch}")


def test_head_run_writes_delta_metrics(tmp_path):
    res = run(tiny_config(tmp_path, "head", steps=2, sft_max_steps=5, delta_vectors="head", vocab_sketch_dim=4,
                          sketch_dim=8))
    rows = read_metrics(os.path.join(res["out"], "metrics.jsonl"))
    assert [r["step"] for r in rows] == [0, 1]
    for r in rows:
        assert r["delta_gamma_pos"] > 0 and r["delta_gamma_neg"] > 0


@pytest.mark.parametrize("argv, message", [
    (["--delta-vectors", "token"], "invalid choice: 'token'"),
    (["--vocab-sketch-dim", "0"], "--vocab-sketch-dim must be >= 1"),
])
def test_bad_head_flags(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_config(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_head_flags_parse():
    cfg = parse_config(["--delta-vectors", "head", "--vocab-sketch-dim", "16", "--sketch-dim", "64"])
    assert (cfg.delta_vectors, cfg.vocab_sketch_dim, cfg.sketch_dim) == ("head", 16, 64)
