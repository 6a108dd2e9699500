"""Triton: the vocabulary sketch of the softmax, p @ S1 (p = softmax of the tempered LM-head
logits, S1 = sketch_matrix(V, r1, seed)), without the [N, V] logits or p.

Kernel ``_softmax_sketch_partials_kernel``: the programs of ``_logprob_partials_kernel``
(triton_logprob.py: token blocks x vocabulary splits, the same tiles and splits). Each streams
its split in [BLOCK_N, BLOCK_V] logits tiles and keeps per row, in float32, the running max m,
s = sum exp(x - m) and acc = sum exp(x - m) S1 signs, one more [BLOCK_N, BLOCK_V] x
[BLOCK_V, BLOCK_R] product per tile (r1 / H extra flops over the tile's own), both rescaled by
exp(m_old - m_new) when the max moves. S1's +-1 signs are hashed in the kernel (sketch_hash),
never read. The host merges the splits in a fixed order:

    p @ S1 = scale * sum_splits exp(m - M) acc / sum_splits exp(m - M) s,   M = max over splits
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._alloc import empty
from ..sketch_matrix import sketch_scale
from ..triton.sketch_hash import seed_argument, sign_tile
from . import triton_logprob
from .triton_logits_tile import HAS_BIAS, row_block, split_logits


@triton.heuristics(HAS_BIAS)
@triton.jit
def _softmax_sketch_partials_kernel(h_ptr, w_ptr, b_ptr, part_ptr, acc_ptr, N, V, H, R, temperature, seed_mixed,
                                    n_blocks, cols_per_split, n_splits,
                                    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                                    BLOCK_R: tl.constexpr):
    rows, row_ok, pid_s = row_block(N, n_blocks, BLOCK_N)
    rcols = tl.arange(0, BLOCK_R)
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    v_lo = pid_s * cols_per_split
    for j in range(0, cols_per_split, BLOCK_V):
        cols, col_ok, x, m_new, m_safe = split_logits(h_ptr, w_ptr, b_ptr, rows, row_ok, v_lo, j, cols_per_split, V,
                                                      H, temperature, m, HAS_BIAS, IEEE, UPCAST, BLOCK_N, BLOCK_V,
                                                      BLOCK_H)
        alpha = tl.exp(m - m_safe)
        p = tl.exp(x - m_safe[:, None])                         # 0 at columns past V
        signs = sign_tile(cols, rcols, seed_mixed, tl.float32)  # [BLOCK_V, BLOCK_R]; columns >= R unused
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, signs, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p, signs)
        s = alpha * s + tl.sum(p, axis=1)
        m = m_new
    out = part_ptr + pid_s * N + rows
    tl.store(out, m, mask=row_ok)
    tl.store(out + n_splits * N, s, mask=row_ok)
    acc_out = acc_ptr + (pid_s * N + rows[:, None]) * R + rcols[None, :]
    tl.store(acc_out, acc, mask=row_ok[:, None] & (rcols[None, :] < R))


def softmax_sketch(hidden, weight, bias, temperature: float, sketch_dim: int, seed: int):
    """hidden [N, H], weight [V, H] (one dtype: fp16/bf16/fp32), bias [V] or None ->
    softmax(x) @ sketch_matrix(V, sketch_dim, seed), [N, sketch_dim] float32."""
    n, hdim = hidden.shape
    vocab = weight.shape[0]
    tile, tiles_per_split = triton_logprob.TILE, triton_logprob.TILES_PER_SPLIT  # read at call time
    cols_per_split = tile["BLOCK_V"] * tiles_per_split
    n_splits = triton.cdiv(vocab, cols_per_split)
    n_blocks = triton.cdiv(n, tile["BLOCK_N"])
    part = empty(2, n_splits, n, dtype=torch.float32, device=hidden.device)
    acc = empty(n_splits, n, sketch_dim, dtype=torch.float32, device=hidden.device)
    _softmax_sketch_partials_kernel[(n_blocks * n_splits,)](
        h_ptr=hidden, w_ptr=weight, b_ptr=bias, part_ptr=part, acc_ptr=acc,
        N=n, V=vocab, H=hdim, R=sketch_dim, temperature=float(temperature), seed_mixed=seed_argument(seed),
        n_blocks=n_blocks, cols_per_split=cols_per_split, n_splits=n_splits,
        IEEE=hidden.dtype == torch.float32,
        UPCAST=triton_logprob.INTERPRET and hidden.dtype == torch.bfloat16,
        BLOCK_R=max(16, triton.next_power_of_2(sketch_dim)), **tile)
    m, s = part.unbind(0)                     # [splits, N] each
    weight_of_split = torch.exp(m - m.max(0).values)
    total = (s * weight_of_split).sum(0)
    return (acc * weight_of_split[:, :, None]).sum(0) * (sketch_scale(sketch_dim) / total[:, None])
