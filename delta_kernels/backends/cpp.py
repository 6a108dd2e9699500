"""backend="cpp": the C++ CPU kernels of csrc/cpu (delta_kernels._cpp), registered as the CPU
kernels of the delta_kernels:: custom ops (backends/_ops.py).

Each op body allocates its outputs with ``_alloc.empty`` and passes raw pointers; the kernels
assume the validated, contiguous inputs that the public API hands over, except the row operands
(hidden, vectors), which may be the caller's [B, T, D] views, read in place (_native.row_layout). The coefficient
pipeline is ``delta_kernels.pipeline.run_coefficients`` over the three passes of _native.py.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import _cpp
from .._alloc import empty
from .._checks import FipoConfig
from ..reference.fipo import METRICS as FIPO_METRICS, call_native, fipo_fake_outputs, native_scalars
from ..aggregation import STATS
from . import _native
from ._native import (ScaledRows, dtype_code, f32, margin_pass, native_phases, opt_ptr,  # noqa: F401
                      pipeline_kernels, ptr, row_layout, side_sums, surrogate_inputs, surrogate_result,
                      token_vectors)
from ._ops import register_kernels, tokens


def _token_vectors(hidden, logp, a_pos, a_neg, sketch_dim, seed, out_f32):
    n, h, strides = row_layout(hidden)
    d = sketch_dim or h
    out = empty(n, d, dtype=torch.float32 if out_f32 else hidden.dtype)
    sums = empty(2, d, dtype=torch.float32)
    _cpp.token_vectors(dtype=dtype_code(hidden), hidden=hidden.data_ptr(), row_strides=strides, logp=ptr(logp),
                       a_pos=ptr(a_pos), a_neg=ptr(a_neg), n_tokens=n, hidden_size=h, sketch_dim=sketch_dim, seed=seed,
                       out_f32=out_f32, out=ptr(out), sums=ptr(sums))
    return out, sums


def _side_sums(x, scale, a_pos, a_neg):
    n, d, strides = row_layout(x)
    sums = empty(2, d, dtype=torch.float32)
    _cpp.side_sums(dtype=dtype_code(x), x=x.data_ptr(), row_strides=strides, scale=opt_ptr(scale), a_pos=ptr(a_pos),
                   a_neg=ptr(a_neg), n_tokens=n, width=d, sums=ptr(sums))
    return sums


def _margin_args(x, scale, w, centre, m):
    n, d, strides = row_layout(x)
    return dict(dtype=dtype_code(x), x=x.data_ptr(), row_strides=strides, scale=opt_ptr(scale), w=ptr(w),
                centre=ptr(centre), n_tokens=n, width=d, margins=ptr(m))


def _margins(x, scale, w, centre):
    m = empty(tokens(x), dtype=torch.float32)
    _cpp.margin_pass(**_margin_args(x, scale, w, centre, m))
    return m


def _gated_margins(x, scale, w, centre, gamma, a_pos, a_neg):
    m = empty(tokens(x), dtype=torch.float32)
    sums = empty(2, x.shape[-1], dtype=torch.float32)
    _cpp.margin_pass(**_margin_args(x, scale, w, centre, m), gamma=ptr(gamma), a_pos=ptr(a_pos), a_neg=ptr(a_neg),
                     sums=ptr(sums))
    return m, sums


def _clipped_surrogate(logp, old_logp, adv, mask, coef, is_weight, clip_low, clip_high, clip_c):
    rows, cols = logp.shape
    row_stats = empty(rows, len(STATS), dtype=torch.float64)
    grad = empty(rows, cols, dtype=torch.float32)
    _cpp.clipped_surrogate(logp=ptr(logp), old_logp=ptr(old_logp), adv=ptr(adv), mask=ptr(mask), coef=opt_ptr(coef),
                           is_weight=opt_ptr(is_weight), rows=rows, cols=cols, clip_low=clip_low,
                           clip_high=clip_high, clip_c=clip_c, row_stats=ptr(row_stats), grad=ptr(grad))
    return row_stats, grad


def _sketch_matrix(hidden_size, sketch_dim, seed):
    out = empty(hidden_size, sketch_dim, dtype=torch.float32)
    _cpp.sketch_matrix(out=ptr(out), hidden_size=hidden_size, sketch_dim=sketch_dim, seed=seed)
    return out


register_kernels("cpu", token_vectors=_token_vectors, side_sums=_side_sums, margins=_margins,
                 gated_margins=_gated_margins, clipped_surrogate=_clipped_surrogate, sketch_matrix=_sketch_matrix)

PIPELINE_KERNELS = pipeline_kernels(token_vectors, side_sums, margin_pass)

token_sketch, delta_coefficients = native_phases(token_vectors, PIPELINE_KERNELS)


def _fipo_weights_body(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                       decay_rate: float, log_clip_c: float, clip_c: float, lower: float, upper: float,
                       clip_lower: bool, safety_thresh: float, at_upper: float,
                       at_lower: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, T] float32 contiguous inputs, mask bool -> (weights, keep [B] bool, future_kl, row_stats [B, 5])."""
    rows, cols = logp.shape
    weights = empty(rows, cols, dtype=torch.float32)
    future_kl = empty(rows, cols, dtype=torch.float32)
    keep = empty(rows, dtype=torch.bool)
    row_stats = empty(rows, 5, dtype=torch.float32)
    _cpp.fipo_weights(logp=ptr(logp), old_logp=ptr(old_logp), adv=ptr(adv), mask=ptr(mask.view(torch.uint8)),
                      rows=rows, cols=cols, gamma=2.0 ** (-1.0 / decay_rate), log_clip_c=log_clip_c, clip_c=clip_c,
                      lower=lower, upper=upper, clip_lower=clip_lower, safety_thresh=safety_thresh,
                      at_upper=at_upper, at_lower=at_lower, weights=ptr(weights), future_kl=ptr(future_kl),
                      keep=ptr(keep.view(torch.uint8)), row_stats=ptr(row_stats))
    return weights, keep, future_kl, row_stats


