"""Naive DelTA: the structure of the published implementation, kept as the baseline to beat.

It mirrors RUCBM/DelTA's ``compute_log_prob_h``: K+3 separate passes over the batch in
micro-batches (statistics, temperatures, K refinements, final weights), each one rebuilding
the [mb, S, H] token-vector tensor from the hidden states (where the published code re-runs
the model forward), then explicit [mb, S, H] difference tensors ``v - mu`` and squared
distances. Same numbers as the reference (tests check it); none of its speed.
"""
from __future__ import annotations

import torch


def _vectors(hidden, logp, dtype):
    return -torch.expm1(logp.to(dtype)).unsqueeze(-1) * hidden.to(dtype)  # [mb, S, H]


def delta_coefficients_naive(hidden: torch.Tensor, logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                             *, k: int = 1, lam_min: float = 0.8, lam_max: float = 1.2, eps: float = 1e-8,
                             micro_batch: int = 8) -> torch.Tensor:
    """hidden [B, S, H], logp [B, S], advantages [B] or [B, S], mask [B, S] -> coef [B, S]
    (float32, float64 for float64 inputs). Per call statistics, as published."""
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(logp)
    adv = advantages.to(dtype)
    valid = mask.to(dtype)
    chunks = list(range(0, hidden.shape[0], micro_batch))
    h_dim, dev = hidden.shape[-1], hidden.device

    def passes():  # one "model forward" per micro-batch: rebuild v
        for s in chunks:
            e = s + micro_batch
            yield slice(s, e), _vectors(hidden[s:e], logp[s:e], dtype)

    def sq_dist(v, mu):
        diff = v - mu  # [mb, S, H]
        return (diff * diff).sum(-1)

    def side_weights(sl):
        a, m = adv[sl], valid[sl]
        return a.clamp(min=0) * m, (-a).clamp(min=0) * m

    # Pass 1: statistics.
    num_p, num_n = torch.zeros(h_dim, dtype=dtype, device=dev), torch.zeros(h_dim, dtype=dtype, device=dev)
    den_p, den_n = torch.zeros((), dtype=dtype, device=dev), torch.zeros((), dtype=dtype, device=dev)
    for sl, v in passes():
        wp, wn = side_weights(sl)
        num_p += (wp.unsqueeze(-1) * v).sum((0, 1))
        num_n += (wn.unsqueeze(-1) * v).sum((0, 1))
        den_p += wp.sum()
        den_n += wn.sum()
    mu_p, mu_n = num_p / den_p.clamp(min=eps), num_n / den_n.clamp(min=eps)

    def temperatures(mu_p, mu_n):
        pos_m, neg_m = [], []
        for sl, v in passes():
            m = sq_dist(v, mu_n) - sq_dist(v, mu_p)
            pos = (adv[sl] > 0) & mask[sl]
            neg = (adv[sl] < 0) & mask[sl]
            pos_m.append(m[pos])
            neg_m.append(-m[neg])
        def std(x):
            x = torch.cat(x)
            if x.numel() == 0:
                return torch.tensor(eps, dtype=dtype, device=dev).sqrt()
            return ((x - x.mean()) ** 2).mean().clamp(min=eps).sqrt()
        return std(pos_m), std(neg_m)

    # Pass 2: temperatures.
    g_p, g_n = temperatures(mu_p, mu_n)
    # Passes 3 .. K+2: refinement (gates, new centroids, temperatures of the old centroids).
    for _ in range(k):
        num_p, num_n = torch.zeros(h_dim, dtype=dtype, device=dev), torch.zeros(h_dim, dtype=dtype, device=dev)
        den_p, den_n = torch.zeros((), dtype=dtype, device=dev), torch.zeros((), dtype=dtype, device=dev)
        for sl, v in passes():
            m = sq_dist(v, mu_n) - sq_dist(v, mu_p)
            wp, wn = side_weights(sl)
            wp, wn = wp * torch.sigmoid(m / g_p), wn * torch.sigmoid(-m / g_n)
            num_p += (wp.unsqueeze(-1) * v).sum((0, 1))
            num_n += (wn.unsqueeze(-1) * v).sum((0, 1))
            den_p += wp.sum()
            den_n += wn.sum()
        g_p, g_n = temperatures(mu_p, mu_n)
        mu_p, mu_n = num_p / den_p.clamp(min=eps), num_n / den_n.clamp(min=eps)
    # Pass K+3: final weights.
    coef = torch.zeros(logp.shape, dtype=dtype, device=dev)
    for sl, v in passes():
        m = sq_dist(v, mu_n) - sq_dist(v, mu_p)
        a, msk = adv[sl], mask[sl]
        c = torch.full_like(m, lam_min)
        c = torch.where(a > 0, lam_min + (lam_max - lam_min) * torch.sigmoid(m / g_p), c)
        c = torch.where(a < 0, lam_min + (lam_max - lam_min) * torch.sigmoid(-m / g_n), c)
        coef[sl] = c * msk.to(dtype)
    return coef * valid.sum() / coef.sum().clamp(min=eps)
