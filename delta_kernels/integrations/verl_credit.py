"""The in-loss credit methods as verl 0.9.1 policy losses, a ``loss_mode`` each:

    actor_rollout_ref.actor.policy_loss.loss_mode=delta_fipo           # FIPO (the authors' future_kl loss)
    actor_rollout_ref.actor.policy_loss.loss_mode=delta_entropy \\
        actor_rollout_ref.actor.calculate_entropy=True                 # high-entropy tokens (80/20)
    actor_rollout_ref.actor.policy_loss.loss_mode=delta_fipo_entropy \\
        actor_rollout_ref.actor.calculate_entropy=True                 # FIPO x entropy

Registered with verl's ``register_policy_loss`` when delta_kernels.integrations.verl is imported
(every process: the ``verl.plugins`` entry point). Each computes its method's weights from the
current log-probs (and entropies) on the batch of the loss call and the dual-clip surrogate with
``delta_kernels.clipped_surrogate_loss(credit=...)``, aggregated by the actor's ``loss_agg_mode``
and ``global_batch_info`` as verl's own losses. DelTA (``+algorithm.delta.enable=True``) is folded
into the advantages before the update, so it composes with any of these (DelTA x entropy:
``algorithm.delta.enable`` plus ``loss_mode=delta_entropy``).

Options, read from ``actor.policy_loss``: FIPO's under the authors' key names (``decay_rate``,
``future_kl_clip_ratio``, ``future_kl_clip_high_only``, ``safety_thresh``; else the paper run's
values, ``delta_kernels.credit.fipo.FipoOptions``), c is the actor's ``clip_ratio_c``; entropy's
``top_quantile`` (else 0.2, ``EntropyOptions``). verl 0.9.1 builds ``policy_loss`` as its
``PolicyLossConfig``, which refuses keys it does not know; ``CreditPolicyLossConfig`` is that
class with these options as fields, so set them with::

    actor_rollout_ref.actor.policy_loss._target_=delta_kernels.integrations.verl_credit.CreditPolicyLossConfig \
        +actor_rollout_ref.actor.policy_loss.top_quantile=0.5 +actor_rollout_ref.actor.policy_loss.decay_rate=64

Entropies: verl's actor computes them when ``actor.calculate_entropy`` is true (or
``entropy_coeff`` != 0) and hands them to ``workers.utils.losses.ppo_loss`` in ``model_output``,
but its call of the policy loss passes only log-probs. ``ppo_loss_passing_entropy`` wraps
``ppo_loss`` (patched by ``verl.install``) to make them visible to the policy loss of the same
call (``policy_entropy``), laid out [B, R] by verl's own ``no_padding_2_padding`` like the
log-probs. The entropy quantile is taken over the valid tokens of the loss call (this rank's
micro-batch), as each loss call of verl sees only its micro-batch.
"""
from __future__ import annotations

import contextvars
import typing
from dataclasses import field, fields, make_dataclass
from typing import Optional

import torch

from .._optional import require
from ..credit import credit_spec
from ..credit.entropy import EntropyOptions
from ..credit.fipo import FipoOptions
from ..surrogate import clipped_surrogate_loss

LOSS_MODES = {"delta_fipo": "fipo", "delta_entropy": "entropy", "delta_fipo_entropy": "fipo*entropy"}
OPTIONS = {"fipo": FipoOptions, "entropy": EntropyOptions}
_core = require("verl.trainer.ppo.core_algos", "verl")
_LOSS_CALL = contextvars.ContextVar("delta_kernels_verl_loss_call", default=None)


def _credit_policy_loss_config():
    """verl's PolicyLossConfig with every option of OPTIONS as a field (None: the method's default)."""
    from verl.workers.config.actor import PolicyLossConfig
    extra = [(f.name, Optional[typing.get_type_hints(cls)[f.name]], field(default=None))
             for cls in OPTIONS.values() for f in fields(cls)]
    return make_dataclass("CreditPolicyLossConfig", extra, bases=(PolicyLossConfig,), namespace={"__module__": __name__})


