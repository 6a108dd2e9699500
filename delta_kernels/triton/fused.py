"""The triton backend's ``delta_coefficients`` in few launches: the pipeline of
delta_kernels/pipeline.py with its [N]- and [D]-sized torch ops moved into the pass kernels'
epilogues (per-group scalar partials, finalize.py) and one small finalize kernel per reduction
point. The side masks and the row scale 1 - exp(logp) are computed inside every kernel from
(advantages, mask, logp), so no [N] weight is ever written.

Launches per call (no torch op runs between them): exact k = 0, 5; k >= 1, 2k + 6:
    side pass (hidden/vectors; the sketch kernel when sketched; the weights alone when the
        side sums are given) -> centroids -> margins with moments -> temperatures
        [-> k x (gated margins with moments -> centroids about c, with the step's temperatures
        in one extra program)] -> final margins with totals -> coefficients
(for k = 0 the temperature kernel takes the totals too and the final margin pass is not needed).
Reads of the rows: as in pipeline.py. No host synchronisation, shapes fixed by the inputs, every
buffer allocated by the call itself: CUDA-graph capturable (docs/cuda_graphs.md).

With a process group (``reduce``, distributed.group_sum) the same kernels run, and at each
reduction point this rank's partials (the [G, 2, D] sums and the [G, STATS] scalar rows) are
first added into one row in the finalize kernels' order (_local_sums_kernel), then summed over
the group by one all_reduce; the finalize kernel reads that one row. side_std needs the group's
moments before its walk over m, so its two halves run apart: the walk stores this rank's sums of
squares (an all_reduce of 2 floats) and the next kernel (the gated or final margins, or for
k = 0 the temperature kernel with the totals) finishes the temperatures from the group's sums.
Per call: 2k + 6 kernels (k = 0: 6), k + 3 local sums (k = 0: 2) and 2k + 4 all_reduce calls
(side sums and weights; moments; sums of squares; per step: gated sums with weights and
moments, sums of squares; final totals, which carry the side counts). On one rank the results
equal the call without a group bit for bit.

Used for rows up to margin_pass.MAX_BLOCK_D wide; wider, the backend runs
pipeline.run_coefficients over the unfused passes.
"""
from __future__ import annotations

import torch
import triton

from .._alloc import empty
from .pass2_centroids import _centroids_kernel, _final_kernel, _local_sums_kernel, _temperature_kernel
from . import pass3_margins as margin_pass
from .pass3_margins import _margin_rows_kernel, margin_config
from .row_partials import row_groups
from .pass1_token_vectors import BLOCK_COLS, BLOCK_ROWS, STATS, _scaled_rows_kernel, sketch_rows

FINALIZE_BLOCK_G = 32    # partial rows per tile of the fixed-order sums
FINALIZE_BLOCK_C = 256   # columns per program of the centroid kernel
FINALIZE_BLOCK_R = 1024  # rows per tile of the [N]-sized walks


def fused_supported(batch, sketch_dim) -> bool:
    """Whether the fused call handles this batch (the rows fit one whole-row tile)."""
    src = batch.vectors if batch.vectors is not None else batch.hidden
    d = sketch_dim if (batch.vectors is None and sketch_dim is not None) else src.shape[1]
    return triton.next_power_of_2(d) <= margin_pass.MAX_BLOCK_D  # read at call time (tests lower it)


def _side_pass(batch, sketch_dim, seed):
    """-> (rows x [N, D], scale source (logp) or None, partial [G, 2, D], n_groups, weight stat [Gw, STATS], Gw)."""
    f32, dev = torch.float32, batch.logp.device
    logp, adv, mask = batch.logp, batch.advantages, batch.mask
    n = logp.numel()
    if batch.vectors is None and sketch_dim is not None:
        # z in float32: not rounded to hidden's dtype, as on cpp and cuda
        z, partial, stat = sketch_rows(batch.hidden, logp, adv, mask, sketch_dim, seed, f32, sums=True, from_adv=True)
        n_groups = partial.shape[0]
        return z, None, partial, n_groups, stat, n_groups
    x = batch.hidden if batch.vectors is None else batch.vectors
    scale = logp if batch.vectors is None else None
    d = x.shape[1]
    given = batch.side_sums is not None
    rows_per_group, n_groups = row_groups(n, BLOCK_ROWS)
    block_d = min(BLOCK_COLS, triton.next_power_of_2(d))
    stat = empty(n_groups, STATS, dtype=f32, device=dev)
    partial = batch.side_sums.to(f32).reshape(1, 2, d) if given else empty(n_groups, 2, d, dtype=f32, device=dev)
    grid = (n_groups, 1 if given else triton.cdiv(d, block_d))
    _scaled_rows_kernel[grid](x, scale, adv, mask, None, partial, stat, n, 0 if given else d, rows_per_group,
                              BLOCK_N=BLOCK_ROWS, BLOCK_D=block_d, num_warps=4)
    return x, scale, partial, 1 if given else n_groups, stat, n_groups


