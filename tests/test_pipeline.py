"""pipeline.run_coefficients over plain-torch pass kernels equals the reference.

Checks the shared orchestration of the fast backends (pass order, temperature lag, gated
denominators) apart from any kernel.
"""
import pytest
import torch

import delta_kernels as dk
from delta_kernels import _checks as C
from delta_kernels.pipeline import run_coefficients
from helpers import CountingPasses, as64, assert_rel, make_batch


def run(passes, h, logp, adv, mask, k, sketch_dim=None, vectors=None):
    flat_adv = C.check_advantages(adv, logp, True)
    batch = C.TokenBatch(shape=tuple(logp.shape), logp=logp.reshape(-1), advantages=flat_adv,
                         mask=mask.reshape(-1), hidden=None if h is None else h.reshape(-1, h.shape[-1]),
                         vectors=vectors)
    return run_coefficients(passes, batch, C.DeltaConfig(k=k), sketch_dim, 0)


@pytest.mark.parametrize("k", [0, 1, 2, 3])
@pytest.mark.parametrize("sketch_dim", [None, 16])
def test_pipeline_equals_reference(k, sketch_dim):
    h, logp, adv, mask = make_batch(7, 9, 40, seed=k)
    passes = CountingPasses()
    coef, weighted, stats = run(passes, h, logp, adv, mask, k, sketch_dim)
    ref = dk.delta_coefficients(*as64(h, logp, adv, mask), k=k, sketch_dim=sketch_dim, backend="torch")
    assert_rel(coef.reshape(7, 9), ref.coef, 1e-5, "coef")
    assert_rel(weighted.reshape(7, 9), ref.weighted_advantages, 1e-5, "weighted_advantages")
    assert_rel(stats.mu_pos, ref.stats.mu_pos, 1e-5, "mu_pos")
    assert_rel(stats.gamma_neg, ref.stats.gamma_neg, 1e-5, "gamma_neg")
    assert_rel(stats.pred.reshape(7, 9), ref.stats.pred, 1e-5, "pred")
    assert passes.reads == (1 if k == 0 else k + 2) + 1  # the docstring's count, + the side sums in token_vectors


def test_pipeline_degenerate_batches():
    h, logp, adv, mask = make_batch(4, 5, 6, seed=1)
    coef = run(CountingPasses(), h, logp, torch.zeros(4), mask, 2).coef
    assert torch.equal(coef[mask.reshape(-1)], torch.ones(int(mask.sum())))
    coef = run(CountingPasses(), h, logp, adv, torch.zeros_like(mask), 2).coef
    assert torch.equal(coef, torch.zeros_like(coef))
    coef, _, st = run(CountingPasses(), h, logp, adv.abs() + 0.5, mask, 1)
    assert torch.isfinite(coef).all() and torch.equal(st.mu_neg, torch.zeros_like(st.mu_neg))
