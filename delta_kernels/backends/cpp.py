"""backend="cpp": the C++ CPU kernels of csrc/cpu (delta_kernels._cpp).

Python allocates every output with ``_alloc.empty`` and passes raw pointers; the kernels
assume the validated, contiguous inputs that the public API hands over. The coefficient
pipeline is ``delta_kernels.pipeline.run_coefficients`` over this module's three passes.
"""
from __future__ import annotations

import sys
from typing import Optional

import torch

from .. import _cpp
from .._alloc import empty
from .._checks import DeltaConfig, SurrogateConfig, TokenBatch
from ..pipeline import run_coefficients
from ._native import AGG_CODES, dtype_code, f32, ptr, rows_of, surrogate_with_grad


def token_vectors(hidden, logp, a_pos, a_neg, sketch_dim: Optional[int], seed: int):
    """hidden [N, H] (f32/bf16/f16), logp, a_pos, a_neg [N] -> (v [N, D] hidden's dtype, sums [2, D] f32)."""
    n, h = hidden.shape
    d = sketch_dim or h
    out = empty(n, d, dtype=hidden.dtype)
    sums = empty(2, d, dtype=torch.float32)
    logp, a_pos, a_neg = f32(logp), f32(a_pos), f32(a_neg)
    _cpp.token_vectors(dtype_code(hidden), ptr(hidden), ptr(logp), ptr(a_pos), ptr(a_neg), n, h, sketch_dim or 0,
                       seed, ptr(out), ptr(sums))
    return out, sums


def side_sums(v, a_pos, a_neg):
    """v [N, D] -> sums [2, D] f32 = (sum a_pos v, sum a_neg v)."""
    n, d = v.shape
    sums = empty(2, d, dtype=torch.float32)
    a_pos, a_neg = f32(a_pos), f32(a_neg)
    _cpp.side_sums(dtype_code(v), ptr(v), ptr(a_pos), ptr(a_neg), n, d, ptr(sums))
    return sums


def margin_pass(v, w, b, gate):
    """v [N, D], w [D], b [] -> (m [N] f32, gated sums [2, D] f32 or None); gate = (gamma [2], a_pos, a_neg)."""
    n, d = v.shape
    w, b = f32(w), f32(b)
    m = empty(n, dtype=torch.float32)
    if gate is None:
        _cpp.margin_pass(dtype_code(v), ptr(v), ptr(w), ptr(b), n, d, 0, 0, 0, ptr(m), 0)
        return m, None
    gamma, a_pos, a_neg = (f32(x) for x in gate)
    sums = empty(2, d, dtype=torch.float32)
    _cpp.margin_pass(dtype_code(v), ptr(v), ptr(w), ptr(b), n, d, ptr(gamma), ptr(a_pos), ptr(a_neg), ptr(m),
                     ptr(sums))
    return m, sums


def token_sketch(hidden, logp, sketch_dim: Optional[int], seed: int):
    zeros = torch.zeros(hidden.shape[0], dtype=torch.float32)
    return token_vectors(hidden, logp, zeros, zeros, sketch_dim, seed)[0]


def delta_coefficients(batch: TokenBatch, cfg: DeltaConfig, sketch_dim: Optional[int], seed: int, reduce=None):
    return run_coefficients(sys.modules[__name__], batch, cfg, sketch_dim, seed, reduce)


def clipped_surrogate_loss(logp, old_logp, adv, mask, coef, cfg: SurrogateConfig):
    rows, cols = rows_of(logp)
    old_logp, adv = f32(old_logp), f32(adv)
    mask = mask.contiguous()
    coef = None if coef is None else f32(coef)

    def kernel(lp):
        lp = f32(lp)
        out = empty(4, dtype=torch.float32)
        grad = empty(*logp.shape, dtype=torch.float32)
        _cpp.clipped_surrogate(ptr(lp), ptr(old_logp), ptr(adv), ptr(mask), 0 if coef is None else ptr(coef),
                               rows, cols, cfg.clip_low, cfg.clip_high, cfg.clip_c, AGG_CODES[cfg.agg], ptr(out),
                               ptr(grad))
        return out[0], out[1:], grad

    return surrogate_with_grad(logp, kernel)


def sketch_matrix(hidden_size: int, sketch_dim: int, seed: int) -> torch.Tensor:
    out = empty(hidden_size, sketch_dim, dtype=torch.float32)
    _cpp.sketch_matrix(ptr(out), hidden_size, sketch_dim, seed)
    return out
