"""backend="cuda": the CUDA kernels of csrc/cuda (delta_kernels._cuda), on CUDA tensors.

Python allocates outputs (``_alloc.empty``) and workspaces and passes data pointers and
``torch.cuda.current_stream().cuda_stream``; a failed launch raises RuntimeError with the CUDA
error string. Same structure as backends/cpp.py: exact token vectors stay implicit
(hidden scaled per token on the fly), the sketch is materialised in float32 for the pipeline.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _cuda
from .._alloc import empty
from .._checks import DeltaConfig, SurrogateConfig, TokenBatch
from ..aggregation import STATS, Aggregation
from ..pipeline import run_coefficients
from ._native import (ScaledRows, dtype_code, f32, native_surrogate, opt_ptr, pipeline_kernels, ptr,  # noqa: F401
                      rows_and_scale)


def _stream() -> int:
    return torch.cuda.current_stream().cuda_stream


def _partial(n: int, d: int, device) -> torch.Tensor:
    return torch.empty(max(_cuda.reduction_chunks(n), 1) * 2 * d, dtype=torch.float32, device=device)


def token_vectors(hidden, logp, a_pos, a_neg, sketch_dim: Optional[int], seed: int, out_dtype=None):
    """hidden [N, H] -> (v [N, D] in out_dtype (hidden's, or float32), sums [2, D] f32)."""
    n, h = hidden.shape
    d = sketch_dim or h
    out_dtype = out_dtype or hidden.dtype
    dev = hidden.device
    out = empty(n, d, dtype=out_dtype, device=dev)
    sums = empty(2, d, dtype=torch.float32, device=dev)
    logp, a_pos, a_neg = f32(logp), f32(a_pos), f32(a_neg)
    scale_ws = torch.empty(max(n, 1), dtype=torch.float32, device=dev)
    _cuda.token_vectors(dtype_code(hidden), ptr(hidden), ptr(logp), ptr(a_pos), ptr(a_neg), n, h, sketch_dim or 0,
                        seed, out_dtype != hidden.dtype, ptr(out), ptr(scale_ws), ptr(_partial(n, d, dev)),
                        ptr(sums), _stream())
    return out, sums


def side_sums(v, a_pos, a_neg):
    rows, scale = rows_and_scale(v)
    n, d = rows.shape
    sums = empty(2, d, dtype=torch.float32, device=rows.device)
    a_pos, a_neg = f32(a_pos), f32(a_neg)
    _cuda.row_pass(dtype_code(rows), ptr(rows), scale, n, d, 0, 0, 0, ptr(a_pos), ptr(a_neg), 0, 0,
                   ptr(_partial(n, d, rows.device)), ptr(sums), _stream())
    return sums


def margin_pass(v, w, c, gate):
    rows, scale = rows_and_scale(v)
    n, d = rows.shape
    w, c = f32(w), f32(c)
    m = empty(n, dtype=torch.float32, device=rows.device)
    if gate is None:
        _cuda.row_pass(dtype_code(rows), ptr(rows), scale, n, d, ptr(w), ptr(c), 0, 0, 0, ptr(m), 0, 0, 0, _stream())
        return m, None
    gamma, a_pos, a_neg = (f32(x) for x in gate)
    sums = empty(2, d, dtype=torch.float32, device=rows.device)
    _cuda.row_pass(dtype_code(rows), ptr(rows), scale, n, d, ptr(w), ptr(c), ptr(gamma), ptr(a_pos), ptr(a_neg),
                   ptr(m), 0, ptr(_partial(n, d, rows.device)), ptr(sums), _stream())
    return m, sums


PIPELINE_KERNELS = pipeline_kernels(token_vectors, side_sums, margin_pass)


def token_sketch(hidden, logp, sketch_dim: Optional[int], seed: int):
    zeros = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    return token_vectors(hidden, logp, zeros, zeros, sketch_dim, seed)[0]


def delta_coefficients(batch: TokenBatch, cfg: DeltaConfig, sketch_dim: Optional[int], seed: int, reduce=None):
    return run_coefficients(PIPELINE_KERNELS, batch, cfg, sketch_dim, seed, reduce)


def clipped_surrogate_loss(logp, old_logp, adv, mask, coef, rollout_is_weights, cfg: SurrogateConfig,
                           agg: Aggregation):
    def launch(lp, old, a, m, c, w, rows, cols):
        partial = empty(rows, _cuda.surrogate_tiles(cols), len(STATS), dtype=torch.float32, device=lp.device)
        grad = empty(rows, cols, dtype=torch.float32, device=lp.device)
        _cuda.clipped_surrogate(ptr(lp), ptr(old), ptr(a), ptr(m), opt_ptr(c), opt_ptr(w), rows, cols, cfg.clip_low,
                                cfg.clip_high, cfg.clip_c, ptr(partial), ptr(grad), _stream())
        return partial.sum(1), grad

    return native_surrogate(logp, old_logp, adv, mask, coef, rollout_is_weights, agg, launch)
