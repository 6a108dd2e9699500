"""Pass 4 of the fused coefficient call (fused.py): the temperatures after a margin pass.
side_std (delta_kernels/_formulas.py) from the margins' moments (the MOM_* slots of the scalar
partials, _common.py) and one walk over m; for k = 0 also the final totals (TOT_* slots) under
those temperatures, so that no final margin pass is needed.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import SLOTS, final_totals, margins_tile, side_gamma, valid_rows

# One program walks the [N] margins 1,024 rows at a time with 4 warps: 54 registers, no spills (AOT
# table, benchmarks/results/aot_sm90.md); a single program, so only the walk's width matters.
TEMPERATURES = dict(BLOCK_G=32, BLOCK_R=1024, num_warps=4)


@triton.heuristics(dict(TOTALS=lambda a: a["totals_ptr"] is not None, SQ_IN=lambda a: a["sq_in_ptr"] is not None,
                        SQ_OUT=lambda a: a["sq_out_ptr"] is not None))
@triton.jit
def _temperature_kernel(stat_ptr, n_groups, m_ptr, adv_ptr, mask_ptr, gamma_ptr, totals_ptr, sq_in_ptr, sq_out_ptr,
                        n_rows, eps, lam_offset, lam_rise, TOTALS: tl.constexpr, SQ_IN: tl.constexpr,
                        SQ_OUT: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_R: tl.constexpr):
    """One program: gamma [2] from the margins' moments (stat [G, SLOTS]) and m [N]; with TOTALS
    (k = 0) also the final totals under those temperatures into the TOT_* slots of totals [1, SLOTS]. SQ_OUT / SQ_IN:
    one half of side_gamma each (a process group; SQ_OUT stores no gamma and takes no TOTALS)."""
    side_gamma(stat_ptr=stat_ptr, n_groups=n_groups, m_ptr=m_ptr, adv_ptr=adv_ptr, mask_ptr=mask_ptr,
               gamma_ptr=gamma_ptr, sq_in_ptr=sq_in_ptr, sq_out_ptr=sq_out_ptr, n_rows=n_rows, eps=eps, SQ_IN=SQ_IN,
               SQ_OUT=SQ_OUT, BLOCK_G=BLOCK_G, BLOCK_R=BLOCK_R)
    if TOTALS:
        gamma_pos = tl.load(gamma_ptr)
        gamma_neg = tl.load(gamma_ptr + 1)
        slot = tl.arange(0, SLOTS)
        totals = tl.zeros([SLOTS], dtype=tl.float32)
        for r0 in range(0, n_rows, BLOCK_R):
            rows, rmask, m, ap, an = margins_tile(m_ptr, adv_ptr, mask_ptr, r0, n_rows, BLOCK_R)
            totals += final_totals(m, ap != 0.0, an != 0.0, valid_rows(mask_ptr, rows, rmask), gamma_pos, gamma_neg,
                                   lam_offset, lam_rise, slot)
        tl.store(totals_ptr + slot, totals)
