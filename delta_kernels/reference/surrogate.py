"""Reference dual-clip DAPO surrogate (verl's compute_policy_loss_vanilla + agg_loss)."""
from __future__ import annotations

from typing import Dict, Tuple

import torch

from .._checks import SurrogateConfig, compute_dtype


def token_losses(logp, old_logp, adv, cfg: SurrogateConfig):
    """Per-token loss and the clip indicators; all tensors of one shape."""
    log_ratio = (logp - old_logp).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    clip1 = torch.maximum(pg1, pg2)
    pg3 = -adv * cfg.clip_c
    loss = torch.where(adv < 0, torch.minimum(clip1, pg3), clip1)
    clipped = pg2 > pg1
    clipped_lower = (clip1 > pg3) & (adv < 0)
    return loss, clipped, clipped_lower, log_ratio


def aggregate(loss, valid, agg: str):
    """verl's agg_loss. ``valid`` is 0/1 of loss's dtype; seq-* modes need [B, T]."""
    if agg == "token-mean":
        return (loss * valid).sum() / valid.sum().clamp_min(1)
    seq_sum = (loss * valid).sum(-1)
    if agg == "seq-mean-token-sum":
        return seq_sum.mean()
    if agg == "seq-mean-token-mean":
        return (seq_sum / valid.sum(-1).clamp_min(1)).mean()
    return seq_sum.sum() / loss.shape[-1]  # seq-mean-token-sum-norm: divide by T


def clipped_surrogate_loss(logp, old_logp, adv, mask, coef, cfg: SurrogateConfig
                           ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """All inputs shaped like logp ([N] or [B, T]); mask bool. Differentiable in logp."""
    dtype = compute_dtype(logp.dtype, old_logp.dtype, adv.dtype, *(() if coef is None else (coef.dtype,)))
    valid = mask.to(dtype)
    a = adv.to(dtype) * valid
    if coef is not None:
        a = a * coef.to(dtype)
    loss, clipped, clipped_lower, log_ratio = token_losses(logp.to(dtype), old_logp.to(dtype), a, cfg)
    n = valid.sum().clamp_min(1)
    with torch.no_grad():
        metrics = dict(clip_frac=(clipped.to(dtype) * valid).sum() / n,
                       clip_frac_lower=(clipped_lower.to(dtype) * valid).sum() / n,
                       ppo_kl=(-log_ratio * valid).sum() / n)
    return aggregate(loss, valid, cfg.agg), metrics
