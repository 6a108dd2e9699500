"""Reference dual-clip DAPO surrogate (verl's compute_policy_loss_vanilla), aggregated by
delta_kernels.aggregation (verl's agg_loss)."""
from __future__ import annotations

from typing import Dict, Tuple

import torch

from .._checks import SurrogateConfig, compute_dtype
from ..aggregation import Aggregation, aggregate


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


def clipped_surrogate_loss(logp, old_logp, adv, mask, coef, rollout_is_weights, cfg: SurrogateConfig,
                           agg: Aggregation) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """All inputs shaped like logp ([N] or [B, T]); mask bool. Differentiable in logp.
    Padding is selected away before any arithmetic, so its values never reach a result."""
    extra = tuple(t.dtype for t in (coef, rollout_is_weights) if t is not None)
    dtype = compute_dtype(logp.dtype, old_logp.dtype, adv.dtype, *extra)
    rows_shape = (1, logp.shape[0]) if logp.dim() == 1 else tuple(logp.shape)
    valid = mask.reshape(rows_shape)

    def take(t, fill=0.0):
        return torch.where(valid, t.reshape(rows_shape).to(dtype), fill)

    a = take(adv) if coef is None else take(adv) * take(coef)
    loss, clipped, clipped_lower, log_ratio = token_losses(take(logp), take(old_logp), a, cfg)
    if rollout_is_weights is not None:
        loss = loss * take(rollout_is_weights)
    zero = torch.zeros((), dtype=dtype, device=logp.device)
    with torch.no_grad():
        stats = [valid.to(dtype).sum(-1), (clipped & valid).to(dtype).sum(-1),
                 (clipped_lower & valid).to(dtype).sum(-1), torch.where(valid, -log_ratio, zero).sum(-1)]
    rows = torch.stack([torch.where(valid, loss, zero).sum(-1), *stats], dim=-1)
    loss, metrics, _ = aggregate(rows, agg, rows_shape[1])
    return loss, metrics
