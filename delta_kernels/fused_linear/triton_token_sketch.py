"""Triton: token-gradient vectors v = (1 - exp(logp)) h, or their sketch z = v @ R, and the
per-block partial side sums (sum a+ v, sum a- v).

Kernel ``_token_sketch_kernel``: one program per (block of BLOCK_N tokens, BLOCK_D output
columns). In sketch mode the signs of R are generated in the kernel from the row and column
hashes of delta_kernels/sketch_matrix.py (a_i = mix32(i ^ mix32(seed)) and
c_j = mix32(j + 0x9e3779b9), computed on the host, O(H + r)); the kernel forms
h_ij = mix32(a_i ^ c_j), sign = +1 if h_ij < 2**31 else -1, and
z = (1 - p) * (h @ signs) * float32(1/sqrt(r)), float32 accumulation.
Side sums leave as partials [n_blocks, 2, D] in float32 (from the float32 vectors, before
rounding to hidden's dtype) and are reduced over blocks in a fixed order on the host.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .._alloc import empty
from ..sketch_matrix import COLUMN_OFFSET, MASK32, mix32, mix32_int, sketch_scale

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BLOCK_N, BLOCK_D, BLOCK_H = (16, 32, 32) if INTERPRET else (64, 64, 64)


@triton.jit
def _mix32(x):
    """lowbias32 on uint32 (wrap-around multiplication)."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    x = x ^ (x >> 16)
    return x


@triton.jit
def _token_sketch_kernel(h_ptr, c_ptr, apos_ptr, aneg_ptr, rowh_ptr, colh_ptr, out_ptr, part_ptr,
                         N, H, D, scale,
                         SKETCH: tl.constexpr, SIDE: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr):
    pid_n = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    c = tl.load(c_ptr + rows, mask=row_ok, other=0.0)          # 1 - exp(logp), float32
    if SKETCH:
        col_hash = tl.load(colh_ptr + cols, mask=col_ok, other=0).to(tl.uint32, bitcast=True)
        acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_H):
            ks = k0 + tl.arange(0, BLOCK_H)
            k_ok = ks < H
            hk = tl.load(h_ptr + rows[:, None] * H + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                         other=0.0).to(tl.float32)
            row_hash = tl.load(rowh_ptr + ks, mask=k_ok, other=0).to(tl.uint32, bitcast=True)
            bits = _mix32(row_hash[:, None] ^ col_hash[None, :]) >> 31
            signs = 1.0 - 2.0 * bits.to(tl.float32)                    # [BLOCK_H, BLOCK_D]
            acc = tl.dot(hk, signs, acc, input_precision="ieee")
        v = acc * (c * scale)[:, None]
    else:
        hv = tl.load(h_ptr + rows[:, None] * H + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                     other=0.0).to(tl.float32)
        v = hv * c[:, None]
    tl.store(out_ptr + rows[:, None] * D + cols[None, :], v.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])
    if SIDE:
        a_pos = tl.load(apos_ptr + rows, mask=row_ok, other=0.0)
        a_neg = tl.load(aneg_ptr + rows, mask=row_ok, other=0.0)
        base = part_ptr + pid_n * 2 * D + cols
        tl.store(base, tl.sum(v * a_pos[:, None], axis=0), mask=col_ok)
        tl.store(base + D, tl.sum(v * a_neg[:, None], axis=0), mask=col_ok)


def _hashes(hdim: int, sketch_dim: int, seed: int, device):
    """Row and column hashes of R as int32 tensors holding the uint32 bits."""
    rows = mix32(torch.arange(hdim, dtype=torch.int64) ^ mix32_int(seed))
    cols = mix32((torch.arange(sketch_dim, dtype=torch.int64) + COLUMN_OFFSET) & MASK32)
    as_i32 = lambda x: torch.where(x >= 2**31, x - 2**32, x).to(torch.int32).to(device)  # noqa: E731
    return as_i32(rows), as_i32(cols)


def token_vectors(hidden, logp, a_pos: Optional[torch.Tensor], a_neg: Optional[torch.Tensor],
                  sketch_dim: Optional[int], seed: int):
    """hidden [N, H], logp [N] float32, a_pos/a_neg [N] float32 or None ->
    (v or z [N, D] in hidden's dtype, side sums [2, D] float32 or None)."""
    n, hdim = hidden.shape
    d = hdim if sketch_dim is None else sketch_dim
    c = (-torch.expm1(logp.to(torch.float32))).contiguous()  # 1 - exp(logp), accurate near 0
    out = empty(n, d, dtype=hidden.dtype, device=hidden.device)
    n_blocks = triton.cdiv(n, BLOCK_N)
    side = a_pos is not None
    part = empty(n_blocks, 2, d, dtype=torch.float32, device=hidden.device) if side else out
    if sketch_dim is None:
        rowh = colh = c  # unused
        scale = 1.0
    else:
        rowh, colh = _hashes(hdim, sketch_dim, seed, hidden.device)
        scale = sketch_scale(sketch_dim)
    _token_sketch_kernel[(n_blocks, triton.cdiv(d, BLOCK_D))](
        hidden, c, a_pos if side else c, a_neg if side else c, rowh, colh, out, part, n, hdim, d, scale,
        SKETCH=sketch_dim is not None, SIDE=side, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, BLOCK_H=BLOCK_H)
    return out, (part.sum(0) if side else None)
