"""The verl plugin's FIPO policy loss (loss_mode "delta_fipo") against the FIPO authors' future_kl
loss written out in float64 (tests/test_fipo.py) on the same batch: value and gradient, four modes."""
from __future__ import annotations

import pytest
import torch

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
ActorConfig = pytest.importorskip("verl.workers.config.actor").ActorConfig
verl_credit = pytest.importorskip("delta_kernels.integrations.verl").verl_credit

from test_fipo import CLIP_C, CLIP_HIGH, CLIP_LOW, authors_loss, fipo_batch  # noqa: E402


def actor_config():
    return ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, use_torch_compile=False,
                       clip_ratio_low=CLIP_LOW, clip_ratio_high=CLIP_HIGH, clip_ratio_c=CLIP_C)


def test_registered_as_a_verl_policy_loss():
    assert core_algos.get_policy_loss_fn("delta_fipo") is verl_credit.compute_policy_loss_delta_fipo


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean",
                                  "seq-mean-token-sum-norm"])
def test_policy_loss_equals_the_authors_future_kl_loss(mode):
    logp, old, adv, mask = fipo_batch(5, 40, seed=4, dtype=torch.float64, pad_nan=False)
    adv_t = adv[:, None].expand_as(logp).contiguous()
    ref_lp, lp = logp.clone().requires_grad_(), logp.clone().requires_grad_()
    ref = authors_loss(ref_lp, old, adv_t, mask, mode)
    loss, metrics = core_algos.get_policy_loss_fn("delta_fipo")(old, lp, adv_t, mask.double(), mode, actor_config())
    (ref + loss).backward()
    assert abs(float(loss) - float(ref)) <= 1e-7 * abs(float(ref))
    assert float((lp.grad - ref_lp.grad).norm()) <= 1e-7 * float(ref_lp.grad.norm())
    assert metrics["actor/fipo/rows_dropped"] >= 1 and "actor/pg_clipfrac" in metrics


def test_options_under_the_authors_keys():
    assert verl_credit.fipo_options(None) == verl_credit.FipoOptions()
    opts = verl_credit.fipo_options({"decay_rate": 8, "future_kl_clip_ratio": 0.0, "safety_thresh": None})
    assert opts.decay_rate == 8.0 and opts.future_kl_clip_ratio == 0.0 and opts.safety_thresh == 10.0
    with pytest.raises(ValueError, match="^decay_rate: must be > 0"):
        verl_credit.fipo_options({"decay_rate": 0})
