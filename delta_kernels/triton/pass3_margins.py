"""Pass 3 of the coefficient pipeline, the margin pass: m = 2 (v - c).w (c, the centroids' midpoint,
subtracted element by element before the dot: exact under an offset the vectors share), and
with a gate also the gated side sums about c (sum sigmoid(m/gamma+) a+ (v - c), sum
sigmoid(-m/gamma-) a- (v - c)), one read of v. v is a tensor or ScaledRows(rows, scale) (v[t] =
scale[t] rows[t], never materialised): then each loaded row is scaled before the centre is
subtracted (m = 2 (scale[t] x[t] - c).w, gated terms g a (scale[t] x[t] - c)), as the cpp
kernels do. Rows whose weight is zero (padding, the other side) are selected out of the sums,
never multiplied in, so whatever they hold changes nothing.

A program owns a group of consecutive rows and loads each row tile whole ([BLOCK_N, D] in
registers, D padded to a power of two), so the margins and the gated sums come from the one
load. The gated sums go through [G, 2, D] float32 partials summed in a fixed order
(row_partials): deterministic, no atomics. For very wide rows (D > MAX_BLOCK_D, beyond any
current LM hidden size) the row is walked in chunks for the margins (wide_margins) and the
gated sums take a second read of v (fused.margin_pass: pass 1's row kernel with weights g a).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .._alloc import empty
from ._common import (SLOTS, WT_NEG, WT_POS, final_totals, group_temperatures, neg_expm1, put, row_count, row_layout,
                      row_starts, row_weights, side_moments, valid_rows)
from .row_partials import row_groups, sum_partials

MAX_BLOCK_D = 16384     # widest row a program holds whole
ROW_ELEMS_PER_THREAD = 16  # row elements per thread of the whole-row kernel (register budget)
ROWS_PER_TILE = 1       # rows per tile of the whole-row kernel; read at call time (the interpreter's tests raise it)
CHUNK_D = 4096          # column chunk of the wide-row kernel


@triton.heuristics(dict(HAS_SCALE=lambda a: a["scale_ptr"] is not None, GATED=lambda a: a["partial_ptr"] is not None,
                        FROM_ADV=lambda a: a["stat_ptr"] is not None, TEMPS=lambda a: a["sq_ptr"] is not None))
@triton.jit
def _margin_rows_kernel(v_ptr, scale_ptr, w_ptr, c_ptr, m_ptr, gamma_ptr, a_pos_ptr, a_neg_ptr, partial_ptr, stat_ptr,
                        n_rows, n_cols, rows_per_group, lam_offset, lam_rise, mom_ptr, sq_ptr, eps, row_len, stride_b,
                        stride_t,
                        HAS_SCALE: tl.constexpr, GATED: tl.constexpr, FROM_ADV: tl.constexpr, TEMPS: tl.constexpr,
                        MOMENTS: tl.constexpr, FINAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        ROW_STAGES: tl.constexpr):
    """Program g: rows [g*rows_per_group, (g+1)*rows_per_group); flags follow the pointers given
    (None: absent). With s = scale[row] if HAS_SCALE
    else 1: m[rows] = 2 (s x - c).w; if GATED, partial[g] = (sum sigmoid(m/gamma[0]) a_pos (s x - c),
    sum sigmoid(-m/gamma[1]) a_neg (s x - c)) over the rows with a nonzero weight (about c). x [N, D]
    fp32/bf16/fp16; scale [N], w [D], c [D],
    gamma [2], a_pos/a_neg [N], m [N], partial [G, 2, D] float32. BLOCK_D >= D.

    FROM_ADV (the fused call, fused.py): scale_ptr is logp (s = 1 - exp(logp)), a_pos_ptr/a_neg_ptr
    the advantages and mask (row_weights), and the group's scalar partials go to stat[g] ([G, SLOTS]
    float32, the slots of _common.py): GATED, the gated weights (sum g+ a+, sum g- a-); MOMENTS, the first
    moments of side_std (sides' counts, sums of m over P and -m over Q, and of their magnitudes);
    FINAL, the totals of final_coefficients (valid count, sum of u = lam_offset + lam_rise gate over
    valid rows, side counts), the gates taken with the temperatures gamma. TEMPS (a process group):
    the temperatures are not read from gamma but finished here from the group's sums
    (group_temperatures of mom [SLOTS] and sq [2], eps), and program 0 stores them in gamma."""
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)  # int32 offsets from a 64-bit row pointer: fewer registers than int64 addresses
    cmask = cols < n_cols
    acc_pos = tl.zeros([1, BLOCK_D], dtype=tl.float32)  # 2-D, in the tile's layout: no conversion per row tile
    acc_neg = tl.zeros([1, BLOCK_D], dtype=tl.float32)
    slot = tl.arange(0, SLOTS)
    stat = tl.zeros([SLOTS], dtype=tl.float32)  # the scalar partials (_common.py's slots)
    if TEMPS:
        gamma_pos, gamma_neg = group_temperatures(mom_ptr, sq_ptr, eps)
        if pid == 0:
            tl.store(gamma_ptr, gamma_pos)
            tl.store(gamma_ptr + 1, gamma_neg)
    elif GATED or FINAL:
        gamma_pos = tl.load(gamma_ptr)
        gamma_neg = tl.load(gamma_ptr + 1)
    row0 = pid * rows_per_group
    for start in tl.range(0, rows_per_group, BLOCK_N, num_stages=ROW_STAGES):  # 2: next row loaded during this one
        rows = row0 + start + tl.arange(0, BLOCK_N).to(tl.int64)
        rmask = rows < n_rows
        tile = tl.load(v_ptr + row_starts(rows, row_len, stride_b, stride_t)[:, None] + cols[None, :],
                       mask=rmask[:, None] & cmask[None, :],
                       other=0.0).to(tl.float32)
        # w and c reloaded per tile (L1 hits), not held across the loop: fewer registers, more CTAs per SM
        w = tl.load(w_ptr + cols[None, :], mask=cmask[None, :], other=0.0)
        c = tl.load(c_ptr + cols[None, :], mask=cmask[None, :], other=0.0)
        if HAS_SCALE:
            if FROM_ADV:
                s = neg_expm1(tl.load(scale_ptr + rows, mask=rmask, other=0.0).to(tl.float32))
            else:
                s = tl.load(scale_ptr + rows, mask=rmask, other=0.0)
            centred = tile * s[:, None] - c
        else:
            centred = tile - c
        m = 2.0 * tl.sum(centred * w, axis=1)
        tl.store(m_ptr + rows, m, mask=rmask)
        if GATED or FINAL or MOMENTS:
            ap, an = row_weights(a_pos_ptr, a_neg_ptr, rows, rmask, FROM_ADV)
        if GATED:
            g_pos = tl.where(ap != 0.0, ap / (1.0 + tl.exp(-(m / gamma_pos))), 0.0)    # sigmoid(m / gamma+) * a+
            g_neg = tl.where(an != 0.0, an / (1.0 + tl.exp(m / gamma_neg)), 0.0)       # sigmoid(-m / gamma-) * a-
            acc_pos += tl.sum(tl.where((ap != 0.0)[:, None], centred * g_pos[:, None], 0.0), axis=0, keep_dims=True)
            acc_neg += tl.sum(tl.where((an != 0.0)[:, None], centred * g_neg[:, None], 0.0), axis=0, keep_dims=True)
            stat += put(slot, WT_POS, tl.sum(g_pos, axis=0)) + put(slot, WT_NEG, tl.sum(g_neg, axis=0))
        if MOMENTS:
            stat += side_moments(m, ap != 0.0, an != 0.0, slot)
        if FINAL:
            stat += final_totals(m, ap != 0.0, an != 0.0, valid_rows(a_neg_ptr, rows, rmask), gamma_pos, gamma_neg,
                                 lam_offset, lam_rise, slot)
    if GATED:
        base = partial_ptr + pid * 2 * n_cols
        tl.store(base + cols[None, :], acc_pos, mask=cmask[None, :])
        tl.store(base + n_cols + cols[None, :], acc_neg, mask=cmask[None, :])
    if FROM_ADV:
        tl.store(stat_ptr + pid * SLOTS + slot, stat)


@triton.heuristics(dict(HAS_SCALE=lambda a: a["scale_ptr"] is not None))
@triton.jit
def _margin_wide_kernel(v_ptr, scale_ptr, w_ptr, c_ptr, m_ptr, n_rows, n_cols, row_len, stride_b, stride_t,
                        HAS_SCALE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """m = 2 (s x - c).w for rows too wide to hold: program i walks rows i*BLOCK_N... in column
    chunks of BLOCK_D (fixed order). Same shapes and dtypes as _margin_rows_kernel."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    rmask = rows < n_rows
    dot = tl.zeros([BLOCK_N], dtype=tl.float32)
    starts = row_starts(rows, row_len, stride_b, stride_t)
    if HAS_SCALE:
        s = tl.load(scale_ptr + rows, mask=rmask, other=0.0)
    for c0 in range(0, n_cols, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D).to(tl.int64)
        cmask = cols < n_cols
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0)
        c = tl.load(c_ptr + cols, mask=cmask, other=0.0)
        tile = tl.load(v_ptr + starts[:, None] + cols[None, :],
                       mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        if HAS_SCALE:
            tile = tile * s[:, None]
        dot += tl.sum((tile - c[None, :]) * w[None, :], axis=1)
    tl.store(m_ptr + rows, 2.0 * dot, mask=rmask)


def margin_config(d: int, gated: bool) -> dict:
    """The launch parameters of the whole-row kernel for rows of width d <= MAX_BLOCK_D: one row
    per tile (ROWS_PER_TILE), ROW_ELEMS_PER_THREAD of it per thread. Ungated, the row loop is software-pipelined
    (ROW_STAGES = 2: the next row is copied to shared memory while this one is reduced); gated,
    it is not, so that the two [D] accumulators (held in the tile's own layout) fit 80 registers:
    3 CTAs of 8 warps per SM at D = 4,096 (benchmarks/NOTES.md, the AOT table)."""
    block_d = triton.next_power_of_2(d)
    warps = max(1, min(16, block_d // (32 * ROW_ELEMS_PER_THREAD)))
    return dict(BLOCK_N=ROWS_PER_TILE, BLOCK_D=block_d, num_warps=warps, ROW_STAGES=1 if gated else 2)


def margin_rows(x: torch.Tensor, scale: Optional[torch.Tensor], w: torch.Tensor, c: torch.Tensor,
                gate: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """The whole-row kernel outside the fused call (rows up to MAX_BLOCK_D wide): x [N, D]
    float32/bf16/fp16 contiguous, scale [N] float32 or None, w [D], c [D] float32 contiguous,
    gate None or (gamma [2], a_pos [N], a_neg [N]) float32 contiguous. -> (m [N] float32,
    gated sums [2, D] float32 about c, or None). One read of x."""
    n, d = row_count(x), x.shape[-1]
    gamma, a_pos, a_neg = gate if gate is not None else (None, None, None)
    cfg = margin_config(d, gated=gate is not None)
    rows_per_group, n_groups = row_groups(n, cfg["BLOCK_N"])
    m = empty(n, dtype=torch.float32, device=x.device)
    partial = None if gate is None else empty(n_groups, 2, d, dtype=torch.float32, device=x.device)
    _margin_rows_kernel[(n_groups,)](
        v_ptr=x, scale_ptr=scale, w_ptr=w, c_ptr=c, m_ptr=m, gamma_ptr=gamma, a_pos_ptr=a_pos, a_neg_ptr=a_neg,
        partial_ptr=partial, stat_ptr=None, n_rows=n, n_cols=d, rows_per_group=rows_per_group, lam_offset=0.0,
        lam_rise=0.0, mom_ptr=None, sq_ptr=None, eps=0.0, MOMENTS=False, FINAL=False, **row_layout(x), **cfg)
    return m, None if partial is None else sum_partials(partial)


# Rows wider than MAX_BLOCK_D (beyond any current LM hidden size; not in the AOT table): 4 rows per
# program walked in CHUNK_D-wide column chunks by 8 warps.
MARGIN_WIDE = dict(BLOCK_N=4, num_warps=8)


def wide_margins(x: torch.Tensor, scale: Optional[torch.Tensor], w: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """m [N] float32 = 2 (s x - c).w for rows wider than MAX_BLOCK_D (same arguments as
    margin_rows, no gate). One read of x."""
    n, d = row_count(x), x.shape[-1]
    m = empty(n, dtype=torch.float32, device=x.device)
    _margin_wide_kernel[(triton.cdiv(n, MARGIN_WIDE["BLOCK_N"]),)](
        v_ptr=x, scale_ptr=scale, w_ptr=w, c_ptr=c, m_ptr=m, n_rows=n, n_cols=d, BLOCK_D=CHUNK_D, **row_layout(x),
        **MARGIN_WIDE)
    return m
