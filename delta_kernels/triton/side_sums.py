"""Side sums of precomputed token vectors: (sum a+ v, sum a- v), one read of v.

The same row kernel as token_vectors (without the logp scale and without a store): float32
per-group partials, summed in a fixed order (row_partials)."""
from __future__ import annotations

import torch

from .token_vectors import scaled_rows


def side_sums(v: torch.Tensor, a_pos: torch.Tensor, a_neg: torch.Tensor) -> torch.Tensor:
    """v [N, D] float32/bf16/fp16 contiguous, a_pos/a_neg [N] -> sums [2, D] float32."""
    f32 = torch.float32
    return scaled_rows(v, None, a_pos.to(f32).contiguous(), a_neg.to(f32).contiguous(), store=False)[1]
