"""The coefficient pipeline of the fast backends, written once over three pass kernels.

(The triton backend's call runs the same steps fused into its kernels,
delta_kernels/triton/fused.py, in 2k + 6 launches, with or without a process group; in
DeltaAccumulator, and for rows too wide for one tile, it runs this pipeline over its unfused passes.)

A backend (cpp, cuda, triton) supplies the passes over the big [N, H] / [N, D] arrays;
everything else is a handful of [N]- and [D]-sized torch ops on the same device (no host
synchronisation). Kernels keep v in its input dtype and accumulate in float32. The [N]- and
[D]-sized arithmetic runs in ``kernels.compute_dtype`` when the kernel set has one (the plain-torch
passes of reference/passes.py compute in float64 for float64 inputs), else in float32.

Kernel contract (all tensors contiguous, on one device; float32 unless stated; hidden and v may be
the caller's [B, T, D] views for a backend that declares strided_rows, docs/backends.md "Strided rows"):
    token_vectors(hidden [N,H], logp [N], a_pos [N], a_neg [N], sketch_dim, seed)
        -> v [N,D] in hidden's dtype (D = H, or r with the sketch of sketch_matrix.py),
           sums [2,D] = (sum a_pos v, sum a_neg v)          one read of hidden
    side_sums(v [N,D], a_pos [N], a_neg [N]) -> sums [2,D]  one read of v
    margin_pass(v [N,D], w [D], c [D], gate) -> (m [N], sums [2,D] or None)
        m = 2 (v - c).w, c subtracted from each element before the dot (exact under an offset
        the vectors share; never the expanded 2 (v.w + b)); with gate = (gamma [2], a_pos, a_neg) also
        sums = (sum sigmoid(m/gamma+) a_pos (v - c), sum sigmoid(-m/gamma-) a_neg (v - c))   one read of v
        (about the centre, subtracted element by element like the margins)

``v`` is whatever the backend's token_vectors returns and only that backend's side_sums and
margin_pass read it: a tensor, or a handle such as cpp/cuda's ``ScaledRows(hidden, 1 - exp(logp))``
that keeps exact vectors implicit (each pass scales the rows of h on the fly; no [N, H] write).

Reads of v per call: 1 when k = 0, else k + 2 (the temperature pass, k fused gate/refine
passes, the final margins), plus the one read of hidden when v is built here. With exact
vectors kept implicit (all three fast backends), "v" is hidden itself: hidden is read k + 3
times (2 when k = 0), the first read being the side sums, and nothing [N, H] is written.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

import torch

from ._checks import BackendCoefficients, DeltaConfig, TokenBatch
from ._formulas import (bias, centroids_about, centroids_from_sums, discriminator, final_coefficients, gated_weights,
                        side_masks, side_std)


@dataclass(frozen=True)
class PassKernels:
    """A backend's three pass kernels (the contract above): what ``run_coefficients`` and
    DeltaAccumulator take, and what every backend's ``PIPELINE_KERNELS`` is. The wrappers
    chunked.ChunkedPasses and head_factors.HeadFactorPasses offer the same methods (and a
    ``compute_dtype``)."""

    token_vectors: Callable[..., Tuple[Any, torch.Tensor]]
    side_sums: Callable[..., torch.Tensor]
    margin_pass: Callable[..., Tuple[torch.Tensor, Optional[torch.Tensor]]]


def _identity(t):
    return t


def run_coefficients(kernels: PassKernels, batch: TokenBatch, cfg: DeltaConfig, sketch_dim: Optional[int], seed: int,
                     reduce=None):
    """The fast backends' ``delta_coefficients``: same contract as the reference's."""
    reduce = reduce or _identity
    dtype = getattr(kernels, "compute_dtype", torch.float32)
    pos, neg, valid, a_pos, a_neg = side_masks(batch.advantages, batch.mask, dtype)
    if batch.vectors is None:
        v, sums = kernels.token_vectors(batch.hidden, batch.logp.to(dtype), a_pos, a_neg, sketch_dim, seed)
    else:
        v = batch.vectors
        sums = batch.side_sums.to(dtype) if batch.side_sums is not None else kernels.side_sums(v, a_pos, a_neg)
    mu = centroids_from_sums(sums, torch.stack([a_pos.sum(), a_neg.sum()]), cfg.eps, reduce)
    w, c = discriminator(mu)
    m, _ = kernels.margin_pass(v, w, c, None)
    gamma = side_std(m, pos, neg, cfg.eps, reduce)
    for step in range(cfg.k):
        # m under the current centroids again (bitwise the same as the pass before), gated with
        # the lagging temperatures, and the gated sums about c for the next centroids: one read of v.
        m, gsums = kernels.margin_pass(v, w, c, (gamma, a_pos, a_neg))
        w_pos, w_neg = gated_weights(m, gamma, a_pos, a_neg)
        gamma = side_std(m, pos, neg, cfg.eps, reduce)
        mu, w, c = centroids_about(c, gsums, torch.stack([w_pos.sum(), w_neg.sum()]), cfg.eps, reduce)
    if cfg.k > 0:
        m, _ = kernels.margin_pass(v, w, c, None)
    coef, scale, n_valid = final_coefficients(m, gamma, pos, neg, valid, cfg, reduce)
    counts = reduce(torch.stack([pos.sum(), neg.sum()]).to(dtype))
    pred = torch.where(batch.mask, torch.sign(batch.advantages.to(dtype)) * (m / 2), 0.0)
    return BackendCoefficients.of(coef, batch, mu_pos=mu[0], mu_neg=mu[1], gamma_pos=gamma[0], gamma_neg=gamma[1],
                                  W=w, b=bias(w, c), pred=pred, n_pos=counts[0], n_neg=counts[1], n_valid=n_valid,
                                  scale=scale)
