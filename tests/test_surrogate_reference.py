"""The reference surrogate against a hand computation for each aggregation mode."""
import math

import pytest
import torch

import delta_kernels as dk
from delta_kernels.aggregation import AGG_MODES

F64 = torch.float64


def hand_case():
    """[3, 3] tokens built to hit each branch (A = adv * coef):
    (0,0) A=+1, ratio 1.5: pg1=-1.5, pg2=-1.28 -> -1.28, clipped
    (0,1) A=+1, ratio 0.5: pg1=-0.5, pg2=-0.8 -> -0.5
    (0,2) A=-1, ratio 0.5: pg1=0.5, pg2=0.8 -> 0.8, clipped; below clip_c*1 = 10
    (1,0) A=-1, ratio 20: pg1=20, pg2=1.28 -> 20, dual clip -> 10 (lower clip)
    (1,1) A=+2 (adv 1, coef 2), ratio 1: -2
    (1,2) masked; row 2 fully masked
    token losses [[-1.28, -0.5, 0.8], [10, -2, .], [., ., .]]; row sums -0.98 and 8 over 3 and 2
    valid tokens; 2 non-empty rows.
    """
    old = torch.full((3, 3), -5.0, dtype=F64)
    ratio = torch.tensor([[1.5, 0.5, 0.5], [20.0, 1.0, 3.0], [2.0, 0.3, 1.1]], dtype=F64)
    logp = (old + ratio.log()).requires_grad_(True)
    adv = torch.tensor([[1, 1, -1], [-1, 1, 5], [3, -2, 1]], dtype=F64)
    coef = torch.tensor([[1, 1, 1], [1, 2, 1], [1, 1, 1]], dtype=F64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    return logp, old, adv, coef, mask, ratio


# Every mode of the library's one list has its hand value here (a mode added without one fails).
HAND_LOSSES = {
    "token-mean": (-1.28 - 0.5 + 0.8 + 10 - 2) / 5,
    "token-sum": -1.28 - 0.5 + 0.8 + 10 - 2,
    "seq-mean-token-sum": (-0.98 + 8) / 2,
    "seq-mean-token-mean": (-0.98 / 3 + 8 / 2) / 2,
    "seq-mean-token-sum-norm": (-0.98 + 8) / 2 / 3,
}


def test_every_mode_has_a_hand_value():
    assert set(HAND_LOSSES) == set(AGG_MODES)


@pytest.mark.parametrize("agg", AGG_MODES)
def test_hand_computed_losses(agg):
    logp, old, adv, coef, mask, ratio = hand_case()
    loss, metrics = dk.clipped_surrogate_loss(logp, old, adv, mask, coef=coef, agg=agg, backend="torch")
    assert loss.item() == pytest.approx(HAND_LOSSES[agg], abs=1e-12)
    assert metrics["clip_frac"].item() == pytest.approx(2 / 5)
    assert metrics["clip_frac_lower"].item() == pytest.approx(1 / 5)
    kl = -(math.log(1.5) + 2 * math.log(0.5) + math.log(20.0)) / 5
    assert metrics["ppo_kl"].item() == pytest.approx(kl)


@pytest.mark.parametrize("agg,scale", [("token-mean", 2 / 40), ("seq-mean-token-sum-norm", 2 / 9 / 7)])
def test_hand_computed_normalisers(agg, scale):
    """dp_size=2 with global counts 40 tokens / 9 sequences, loss_scale_factor 7: sums times the scale."""
    logp, old, adv, coef, mask, _ = hand_case()
    loss, _ = dk.clipped_surrogate_loss(logp, old, adv, mask, coef=coef, agg=agg, dp_size=2, batch_num_tokens=40,
                                        global_batch_size=9, loss_scale_factor=7, backend="torch")
    assert loss.item() == pytest.approx((-0.98 + 8) * scale, abs=1e-12)


def test_hand_computed_gradient_token_mean():
    # Only unclipped tokens carry gradient: d(-A ratio)/dlogp = -A ratio; token-mean divides by 5.
    logp, old, adv, coef, mask, ratio = hand_case()
    loss, _ = dk.clipped_surrogate_loss(logp, old, adv, mask, coef=coef, backend="torch")
    loss.backward()
    expected = torch.zeros(3, 3, dtype=F64)
    expected[0, 1] = -1 * 0.5 / 5
    expected[1, 1] = -2 * 1.0 / 5
    torch.testing.assert_close(logp.grad, expected)


@pytest.mark.parametrize("agg", AGG_MODES)
def test_gradcheck(agg):
    g = torch.Generator().manual_seed(1)
    old = -torch.rand(3, 5, generator=g, dtype=F64) - 0.1
    logp = (old + 0.3 * torch.randn(3, 5, generator=g, dtype=F64)).clamp(max=-1e-3).requires_grad_(True)
    adv, coef = torch.randn(3, generator=g, dtype=F64), torch.rand(3, 5, generator=g, dtype=F64) + 0.5
    isw = torch.rand(3, 5, generator=g, dtype=F64) + 0.5
    mask = torch.rand(3, 5, generator=g) > 0.2
    def f(lp):
        return dk.clipped_surrogate_loss(lp, old, adv, mask, coef=coef, agg=agg, rollout_is_weights=isw,
                                         backend="torch", check_values=False)[0]
    assert torch.autograd.gradcheck(f, (logp,))


def test_no_coef_equals_unit_coef_and_seq_advantages():
    logp, old, adv, coef, mask, _ = hand_case()
    seq_adv = torch.tensor([0.7, -1.1, 0.4], dtype=F64)
    a, _ = dk.clipped_surrogate_loss(logp, old, seq_adv, mask, backend="torch")
    b, _ = dk.clipped_surrogate_loss(logp, old, seq_adv[:, None].expand(3, 3), mask,
                                     coef=torch.ones(3, 3, dtype=F64), backend="torch")
    assert a.item() == b.item()


@pytest.mark.parametrize("agg", AGG_MODES)
def test_fully_masked_loss_is_zero(agg):
    """verl divides 0 by 0 here; an all-padding micro-batch gives loss 0 and zero gradients."""
    logp, old, adv, coef, _, _ = hand_case()
    loss, metrics = dk.clipped_surrogate_loss(logp, old, adv, torch.zeros(3, 3, dtype=torch.bool), agg=agg,
                                              backend="torch")
    loss.backward()
    assert loss.item() == 0.0 and all(v.item() == 0.0 for v in metrics.values())
    assert torch.equal(logp.grad, torch.zeros_like(logp))
