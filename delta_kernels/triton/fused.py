"""The triton backend's coefficient path, the one module that imports the passes (pass1_... to
pass5_... run in the order of their numbers; they import only the leaves _common, row_partials
and sketch_hash, never each other).

``delta_coefficients``: the fused call in few launches, the pipeline of
delta_kernels/pipeline.py with its [N]- and [D]-sized torch ops moved into the pass kernels'
epilogues (per-group scalar partials in the named slots of _common.py) and one small finalize
kernel per reduction point (pass2_centroids, pass4_temperatures, pass5_coefficients). The side
masks and the row scale 1 - exp(logp) are computed inside every kernel from (advantages, mask,
logp), so no [N] weight is ever written.

Launches per call (no torch op runs between them): exact k = 0, 5; k >= 1, 2k + 6:
    side pass (hidden/vectors; the sketch kernel when sketched; the weights alone when the
        side sums are given) -> centroids -> margins with moments -> temperatures
        [-> k x (gated margins with moments -> centroids about c, with the step's temperatures
        in one extra program)] -> final margins with totals -> coefficients
(for k = 0 the temperature kernel takes the totals too and the final margin pass is not needed).
Reads of the rows: as in pipeline.py. No host synchronisation, shapes fixed by the inputs, every
buffer allocated by the call itself: CUDA-graph capturable (docs/cuda_graphs.md).

With a process group (``reduce``, distributed.group_sum) the same kernels run, and at each
reduction point this rank's partials (the [G, 2, D] sums and the [G, SLOTS] scalar rows, _common.py) are
first added into one row in the finalize kernels' order (row_partials._local_sums_kernel), then summed over
the group by one all_reduce; the finalize kernel reads that one row. side_std needs the group's
moments before its walk over m, so its two halves run apart: the walk stores this rank's sums of
squares (an all_reduce of 2 floats) and the next kernel (the gated or final margins, or for
k = 0 the temperature kernel with the totals) finishes the temperatures from the group's sums.
Per call: 2k + 6 kernels (k = 0: 6), k + 3 local sums (k = 0: 2) and 2k + 4 all_reduce calls
(side sums and weights; moments; sums of squares; per step: gated sums with weights and
moments, sums of squares; final totals, which carry the side counts). On one rank the results
equal the call without a group bit for bit.

Used for rows up to pass3_margins.MAX_BLOCK_D wide; wider, delta_kernels.pipeline.run_coefficients
runs over the unfused passes, PIPELINE_KERNELS (also what DeltaAccumulator drives).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton

from .._alloc import empty
from .._checks import BackendCoefficients, DeltaStats
from ..pipeline import PassKernels, run_coefficients
from . import pass3_margins
from ._common import RES_BIAS, RES_N_NEG, RES_N_POS, RES_N_VALID, RES_SCALE, RESULTS, SLOTS, row_layout, rows_and_scale
from .pass1_token_vectors import (launch_scaled_rows, scaled_rows, scaled_rows_groups, side_sums, sketch_rows,
                                  token_sketch, token_vectors)  # noqa: F401  (token_sketch: the package's entry)
from .pass2_centroids import CENTROIDS, _centroids_kernel
from .pass3_margins import _margin_rows_kernel, margin_config, margin_rows, wide_margins
from .pass4_temperatures import TEMPERATURES, _temperature_kernel
from .pass5_coefficients import COEFFICIENTS, _final_kernel
from .row_partials import SUM_PARTIALS, _local_sums_kernel, row_groups


def fused_supported(batch, sketch_dim) -> bool:
    """Whether the fused call handles this batch (the rows fit one whole-row tile)."""
    src = batch.vectors if batch.vectors is not None else batch.hidden
    d = sketch_dim if (batch.vectors is None and sketch_dim is not None) else src.shape[-1]
    return triton.next_power_of_2(d) <= pass3_margins.MAX_BLOCK_D  # read at call time (tests lower it)


def _side_pass(batch, sketch_dim, seed):
    """Pass 1. -> (rows x [N, D], scale source (logp) or None, partial [G, 2, D], n_groups,
    weight stat [Gw, SLOTS], Gw)."""
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
    d = x.shape[-1]
    given = batch.side_sums is not None
    n_groups = scaled_rows_groups(n)[1]
    stat = empty(n_groups, SLOTS, dtype=f32, device=dev)
    partial = batch.side_sums.to(f32).reshape(1, 2, d) if given else empty(n_groups, 2, d, dtype=f32, device=dev)
    launch_scaled_rows(x, scale, adv, mask, out=None, partial=partial, weight=stat, sum_cols=0 if given else d)
    return x, scale, partial, 1 if given else n_groups, stat, n_groups


def fused_coefficients(batch, cfg, sketch_dim, seed, reduce=None):
    """Same contract as delta_kernels.reference.delta_coefficients (float32 results; the final
    kernel writes weighted_advantages too). ``reduce``: a process group's
    sum (delta_kernels.distributed.group_sum) or None; see the module docstring."""
    f32 = torch.float32
    logp, adv, mask = batch.logp, batch.advantages, batch.mask
    dev, n = logp.device, logp.numel()
    x, scale, partial, n_part, stat, n_stat = _side_pass(batch, sketch_dim, seed)
    d = x.shape[-1]
    eps = float(cfg.eps)
    base = cfg.lam_min if cfg.lam_min > 0 else 1.0
    lam_offset, lam_rise = cfg.lam_min / base, (cfg.lam_max - cfg.lam_min) / base
    rows_per_group, n_groups = row_groups(n, margin_config(d, gated=False)["BLOCK_N"])  # the same for both
    rows = dict(adv_ptr=adv, mask_ptr=mask, n_rows=n, eps=eps)  # what the finalize kernels take of the rows
    group = reduce is not None

    def group_sums(partial, n_part, stat, n_stat):
        """One reduction point with a process group: this rank's partials (or none) and scalar
        partials added into one row (fixed order), summed over the group by one all_reduce.
        -> (partial [1, 2, D] or None, stat [1, SLOTS])."""
        n_cols = 0 if partial is None else 2 * d
        out = empty(n_cols + SLOTS, dtype=f32, device=dev)
        _local_sums_kernel[(triton.cdiv(n_cols, SUM_PARTIALS["BLOCK_C"]) + 1,)](
            partial_ptr=stat if partial is None else partial, n_groups=n_part, stat_ptr=stat, n_stat_groups=n_stat,
            out_ptr=out, n_cols=n_cols, **SUM_PARTIALS)
        out = reduce(out)
        return (None if partial is None else out[:n_cols].view(1, 2, d)), out[n_cols:].view(1, SLOTS)

    def centroids(partial, n_part, stat, n_stat, centre, m=None, gamma=None, sq=None):
        """Pass 2 (with m: also side_std of m into gamma, or its sums of squares into sq)."""
        mu, w, c = empty(2, d, dtype=f32, device=dev), empty(d, dtype=f32, device=dev), empty(d, dtype=f32, device=dev)
        _centroids_kernel[(triton.cdiv(d, CENTROIDS["BLOCK_C"]) + int(m is not None),)](
            partial_ptr=partial, n_groups=n_part, stat_ptr=stat, n_stat_groups=n_stat, centre_ptr=centre, mu_ptr=mu,
            w_ptr=w, c_ptr=c, m_ptr=m, gamma_ptr=gamma, sq_out_ptr=sq, n_cols=d, **rows, **CENTROIDS)
        return mu, w, c

    def margins(w, c, gamma=None, gated=False, moments=False, final=False, temps=(None, None)):
        """Pass 3 over the rows, with the scalar partials of the flags."""
        m = empty(n, dtype=f32, device=dev)
        st = empty(n_groups, SLOTS, dtype=f32, device=dev)
        part = empty(n_groups, 2, d, dtype=f32, device=dev) if gated else None
        _margin_rows_kernel[(n_groups,)](
            v_ptr=x, scale_ptr=scale, w_ptr=w, c_ptr=c, m_ptr=m, gamma_ptr=gamma, a_pos_ptr=adv, a_neg_ptr=mask,
            partial_ptr=part, stat_ptr=st, n_rows=n, n_cols=d, rows_per_group=rows_per_group, lam_offset=lam_offset,
            lam_rise=lam_rise, mom_ptr=temps[0], sq_ptr=temps[1], eps=eps, MOMENTS=moments, FINAL=final,
            **row_layout(x), **margin_config(d, gated))
        return m, part, st

    def temperature(stat, n_stat, m, gamma=None, totals=None, sq_in=None, sq_out=None):
        """Pass 4."""
        _temperature_kernel[(1,)](stat_ptr=stat, n_groups=n_stat, m_ptr=m, gamma_ptr=gamma, totals_ptr=totals,
                                  sq_in_ptr=sq_in, sq_out_ptr=sq_out, lam_offset=lam_offset, lam_rise=lam_rise,
                                  **rows, **TEMPERATURES)

    if group:
        partial, stat = group_sums(partial, n_part, stat, n_stat)
        n_part = n_stat = 1
    mu, w, c = centroids(partial, n_part, stat, n_stat, None)
    m, _, st = margins(w, c, moments=True)
    gamma = empty(2, dtype=f32, device=dev)
    totals = empty(1, SLOTS, dtype=f32, device=dev)
    temps = (None, None)  # with a group: (moments [1, SLOTS], sums of squares [2]) summed over it
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
    res = empty(RESULTS, dtype=f32, device=dev)
    _final_kernel[(triton.cdiv(n, COEFFICIENTS["BLOCK_R"]),)](  # pass 5
        m_ptr=m, gamma_ptr=gamma, stat_ptr=totals, n_stat_groups=n_tot, w_ptr=w, c_ptr=c, coef_ptr=coef,
        weighted_ptr=weighted, pred_ptr=pred, scalar_ptr=res, n_cols=d, lam_offset=lam_offset, lam_rise=lam_rise,
        inv_base=1.0 / base, **rows, **COEFFICIENTS)
    return BackendCoefficients(coef, weighted, DeltaStats(
        mu_pos=mu[0], mu_neg=mu[1], gamma_pos=gamma[0], gamma_neg=gamma[1], W=w, b=res[RES_BIAS.value], pred=pred,
        n_pos=res[RES_N_POS.value], n_neg=res[RES_N_NEG.value], n_valid=res[RES_N_VALID.value],
        scale=res[RES_SCALE.value]))


# ---------------------------------------------------------------- the unfused passes

def margin_pass(v, w: torch.Tensor, c: torch.Tensor, gate: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """Pipeline kernel (see delta_kernels/pipeline.py): pass 3 outside the fused call.

    v [N, D] float32/bf16/fp16 contiguous, or ScaledRows(rows [N, D], scale [N] float32);
    w [D], c [D] float32 (m = 2 (v - c).w; the gated sums are of v - c); gate None or
    (gamma [2], a_pos [N], a_neg [N]). Returns (m [N] float32, sums [2, D] float32 or None).
    Reads of v (or of its rows): one (two when gated and D > MAX_BLOCK_D: then the gated sums
    come from pass 1's row kernel with weights g a)."""
    f32 = torch.float32
    x, scale = rows_and_scale(v)
    w = w.to(f32).contiguous()
    c = c.to(f32).contiguous()
    gate = None if gate is None else tuple(t.to(f32).contiguous() for t in gate)
    if triton.next_power_of_2(x.shape[-1]) <= pass3_margins.MAX_BLOCK_D:
        return margin_rows(x, scale, w, c, gate)
    m = wide_margins(x, scale, w, c)
    if gate is None:
        return m, None
    gamma, a_pos, a_neg = gate
    zero = torch.zeros((), dtype=f32, device=m.device)
    g_pos = torch.where(a_pos != 0, torch.sigmoid(m / gamma[0]) * a_pos, zero)
    g_neg = torch.where(a_neg != 0, torch.sigmoid(-m / gamma[1]) * a_neg, zero)
    sums = scaled_rows(x, scale, g_pos.contiguous(), g_neg.contiguous(), store=False)[1]
    # about c, as the whole-row kernel gives them (here after the sum: not exact under an offset)
    return m, sums - torch.stack([g_pos.sum(), g_neg.sum()])[:, None] * c[None, :]


# the backend's entries (delta_kernels/triton/__init__.py): PIPELINE_KERNELS, delta_coefficients, token_sketch
PIPELINE_KERNELS = PassKernels(token_vectors=token_vectors, side_sums=side_sums, margin_pass=margin_pass)


def delta_coefficients(batch, cfg, sketch_dim, seed, reduce=None):
    """Same contract as delta_kernels.reference.delta_coefficients (float32 results): the fused
    call (2k + 6 kernels; with a process group also 2k + 4 all_reduce calls); rows too wide for
    one tile: the pipeline over the unfused passes, each sum all-reduced between them."""
    if fused_supported(batch, sketch_dim):
        return fused_coefficients(batch, cfg, sketch_dim, seed, reduce)
    return run_coefficients(PIPELINE_KERNELS, batch, cfg, sketch_dim, seed, reduce)
