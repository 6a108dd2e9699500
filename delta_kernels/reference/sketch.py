"""Reference token-gradient vectors: v = (1 - exp(logp)) h, or the sketch z = v @ R."""
from __future__ import annotations

from typing import Optional

import torch

from .._checks import compute_dtype
from ..sketch_matrix import sketch_matrix


def token_vectors(hidden: torch.Tensor, logp: torch.Tensor, sketch_dim: Optional[int], seed: int,
                  dtype: torch.dtype) -> torch.Tensor:
    """[N, H], [N] -> [N, H] or [N, sketch_dim], computed and returned in ``dtype``."""
    v = -torch.expm1(logp.to(dtype))[:, None] * hidden.to(dtype)  # 1 - exp(logp), accurate near 0
    if sketch_dim is None:
        return v
    return v @ sketch_matrix(hidden.shape[1], sketch_dim, seed, dtype=dtype, device=hidden.device)


def token_sketch(hidden: torch.Tensor, logp: torch.Tensor, sketch_dim: Optional[int], seed: int) -> torch.Tensor:
    """Backend entry: returns the vectors in hidden's dtype."""
    dtype = compute_dtype(hidden.dtype, logp.dtype)
    return token_vectors(hidden, logp, sketch_dim, seed, dtype).to(hidden.dtype)
