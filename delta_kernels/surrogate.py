"""Phase C: the weighted dual-clip DAPO surrogate."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from . import _checks as C
from ._backends import resolve
from .aggregation import SEQUENCE_MODES, Aggregation
from .credit.registry import fused_in_loss, in_loss_credit


def surrogate_aggregation(agg: str, shape, dp_size: int, batch_num_tokens, global_batch_size,
                          loss_scale_factor) -> Aggregation:
    """The validated Aggregation of a surrogate call whose tokens have ``shape`` ([N] or [B, T])."""
    a = Aggregation(agg, dp_size, batch_num_tokens, global_batch_size, loss_scale_factor)
    if agg in SEQUENCE_MODES and len(shape) != 2:
        C.fail("agg", f"{agg!r} aggregates per sequence and needs [B, T] inputs, got shape {list(shape)}")
    return a


def clipped_surrogate_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                           *, coef: Optional[torch.Tensor] = None, clip_low: float = 0.2, clip_high: float = 0.28,
                           clip_c: float = 10.0, agg: str = "token-mean", dp_size: int = 1,
                           batch_num_tokens: Optional[float] = None, global_batch_size: Optional[float] = None,
                           loss_scale_factor: Optional[float] = None,
                           rollout_is_weights: Optional[torch.Tensor] = None, credit=None,
                           entropy: Optional[torch.Tensor] = None, credit_group=None, backend: str = "auto",
                           check_values: bool = True) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """DAPO dual-clip surrogate with per-token advantages ``A = advantages * coef`` on valid tokens.

    ratio = exp(clamp(logp - old_logp, -20, 20)); l = max(-A ratio, -A clamp(ratio, 1-clip_low,
    1+clip_high)); for A < 0, l = min(l, -A clip_c); l is multiplied by rollout_is_weights.
    Aggregated exactly as verl 0.9.1's agg_loss (delta_kernels.aggregation): agg is one of
    "token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
    "seq-mean-token-sum-norm" (seq-* modes need [B, T] inputs; fully masked rows are left out
    of their mean). Padding is don't-care: values at masked positions are never read.

    Args:
        logp: [N] or [B, T] current log-probs (differentiable). old_logp: same shape.
        advantages: shaped like logp, or [B] per sequence. mask: like logp, bool or 0/1.
        coef: optional per-token coefficients shaped like logp (delta_coefficients(...).coef).
        dp_size, batch_num_tokens, global_batch_size, loss_scale_factor: verl's normalisers
            (see delta_kernels.aggregation.Aggregation); dp_size > 1 needs the global count.
        rollout_is_weights: optional per-token weights on the loss, shaped like logp
            (verl's off-policy correction; not applied to the metrics).
        credit: optional in-loss credit (delta_kernels.credit): a spec such as "fipo",
            "entropy", "fipo*entropy" or a credit_spec(...) with options. Its weights are
            computed here from the detached current logp (and ``entropy``), multiply coef, and
            its dropped rows leave the mask (FIPO uses this call's clip_c). [B, T] inputs only.
        entropy: [B, T] per-token entropies, for the "entropy" method.
        credit_group: torch.distributed group over which the entropy quantile is taken.
    Returns:
        (loss [] , metrics {clip_frac, clip_frac_lower, ppo_kl, and "<method>/<metric>" of
        credit}), float32 (float64 for float64). The metrics are means over this call's valid
        tokens. The loss is differentiable in logp.
    """
    cfg = C.SurrogateConfig(clip_low=clip_low, clip_high=clip_high, clip_c=clip_c)
    device = C.check_devices(logp=logp, old_logp=old_logp, advantages=advantages, mask=mask, coef=coef,
                             rollout_is_weights=rollout_is_weights)
    logp = C.check_logp("logp", logp, False)
    old_logp = C.check_logp("old_logp", old_logp, False)
    if tuple(old_logp.shape) != tuple(logp.shape):
        C.fail("old_logp", f"shape {list(old_logp.shape)} does not match logp's {list(logp.shape)}")
    aggregation = surrogate_aggregation(agg, logp.shape, dp_size, batch_num_tokens, global_batch_size,
                                        loss_scale_factor)
    valid = C.check_mask(mask, logp.shape, check_values).reshape(logp.shape)
    if check_values:  # padding is don't-care: only valid positions are looked at
        C.check_values_of_logp("logp", logp, valid)
        C.check_values_of_logp("old_logp", old_logp, valid)
    adv = C.check_advantages(advantages, logp, check_values, valid).reshape(logp.shape)
    coef = C.check_token_weights("coef", coef, logp.shape, valid, check_values)
    rollout_is_weights = C.check_token_weights("rollout_is_weights", rollout_is_weights, logp.shape, valid,
                                               check_values)
    dtypes = [t.dtype for t in (logp, old_logp, advantages, coef, rollout_is_weights) if t is not None]
    cdt = C.compute_dtype(*dtypes)  # credit weights come in the inputs' compute dtype: no change
    C.check_representable("clip_c", clip_c, cdt)
    impl = resolve(backend, device, cdt, "clipped_surrogate_loss")
    detach = (lambda t: None if t is None else t.detach())  # noqa: E731
    fused = fused_in_loss(credit, impl.clipped_surrogate_loss, logp, clip_c)
    if fused is not None:  # the backend computes the credit weights inside its surrogate call
        loss, metrics, credit_metrics = impl.clipped_surrogate_loss(
            logp, old_logp.detach(), adv.detach(), valid, detach(coef), detach(rollout_is_weights), cfg, aggregation,
            credit=fused[1])
        return loss, {**metrics, **{f"{fused[0].name}/{k}": v for k, v in credit_metrics.items()}}
    valid, coef, credit_metrics = in_loss_credit(credit, logp, old_logp, adv, valid, coef, entropy, clip_c,
                                                 credit_group, backend)
    loss, metrics = impl.clipped_surrogate_loss(logp, old_logp.detach(), adv.detach(), valid, detach(coef),
                                                detach(rollout_is_weights), cfg, aggregation)
    return loss, {**metrics, **credit_metrics}
