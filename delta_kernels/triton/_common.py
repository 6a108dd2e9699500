"""What the coefficient passes share (a leaf: it imports no other module of this package): the
names of the scalar slots, the ScaledRows handle, and the @triton.jit helpers every pass calls.

Scalar partials. Each row pass of the fused call (fused.py) writes one row of SLOTS float32 per
row group; the finalize steps (pass2_centroids, pass4_temperatures, pass5_coefficients) add the
rows in group order (sum_slots) and read the slots by these names:
    WT_POS, WT_NEG            side weights: (sum a+, sum a-) in the side pass, (sum g+ a+, sum g- a-)
                              in a gated pass
    MOM_*                     first moments of side_std: |P|, |Q|, sum over P of m, over Q of -m,
                              and of their magnitudes
    TOT_*                     totals of final_coefficients: valid count, sum of u, |P|, |Q|
The final kernel writes a second, shorter vector, the call's scalar results (RESULTS slots,
RES_*). Formulas as in delta_kernels/_formulas.py (docs/design.md), in float32.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl


def _slots(first: int, count: int):
    return tuple(tl.constexpr(first + i) for i in range(count))


SLOTS = tl.constexpr(16)     # width of one row of scalar partials (a power of two: tl.arange)
WT_POS, WT_NEG = _slots(0, 2)
MOM_N_POS, MOM_N_NEG, MOM_SUM_POS, MOM_SUM_NEG, MOM_ABS_POS, MOM_ABS_NEG = _slots(2, 6)
TOT_VALID, TOT_U, TOT_N_POS, TOT_N_NEG = _slots(8, 4)

# the final kernel's scalar results: the coefficients' scale over the lam base (stats "scale"), the valid
# count, |P|, |Q| and b = -c.w
RES_SCALE, RES_N_VALID, RES_N_POS, RES_N_NEG, RES_BIAS = _slots(0, 5)
RESULTS = tl.constexpr(5)


class ScaledRows(NamedTuple):
    """Token vectors v[t] = scale[t] * rows[t] that are never materialised: side_sums and
    margin_pass read the rows and scale each on the fly (one read of the rows per pass)."""
    rows: torch.Tensor   # [N, D] float32/bf16/fp16, or a [B, T, D] view (row_layout): the hidden states
    scale: torch.Tensor  # [N] float32 contiguous, 1 - exp(logp)


def row_count(x: torch.Tensor) -> int:
    """The rows of a row operand x ([N, D], or the caller's [B, T, D] view): N = B T."""
    return math.prod(x.shape[:-1])


def row_layout(x: torch.Tensor) -> dict:
    """Where the rows of a row operand lie, as the row kernels' keyword arguments: x [N, D] or the
    caller's [B, T, D] view, last dim contiguous, read in place (no [N, D] copy): row n = b T + t
    starts at element b stride_b + t stride_t (row_starts)."""
    assert x.dim() in (2, 3) and (x.stride(-1) == 1 or x.shape[-1] <= 1), "rows with a contiguous last dim"
    if x.dim() == 3:
        return dict(row_len=max(x.shape[1], 1), stride_b=x.stride(0), stride_t=x.stride(1))
    return dict(row_len=max(x.shape[0], 1), stride_b=0, stride_t=x.stride(0))


@triton.jit
def row_starts(rows, row_len, stride_b, stride_t):
    """Element offsets (int64) of the rows n = b T + t of a row operand: b stride_b + t stride_t."""
    return (rows // row_len) * stride_b + (rows % row_len) * stride_t


def rows_and_scale(v):
    """v: a tensor [N, D] or ScaledRows -> (rows [N, D], scale [N] float32 or None)."""
    return (v.rows, v.scale) if isinstance(v, ScaledRows) else (v, None)


@triton.jit
def neg_expm1(x):
    """1 - exp(x) = -expm1(x) in float32, accurate for x near 0: a degree-10 Taylor series
    (Horner) for |x| < 0.5, where the rounding of exp(x) near 1 would dominate, else 1 - exp(x)."""
    p = 1.0 + x * (1.0 / 10.0)
    p = 1.0 + x * (1.0 / 9.0) * p
    p = 1.0 + x * (1.0 / 8.0) * p
    p = 1.0 + x * (1.0 / 7.0) * p
    p = 1.0 + x * (1.0 / 6.0) * p
    p = 1.0 + x * (1.0 / 5.0) * p
    p = 1.0 + x * (1.0 / 4.0) * p
    p = 1.0 + x * (1.0 / 3.0) * p
    p = 1.0 + x * 0.5 * p
    return tl.where(tl.abs(x) < 0.5, -x * p, 1.0 - tl.exp(x))


@triton.jit
def row_weights(a_pos_ptr, a_neg_ptr, rows, rmask, FROM_ADV: tl.constexpr):
    """-> (a+, a-) float32 for ``rows``. FROM_ADV: a_pos_ptr holds the advantages (any float
    dtype) and a_neg_ptr the mask (bool), and the weights are side_masks' in-kernel:
    a+ = adv where valid and adv > 0, a- = -adv where valid and adv < 0, else 0. Otherwise both
    are loaded as given (float32 [N])."""
    if FROM_ADV:
        a = tl.load(a_pos_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
        valid = (tl.load(a_neg_ptr + rows, mask=rmask, other=0) != 0) & rmask
        ap = tl.where(valid & (a > 0.0), a, 0.0)
        an = tl.where(valid & (a < 0.0), -a, 0.0)
    else:
        ap = tl.load(a_pos_ptr + rows, mask=rmask, other=0.0)
        an = tl.load(a_neg_ptr + rows, mask=rmask, other=0.0)
    return ap, an


@triton.jit
def margins_tile(m_ptr, adv_ptr, mask_ptr, r0, n_rows, BLOCK_R: tl.constexpr):
    """Rows r0... of a walk over the margins m [N]: (rows, in range, m, a+, a-)."""
    rows = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
    rmask = rows < n_rows
    m = tl.load(m_ptr + rows, mask=rmask, other=0.0)
    ap, an = row_weights(adv_ptr, mask_ptr, rows, rmask, True)
    return rows, rmask, m, ap, an


@triton.jit
def valid_rows(mask_ptr, rows, rmask):
    """The mask (bool [N]) at ``rows``, False outside."""
    return (tl.load(mask_ptr + rows, mask=rmask, other=0) != 0) & rmask


@triton.jit
def put(slot, j: tl.constexpr, x):
    """x in slot j of a [SLOTS] row (slot = tl.arange(0, SLOTS)), 0 elsewhere."""
    return tl.where(slot == j, x, 0.0)


@triton.jit
def get(row, slot, j: tl.constexpr):
    """Slot j of a [SLOTS] row, as a scalar."""
    return tl.sum(tl.where(slot == j, row, 0.0), axis=0)


@triton.jit
def side_moments(m, pos, neg, slot):
    """The MOM_* slots of a tile of margins m (pos/neg: the rows of P and Q), as a [SLOTS] row."""
    mp = tl.where(pos, m, 0.0)
    mn = tl.where(neg, -m, 0.0)
    return (put(slot, MOM_N_POS, tl.sum(pos.to(tl.float32), axis=0))
            + put(slot, MOM_N_NEG, tl.sum(neg.to(tl.float32), axis=0))
            + put(slot, MOM_SUM_POS, tl.sum(mp, axis=0)) + put(slot, MOM_SUM_NEG, tl.sum(mn, axis=0))
            + put(slot, MOM_ABS_POS, tl.sum(tl.abs(mp), axis=0)) + put(slot, MOM_ABS_NEG, tl.sum(tl.abs(mn), axis=0)))


@triton.jit
def mapped_gates(m, pos, neg, valid, gamma_pos, gamma_neg, lam_offset, lam_rise):
    """u = lam_offset + lam_rise * gate on valid rows (gate: sigmoid(m / gamma+) on P,
    sigmoid(-m / gamma-) on Q, 0 elsewhere), 0 on the others."""
    gate = tl.where(pos, tl.sigmoid(m / gamma_pos), tl.where(neg, tl.sigmoid(-m / gamma_neg), 0.0))
    return tl.where(valid, lam_offset + lam_rise * gate, 0.0)


@triton.jit
def final_totals(m, pos, neg, valid, gamma_pos, gamma_neg, lam_offset, lam_rise, slot):
    """The TOT_* slots of a tile of margins, as a [SLOTS] row."""
    u = mapped_gates(m, pos, neg, valid, gamma_pos, gamma_neg, lam_offset, lam_rise)
    return (put(slot, TOT_VALID, tl.sum(valid.to(tl.float32), axis=0)) + put(slot, TOT_U, tl.sum(u, axis=0))
            + put(slot, TOT_N_POS, tl.sum(pos.to(tl.float32), axis=0))
            + put(slot, TOT_N_NEG, tl.sum(neg.to(tl.float32), axis=0)))


@triton.jit
def sum_slots(stat_ptr, n_groups, BLOCK_G: tl.constexpr):
    """The [SLOTS] column sums of stat [G, SLOTS] float32, in the fixed order (tiles of BLOCK_G
    rows by a fixed tree, tiles in order), accumulated in float64 (a few thousand scalars: the
    rounding of a side's total weight would otherwise scale an offset the vectors share into the
    centroids). Every program adds them the same way, so each gets bitwise the same totals."""
    slot = tl.arange(0, SLOTS)
    acc = tl.zeros([SLOTS], dtype=tl.float64)
    for g0 in range(0, n_groups, BLOCK_G):
        g = g0 + tl.arange(0, BLOCK_G).to(tl.int64)
        acc += tl.sum(tl.load(stat_ptr + g[:, None] * SLOTS + slot[None, :], mask=(g < n_groups)[:, None],
                              other=0.0).to(tl.float64), axis=0)
    return acc.to(tl.float32)


@triton.jit
def _side_scales(tot, slot):
    """From the MOM_* slots of tot [SLOTS]: the sides' counts (clamped to 1), mean margins and
    mean |m| (clamped to 1e-30): n_pos, n_neg, mean_pos, mean_neg, scale_pos, scale_neg."""
    n_pos = tl.maximum(get(tot, slot, MOM_N_POS), 1.0)
    n_neg = tl.maximum(get(tot, slot, MOM_N_NEG), 1.0)
    return (n_pos, n_neg, get(tot, slot, MOM_SUM_POS) / n_pos, get(tot, slot, MOM_SUM_NEG) / n_neg,
            tl.maximum(get(tot, slot, MOM_ABS_POS) / n_pos, 1e-30),
            tl.maximum(get(tot, slot, MOM_ABS_NEG) / n_neg, 1e-30))


@triton.jit
def _gammas(n_pos, n_neg, scale_pos, scale_neg, sq_pos, sq_neg, eps):
    """side_std's temperatures from the sums of squared scaled deviations sq (per side)."""
    floor = tl.sqrt(eps)
    return (tl.maximum(scale_pos * tl.sqrt(sq_pos / n_pos), floor),
            tl.maximum(scale_neg * tl.sqrt(sq_neg / n_neg), floor))


@triton.jit
def group_temperatures(mom_ptr, sq_ptr, eps):
    """(gamma+, gamma-) from group-wide sums: the moments row mom [SLOTS] and the sums of squared
    scaled deviations sq [2] (the process-group path of fused.py)."""
    slot = tl.arange(0, SLOTS)
    n_pos, n_neg, mean_pos, mean_neg, scale_pos, scale_neg = _side_scales(tl.load(mom_ptr + slot), slot)
    return _gammas(n_pos, n_neg, scale_pos, scale_neg, tl.load(sq_ptr), tl.load(sq_ptr + 1), eps)


@triton.jit
def side_gamma(stat_ptr, n_groups, m_ptr, adv_ptr, mask_ptr, gamma_ptr, sq_in_ptr, sq_out_ptr, n_rows, eps,
               SQ_IN: tl.constexpr, SQ_OUT: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_R: tl.constexpr):
    """side_std: gamma = max(scale sqrt(mean(((+-m - mean) / scale)^2)), sqrt(eps)) per side,
    scale = the side's mean |m|, from the moments in stat and one walk over m; stored in gamma [2].
    With a process group the two halves run apart, an all_reduce between them: SQ_OUT stores the
    walk's sums of squares (this rank's rows) in sq_out [2] instead; SQ_IN takes them, summed over
    the group, from sq_in [2] instead of walking m."""
    slot = tl.arange(0, SLOTS)
    tot = sum_slots(stat_ptr, n_groups, BLOCK_G)
    n_pos, n_neg, mean_pos, mean_neg, scale_pos, scale_neg = _side_scales(tot, slot)
    if SQ_IN:
        sq_pos_sum = tl.load(sq_in_ptr)
        sq_neg_sum = tl.load(sq_in_ptr + 1)
    else:
        sq_pos = tl.zeros([BLOCK_R], dtype=tl.float32)
        sq_neg = tl.zeros([BLOCK_R], dtype=tl.float32)
        for r0 in range(0, n_rows, BLOCK_R):
            rows, rmask, m, ap, an = margins_tile(m_ptr, adv_ptr, mask_ptr, r0, n_rows, BLOCK_R)
            d_pos = tl.where(ap != 0.0, (m - mean_pos) / scale_pos, 0.0)
            d_neg = tl.where(an != 0.0, (-m - mean_neg) / scale_neg, 0.0)
            sq_pos += d_pos * d_pos
            sq_neg += d_neg * d_neg
        sq_pos_sum = tl.sum(sq_pos, axis=0)
        sq_neg_sum = tl.sum(sq_neg, axis=0)
    if SQ_OUT:
        tl.store(sq_out_ptr, sq_pos_sum)
        tl.store(sq_out_ptr + 1, sq_neg_sum)
    else:
        gamma_pos, gamma_neg = _gammas(n_pos, n_neg, scale_pos, scale_neg, sq_pos_sum, sq_neg_sum, eps)
        tl.store(gamma_ptr, gamma_pos)
        tl.store(gamma_ptr + 1, gamma_neg)
