"""The [N]- and [D]-sized steps of the fused coefficient call (fused.py) as Triton code: the
row-pass epilogues that fill the per-group scalar partials, and the small kernels that run at
each reduction point. Same formulas as delta_kernels/_formulas.py (docs/design.md), in float32.

Scalar partials: each row pass writes one row of STATS float32 per row group; the slots are
    0, 1   side weights: (sum a+, sum a-) in the side pass, (sum g+ a+, sum g- a-) in a gated pass
    2..7   first moments of side_std: |P|, |Q|, sum over P of m, over Q of -m, and of their magnitudes
    8..11  totals of final_coefficients: valid count, sum of u, |P|, |Q|
A finalize kernel adds the rows in group order (tiles of BLOCK_G by a fixed tree, tiles in order),
in float64 (a few thousand scalars: the rounding of a side's total weight would otherwise scale an
offset the vectors share into the centroids), every program the same way, so each gets bitwise the
same totals and two calls agree bitwise.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .pass1_token_vectors import STATS, row_weights




@triton.jit
def _at(slot, j: tl.constexpr, x):
    """x in slot j of a [STATS] vector."""
    return tl.where(slot == j, x, 0.0)


@triton.jit
def _get(v, slot, j: tl.constexpr):
    """Slot j of a [STATS] vector, as a scalar."""
    return tl.sum(tl.where(slot == j, v, 0.0), axis=0)


@triton.jit
def valid_rows(mask_ptr, rows, rmask):
    """The mask (bool [N]) at ``rows``, False outside."""
    return (tl.load(mask_ptr + rows, mask=rmask, other=0) != 0) & rmask


@triton.jit
def side_moments(m, pos, neg):
    """The slots 2..7 (six scalars) of a tile of margins m (pos/neg: the rows of P and Q)."""
    mp = tl.where(pos, m, 0.0)
    mn = tl.where(neg, -m, 0.0)
    return (tl.sum(pos.to(tl.float32), axis=0), tl.sum(neg.to(tl.float32), axis=0), tl.sum(mp, axis=0),
            tl.sum(mn, axis=0), tl.sum(tl.abs(mp), axis=0), tl.sum(tl.abs(mn), axis=0))


@triton.jit
def _mapped_gates(m, pos, neg, valid, gamma_pos, gamma_neg, lam_offset, lam_rise):
    """u = lam_offset + lam_rise * gate on valid rows (gate: sigmoid(m / gamma+) on P,
    sigmoid(-m / gamma-) on Q, 0 elsewhere), 0 on the others."""
    gate = tl.where(pos, tl.sigmoid(m / gamma_pos), tl.where(neg, tl.sigmoid(-m / gamma_neg), 0.0))
    return tl.where(valid, lam_offset + lam_rise * gate, 0.0)


@triton.jit
def final_totals(m, pos, neg, valid, gamma_pos, gamma_neg, lam_offset, lam_rise):
    """The slots 8..11 (four scalars) of a tile of margins."""
    u = _mapped_gates(m, pos, neg, valid, gamma_pos, gamma_neg, lam_offset, lam_rise)
    return (tl.sum(valid.to(tl.float32), axis=0), tl.sum(u, axis=0), tl.sum(pos.to(tl.float32), axis=0),
            tl.sum(neg.to(tl.float32), axis=0))


@triton.jit
def store_stats(stat_ptr, w_pos, w_neg, n_pos, n_neg, sum_pos, sum_neg, abs_pos, abs_neg, n_valid, u_sum, fin_pos,
                fin_neg):
    """One row of scalar partials (the twelve slots, in order; the rest 0) at stat_ptr."""
    slot = tl.arange(0, STATS)
    row = (_at(slot, 0, w_pos) + _at(slot, 1, w_neg) + _at(slot, 2, n_pos) + _at(slot, 3, n_neg)
           + _at(slot, 4, sum_pos) + _at(slot, 5, sum_neg) + _at(slot, 6, abs_pos) + _at(slot, 7, abs_neg)
           + _at(slot, 8, n_valid) + _at(slot, 9, u_sum) + _at(slot, 10, fin_pos) + _at(slot, 11, fin_neg))
    tl.store(stat_ptr + slot, row)


@triton.jit
def sum_stats(stat_ptr, n_groups, BLOCK_G: tl.constexpr):
    """The [STATS] column sums of stat [G, STATS] float32, in the fixed order, accumulated in float64."""
    slot = tl.arange(0, STATS)
    acc = tl.zeros([STATS], dtype=tl.float64)
    for g0 in range(0, n_groups, BLOCK_G):
        g = g0 + tl.arange(0, BLOCK_G).to(tl.int64)
        acc += tl.sum(tl.load(stat_ptr + g[:, None] * STATS + slot[None, :], mask=(g < n_groups)[:, None],
                              other=0.0).to(tl.float64), axis=0)
    return acc.to(tl.float32)


@triton.jit
def _side_scales(tot, slot):
    """From the moments (slots 2..7 of tot [STATS]): the sides' counts (clamped to 1), mean
    margins and mean |m| (clamped to 1e-30): n_pos, n_neg, mean_pos, mean_neg, scale_pos, scale_neg."""
    n_pos = tl.maximum(_get(tot, slot, 2), 1.0)
    n_neg = tl.maximum(_get(tot, slot, 3), 1.0)
    return (n_pos, n_neg, _get(tot, slot, 4) / n_pos, _get(tot, slot, 5) / n_neg,
            tl.maximum(_get(tot, slot, 6) / n_pos, 1e-30), tl.maximum(_get(tot, slot, 7) / n_neg, 1e-30))


@triton.jit
def _gammas(n_pos, n_neg, scale_pos, scale_neg, sq_pos, sq_neg, eps):
    """side_std's temperatures from the sums of squared scaled deviations sq (per side)."""
    floor = tl.sqrt(eps)
    return (tl.maximum(scale_pos * tl.sqrt(sq_pos / n_pos), floor),
            tl.maximum(scale_neg * tl.sqrt(sq_neg / n_neg), floor))


