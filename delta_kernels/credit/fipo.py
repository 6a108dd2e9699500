"""FIPO: future-KL influence weights (in the loss; the FIPO authors' ``future_kl`` policy loss).

Spec and both default sets: docs/design.md, "FIPO". Each valid token's weight is the clipped
exp of the discounted sum of the log-ratios from it to the end of its response; rows with more
than one dual-clipped negative token are dropped.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .. import _checks as C
from .._backends import resolve
from ..reference.fipo import METRICS
from .registry import IN_LOSS, CreditInputs, CreditMethod, CreditWeights, register


class FipoWeights(NamedTuple):
    weights: torch.Tensor    # [B, T] float32 (float64 for float64), 0 at padding; detached
    keep: torch.Tensor       # [B] bool: False for a dropped row (more than one valid A < 0, ratio > clip_c)
    future_kl: torch.Tensor  # [B, T] like weights, 0 at padding


def _check_inputs(logp, old_logp, advantages, mask, check_values: bool):
    """-> logp, old_logp, advantages [B, T], mask [B, T] bool (all admitted)."""
    C.check_devices(logp=logp, old_logp=old_logp, advantages=advantages, mask=mask)
    logp = C.check_logp("logp", logp, False)
    if logp.dim() != 2:
        C.fail("logp", f"FIPO sums over each response: expected [B, T], got shape {list(logp.shape)}")
    old_logp = C.check_logp("old_logp", old_logp, False)
    if tuple(old_logp.shape) != tuple(logp.shape):
        C.fail("old_logp", f"shape {list(old_logp.shape)} does not match logp's {list(logp.shape)}")
    valid = C.check_mask(mask, logp.shape, check_values).reshape(logp.shape)
    if check_values:
        C.check_values_of_logp("logp", logp, valid)
        C.check_values_of_logp("old_logp", old_logp, valid)
    adv = C.check_advantages(advantages, logp, check_values, valid).reshape(logp.shape)
    return logp, old_logp, adv, valid


def fipo_weights(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                 decay_rate: float = 32.0, future_kl_clip_ratio: float = 0.2, future_kl_clip_high_only: bool = True,
                 safety_thresh: float = 10.0, clip_c: float = 10.0, backend: str = "auto",
                 check_values: bool = True) -> FipoWeights:
    """FIPO's per-token influence weights, exactly as the authors' ``compute_policy_loss_future_kl``.

    With D = clamp(logp - old_logp, -20, 20), r = exp(D), gamma = 2^(-1 / decay_rate):
    FutureKL_t = sum_{k >= t} gamma^(k - t) D_k over valid k with D_k <= log(clip_c) (t included);
    f = clamp(exp(FutureKL), 1 - rho, 1 + rho) ([1, 1 + rho] with future_kl_clip_high_only;
    min(exp(FutureKL), 10) for rho = future_kl_clip_ratio = 0); where A < 0 and r >
    safety_thresh, f is clamped to [0.8, 1]. A row with more than one valid token where A < 0
    and r > clip_c is dropped. Defaults: the paper's run (docs/design.md lists the authors'
    dataclass defaults too).

    Args:
        logp: [B, T] current log-probs (read detached). old_logp: [B, T]. advantages: [B, T] or [B].
        mask: [B, T] bool or 0/1. Padding is never read.
        decay_rate > 0, future_kl_clip_ratio >= 0, safety_thresh, clip_c > 1: as above (use the
            surrogate's clip_c).
        backend: "auto" or a registered backend with the fipo_weights op (torch: float64 too).
        check_values: finiteness of logp, old_logp and advantages at valid positions (syncs).
    Returns:
        FipoWeights(weights [B, T], keep [B] bool, future_kl [B, T]); float32, float64 for
        float64 inputs; weights and future_kl 0 at padding. Use them as
        ``clipped_surrogate_loss(..., mask & keep[:, None], coef=weights, clip_c=clip_c)``.
    """
    cfg = C.FipoConfig(decay_rate=decay_rate, future_kl_clip_ratio=future_kl_clip_ratio,
                       future_kl_clip_high_only=future_kl_clip_high_only, safety_thresh=safety_thresh, clip_c=clip_c)
    return _fipo(logp, old_logp, advantages, mask, cfg, backend, check_values)[0]


def _fipo(logp, old_logp, advantages, mask, cfg: C.FipoConfig, backend: str, check_values: bool):
    """-> (FipoWeights, row_stats [B, 5]: the backend's per-row metric partials)."""
    logp, old_logp, adv, valid = _check_inputs(logp, old_logp, advantages, mask, check_values)
    cdt = C.compute_dtype(logp.dtype, old_logp.dtype, adv.dtype)
    impl = resolve(backend, logp.device, cdt, "fipo_weights")
    weights, keep, future_kl, row_stats = impl.fipo_weights(
        logp.detach().contiguous(), old_logp.detach().contiguous(), adv.detach().contiguous(), valid.contiguous(), cfg)
    return FipoWeights(weights, keep, future_kl), row_stats


FipoOptions = C.FipoOptions  # FIPO's options in a credit spec (clip_c is the surrogate's)


def fipo_metrics(fw: FipoWeights, row_stats: torch.Tensor) -> dict:
    """From the per-row partials (count, sum, min, max, at a bound): weight_mean / weight_min /
    weight_max over valid tokens (0 when there are none), rows_dropped, clip_frac (valid tokens
    within 1e-7 of a clip bound, FipoConfig.at_bound_limits). [B]-sized work only."""
    n = row_stats[:, 0].sum()
    some = n > 0
    zero = row_stats.new_zeros(())
    return dict(weight_mean=row_stats[:, 1].sum() / n.clamp_min(1),
                weight_min=torch.where(some, row_stats[:, 2].min(), zero) if len(row_stats) else zero,
                weight_max=torch.where(some, row_stats[:, 3].max(), zero) if len(row_stats) else zero,
                rows_dropped=(~fw.keep).sum().to(row_stats.dtype),
                clip_frac=row_stats[:, 4].sum() / n.clamp_min(1))


def _compute(inputs: CreditInputs, options: FipoOptions) -> CreditWeights:
    cfg = options.config(inputs.clip_c)
    fw, row_stats = _fipo(inputs.logp, inputs.old_logp, inputs.advantages, inputs.mask, cfg, inputs.backend, False)
    return CreditWeights(weights=fw.weights, keep=fw.keep, metrics=fipo_metrics(fw, row_stats))


METHOD = register(CreditMethod(
    name="fipo", kind=IN_LOSS, inputs=("logp", "old_logp", "advantages", "mask"), depends_on_theta=True,
    metrics=METRICS, options=FipoOptions, compute=_compute, fused_config=FipoOptions.config,
    summary="FIPO future-KL influence weights (rows with > 1 dual-clipped negative dropped)"))