CreditPolicyLossConfig = _credit_policy_loss_config()


def options_from_config(options_cls, policy_loss_config):
    """A method's options under their field names in ``actor.policy_loss`` (absent or None: the default)."""
    given = {}
    for f in fields(options_cls):
        value = policy_loss_config.get(f.name, None) if policy_loss_config is not None else None
        if value is not None:
            given[f.name] = type(f.default)(value)
    return options_cls(**given)


def ppo_loss_passing_entropy(original):
    """Wrap verl's ``ppo_loss(config, model_output, data, dp_group)`` so that the policy loss it
    calls can read this call's entropies (``policy_entropy``)."""
    def ppo_loss(config, model_output, data, dp_group=None):
        token = _LOSS_CALL.set((model_output, data))
        try:
            return original(config, model_output, data, dp_group)
        finally:
            _LOSS_CALL.reset(token)
    ppo_loss.__wrapped__ = original
    ppo_loss._delta_kernels_patch = True
    return ppo_loss


def policy_entropy(log_prob: torch.Tensor) -> torch.Tensor:
    """The entropies of the enclosing ``ppo_loss`` call, [B, R] like ``log_prob``."""
    call = _LOSS_CALL.get()
    entropy = None if call is None else call[0].get("entropy", None)
    if entropy is None:
        raise ValueError("actor_rollout_ref.actor.calculate_entropy: the entropy credit method needs the actor's "
                         "entropies; set it to True (and load delta_kernels.integrations.verl in the workers, whose "
                         "ppo_loss patch hands them to the policy loss)")
    from verl.workers.utils.padding import no_padding_2_padding
    entropy = no_padding_2_padding(entropy, call[1])
    if tuple(entropy.shape) != tuple(log_prob.shape):
        raise ValueError(f"entropy: shape {list(entropy.shape)} does not match log_prob's {list(log_prob.shape)}")
    return entropy


def _credit_policy_loss(mode: str, spec_name: str):
    names = spec_name.split("*")

    def policy_loss(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                    response_mask: torch.Tensor, loss_agg_mode: str = "token-mean", config=None,
                    rollout_is_weights=None):
        if config is None:
            raise ValueError("config: the actor config is required (clip ratios, policy_loss options)")
        low = config.clip_ratio_low if config.clip_ratio_low is not None else config.clip_ratio
        high = config.clip_ratio_high if config.clip_ratio_high is not None else config.clip_ratio
        spec = credit_spec(spec_name, **{n: options_from_config(OPTIONS[n], config.policy_loss) for n in names})
        entropy = policy_entropy(log_prob) if "entropy" in names else None
        info = dict(config.global_batch_info) if getattr(config, "global_batch_info", None) else {}
        loss, metrics = clipped_surrogate_loss(log_prob, old_log_prob, advantages, response_mask, credit=spec,
                                               entropy=entropy, clip_low=low, clip_high=high,
                                               clip_c=config.get("clip_ratio_c", 3.0), agg=loss_agg_mode,
                                               rollout_is_weights=rollout_is_weights, check_values=False, **info)
        renamed = {"clip_frac": "actor/pg_clipfrac", "clip_frac_lower": "actor/pg_clipfrac_lower",
                   "ppo_kl": "actor/ppo_kl"}
        return loss, {renamed.get(k, f"actor/{k}"): float(v) for k, v in metrics.items()}
    policy_loss.__name__ = policy_loss.__qualname__ = f"compute_policy_loss_{mode}"
    policy_loss.__doc__ = (f"verl's policy-loss signature -> (loss, metrics): the dual-clip surrogate with "
                           f"credit {spec_name!r}.")
    return _core.register_policy_loss(mode)(policy_loss)


POLICY_LOSSES = {mode: _credit_policy_loss(mode, spec) for mode, spec in LOSS_MODES.items()}
compute_policy_loss_delta_fipo = POLICY_LOSSES["delta_fipo"]
compute_policy_loss_delta_entropy = POLICY_LOSSES["delta_entropy"]