def fused_coefficients(batch, cfg, sketch_dim, seed, reduce=None):
    """Same contract as delta_kernels.reference.delta_coefficients (float32 results), plus the
    stats entry "weighted_advantages" (adv * coef on valid rows). ``reduce``: a process group's
    sum (delta_kernels.distributed.group_sum) or None; see the module docstring."""
    f32 = torch.float32
    logp, adv, mask = batch.logp, batch.advantages, batch.mask
    dev, n = logp.device, logp.numel()
    x, scale, partial, n_part, stat, n_stat = _side_pass(batch, sketch_dim, seed)
    d = x.shape[1]
    eps = float(cfg.eps)
    base = cfg.lam_min if cfg.lam_min > 0 else 1.0
    lam_offset, lam_rise = cfg.lam_min / base, (cfg.lam_max - cfg.lam_min) / base
    n_tiles = triton.cdiv(d, FINALIZE_BLOCK_C)
    rows_per_group, n_groups = row_groups(n, margin_config(d, gated=False)["BLOCK_N"])  # the same for both
    fin = dict(BLOCK_G=FINALIZE_BLOCK_G, BLOCK_R=FINALIZE_BLOCK_R)
    group = reduce is not None

    def group_sums(partial, n_part, stat, n_stat):
        """One reduction point with a process group: this rank's partials (or none) and scalar
        partials added into one row (fixed order), summed over the group by one all_reduce.
        -> (partial [1, 2, D] or None, stat [1, STATS])."""
        n_cols = 0 if partial is None else 2 * d
        out = empty(n_cols + STATS, dtype=f32, device=dev)
        _local_sums_kernel[(triton.cdiv(n_cols, FINALIZE_BLOCK_C) + 1,)](
            stat if partial is None else partial, n_part, stat, n_stat, out, n_cols, BLOCK_G=FINALIZE_BLOCK_G,
            BLOCK_C=FINALIZE_BLOCK_C, num_warps=4)
        out = reduce(out)
        return (None if partial is None else out[:n_cols].view(1, 2, d)), out[n_cols:].view(1, STATS)

    def centroids(partial, n_part, stat, n_stat, centre, m=None, gamma=None, sq=None):
        mu, w, c = empty(2, d, dtype=f32, device=dev), empty(d, dtype=f32, device=dev), empty(d, dtype=f32, device=dev)
        std = m is not None
        _centroids_kernel[(n_tiles + int(std),)](partial, n_part, stat, n_stat, centre, mu, w, c, m, adv, mask, gamma,
                                                 sq, d, n, eps, BLOCK_C=FINALIZE_BLOCK_C, **fin, num_warps=4)
        return mu, w, c

    def margins(w, c, gamma=None, gated=False, moments=False, final=False, temps=(None, None)):
        m = empty(n, dtype=f32, device=dev)
        st = empty(n_groups, STATS, dtype=f32, device=dev)
        part = empty(n_groups, 2, d, dtype=f32, device=dev) if gated else st
        _margin_rows_kernel[(n_groups,)](x, scale, w, c, m, gamma, adv, mask, part if gated else None, st, n, d,
                                         rows_per_group, lam_offset, lam_rise, *temps, eps, MOMENTS=moments,
                                         FINAL=final, **margin_config(d, gated))
        return m, part, st

    def temperature(stat, n_stat, m, gamma=None, totals=None, sq_in=None, sq_out=None):
        _temperature_kernel[(1,)](stat, n_stat, m, adv, mask, gamma, totals, sq_in, sq_out, n, eps, lam_offset,
                                  lam_rise, **fin, num_warps=4)

    if group:
        partial, stat = group_sums(partial, n_part, stat, n_stat)
        n_part = n_stat = 1
    mu, w, c = centroids(partial, n_part, stat, n_stat, None)
    m, _, st = margins(w, c, moments=True)
    gamma = empty(2, dtype=f32, device=dev)
    totals = empty(1, STATS, dtype=f32, device=dev)
    temps = (None, None)  # with a group: (moments [1, STATS], sums of squares [2]) summed over it
    if group:
        mom = group_sums(None, 0, st, n_groups)[1]
        sq = empty(2, dtype=f32, device=dev)
        temperature(mom, 1, m, sq_out=sq)
        temps = (mom, reduce(sq))
        if cfg.k == 0:
            temperature(mom, 1, m, gamma, totals, sq_in=temps[1])
            totals = reduce(totals)
    else:
        temperature(st, n_groups, m, gamma, totals if cfg.k == 0 else None)
    n_tot = 1
    for _ in range(cfg.k):
        m, gsums, st = margins(w, c, gamma, gated=True, moments=True, temps=temps)
        gamma = empty(2, dtype=f32, device=dev)
        if group:
            gsums, st = group_sums(gsums, n_groups, st, n_groups)
            sq = empty(2, dtype=f32, device=dev)
            mu, w, c = centroids(gsums, 1, st, 1, c, m, sq=sq)
            temps = (st, reduce(sq))
        else:
            mu, w, c = centroids(gsums, n_groups, st, n_groups, c, m, gamma)
    if cfg.k > 0:
        m, _, totals = margins(w, c, gamma, final=True, temps=temps)
        n_tot = n_groups
        if group:
            totals = group_sums(None, 0, totals, n_groups)[1]
            n_tot = 1
    coef, weighted, pred = (empty(n, dtype=f32, device=dev) for _ in range(3))
    scalars = empty(STATS, dtype=f32, device=dev)
    _final_kernel[(triton.cdiv(n, FINALIZE_BLOCK_R),)](m, adv, mask, gamma, totals, n_tot, w, c, coef, weighted, pred,
                                                       scalars, n, d, eps, lam_offset, lam_rise, 1.0 / base,
                                                       BLOCK_G=FINALIZE_BLOCK_G, BLOCK_R=FINALIZE_BLOCK_R,
                                                       BLOCK_D=FINALIZE_BLOCK_C, num_warps=4)
    stats = dict(mu_pos=mu[0], mu_neg=mu[1], gamma_pos=gamma[0], gamma_neg=gamma[1], W=w, b=scalars[4], pred=pred,
                 n_pos=scalars[2], n_neg=scalars[3], n_valid=scalars[1], scale=scalars[0],
                 weighted_advantages=weighted)
    return coef, stats
