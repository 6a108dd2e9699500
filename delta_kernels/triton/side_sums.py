"""Side sums of token vectors: (sum a+ v, sum a- v), one read of v (or of h for ScaledRows).

The same row kernel as token_vectors (without a store): for ScaledRows(rows, scale) each row's
coefficient is a[t] * scale[t], applied to the loaded row (v is never materialised); float32
per-group partials, summed in a fixed order (row_partials)."""
from __future__ import annotations

import torch

from .pass1_token_vectors import rows_and_scale, scaled_rows


def side_sums(v, a_pos: torch.Tensor, a_neg: torch.Tensor) -> torch.Tensor:
    """v [N, D] float32/bf16/fp16 contiguous, or ScaledRows(rows [N, D], scale [N] float32);
    a_pos/a_neg [N] -> sums [2, D] float32."""
    f32 = torch.float32
    rows, scale = rows_and_scale(v)
    return scaled_rows(rows, scale, a_pos.to(f32).contiguous(), a_neg.to(f32).contiguous(), store=False)[1]
