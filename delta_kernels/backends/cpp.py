"""backend="cpp": the C++ CPU kernels of csrc/cpu (delta_kernels._cpp).

Python allocates every output with ``_alloc.empty`` and passes raw pointers; the kernels
assume the validated, contiguous inputs that the public API hands over. The coefficient
pipeline is ``delta_kernels.pipeline.run_coefficients`` over this module's three passes.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import _cpp
from .._alloc import empty
from .._checks import FipoConfig, SurrogateConfig
from ..reference.fipo import log_clip_c
from ..aggregation import STATS
from ._native import (ScaledRows, dtype_code, f32, native_phases, native_surrogate, opt_ptr,  # noqa: F401
                      pipeline_kernels, ptr, rows_and_scale)


def token_vectors(hidden, logp, a_pos, a_neg, sketch_dim: Optional[int], seed: int, out_dtype=None):
    """hidden [N, H] (f32/bf16/f16), logp, a_pos, a_neg [N] -> (v [N, D] in out_dtype (default hidden's;
    else float32), sums [2, D] f32)."""
    n, h = hidden.shape
    d = sketch_dim or h
    out_dtype = out_dtype or hidden.dtype
    assert out_dtype in (hidden.dtype, torch.float32)
    out = empty(n, d, dtype=out_dtype)
    sums = empty(2, d, dtype=torch.float32)
    logp, a_pos, a_neg = f32(logp), f32(a_pos), f32(a_neg)
    _cpp.token_vectors(dtype=dtype_code(hidden), hidden=ptr(hidden), logp=ptr(logp), a_pos=ptr(a_pos),
                       a_neg=ptr(a_neg), n_tokens=n, hidden_size=h, sketch_dim=sketch_dim or 0, seed=seed,
                       out_f32=out_dtype != hidden.dtype, out=ptr(out), sums=ptr(sums))
    return out, sums


def side_sums(v, a_pos, a_neg):
    """v [N, D] (a tensor or ScaledRows) -> sums [2, D] f32 = (sum a_pos v, sum a_neg v)."""
    rows, scale = rows_and_scale(v)
    n, d = rows.shape
    sums = empty(2, d, dtype=torch.float32)
    a_pos, a_neg = f32(a_pos), f32(a_neg)
    _cpp.side_sums(dtype=dtype_code(rows), x=ptr(rows), scale=scale, a_pos=ptr(a_pos), a_neg=ptr(a_neg), n_tokens=n,
                   width=d, sums=ptr(sums))
    return sums


def margin_pass(v, w, c, gate):
    """v [N, D] (a tensor or ScaledRows), w [D], c [D] -> (m [N] = 2 (v - c).w f32, gated sums [2, D] f32
    or None);
    gate = (gamma [2], a_pos, a_neg)."""
    rows, scale = rows_and_scale(v)
    n, d = rows.shape
    w, c = f32(w), f32(c)
    m = empty(n, dtype=torch.float32)
    common = dict(dtype=dtype_code(rows), x=ptr(rows), scale=scale, w=ptr(w), centre=ptr(c), n_tokens=n, width=d,
                  margins=ptr(m))
    if gate is None:
        _cpp.margin_pass(**common)
        return m, None
    gamma, a_pos, a_neg = (f32(x) for x in gate)
    sums = empty(2, d, dtype=torch.float32)
    _cpp.margin_pass(**common, gamma=ptr(gamma), a_pos=ptr(a_pos), a_neg=ptr(a_neg), sums=ptr(sums))
    return m, sums


PIPELINE_KERNELS = pipeline_kernels(token_vectors, side_sums, margin_pass)


token_sketch, delta_coefficients = native_phases(token_vectors, PIPELINE_KERNELS)


def _surrogate_launch(cfg: SurrogateConfig, lp, old, a, m, c, w, rows, cols):
    row_stats = empty(rows, len(STATS), dtype=torch.float64)
    grad = empty(rows, cols, dtype=torch.float32)
    _cpp.clipped_surrogate(logp=ptr(lp), old_logp=ptr(old), adv=ptr(a), mask=ptr(m), coef=opt_ptr(c),
                           is_weight=opt_ptr(w), rows=rows, cols=cols, clip_low=cfg.clip_low,
                           clip_high=cfg.clip_high, clip_c=cfg.clip_c, row_stats=ptr(row_stats), grad=ptr(grad))
    return row_stats, grad


clipped_surrogate_loss = native_surrogate(_surrogate_launch)


def sketch_matrix(hidden_size: int, sketch_dim: int, seed: int) -> torch.Tensor:
    out = empty(hidden_size, sketch_dim, dtype=torch.float32)
    _cpp.sketch_matrix(out=ptr(out), hidden_size=hidden_size, sketch_dim=sketch_dim, seed=seed)
    return out


@torch.library.custom_op("delta_kernels::fipo_weights_cpp", mutates_args=())
def _fipo_weights_op(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                     decay_rate: float, log_clip_c: float, clip_c: float, lower: float, upper: float,
                     clip_lower: bool, safety_thresh: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, T] float32 contiguous inputs, mask bool -> (weights, keep [B] bool, future_kl)."""
    rows, cols = logp.shape
    weights = empty(rows, cols, dtype=torch.float32)
    future_kl = empty(rows, cols, dtype=torch.float32)
    keep = empty(rows, dtype=torch.bool)
    _cpp.fipo_weights(logp=ptr(logp), old_logp=ptr(old_logp), adv=ptr(adv), mask=ptr(mask.view(torch.uint8)),
                      rows=rows, cols=cols, gamma=2.0 ** (-1.0 / decay_rate), log_clip_c=log_clip_c, clip_c=clip_c,
                      lower=lower, upper=upper, clip_lower=clip_lower, safety_thresh=safety_thresh,
                      weights=ptr(weights), future_kl=ptr(future_kl), keep=ptr(keep.view(torch.uint8)))
    return weights, keep, future_kl


@_fipo_weights_op.register_fake
def _(logp, old_logp, adv, mask, decay_rate, log_clip_c, clip_c, lower, upper, clip_lower, safety_thresh):
    return (logp.new_empty(logp.shape, dtype=torch.float32), logp.new_empty(logp.shape[0], dtype=torch.bool),
            logp.new_empty(logp.shape, dtype=torch.float32))


def fipo_weights(logp, old_logp, adv, mask, cfg: FipoConfig):
    """Backend entry (delta_kernels.reference.fipo_weights' contract), float32 results."""
    lower, upper = cfg.bounds()
    return _fipo_weights_op(f32(logp), f32(old_logp), f32(adv), mask.contiguous(), cfg.decay_rate,
                            log_clip_c(cfg, torch.float32), cfg.clip_c, lower, upper, cfg.future_kl_clip_ratio > 0,
                            cfg.safety_thresh)
