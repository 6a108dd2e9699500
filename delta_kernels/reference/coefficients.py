"""Reference DelTA coefficients, steps 2-7 of docs/design.md, one line of torch per line of spec.

``reduce`` sums a tensor over the data-parallel group (identity for one process); every
statistic goes through it, so several ranks get the answer of one process over the
concatenated batch.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .._checks import BackendCoefficients, DeltaConfig, TokenBatch, compute_dtype
from .._formulas import (bias, centroids_from_sums, discriminator, final_coefficients, gated_weights, side_masks,
                         side_std)
from .sketch import token_vectors

Reduce = Callable[[torch.Tensor], torch.Tensor]


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def delta_coefficients(batch: TokenBatch, cfg: DeltaConfig, sketch_dim: Optional[int], seed: int,
                       reduce: Optional[Reduce] = None) -> BackendCoefficients:
    reduce = reduce or _identity
    src = batch.vectors if batch.vectors is not None else batch.hidden
    dtype = compute_dtype(src.dtype, batch.logp.dtype, batch.advantages.dtype)
    if batch.vectors is not None:
        v = batch.vectors.to(dtype)
    else:
        v = token_vectors(batch.hidden, batch.logp, sketch_dim, seed, dtype)
    v = torch.where(batch.mask[:, None], v, 0.0)  # padding is don't-care: whatever it holds is dropped
    pos, neg, valid, a_pos, a_neg = side_masks(batch.advantages, batch.mask, dtype)

    # float32: the centroids (and W, c from them) are computed in float64 and the discriminator
    # rounded once; in float32 a common offset of the vectors would cost about offset / spread
    # digits of W = mu+ - mu-. The margins subtract the centre first (no cancellation either).
    f64 = torch.float64

    v64 = v.to(f64)  # once (a no-op for float64), not per centroid step

    def centroids(w_pos, w_neg):  # -> mu [2, D] float64
        w2 = torch.stack([w_pos, w_neg]).to(f64)
        return centroids_from_sums(w2 @ v64, w2.sum(1), cfg.eps, reduce)

    def margins(mu):
        w, c = (t.to(dtype) for t in discriminator(mu))
        return 2.0 * ((v - c) @ w)

    if batch.side_sums is not None:
        mu = centroids_from_sums(batch.side_sums.to(f64), torch.stack([a_pos.sum(), a_neg.sum()]).to(f64), cfg.eps,
                                 reduce)
    else:
        mu = centroids(a_pos, a_neg)
    m = margins(mu)
    gamma = side_std(m, pos, neg, cfg.eps, reduce)
    for _ in range(cfg.k):
        w_pos, w_neg = gated_weights(m, gamma, a_pos, a_neg)
        gamma = side_std(m, pos, neg, cfg.eps, reduce)  # temperatures of the centroids used in this step
        mu = centroids(w_pos, w_neg)
        m = margins(mu)

    coef, scale, n_valid = final_coefficients(m, gamma, pos, neg, valid, cfg, reduce)
    w, c = discriminator(mu)
    mu, w, b = mu.to(dtype), w.to(dtype), bias(w, c).to(dtype)
    counts = reduce(torch.stack([pos.sum(), neg.sum()]).to(dtype))  # the compute dtype, as on every backend
    pred = torch.where(batch.mask, torch.sign(batch.advantages.to(dtype)) * (m / 2), 0.0)
    return BackendCoefficients.of(coef, batch, mu_pos=mu[0], mu_neg=mu[1], gamma_pos=gamma[0], gamma_neg=gamma[1],
                                  W=w, b=b, pred=pred, n_pos=counts[0], n_neg=counts[1], n_valid=n_valid,
                                  scale=scale)
