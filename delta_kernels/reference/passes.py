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
        v = v.to(a_pos.dtype)
        return torch.stack([a_pos @ v, a_neg @ v])

    def margin_pass(self, v, w, b, gate):
        v = v.to(w.dtype)
        m = 2.0 * (v @ w + b)
        if gate is None:
            return m, None
        gamma, a_pos, a_neg = gate
        return m, torch.stack([(torch.sigmoid(m / gamma[0]) * a_pos) @ v, (torch.sigmoid(-m / gamma[1]) * a_neg) @ v])
