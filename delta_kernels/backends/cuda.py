"""backend="cuda": the CUDA kernels of csrc/cuda (delta_kernels._cuda), registered as the CUDA
kernels of the delta_kernels:: custom ops (backends/_ops.py).

Each op body allocates its outputs (``_alloc.empty``) and workspaces and passes data pointers and
``torch.cuda.current_stream().cuda_stream``; a failed launch raises RuntimeError with the CUDA
error string. Same structure as backends/cpp.py: exact token vectors stay implicit (hidden
scaled per token on the fly), the sketch is materialised in float32 for the pipeline; hidden and
vectors may be the caller's [B, T, D] views, read in place (_native.row_layout). The
wrappers refuse, naming the argument, sums wider than the kernels' shared memory takes.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _cuda
from .._alloc import empty
from ..aggregation import STATS
from . import _native
from ._native import (ScaledRows, clipped_surrogate_loss, dtype_code, native_phases, opt_ptr,  # noqa: F401
                      pipeline_kernels, ptr, row_layout)
from ._ops import register_kernels, tokens


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
    _check_sums_width(sketch_dim or hidden.shape[-1], "sketch_dim" if sketch_dim else "hidden")
    return _native.token_vectors(hidden, logp, a_pos, a_neg, sketch_dim, seed, out_dtype)


def side_sums(v, a_pos, a_neg):
    _check_sums_width(_native.rows_and_scale(v)[0].shape[-1], "vectors")
    return _native.side_sums(v, a_pos, a_neg)


def margin_pass(v, w, c, gate):
    if gate is not None:
        _check_sums_width(_native.rows_and_scale(v)[0].shape[-1], "vectors")
    return _native.margin_pass(v, w, c, gate)


def _token_vectors(hidden, logp, a_pos, a_neg, sketch_dim, seed, out_f32):
    n, h, strides = row_layout(hidden)
    d = sketch_dim or h
    dev = hidden.device
    out = empty(n, d, dtype=torch.float32 if out_f32 else hidden.dtype, device=dev)
    sums = empty(2, d, dtype=torch.float32, device=dev)
    scale_ws = torch.empty(max(n, 1), dtype=torch.float32, device=dev)
    _cuda.token_vectors(dtype=dtype_code(hidden), hidden=hidden.data_ptr(), row_strides=strides, logp=ptr(logp),
                        a_pos=ptr(a_pos), a_neg=ptr(a_neg), n_tokens=n, hidden_size=h, sketch_dim=sketch_dim, seed=seed,
                        out_f32=out_f32, out=ptr(out), scale_ws=ptr(scale_ws), partial=ptr(_partial(n, d, dev)),
                        sums=ptr(sums), stream=_stream())
    return out, sums


def _side_sums(x, scale, a_pos, a_neg):
    n, d, strides = row_layout(x)
    sums = empty(2, d, dtype=torch.float32, device=x.device)
    _cuda.row_pass(dtype=dtype_code(x), x=x.data_ptr(), row_strides=strides, scale=opt_ptr(scale), n_tokens=n,
                   width=d, a_pos=ptr(a_pos), a_neg=ptr(a_neg), partial=ptr(_partial(n, d, x.device)), sums=ptr(sums),
                   stream=_stream())
    return sums


def _margin_args(x, scale, w, centre, m):
    n, d, strides = row_layout(x)
    return dict(dtype=dtype_code(x), x=x.data_ptr(), row_strides=strides, scale=opt_ptr(scale), n_tokens=n,
                width=d, w=ptr(w), centre=ptr(centre), margins=ptr(m), stream=_stream())


def _margins(x, scale, w, centre):
    m = empty(tokens(x), dtype=torch.float32, device=x.device)
    _cuda.row_pass(**_margin_args(x, scale, w, centre, m))
    return m


def _gated_margins(x, scale, w, centre, gamma, a_pos, a_neg):
    n, d, _ = row_layout(x)
    m = empty(n, dtype=torch.float32, device=x.device)
    sums = empty(2, d, dtype=torch.float32, device=x.device)
    _cuda.row_pass(**_margin_args(x, scale, w, centre, m), gamma=ptr(gamma), a_pos=ptr(a_pos), a_neg=ptr(a_neg),
                   partial=ptr(_partial(n, d, x.device)), sums=ptr(sums))
    return m, sums


def _clipped_surrogate(logp, old_logp, adv, mask, coef, is_weight, clip_low, clip_high, clip_c):
    rows, cols = logp.shape
    partial = empty(rows, _cuda.surrogate_tiles(cols), len(STATS), dtype=torch.float32, device=logp.device)
    grad = empty(rows, cols, dtype=torch.float32, device=logp.device)
    _cuda.clipped_surrogate(logp=ptr(logp), old_logp=ptr(old_logp), adv=ptr(adv), mask=ptr(mask), coef=opt_ptr(coef),
                            is_weight=opt_ptr(is_weight), rows=rows, cols=cols, clip_low=clip_low,
                            clip_high=clip_high, clip_c=clip_c, partial=ptr(partial), grad=ptr(grad),
                            stream=_stream())
    return partial.sum(1), grad


register_kernels("cuda", token_vectors=_token_vectors, side_sums=_side_sums, margins=_margins,
                 gated_margins=_gated_margins, clipped_surrogate=_clipped_surrogate)

PIPELINE_KERNELS = pipeline_kernels(token_vectors, side_sums, margin_pass)


token_sketch, delta_coefficients = native_phases(token_vectors, PIPELINE_KERNELS)
