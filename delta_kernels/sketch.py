"""Phase A: token-gradient vectors and their sketches."""
from __future__ import annotations

from typing import Optional

import torch

from . import _checks as C
from ._backends import resolve


def token_sketch(hidden: torch.Tensor, logp: torch.Tensor, *, sketch_dim: Optional[int] = None, seed: int = 0,
                 backend: str = "auto", check_values: bool = True) -> torch.Tensor:
    """Token-gradient vectors ``v = (1 - exp(logp)) * hidden``, or their sketch ``z = v @ R``.

    Args:
        hidden: [..., H] floating hidden states entering the LM head; leading dims equal logp's.
        logp: [N] or [B, T] log-probabilities (<= 0) of the sampled tokens.
        sketch_dim: r; when set, returns z = v @ R with R = ``sketch_matrix(H, r, seed)``
            (Rademacher, scaled 1/sqrt(r); see delta_kernels.sketch_matrix for the exact hash).
        seed: in [0, 2**32).
        backend: "auto" or a registered name (delta_kernels._backends; "torch": float64 too).
        check_values: check finiteness and logp <= 0 (one device sync each).
    Returns:
        [..., H] or [..., r], hidden's dtype (accumulated in float32, or float64 for float64).
    """
    device = C.check_devices(hidden=hidden, logp=logp)
    logp = C.check_logp("logp", logp, check_values)
    C.check_sketch_args(sketch_dim, seed)
    rows = C.check_hidden("hidden", hidden, logp, check_values)
    impl = resolve(backend, device, C.compute_dtype(hidden.dtype, logp.dtype), "token_sketch")
    out = impl.token_sketch(C.rows_for(impl, rows), logp.reshape(-1).contiguous(), sketch_dim, seed)
    return out.reshape(*logp.shape, out.shape[-1])
