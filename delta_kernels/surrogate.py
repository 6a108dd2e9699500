"""Phase C: the weighted dual-clip DAPO surrogate."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from . import _checks as C
from ._backends import resolve


def clipped_surrogate_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                           *, coef: Optional[torch.Tensor] = None, clip_low: float = 0.2, clip_high: float = 0.28,
                           clip_c: float = 10.0, agg: str = "token-mean", backend: str = "auto",
                           check_values: bool = True) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """DAPO dual-clip surrogate with per-token advantages ``A = advantages * coef * mask``.

    ratio = exp(clamp(logp - old_logp, -20, 20)); l = max(-A ratio, -A clamp(ratio, 1-clip_low,
    1+clip_high)); for A < 0, l = min(l, -A clip_c). Aggregated as verl's agg_loss:
    "token-mean" (sum over valid tokens / their count), "seq-mean-token-sum",
    "seq-mean-token-mean", "seq-mean-token-sum-norm" (seq-* modes need [B, T] inputs).

    Args:
        logp: [N] or [B, T] current log-probs (differentiable). old_logp: same shape.
        advantages: shaped like logp, or [B] per sequence. mask: like logp, bool or 0/1.
        coef: optional per-token coefficients shaped like logp (delta_coefficients(...).coef).
    Returns:
        (loss [] , metrics {clip_frac, clip_frac_lower, ppo_kl}), float32 (float64 for float64).
        The loss is differentiable in logp.
    """
    cfg = C.SurrogateConfig(clip_low=clip_low, clip_high=clip_high, clip_c=clip_c, agg=agg)
    device = C.check_devices(logp=logp, old_logp=old_logp, advantages=advantages, mask=mask, coef=coef)
    logp = C.check_logp("logp", logp, check_values)
    old_logp = C.check_tensor("old_logp", old_logp)
    if tuple(old_logp.shape) != tuple(logp.shape):
        C.fail("old_logp", f"shape {list(old_logp.shape)} does not match logp's {list(logp.shape)}")
    old_logp = C.check_logp("old_logp", old_logp, check_values)
    if agg != "token-mean" and logp.dim() != 2:
        C.fail("agg", f"{agg!r} aggregates per sequence and needs [B, T] inputs, got logp of shape {list(logp.shape)}")
    adv = C.check_advantages(advantages, logp, check_values).reshape(logp.shape)
    flat_mask = C.check_mask(mask, logp.shape, check_values)
    if coef is not None:
        coef = C.check_tensor("coef", coef)
        if tuple(coef.shape) != tuple(logp.shape):
            C.fail("coef", f"shape {list(coef.shape)} does not match logp's {list(logp.shape)}")
        if check_values:
            C.check_finite("coef", coef)
    dtypes = [t.dtype for t in (logp, old_logp, advantages, coef) if t is not None]
    cdt = C.compute_dtype(*dtypes)
    C.check_representable("clip_c", clip_c, cdt)
    impl = resolve(backend, device, cdt, "clipped_surrogate_loss")
    return impl.clipped_surrogate_loss(logp, old_logp.detach(), adv.detach(), flat_mask.reshape(logp.shape),
                                       None if coef is None else coef.detach(), cfg)
