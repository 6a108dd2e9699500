"""The coefficient pipeline's three pass kernels (delta_kernels/pipeline.py) in plain torch.

They compute in the dtype of the per-token arrays they are given (the pipeline's compute
dtype: float64 for float64 inputs), so ``run_coefficients`` over them matches the reference to
rounding. ``DeltaAccumulator`` runs them for backend="torch" (``delta_coefficients``' torch
backend is coefficients.py, the line-by-line spec). Exact vectors are materialised here.
"""
from __future__ import annotations

import torch

from .sketch import token_vectors as reference_vectors


class TorchPasses:
    """token_vectors / side_sums / margin_pass of the pipeline's kernel contract."""

    def token_vectors(self, hidden, logp, a_pos, a_neg, sketch_dim, seed):
        v = reference_vectors(hidden, logp, sketch_dim, seed, logp.dtype)
        return v, self.side_sums(v, a_pos, a_neg)

    def side_sums(self, v, a_pos, a_neg):
        v = _contributing(v.to(a_pos.dtype), a_pos, a_neg)
        return torch.stack([a_pos @ v, a_neg @ v])

    def margin_pass(self, v, w, c, gate):
        """m = 2 (v - c).w; with gate = (gamma, a_pos, a_neg) also the gated sums about c."""
        d = v.to(w.dtype) - c
        m = 2.0 * (d @ w)
        if gate is None:
            return m, None
        gamma, a_pos, a_neg = gate
        g_pos, g_neg = torch.sigmoid(m / gamma[0]) * a_pos, torch.sigmoid(-m / gamma[1]) * a_neg
        d = _contributing(d, a_pos, a_neg)
        return m, torch.stack([torch.where(a_pos != 0, g_pos, 0) @ d, torch.where(a_neg != 0, g_neg, 0) @ d])


def _contributing(v: torch.Tensor, a_pos: torch.Tensor, a_neg: torch.Tensor) -> torch.Tensor:
    """v with the rows that carry no side weight (padding, zero advantages) selected to 0, so
    whatever padding holds (NaN, inf) never reaches a sum."""
    return torch.where(((a_pos != 0) | (a_neg != 0))[:, None], v, 0)
