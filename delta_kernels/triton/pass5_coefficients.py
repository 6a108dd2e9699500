"""Pass 5, the last launch of the fused coefficient call (fused.py): final_coefficients
(delta_kernels/_formulas.py) from the final margins and the totals (the TOT_* slots of the
scalar partials, _common.py): coef, the weighted advantages and pred per row, and the call's
scalar results (RES_* slots).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import (RES_BIAS, RES_N_NEG, RES_N_POS, RES_N_VALID, RES_SCALE, RESULTS, SLOTS, TOT_N_NEG, TOT_N_POS,
                      TOT_U, TOT_VALID, get, mapped_gates, put, sum_slots, valid_rows)

# 1,024 rows per program, 4 warps: 56 registers, no spills, 9 CTAs/SM (register-bound; AOT table,
# benchmarks/results/aot_sm90.md); program 0 also walks c.w 256 columns at a time.
COEFFICIENTS = dict(BLOCK_G=32, BLOCK_R=1024, BLOCK_D=256, num_warps=4)


@triton.jit
def _final_kernel(m_ptr, adv_ptr, mask_ptr, gamma_ptr, stat_ptr, n_stat_groups, w_ptr, c_ptr,
                  coef_ptr, weighted_ptr, pred_ptr, scalar_ptr, n_rows, n_cols, eps, lam_offset, lam_rise, inv_base,
                  BLOCK_G: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """final_coefficients over rows pid*BLOCK_R...: coef = u * scale (scale = valid count / sum u,
    from the TOT_VALID and TOT_U slots of stat), weighted = adv coef and pred = sign(adv) m / 2 on valid rows, 0
    elsewhere ([N] float32 each). Program 0 also stores the results scalar [RESULTS]: RES_SCALE =
    scale * inv_base, RES_N_VALID, RES_N_POS, RES_N_NEG (|P|, |Q|) and RES_BIAS = b = -c.w."""
    pid = tl.program_id(0)
    slot = tl.arange(0, SLOTS)
    tot = sum_slots(stat_ptr, n_stat_groups, BLOCK_G)
    n_valid = get(tot, slot, TOT_VALID)
    scale = n_valid / tl.maximum(get(tot, slot, TOT_U), eps)
    gamma_pos = tl.load(gamma_ptr)
    gamma_neg = tl.load(gamma_ptr + 1)
    rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < n_rows
    m = tl.load(m_ptr + rows, mask=rmask, other=0.0)
    a = tl.load(adv_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    valid = valid_rows(mask_ptr, rows, rmask)
    coef = mapped_gates(m, valid & (a > 0.0), valid & (a < 0.0), valid, gamma_pos, gamma_neg, lam_offset,
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
        out = (put(slot, RES_SCALE, scale * inv_base) + put(slot, RES_N_VALID, n_valid)
               + put(slot, RES_N_POS, get(tot, slot, TOT_N_POS)) + put(slot, RES_N_NEG, get(tot, slot, TOT_N_NEG))
               + put(slot, RES_BIAS, -tl.sum(dot, axis=0)))
        tl.store(scalar_ptr + slot, out, mask=slot < RESULTS)