@triton.jit
def group_temperatures(mom_ptr, sq_ptr, eps):
    """(gamma+, gamma-) from group-wide sums: the moments row mom [STATS] and the sums of squared
    scaled deviations sq [2] (the process-group path of fused.py)."""
    slot = tl.arange(0, STATS)
    n_pos, n_neg, mean_pos, mean_neg, scale_pos, scale_neg = _side_scales(tl.load(mom_ptr + slot), slot)
    return _gammas(n_pos, n_neg, scale_pos, scale_neg, tl.load(sq_ptr), tl.load(sq_ptr + 1), eps)


@triton.jit
def _side_gamma(stat_ptr, n_groups, m_ptr, adv_ptr, mask_ptr, gamma_ptr, sq_in_ptr, sq_out_ptr, n_rows, eps,
                SQ_IN: tl.constexpr, SQ_OUT: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_R: tl.constexpr):
    """side_std: gamma = max(scale sqrt(mean(((+-m - mean) / scale)^2)), sqrt(eps)) per side,
    scale = the side's mean |m|, from the moments in stat and one walk over m; stored in gamma [2].
    With a process group the two halves run apart, an all_reduce between them: SQ_OUT stores the
    walk's sums of squares (this rank's rows) in sq_out [2] instead; SQ_IN takes them, summed over
    the group, from sq_in [2] instead of walking m."""
    slot = tl.arange(0, STATS)
    tot = sum_stats(stat_ptr, n_groups, BLOCK_G)
    n_pos, n_neg, mean_pos, mean_neg, scale_pos, scale_neg = _side_scales(tot, slot)
    if SQ_IN:
        sq_pos_sum = tl.load(sq_in_ptr)
        sq_neg_sum = tl.load(sq_in_ptr + 1)
    else:
        sq_pos = tl.zeros([BLOCK_R], dtype=tl.float32)
        sq_neg = tl.zeros([BLOCK_R], dtype=tl.float32)
        for r0 in range(0, n_rows, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
            rmask = rows < n_rows
            m = tl.load(m_ptr + rows, mask=rmask, other=0.0)
            ap, an = row_weights(adv_ptr, mask_ptr, rows, rmask, True)
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


@triton.heuristics(dict(TOTALS=lambda a: a["totals_ptr"] is not None, SQ_IN=lambda a: a["sq_in_ptr"] is not None,
                        SQ_OUT=lambda a: a["sq_out_ptr"] is not None))
@triton.jit
def _temperature_kernel(stat_ptr, n_groups, m_ptr, adv_ptr, mask_ptr, gamma_ptr, totals_ptr, sq_in_ptr, sq_out_ptr,
                        n_rows, eps, lam_offset, lam_rise, TOTALS: tl.constexpr, SQ_IN: tl.constexpr,
                        SQ_OUT: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_R: tl.constexpr):
    """One program: gamma [2] from the margins' moments (stat [G, STATS]) and m [N]; with TOTALS
    (k = 0) also the final totals under those temperatures into totals [1, STATS]. SQ_OUT / SQ_IN:
    one half of _side_gamma each (a process group; SQ_OUT stores no gamma and takes no TOTALS)."""
    _side_gamma(stat_ptr, n_groups, m_ptr, adv_ptr, mask_ptr, gamma_ptr, sq_in_ptr, sq_out_ptr, n_rows, eps, SQ_IN,
                SQ_OUT, BLOCK_G, BLOCK_R)
    if TOTALS:
        gamma_pos = tl.load(gamma_ptr)
        gamma_neg = tl.load(gamma_ptr + 1)
        zero = tl.zeros([], dtype=tl.float32)
        n_valid, u_sum, n_pos, n_neg = zero, zero, zero, zero
        for r0 in range(0, n_rows, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
            rmask = rows < n_rows
            m = tl.load(m_ptr + rows, mask=rmask, other=0.0)
            ap, an = row_weights(adv_ptr, mask_ptr, rows, rmask, True)
            t0, t1, t2, t3 = final_totals(m, ap != 0.0, an != 0.0, valid_rows(mask_ptr, rows, rmask), gamma_pos,
                                          gamma_neg, lam_offset, lam_rise)
            n_valid += t0
            u_sum += t1
            n_pos += t2
            n_neg += t3
        store_stats(totals_ptr, zero, zero, zero, zero, zero, zero, zero, zero, n_valid, u_sum, n_pos, n_neg)


@triton.heuristics(dict(ABOUT=lambda a: a["centre_ptr"] is not None, STD=lambda a: a["m_ptr"] is not None,
                        SQ_OUT=lambda a: a["sq_out_ptr"] is not None))
@triton.jit
def _centroids_kernel(partial_ptr, n_groups, stat_ptr, n_stat_groups, centre_ptr, mu_ptr, w_ptr, c_ptr,
                      m_ptr, adv_ptr, mask_ptr, gamma_ptr, sq_out_ptr, n_cols, n_rows, eps,
                      ABOUT: tl.constexpr, STD: tl.constexpr, SQ_OUT: tl.constexpr, BLOCK_G: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """Programs 0..T-1 (column tiles): sums [2, D] = the partials [G, 2, D] added in group order,
    weights = slots 0, 1 of stat; mu [2, D], w = the discriminator, c = its centre
    (centroids_from_sums and discriminator; ABOUT: centroids_about the centre [D], the sums taken
    about it). With STD, program T also stores side_std of m into gamma [2] (the moments in stat);
    SQ_OUT (a process group): only the sums of squares of side_std, into sq_out [2]."""
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(n_cols, BLOCK_C)
    if pid < n_tiles:
        slot = tl.arange(0, STATS)
        cols = pid.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cols < n_cols
        s_pos = tl.zeros([BLOCK_C], dtype=tl.float32)
        s_neg = tl.zeros([BLOCK_C], dtype=tl.float32)
        for g0 in range(0, n_groups, BLOCK_G):
            g = g0 + tl.arange(0, BLOCK_G).to(tl.int64)
            gmask = (g < n_groups)[:, None] & cmask[None, :]
            offs = g[:, None] * 2 * n_cols + cols[None, :]
            s_pos += tl.sum(tl.load(partial_ptr + offs, mask=gmask, other=0.0), axis=0)
            s_neg += tl.sum(tl.load(partial_ptr + offs + n_cols, mask=gmask, other=0.0), axis=0)
        tot = sum_stats(stat_ptr, n_stat_groups, BLOCK_G)
        wt_pos = _get(tot, slot, 0)
        wt_neg = _get(tot, slot, 1)
        if ABOUT:
            centre = tl.load(centre_ptr + cols, mask=cmask, other=0.0)
            off_pos = tl.where(wt_pos >= eps, s_pos / tl.maximum(wt_pos, eps), (s_pos + wt_pos * centre) / eps - centre)
            off_neg = tl.where(wt_neg >= eps, s_neg / tl.maximum(wt_neg, eps), (s_neg + wt_neg * centre) / eps - centre)
            mu_pos = tl.where(wt_pos >= eps, centre + off_pos, (s_pos + wt_pos * centre) / eps)
            mu_neg = tl.where(wt_neg >= eps, centre + off_neg, (s_neg + wt_neg * centre) / eps)
            w = off_pos - off_neg
            c = centre + 0.5 * (off_pos + off_neg)
        else:
            mu_pos = s_pos / tl.maximum(wt_pos, eps)
            mu_neg = s_neg / tl.maximum(wt_neg, eps)
            w = mu_pos - mu_neg
            c = 0.5 * (mu_pos + mu_neg)
        tl.store(mu_ptr + cols, mu_pos, mask=cmask)
        tl.store(mu_ptr + n_cols + cols, mu_neg, mask=cmask)
        tl.store(w_ptr + cols, w, mask=cmask)
        tl.store(c_ptr + cols, c, mask=cmask)
    if STD:
        if pid == n_tiles:
            _side_gamma(stat_ptr, n_stat_groups, m_ptr, adv_ptr, mask_ptr, gamma_ptr, None, sq_out_ptr, n_rows, eps,
                        False, SQ_OUT, BLOCK_G, BLOCK_R)


@triton.jit
def _final_kernel(m_ptr, adv_ptr, mask_ptr, gamma_ptr, stat_ptr, n_stat_groups, w_ptr, c_ptr,
                  coef_ptr, weighted_ptr, pred_ptr, scalar_ptr, n_rows, n_cols, eps, lam_offset, lam_rise, inv_base,
                  BLOCK_G: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """final_coefficients over rows pid*BLOCK_R...: coef = u * scale (scale = valid count / sum u,
    from slots 8, 9 of stat), weighted = adv coef and pred = sign(adv) m / 2 on valid rows, 0
    elsewhere ([N] float32 each). Program 0 also stores scalar [5] = (scale * inv_base, valid
    count, |P|, |Q|, b = -c.w)."""
    pid = tl.program_id(0)
    slot = tl.arange(0, STATS)
    tot = sum_stats(stat_ptr, n_stat_groups, BLOCK_G)
    n_valid = _get(tot, slot, 8)
    scale = n_valid / tl.maximum(_get(tot, slot, 9), eps)
    gamma_pos = tl.load(gamma_ptr)
    gamma_neg = tl.load(gamma_ptr + 1)
    rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < n_rows
    m = tl.load(m_ptr + rows, mask=rmask, other=0.0)
    a = tl.load(adv_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    valid = valid_rows(mask_ptr, rows, rmask)
    coef = _mapped_gates(m, valid & (a > 0.0), valid & (a < 0.0), valid, gamma_pos, gamma_neg, lam_offset,
                         lam_rise) * scale
    tl.store(coef_ptr + rows, coef, mask=rmask)
    tl.store(weighted_ptr + rows, tl.where(valid, a * coef, 0.0), mask=rmask)
    half = m * 0.5
    tl.store(pred_ptr + rows, tl.where(valid & (a > 0.0), half, tl.where(valid & (a < 0.0), -half, 0.0)), mask=rmask)
    if pid == 0:
        dot = tl.zeros([BLOCK_D], dtype=tl.float32)
        for d0 in range(0, n_cols, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            cmask = cols < n_cols
            dot += tl.load(c_ptr + cols, mask=cmask, other=0.0) * tl.load(w_ptr + cols, mask=cmask, other=0.0)
        out = (_at(slot, 0, scale * inv_base) + _at(slot, 1, n_valid) + _at(slot, 2, _get(tot, slot, 10))
               + _at(slot, 3, _get(tot, slot, 11)) + _at(slot, 4, -tl.sum(dot, axis=0)))
        tl.store(scalar_ptr + slot, out, mask=slot < 5)


@triton.jit
def _local_sums_kernel(partial_ptr, n_groups, stat_ptr, n_stat_groups, out_ptr, n_cols,
                       BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr):
    """One reduction point of the process-group path: this rank's partials added into one row,
    in the orders the finalize kernels use, for one all_reduce. Programs 0..T-1 (column tiles):
    out[:C] = the rows of partial [G, C] in group order (float32, as _centroids_kernel's sums);
    program T: out[C:C + STATS] = sum_stats of stat [Gs, STATS]. out [C + STATS] float32."""
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(n_cols, BLOCK_C)
    if pid < n_tiles:
        cols = pid.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cols < n_cols
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for g0 in range(0, n_groups, BLOCK_G):
            g = g0 + tl.arange(0, BLOCK_G).to(tl.int64)
            acc += tl.sum(tl.load(partial_ptr + g[:, None] * n_cols + cols[None, :],
                                  mask=(g < n_groups)[:, None] & cmask[None, :], other=0.0), axis=0)
        tl.store(out_ptr + cols, acc, mask=cmask)
    else:
        slot = tl.arange(0, STATS)
        tl.store(out_ptr + n_cols + slot, sum_stats(stat_ptr, n_stat_groups, BLOCK_G))
