"""backend="cpp": the C++ CPU kernels of csrc/cpu (delta_kernels._cpp)."""
from __future__ import annotations

from typing import Optional

import torch

from .. import _cpp
from .._alloc import empty
from ._native import dtype_code, ptr


def token_vectors(hidden, logp, a_pos, a_neg, sketch_dim: Optional[int], seed: int):
    n, h = hidden.shape
    d = sketch_dim or h
    out = empty(n, d, dtype=hidden.dtype)
    sums = empty(2, d, dtype=torch.float32)
    logp, a_pos, a_neg = (x.to(torch.float32).contiguous() for x in (logp, a_pos, a_neg))
    _cpp.token_vectors(dtype_code(hidden), ptr(hidden), ptr(logp), ptr(a_pos), ptr(a_neg), n, h, sketch_dim or 0,
                       seed, ptr(out), ptr(sums))
    return out, sums


def token_sketch(hidden, logp, sketch_dim: Optional[int], seed: int):
    zeros = torch.zeros(hidden.shape[0], dtype=torch.float32)
    return token_vectors(hidden, logp, zeros, zeros, sketch_dim, seed)[0]


def sketch_matrix(hidden_size: int, sketch_dim: int, seed: int) -> torch.Tensor:
    out = empty(hidden_size, sketch_dim, dtype=torch.float32)
    _cpp.sketch_matrix(ptr(out), hidden_size, sketch_dim, seed)
    return out
