"""The small formulas of docs/design.md that touch only [N]- or [D]-sized tensors.

Shared by the reference and the fast pipeline so that the degenerate-batch rules (eps
clamps, empty sides, normalisation) live in one place. The passes over [N, D] arrays are
written separately in each (the reference with plain matmuls, backends with kernels).
``reduce`` sums a tensor over the data-parallel group, or is the identity.
"""
from __future__ import annotations

import torch

from ._checks import DeltaConfig


def discriminator(mu: torch.Tensor):
    """mu [2, D] -> W = mu+ - mu- [D], c = (mu+ + mu-) / 2 [D]: the margin of v is 2 (v - c).W.

    The passes subtract c from v element by element before the dot. The expanded form
    2 (v.W + b), b = -(|mu+|^2 - |mu-|^2) / 2 = -c.W, cancels in float32 when every vector shares
    a large common component (final-layer hidden states do): its error grows with that offset."""
    return mu[0] - mu[1], 0.5 * (mu[0] + mu[1])


def bias(w: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """b = -c.W [] (the stats' offset of the margin: v.W + b = (v - c).W)."""
    return -c.dot(w)


def centroids_from_sums(sums: torch.Tensor, weights: torch.Tensor, eps: float, reduce) -> torch.Tensor:
    """sums [2, D] = (sum w+ v, sum w- v), weights [2] = (sum w+, sum w-) -> mu [2, D].
    One collective: sums and weights travel in one buffer."""
    d = sums.shape[1]
    packed = reduce(torch.cat([sums.reshape(-1), weights.to(sums.dtype)]))
    return packed[:2 * d].reshape(2, d) / packed[2 * d:].clamp_min(eps)[:, None]


def centroids_about(centre: torch.Tensor, sums: torch.Tensor, weights: torch.Tensor, eps: float,
                    reduce) -> torch.Tensor:
    """centroids_from_sums for sums taken about ``centre`` [D]: sums [2, D] = (sum w+ (v - centre),
    sum w- (v - centre)) -> mu [2, D] = centre + sums / weights, so a component every v shares with
    the centre never enters a rounded sum. A side whose weight is below eps gets
    (sums + weight centre) / eps, what centroids_from_sums gives it (an empty side: zero).
    Returns (mu, W, c): the next discriminator straight from the offsets mu - centre, so that W
    does not inherit the rounding of mu (whose magnitude includes the shared component)."""
    d = sums.shape[1]
    packed = reduce(torch.cat([sums.reshape(-1), weights.to(sums.dtype)]))
    s, wts = packed[:2 * d].reshape(2, d), packed[2 * d:, None]
    full = wts >= eps
    off = torch.where(full, s / wts.clamp_min(eps), (s + wts * centre) / eps - centre)
    mu = torch.where(full, centre + off, (s + wts * centre) / eps)
    return mu, off[0] - off[1], centre + 0.5 * (off[0] + off[1])


def side_std(m: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, eps: float, reduce) -> torch.Tensor:
    """[gamma+, gamma-]: population std of m over P and of -m over Q (counts clamped to 1),
    floored at sqrt(eps). Two-pass (mean, then squared deviations): two collectives.

    The deviations are divided by the side's mean |m| before squaring, so margins up to the
    float32 range do not overflow (gamma = scale * sqrt(mean((d / scale)^2)), the same number)."""
    sel = torch.stack([pos, neg])
    signed = torch.where(sel, torch.stack([m, -m]), 0.0)  # selected: m at padding may be anything
    sides = sel.to(m.dtype)
    first = reduce(torch.cat([sides.sum(1), signed.sum(1), signed.abs().sum(1)]))
    n = first[:2].clamp_min(1)
    mean = first[2:4] / n
    scale = (first[4:] / n).clamp_min(1e-30)
    dev = torch.where(sides > 0, (signed - mean[:, None]) / scale[:, None], torch.zeros_like(signed))
    var_scaled = reduce((dev * dev).sum(1)) / n
    # torch.full, not torch.tensor: a fill on the device, no host-to-device copy (CUDA-graph capturable)
    return torch.maximum(scale * var_scaled.sqrt(), torch.full((), eps, dtype=m.dtype, device=m.device).sqrt())


def gates(m: torch.Tensor, gamma: torch.Tensor):
    """g+ = sigmoid(m / gamma+), g- = sigmoid(-m / gamma-)."""
    return torch.sigmoid(m / gamma[0]), torch.sigmoid(-m / gamma[1])


def gated_weights(m: torch.Tensor, gamma: torch.Tensor, a_pos: torch.Tensor, a_neg: torch.Tensor):
    """(g+ a+, g- a-) [N] each, zero wherever the advantage weight is zero (selected, not
    multiplied: m at padding may be anything)."""
    g_pos, g_neg = gates(m, gamma)
    return torch.where(a_pos != 0, g_pos * a_pos, 0.0), torch.where(a_neg != 0, g_neg * a_neg, 0.0)


def final_coefficients(m, gamma, pos, neg, valid, cfg: DeltaConfig, reduce):
    """Steps 5-6: map the final gates to [lam_min, lam_max] and self-normalise.

    Computed divided by lam_min (when > 0): the factor cancels in the normalisation, and a
    batch with all advantages zero then gets coefficients of exactly 1.
    Returns (coef [N], scale [], n_valid []); scale is the spec's factor
    sum(mask) / max(sum(coef before normalisation), eps)."""
    g_pos, g_neg = gates(m, gamma)
    base = cfg.lam_min if cfg.lam_min > 0 else 1.0
    offset, rise = cfg.lam_min / base, (cfg.lam_max - cfg.lam_min) / base
    gate = torch.where(pos, g_pos, torch.where(neg, g_neg, torch.zeros_like(m)))
    u = (offset + rise * gate) * valid
    totals = reduce(torch.stack([valid.sum(), u.sum()]))
    scale = totals[0] / totals[1].clamp_min(cfg.eps)
    return u * scale, scale / base, totals[0]


def side_masks(advantages: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype):
    """-> pos, neg (bool [N]), valid, a_pos, a_neg ([N] of dtype)."""
    adv = advantages.to(dtype)
    valid = mask.to(dtype)
    pos = mask & (advantages > 0)
    neg = mask & (advantages < 0)
    zero = torch.zeros((), dtype=dtype, device=adv.device)
    return pos, neg, valid, torch.where(pos, adv, zero), torch.where(neg, -adv, zero)
