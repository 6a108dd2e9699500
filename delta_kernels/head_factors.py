"""DelTA on the full LM-head gradient, kept as its two factors: z[t] = u[t] (x) s[t] is never formed.

``delta_coefficients(None, logp, advantages, mask, head_vectors=(u, s))`` (u [N, r1], s [N, r2], e.g.
from head_gradient_sketch) runs the pipeline of delta_kernels/pipeline.py unchanged over
``HeadFactorPasses``: every D = r1 * r2 vector of the pipeline (centroids, W, c) is an [r1, r2]
matrix flattened row-major, the index of u[a] s[b] in z = kron(u, s). The passes:

    side sums       sum a u s^T = (a u)^T s                              one [r1, N] x [N, r2] GEMM
    margins         m = 2 (u^T W s - <C, W>) = 2 ((s W^T) . u - <C, W>)  one [N, r2] x [r2, r1] GEMM + row dots
    gated sums      sum g a (z - C) = (g a u)^T s - (sum g a) C          about the centre C, as the pipeline wants

|z|^2 = |u|^2 |s|^2 is never needed (the margins are differences of squared distances). Work per
pass is 2 N r1 r2 flops on N (r1 + r2) numbers read, against N r1 r2 numbers for explicit z.
The passes are small GEMMs and row dots in torch ops, one implementation on every backend
(docs/backends.md says why), in the pipeline's compute dtype (float64 for float64 inputs).
"""
from __future__ import annotations

from typing import NamedTuple, Tuple

import torch

from . import _checks as C


class HeadFactors(NamedTuple):
    """Token vectors z[t] = u[t] (x) s[t], never formed: ``rows`` = [u | s], [N, r1 + r2], zero at
    padding (flat_head_vectors selects it out once, so the passes need no per-pass selection), one
    array so that DeltaAccumulator stores and moves it as it does vectors."""
    rows: torch.Tensor
    r1: int

    def factors(self, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.rows[:, :self.r1].to(dtype), self.rows[:, self.r1:].to(dtype)


def admit_head_vectors(head_vectors) -> Tuple[torch.Tensor, torch.Tensor]:
    """The pair (u [..., r1], s [..., r2]): readable float tensors of one dtype over the same tokens."""
    if not isinstance(head_vectors, (tuple, list)) or len(head_vectors) != 2:
        raise TypeError(f"head_vectors: expected a pair (u, s) from head_gradient_sketch, got "
                        f"{type(head_vectors).__name__}")
    u, s = (C.check_tensor(f"head_vectors[{i}]", t) for i, t in enumerate(head_vectors))
    if u.dim() < 1 or s.dim() < 1 or tuple(u.shape[:-1]) != tuple(s.shape[:-1]):
        C.fail("head_vectors", f"u {list(u.shape)} and s {list(s.shape)} cover different tokens (their leading "
                               "dims differ): factors of two batches?")
    for name, t in (("r1", u), ("r2", s)):
        if t.shape[-1] < 1:
            C.fail("head_vectors", f"{name} (the last dim of {'u' if name == 'r1' else 's'}) must be >= 1")
    if u.dtype != s.dtype:
        raise TypeError(f"head_vectors: s has dtype {s.dtype}, u {u.dtype}; pass both in one dtype")
    return u, s


def flat_head_vectors(u: torch.Tensor, s: torch.Tensor, logp: torch.Tensor, valid: torch.Tensor,
                      check_values: bool) -> HeadFactors:
    """u, s with leading dims equal to logp's -> HeadFactors over the flat tokens; finite at valid
    positions (``valid``: bool, logp's shape) with check_values."""
    if tuple(u.shape[:-1]) != tuple(logp.shape):
        C.fail("head_vectors", f"u {list(u.shape)} and s {list(s.shape)}: leading dims must equal logp's shape "
                               f"{list(logp.shape)}")
    if check_values:
        C.check_finite("head_vectors[0]", u, valid)
        C.check_finite("head_vectors[1]", s, valid)
    rows = torch.cat([u.reshape(-1, u.shape[-1]), s.reshape(-1, s.shape[-1])], dim=1)
    return HeadFactors(torch.where(valid.reshape(-1, 1), rows, 0), u.shape[-1])  # padding: whatever it held, 0


class HeadFactorPasses:
    """side_sums / margin_pass of the pipeline's kernel contract (pipeline.py) on HeadFactors.
    Padding rows are zero and the side weights zero wherever a token has no side, so every sum is
    over the weighted tokens without a selection."""

    def __init__(self, compute_dtype: torch.dtype):
        self.compute_dtype = compute_dtype

    @staticmethod
    def _two_sums(u, s, w_pos, w_neg):
        """(sum w+ u s^T, sum w- u s^T) flattened, [2, r1 * r2]: one [2 r1, N] x [N, r2] GEMM."""
        both = torch.cat([w_pos[:, None] * u, w_neg[:, None] * u], dim=1)
        return (both.T @ s).reshape(2, -1)

    def side_sums(self, v: HeadFactors, a_pos, a_neg):
        return self._two_sums(*v.factors(self.compute_dtype), a_pos, a_neg)

    def margin_pass(self, v: HeadFactors, w, c, gate):
        """m = 2 (u^T W s - <C, W>); with gate = (gamma, a_pos, a_neg) also the gated sums about C."""
        u, s = v.factors(w.dtype)
        m = 2.0 * (((s @ w.reshape(v.r1, -1).T) * u).sum(1) - c.dot(w))
        if gate is None:
            return m, None
        gamma, a_pos, a_neg = gate
        g_pos, g_neg = torch.sigmoid(m / gamma[0]) * a_pos, torch.sigmoid(-m / gamma[1]) * a_neg
        about_c = torch.stack([g_pos.sum(), g_neg.sum()])[:, None] * c
        return m, self._two_sums(u, s, g_pos, g_neg) - about_c
