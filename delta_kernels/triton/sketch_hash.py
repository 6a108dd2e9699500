"""The sketch matrix's +-1 signs generated inside Triton kernels (never read from memory).

Bit for bit the uint32 hash of delta_kernels/sketch_matrix.py: R[i, j] = sign(i, j) * scale,
sign = +1 if mix32(mix32(i ^ mix32(seed)) ^ mix32(j + 0x9e3779b9)) < 2**31 else -1.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..sketch_matrix import mix32_int


def seed_argument(seed: int) -> int:
    """mix32(seed) as a signed 32-bit int (a kernel argument that fits i32 on every triton
    version); kernels bitcast it back to uint32."""
    s = mix32_int(seed)
    return s - (1 << 32) if s >= (1 << 31) else s


@triton.jit
def mix32(x):
    """lowbias32 on a uint32 tensor (wrap-around multiplies)."""
    x = x ^ (x >> 16)
    x = x * tl.full([], 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full([], 0x846CA68B, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def sign_tile(rows, cols, seed_mixed, dtype: tl.constexpr):
    """+-1 of R[rows, cols] as a [len(rows), len(cols)] tile of ``dtype`` (exact in bf16/fp16).
    rows, cols: integer index vectors; seed_mixed: mix32(seed) as a bitcast int32."""
    s = seed_mixed.to(tl.uint32, bitcast=True)
    a = mix32(rows.to(tl.uint32) ^ s)
    c = mix32(cols.to(tl.uint32) + tl.full([], 0x9E3779B9, tl.uint32))
    h = mix32(a[:, None] ^ c[None, :])
    return (1.0 - 2.0 * (h >> 31).to(tl.float32)).to(dtype)
