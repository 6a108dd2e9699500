"""Triton: log p of the target, log-sum-exp and entropy of tempered LM-head logits, without
holding the [N, V] logits.

Kernel ``_logprob_partials_kernel``: one program per (block of BLOCK_N tokens, vocabulary
split of COLS_PER_SPLIT columns); token blocks vary fastest so that programs running
together share the same weight tiles through L2. Each program streams its split in
[BLOCK_N, BLOCK_V] logits tiles (``logits_tile``) and keeps per row, in float32:
    m   running max,   s = sum exp(x - m),   t = sum exp(x - m) (x - m),   x_y = target logit
and writes them to ``partials [4, splits, N]``. The host merges the splits in a fixed order
(torch reductions over a small [splits, N] array), so the result is deterministic and the
split count depends only on V, never on the GPU.

    lse = M + log S,   logp = min(x_y - lse, 0),   entropy = log S - T / S   (shift-free form,
    stable for large or all-negative logits)

Padding is don't-care: with ``valid`` the rows that are not valid load zeros for h (selected,
never multiplied), and their logp and entropy are 0.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .._alloc import empty
from .triton_logits_tile import OPTIONAL, read_rows, row_block, split_logits

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # the interpreter's bf16 dot quirk only (UPCAST)
# 128 x 128 tiles, 64-wide K steps, 8 warps, 3 stages: 254 registers and no spills for bf16, 1 CTA/SM (AOT
# table, benchmarks/results/aot_sm90.md; float32's IEEE products spill 224 bytes at this tile). A split is
# 32 tiles (4096 columns). Read at call time: the interpreter's tests set small tiles and 2-tile splits
# (tests/conftest.py) so small shapes cross every boundary.
TILE = dict(BLOCK_N=128, BLOCK_V=128, BLOCK_H=64, num_warps=8, num_stages=3)
TILES_PER_SPLIT = 32


@triton.heuristics(OPTIONAL)
@triton.jit
def _logprob_partials_kernel(h_ptr, w_ptr, b_ptr, y_ptr, valid_ptr, part_ptr, N, V, H, temperature, n_blocks,
                             cols_per_split, n_splits,
                             HAS_BIAS: tl.constexpr, HAS_VALID: tl.constexpr, ENTROPY: tl.constexpr,
                             IEEE: tl.constexpr, UPCAST: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    rows, row_ok, pid_s = row_block(N, n_blocks, BLOCK_N)
    h_ok = read_rows(valid_ptr, rows, row_ok, HAS_VALID)
    y = tl.load(y_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t = tl.zeros((BLOCK_N,), dtype=tl.float32)
    x_y = tl.zeros((BLOCK_N,), dtype=tl.float32)
    v_lo = pid_s * cols_per_split
    for j in range(0, cols_per_split, BLOCK_V):
        cols, col_ok, x, m_new, m_safe = split_logits(h_ptr, w_ptr, b_ptr, rows, h_ok, v_lo, j, cols_per_split, V, H,
                                                      temperature, m, HAS_BIAS, IEEE, UPCAST, BLOCK_N, BLOCK_V,
                                                      BLOCK_H)
        x_y += tl.sum(tl.where(cols[None, :] == y[:, None], x, 0.0), axis=1)
        alpha = tl.exp(m - m_safe)
        p = tl.exp(x - m_safe[:, None])
        if ENTROPY:
            shift = s * tl.where(s > 0, m - m_safe, 0.0)              # no 0 * -inf
            xs = tl.where(col_ok[None, :], x - m_safe[:, None], 0.0)
            t = alpha * (t + shift) + tl.sum(p * xs, axis=1)
        s = alpha * s + tl.sum(p, axis=1)
        m = m_new
    out = part_ptr + pid_s * N + rows
    plane = n_splits * N
    tl.store(out, m, mask=row_ok)
    tl.store(out + plane, s, mask=row_ok)
    tl.store(out + 2 * plane, t, mask=row_ok)
    tl.store(out + 3 * plane, x_y, mask=row_ok)


def logprob(hidden, weight, bias, targets, temperature: float, want_entropy: bool, valid=None):
    """hidden [N, H], weight [V, H] (one dtype: fp16/bf16/fp32), bias [V] or None, targets [N]
    int64, valid [N] bool or None (all valid) -> logp [N], lse [N], entropy [N] or None, float32;
    logp and entropy are 0 where not valid."""
    n, hdim = hidden.shape
    vocab = weight.shape[0]
    cols_per_split = TILE["BLOCK_V"] * TILES_PER_SPLIT
    n_splits = triton.cdiv(vocab, cols_per_split)
    n_blocks = triton.cdiv(n, TILE["BLOCK_N"])
    part = empty(4, n_splits, n, dtype=torch.float32, device=hidden.device)
    _logprob_partials_kernel[(n_blocks * n_splits,)](
        h_ptr=hidden, w_ptr=weight, b_ptr=bias, y_ptr=targets, valid_ptr=valid, part_ptr=part, N=n, V=vocab, H=hdim,
        temperature=float(temperature), n_blocks=n_blocks, cols_per_split=cols_per_split, n_splits=n_splits,
        ENTROPY=want_entropy, IEEE=hidden.dtype == torch.float32, UPCAST=INTERPRET and hidden.dtype == torch.bfloat16,
        **TILE)
    m, s, t, x_y = part.unbind(0)            # [splits, N] each
    big_m = m.max(0).values
    scale = torch.exp(m - big_m)
    big_s = (s * scale).sum(0)
    lse = big_m + torch.log(big_s)
    logp = (x_y.sum(0) - lse).clamp_max(0.0)  # x_y is 0 in every split but the target's
    ent = None
    if want_entropy:
        big_t = ((t + s * (m - big_m)) * scale).sum(0)
        ent = (torch.log(big_s) - big_t / big_s).clamp_min(0.0)
    if valid is not None:
        logp = torch.where(valid, logp, 0.0)
        ent = None if ent is None else torch.where(valid, ent, 0.0)
    return logp, lse, ent
