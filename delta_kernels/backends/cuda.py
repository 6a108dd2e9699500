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
from .._checks import SurrogateConfig
from ..aggregation import STATS
from ._native import (ScaledRows, dtype_code, f32, native_phases, native_surrogate, opt_ptr,  # noqa: F401
                      pipeline_kernels, ptr, rows_and_scale)


def _stream() -> int:
    return torch.cuda.current_stream().cuda_stream


def _partial(n: int, d: int, device) -> torch.Tensor:
    """The row passes' workspace: one partial [2, d] row per token chunk."""
    return torch.empty(max(_cuda.reduction_chunk_count(n), 1) * 2 * d, dtype=torch.float32, device=device)


def _check_sums_width(d: int, name: str) -> None:
    if d > _cuda.MAX_SUMS_WIDTH:
        raise ValueError(f"{name}: backend='cuda' sums rows of at most {_cuda.MAX_SUMS_WIDTH} columns "
                         f"(the block's partial sums live in shared memory), got {d}; use backend='triton'")


def token_vectors(hidden, logp, a_pos, a_neg, sketch_dim: Optional[int], seed: int, out_dtype=None):
    """hidden [N, H] -> (v [N, D] in out_dtype (hidden's, or float32), sums [2, D] f32).
    D <= _cuda.MAX_SUMS_WIDTH (ValueError naming sketch_dim or hidden otherwise)."""
    n, h = hidden.shape
    d = sketch_dim or h
    _check_sums_width(d, "sketch_dim" if sketch_dim else "hidden")
    out_dtype = out_dtype or hidden.dtype
    dev = hidden.device
    out = empty(n, d, dtype=out_dtype, device=dev)
    sums = empty(2, d, dtype=torch.float32, device=dev)
    logp, a_pos, a_neg = f32(logp), f32(a_pos), f32(a_neg)
    scale_ws = torch.empty(max(n, 1), dtype=torch.float32, device=dev)
    _cuda.token_vectors(dtype=dtype_code(hidden), hidden=ptr(hidden), logp=ptr(logp), a_pos=ptr(a_pos),
                        a_neg=ptr(a_neg), n_tokens=n, hidden_size=h, sketch_dim=sketch_dim or 0, seed=seed,
                        out_f32=out_dtype != hidden.dtype, out=ptr(out), scale_ws=ptr(scale_ws),
                        partial=ptr(_partial(n, d, dev)), sums=ptr(sums), stream=_stream())
    return out, sums


def side_sums(v, a_pos, a_neg):
    rows, scale = rows_and_scale(v)
    n, d = rows.shape
    _check_sums_width(d, "vectors")
    sums = empty(2, d, dtype=torch.float32, device=rows.device)
    a_pos, a_neg = f32(a_pos), f32(a_neg)
    _cuda.row_pass(dtype=dtype_code(rows), x=ptr(rows), scale=scale, n_tokens=n, width=d, a_pos=ptr(a_pos),
                   a_neg=ptr(a_neg), partial=ptr(_partial(n, d, rows.device)), sums=ptr(sums), stream=_stream())
    return sums


def margin_pass(v, w, c, gate):
    rows, scale = rows_and_scale(v)
    n, d = rows.shape
    if gate is not None:
        _check_sums_width(d, "vectors")
    w, c = f32(w), f32(c)
    m = empty(n, dtype=torch.float32, device=rows.device)
    common = dict(dtype=dtype_code(rows), x=ptr(rows), scale=scale, n_tokens=n, width=d, w=ptr(w), centre=ptr(c),
                  margins=ptr(m), stream=_stream())
    if gate is None:
        _cuda.row_pass(**common)
        return m, None
    gamma, a_pos, a_neg = (f32(x) for x in gate)
    sums = empty(2, d, dtype=torch.float32, device=rows.device)
    _cuda.row_pass(**common, gamma=ptr(gamma), a_pos=ptr(a_pos), a_neg=ptr(a_neg),
                   partial=ptr(_partial(n, d, rows.device)), sums=ptr(sums))
    return m, sums


PIPELINE_KERNELS = pipeline_kernels(token_vectors, side_sums, margin_pass)


token_sketch, delta_coefficients = native_phases(token_vectors, PIPELINE_KERNELS)


def _surrogate_launch(cfg: SurrogateConfig, lp, old, a, m, c, w, rows, cols):
    partial = empty(rows, _cuda.surrogate_tiles(cols), len(STATS), dtype=torch.float32, device=lp.device)
    grad = empty(rows, cols, dtype=torch.float32, device=lp.device)
    _cuda.clipped_surrogate(logp=ptr(lp), old_logp=ptr(old), adv=ptr(a), mask=ptr(m), coef=opt_ptr(c),
                            is_weight=opt_ptr(w), rows=rows, cols=cols, clip_low=cfg.clip_low,
                            clip_high=cfg.clip_high, clip_c=cfg.clip_c, partial=ptr(partial), grad=ptr(grad),
                            stream=_stream())
    return partial.sum(1), grad


clipped_surrogate_loss = native_surrogate(_surrogate_launch)