_fipo_weights_op = torch.library.custom_op("delta_kernels::fipo_weights_cpp", _fipo_weights_body,
                                           mutates_args=())


@_fipo_weights_op.register_fake
def _(logp, old_logp, adv, mask, *scalars):
    return fipo_fake_outputs(logp)


def fipo_weights(logp, old_logp, adv, mask, cfg: FipoConfig):
    """Backend entry (delta_kernels.reference.fipo_weights' contract), float32 results."""
    return call_native(_fipo_weights_op, _fipo_weights_body, f32(logp), f32(old_logp), f32(adv), mask.contiguous(),
                       *native_scalars(cfg))


def _fipo_surrogate_body(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                         coef: Optional[torch.Tensor], is_weight: Optional[torch.Tensor], decay_rate: float,
                         log_clip_c: float, fipo_clip_c: float, lower: float, upper: float, clip_lower: bool,
                         safety_thresh: float, at_upper: float, at_lower: float, clip_low: float, clip_high: float,
                         clip_c: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, T] float32 contiguous inputs, mask bool -> (rows [B, 5] float64 (aggregation.STATS),
    token_grad [B, T], keep [B] bool, FIPO's metrics [5] float32 (reference.fipo.METRICS))."""
    rows, cols = logp.shape
    row_stats = empty(rows, len(STATS), dtype=torch.float64)
    grad = empty(rows, cols, dtype=torch.float32)
    keep = empty(rows, dtype=torch.bool)
    metrics = empty(len(FIPO_METRICS), dtype=torch.float32)
    _cpp.fipo_surrogate(logp=ptr(logp), old_logp=ptr(old_logp), adv=ptr(adv), mask=ptr(mask.view(torch.uint8)),
                        coef=opt_ptr(coef), is_weight=opt_ptr(is_weight), rows=rows, cols=cols,
                        gamma=2.0 ** (-1.0 / decay_rate), log_clip_c=log_clip_c, fipo_clip_c=fipo_clip_c, lower=lower,
                        upper=upper, clip_lower=clip_lower, safety_thresh=safety_thresh, at_upper=at_upper,
                        at_lower=at_lower, clip_low=clip_low, clip_high=clip_high, clip_c=clip_c,
                        row_stats=ptr(row_stats), grad=ptr(grad), keep=ptr(keep.view(torch.uint8)),
                        metrics=ptr(metrics))
    return row_stats, grad, keep, metrics


_fipo_surrogate_op = torch.library.custom_op("delta_kernels::fipo_surrogate_cpp", _fipo_surrogate_body,
                                             mutates_args=())


@_fipo_surrogate_op.register_fake
def _(logp, old_logp, adv, mask, coef, is_weight, *scalars):
    rows, cols = logp.shape
    return (logp.new_empty(rows, len(STATS), dtype=torch.float64), logp.new_empty(rows, cols, dtype=torch.float32),
            logp.new_empty(rows, dtype=torch.bool), logp.new_empty(len(FIPO_METRICS), dtype=torch.float32))


def clipped_surrogate_loss(logp, old_logp, adv, mask, coef, rollout_is_weights, cfg, agg, credit: FipoConfig = None):
    """The native phase C (_native.clipped_surrogate_loss); with ``credit`` (FIPO's FipoConfig,
    [B, T] inputs) FIPO's weights multiply coef and its dropped rows leave the mask inside the
    one kernel call (fipo_surrogate.cpp; the same bits as fipo_weights then the surrogate) ->
    (loss, metrics, FIPO's metrics)."""
    if credit is None:
        return _native.clipped_surrogate_loss(logp, old_logp, adv, mask, coef, rollout_is_weights, cfg, agg)
    inputs = surrogate_inputs(logp, old_logp, adv, mask, coef, rollout_is_weights)
    rows, grad, _keep, fipo = call_native(_fipo_surrogate_op, _fipo_surrogate_body, *inputs, *native_scalars(credit),
                                          cfg.clip_low, cfg.clip_high, cfg.clip_c)
    loss, metrics = surrogate_result(logp, rows, grad, agg)
    return loss, metrics, dict(zip(FIPO_METRICS, fipo.unbind()))


clipped_surrogate_loss.fused_credit = ("fipo",)  # credit.registry.FUSED_CREDIT
