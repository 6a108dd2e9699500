"""FIPO as a verl 0.9.1 policy loss: ``actor_rollout_ref.actor.policy_loss.loss_mode=delta_fipo``.

Registered with verl's ``register_policy_loss`` when delta_kernels.integrations.verl is imported
(every process: the ``verl.plugins`` entry point). It computes FIPO's weights from the current
log-probs (``delta_kernels.fipo_weights``) and the dual-clip surrogate on the same batch with
``delta_kernels.clipped_surrogate_loss``, aggregated by the actor's ``loss_agg_mode`` and
``global_batch_info`` as verl's own losses: the authors' ``future_kl`` loss. Options are read
from ``actor.policy_loss`` under the authors' key names when present (``decay_rate``,
``future_kl_clip_ratio``, ``future_kl_clip_high_only``, ``safety_thresh``), else the paper run's
values (``delta_kernels.credit.fipo.FipoOptions``); c is the actor's ``clip_ratio_c``.
The entropy method needs the entropies, which verl's policy-loss call does not pass: not offered.
"""
from __future__ import annotations

from dataclasses import fields

import torch

from .._optional import require
from ..credit import credit_spec
from ..credit.fipo import FipoOptions
from ..surrogate import clipped_surrogate_loss

LOSS_MODE = "delta_fipo"
_core = require("verl.trainer.ppo.core_algos", "verl")


def fipo_options(policy_loss_config) -> FipoOptions:
    """The FIPO options under the authors' key names in ``actor.policy_loss`` (defaults: FipoOptions)."""
    given = {}
    for f in fields(FipoOptions):
        value = policy_loss_config.get(f.name, None) if policy_loss_config is not None else None
        if value is not None:
            given[f.name] = type(f.default)(value)
    return FipoOptions(**given)


@_core.register_policy_loss(LOSS_MODE)
def compute_policy_loss_delta_fipo(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                                   response_mask: torch.Tensor, loss_agg_mode: str = "token-mean", config=None,
                                   rollout_is_weights=None):
    """verl's policy-loss signature -> (loss, metrics): the FIPO-weighted dual-clip surrogate."""
    if config is None:
        raise ValueError("config: the actor config is required (clip ratios, policy_loss options)")
    low = config.clip_ratio_low if config.clip_ratio_low is not None else config.clip_ratio
    high = config.clip_ratio_high if config.clip_ratio_high is not None else config.clip_ratio
    spec = credit_spec("fipo", fipo=fipo_options(config.policy_loss))
    info = dict(config.global_batch_info) if getattr(config, "global_batch_info", None) else {}
    loss, metrics = clipped_surrogate_loss(log_prob, old_log_prob, advantages, response_mask, credit=spec,
                                           clip_low=low, clip_high=high, clip_c=config.get("clip_ratio_c", 3.0),
                                           agg=loss_agg_mode, rollout_is_weights=rollout_is_weights,
                                           check_values=False, **info)
    names = {"clip_frac": "actor/pg_clipfrac", "clip_frac_lower": "actor/pg_clipfrac_lower", "ppo_kl": "actor/ppo_kl"}
    return loss, {names.get(k, f"actor/{k}"): float(v) for k, v in metrics.items()}
