"""Pass 2 of the fused coefficient call (fused.py): the centroids, at each reduction point after
a pass that sums the rows (pass 1's side sums, pass 3's gated sums). The per-group [G, 2, D]
partials are added in group order and divided by the side weights (the WT_* slots of the
scalar partials, _common.py): centroids_from_sums and discriminator, or centroids_about the
previous centre (delta_kernels/_formulas.py, docs/design.md), in float32. One extra program
can take side_std's walk over the margins in the same launch.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import SLOTS, WT_NEG, WT_POS, get, side_gamma, sum_slots

# 256 columns per program, partial rows added 32 at a time, the margins walked 1,024 rows at a time,
# 4 warps: 94 registers, no spills, 5 CTAs/SM (register-bound; AOT table, benchmarks/results/aot_sm90.md).
# There are D / 256 programs (+ 1), so occupancy is not what limits this kernel.
CENTROIDS = dict(BLOCK_G=32, BLOCK_C=256, BLOCK_R=1024, num_warps=4)


@triton.heuristics(dict(ABOUT=lambda a: a["centre_ptr"] is not None, STD=lambda a: a["m_ptr"] is not None,
                        SQ_OUT=lambda a: a["sq_out_ptr"] is not None))
@triton.jit
def _centroids_kernel(partial_ptr, n_groups, stat_ptr, n_stat_groups, centre_ptr, mu_ptr, w_ptr, c_ptr,
                      m_ptr, adv_ptr, mask_ptr, gamma_ptr, sq_out_ptr, n_cols, n_rows, eps,
                      ABOUT: tl.constexpr, STD: tl.constexpr, SQ_OUT: tl.constexpr, BLOCK_G: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """Programs 0..T-1 (column tiles): sums [2, D] = the partials [G, 2, D] added in group order,
    weights = slots WT_POS, WT_NEG of stat; mu [2, D], w = the discriminator, c = its centre
    (centroids_from_sums and discriminator; ABOUT: centroids_about the centre [D], the sums taken
    about it). With STD, program T also stores side_std of m into gamma [2] (the moments in stat);
    SQ_OUT (a process group): only the sums of squares of side_std, into sq_out [2]."""
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(n_cols, BLOCK_C)
    if pid < n_tiles:
        slot = tl.arange(0, SLOTS)
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
        tot = sum_slots(stat_ptr, n_stat_groups, BLOCK_G)
        wt_pos = get(tot, slot, WT_POS)
        wt_neg = get(tot, slot, WT_NEG)
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
            side_gamma(stat_ptr=stat_ptr, n_groups=n_stat_groups, m_ptr=m_ptr, adv_ptr=adv_ptr, mask_ptr=mask_ptr,
                       gamma_ptr=gamma_ptr, sq_in_ptr=None, sq_out_ptr=sq_out_ptr, n_rows=n_rows, eps=eps, SQ_IN=False,
                       SQ_OUT=SQ_OUT, BLOCK_G=BLOCK_G, BLOCK_R=BLOCK_R)
