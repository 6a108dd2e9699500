"""The sketch matrix R: a pure function of (seed, row, column), the same on every backend.

Specification (every backend reproduces it bit for bit)
-------------------------------------------------------
All arithmetic is on unsigned 32-bit integers with wrap-around (mod 2**32).

``mix32(x)`` is the "lowbias32" integer finaliser::

    x ^= x >> 16;  x *= 0x7feb352d;  x ^= x >> 15;  x *= 0x846ca68b;  x ^= x >> 16

For a seed ``seed`` in [0, 2**32), a row ``i`` in [0, H) and a column ``j`` in [0, r)::

    s    = mix32(seed)
    a_i  = mix32(i ^ s)                    # one per row of R (a hidden dimension)
    c_j  = mix32(j + 0x9e3779b9)           # one per column of R (a sketch dimension)
    h_ij = mix32(a_i ^ c_j)
    R[i, j] = (+1 if h_ij < 2**31 else -1) * scale,   scale = float32(1 / sqrt(r))

So R has Rademacher entries scaled so that E[R R^T] = I and E[(v R).(v' R)] = v.v'.
Backends may multiply by the +-1 signs first and by ``scale`` after the reduction over
i; R itself (``sketch_matrix``) is bitwise identical everywhere.
"""
from __future__ import annotations

import math
import struct

import torch

MASK32 = 0xFFFFFFFF
MIX_C1 = 0x7FEB352D
MIX_C2 = 0x846CA68B
COLUMN_OFFSET = 0x9E3779B9


def sketch_scale(sketch_dim: int) -> float:
    """float32(1/sqrt(r)) as a Python float (exactly representable in float32); no tensor op."""
    return struct.unpack("f", struct.pack("f", 1.0 / math.sqrt(sketch_dim)))[0]


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    # (x * c) mod 2**32 for x in [0, 2**32) held in int64, without int64 overflow:
    # split c into 16-bit halves so that every partial product stays below 2**49.
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on an int64 tensor of values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, MIX_C1)
    x = x ^ (x >> 15)
    x = _mul32(x, MIX_C2)
    return x ^ (x >> 16)


def mix32_int(x: int) -> int:
    """lowbias32 on one Python int (used to hash the seed once on the host)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * MIX_C1) & MASK32
    x ^= x >> 15
    x = (x * MIX_C2) & MASK32
    return x ^ (x >> 16)


def sketch_signs(hidden_size: int, sketch_dim: int, seed: int, device=None) -> torch.Tensor:
    """The +-1 signs of R as an int8 [hidden_size, sketch_dim] tensor."""
    return row_signs(torch.arange(hidden_size, dtype=torch.int64, device=device), sketch_dim, seed)


def row_signs(rows: torch.Tensor, sketch_dim: int, seed: int) -> torch.Tensor:
    """The +-1 signs of the rows ``rows`` (int64 [n], values in [0, 2**32)) of R as int8 [n, sketch_dim]:
    R[rows] without the other rows (e.g. the sampled tokens' rows of the vocabulary sketch)."""
    a = mix32(rows.to(torch.int64) ^ mix32_int(seed))
    cols = mix32((torch.arange(sketch_dim, dtype=torch.int64, device=rows.device) + COLUMN_OFFSET) & MASK32)
    h = mix32(a[:, None] ^ cols[None, :])
    return (1 - 2 * (h >> 31)).to(torch.int8)


def sketch_matrix(hidden_size: int, sketch_dim: int, seed: int = 0, *, dtype=torch.float32,
                  device=None) -> torch.Tensor:
    """R, [hidden_size, sketch_dim], entries +-float32(1/sqrt(sketch_dim)), cast to ``dtype``."""
    if hidden_size < 1 or sketch_dim < 1:
        raise ValueError(f"sketch_matrix: hidden_size and sketch_dim must be >= 1, got {hidden_size}, {sketch_dim}")
    if not 0 <= seed <= MASK32:
        raise ValueError(f"sketch_matrix: seed must be in [0, 2**32), got {seed}")
    signs = sketch_signs(hidden_size, sketch_dim, seed, device)
    return (signs.to(torch.float32) * sketch_scale(sketch_dim)).to(dtype)
