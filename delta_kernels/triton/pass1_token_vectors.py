"""Phase A in Triton: token-gradient vectors v = (1 - exp(logp)) h, or their sketch z = v @ R,
with the side sums (sum a+ v, sum a- v) fused into the same single read of ``hidden``.

Exact vectors stay implicit in the coefficient pipeline: ``token_vectors`` returns
``ScaledRows(hidden, 1 - exp(logp))`` and every later pass (side_sums, margin_pass) reads the
rows of h and scales each by its float32 scale on the fly, so v is never written (nor rounded
to hidden's dtype). Memory traffic per call: hidden is read once; exact mode writes nothing
[N, H]; the sketch writes z [N, r] once; ``token_sketch`` (the public op) writes v or z once.
The side sums go through [G, 2, D] float32 partials (G <= 512 row groups, see row_partials)
reduced in a fixed order. R is never read: its +-1 signs are hashed inside the kernel
(sketch_hash). ``side_sums`` (given vectors) is the same row kernel without a store.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .._alloc import empty
from ..sketch_matrix import sketch_scale
from ._common import (SLOTS, WT_NEG, WT_POS, ScaledRows, neg_expm1, row_count, row_layout, row_starts, row_weights,
                      rows_and_scale)
from .row_partials import row_groups, sum_partials
from .sketch_hash import seed_argument, sign_tile

# One config per kernel, next to it; the reasons are the AOT table's (benchmarks/results/aot_sm90.md,
# bf16, sm_90; benchmarks/aot_table.py). Exact kernel: 16 rows x 256 columns per tile, 4 warps: 80
# registers with the side sums (40 storing v), no spills, 6 CTAs/SM (register-bound); narrower rows
# take a power-of-two BLOCK_D below 256.
SCALED_ROWS = dict(BLOCK_N=16, BLOCK_D=256, num_warps=4)


@triton.jit
def _program_cols(n_cols, BLOCK: tl.constexpr):
    """(row group g, column block, its columns [BLOCK] and their mask) of a program of grid (G, cols)."""
    pid_g = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1).to(tl.int64)
    cols = pid_c * BLOCK + tl.arange(0, BLOCK)
    return pid_g, pid_c, cols, cols < n_cols


@triton.jit
def _tile_rows(first, n_rows, BLOCK: tl.constexpr):
    """Rows [first, first + BLOCK) (int64) and their mask (row < n_rows)."""
    rows = first + tl.arange(0, BLOCK).to(tl.int64)
    return rows, rows < n_rows


@triton.jit
def _zero_sums(BLOCK: tl.constexpr):
    """The side-sum accumulators of a program: (acc_pos [BLOCK], acc_neg [BLOCK], w_tot_pos, w_tot_neg)."""
    return (tl.zeros([BLOCK], dtype=tl.float32), tl.zeros([BLOCK], dtype=tl.float32),
            tl.zeros([], dtype=tl.float32), tl.zeros([], dtype=tl.float32))


@triton.jit
def _add_sums(vals, wp, wn, acc_pos, acc_neg):
    """acc += sum over rows of w vals, rows selected by w != 0, not multiplied: a zero-weight row
    (padding) may hold anything."""
    acc_pos += tl.sum(tl.where((wp != 0.0)[:, None], vals * wp[:, None], 0.0), axis=0)
    acc_neg += tl.sum(tl.where((wn != 0.0)[:, None], vals * wn[:, None], 0.0), axis=0)
    return acc_pos, acc_neg


@triton.jit
def _store_sums(partial_ptr, weight_ptr, pid_g, pid_col, cols, cmask, n_cols, acc_pos, acc_neg, w_tot_pos, w_tot_neg,
                SUMS: tl.constexpr, FROM_ADV: tl.constexpr):
    """partial[g] = (acc_pos, acc_neg) over the program's columns; with FROM_ADV, column block 0 also
    writes weight[g, WT_POS], weight[g, WT_NEG] = (sum a+, sum a-)."""
    if SUMS:
        base = partial_ptr + pid_g * 2 * n_cols
        tl.store(base + cols, acc_pos, mask=cmask)
        tl.store(base + n_cols + cols, acc_neg, mask=cmask)
    if FROM_ADV:
        if pid_col == 0:
            tl.store(weight_ptr + pid_g * SLOTS + WT_POS, w_tot_pos)
            tl.store(weight_ptr + pid_g * SLOTS + WT_NEG, w_tot_neg)


@triton.heuristics(dict(HAS_SCALE=lambda a: a["scale_ptr"] is not None, STORE=lambda a: a["out_ptr"] is not None,
                        SUMS=lambda a: a["partial_ptr"] is not None, FROM_ADV=lambda a: a["weight_ptr"] is not None))
@triton.jit
def _scaled_rows_kernel(x_ptr, scale_ptr, w_pos_ptr, w_neg_ptr, out_ptr, partial_ptr, weight_ptr,
                        n_rows, n_cols, rows_per_group, row_len, stride_b, stride_t,
                        HAS_SCALE: tl.constexpr, STORE: tl.constexpr, SUMS: tl.constexpr, FROM_ADV: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (g, d): rows [g*rows_per_group, (g+1)*rows_per_group), columns d*BLOCK_D...
    The flags follow the pointers given (None: absent). With s = scale[row] if HAS_SCALE else 1:
    stores y = s x in out's dtype if STORE; writes
    partial[g] = (sum_rows (w_pos s) x, sum_rows (w_neg s) x) over its columns, float32.
    x [N, D] (fp32/bf16/fp16; row n at row_starts), out [N, D] contiguous, scale/w_pos/w_neg [N]
    float32, partial [G, 2, D] float32.
    FROM_ADV (the fused call, fused.py): scale_ptr is logp (s = 1 - exp(logp)), w_pos_ptr/w_neg_ptr
    the advantages and mask (row_weights), and program (g, 0) also writes
    weight[g, WT_POS], weight[g, WT_NEG] = (sum a+, sum a-) (weight [G, SLOTS] float32)."""
    pid_g, pid_d, cols, cmask = _program_cols(n_cols, BLOCK_D)
    acc_pos, acc_neg, w_tot_pos, w_tot_neg = _zero_sums(BLOCK_D)
    row0 = pid_g * rows_per_group
    for start in range(0, rows_per_group, BLOCK_N):
        rows, rmask = _tile_rows(row0 + start, n_rows, BLOCK_N)
        mask = rmask[:, None] & cmask[None, :]
        offs = rows[:, None] * n_cols + cols[None, :]
        x = tl.load(x_ptr + row_starts(rows, row_len, stride_b, stride_t)[:, None] + cols[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        if HAS_SCALE:
            if FROM_ADV:
                s = neg_expm1(tl.load(scale_ptr + rows, mask=rmask, other=0.0).to(tl.float32))
            else:
                s = tl.load(scale_ptr + rows, mask=rmask, other=0.0)
        if STORE:
            if HAS_SCALE:
                tl.store(out_ptr + offs, (x * s[:, None]).to(out_ptr.dtype.element_ty), mask=mask)
            else:
                tl.store(out_ptr + offs, x.to(out_ptr.dtype.element_ty), mask=mask)
        if SUMS:
            wp, wn = row_weights(w_pos_ptr, w_neg_ptr, rows, rmask, FROM_ADV)
            if FROM_ADV:
                w_tot_pos += tl.sum(wp, axis=0)
                w_tot_neg += tl.sum(wn, axis=0)
            if HAS_SCALE:
                wp = tl.where(wp != 0.0, wp * s, 0.0)
                wn = tl.where(wn != 0.0, wn * s, 0.0)
            acc_pos, acc_neg = _add_sums(x, wp, wn, acc_pos, acc_neg)
    _store_sums(partial_ptr, weight_ptr, pid_g, pid_d, cols, cmask, n_cols, acc_pos, acc_neg, w_tot_pos, w_tot_neg,
                SUMS, FROM_ADV)


@triton.jit
def _sign_dot(a, signs, acc, IEEE: tl.constexpr):
    """acc + a @ signs, float32 accumulation. IEEE (the interpreter only): on float32 copies,
    since the interpreter's tl.dot multiplies bf16/fp16 tiles as their raw integer bits."""
    if IEEE:
        return tl.dot(a.to(tl.float32), signs.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, signs, acc)


# Sketch kernel: 128-row tiles (each tile regenerates its R signs, so taller tiles hash less), 128 sketch
# columns, 64-wide K steps, 3 stages: 226 registers, no spills, 1 CTA/SM; 4 warps when r <= 64.
SKETCH_ROWS = dict(BLOCK_M=128, BLOCK_R=128, BLOCK_K=64, num_warps=8, num_stages=3)
SKETCH_BLOCK_K_SPLIT = 16  # float32 h: wider K steps of its three bf16 parts spill registers (sm_80, sm_90)


@triton.heuristics(dict(SUMS=lambda a: a["partial_ptr"] is not None, FROM_ADV=lambda a: a["weight_ptr"] is not None))
@triton.jit(do_not_specialize=["seed_mixed"])
def _sketch_rows_kernel(h_ptr, logp_ptr, w_pos_ptr, w_neg_ptr, z_ptr, partial_ptr, weight_ptr,
                        n_rows, hidden, sketch_dim, rows_per_group, seed_mixed, scale, row_len, stride_b, stride_t,
                        SPLIT: tl.constexpr, IEEE: tl.constexpr, SUMS: tl.constexpr, FROM_ADV: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (g, j): z[rows, cols] = (1 - exp(logp)) * (h[rows] @ sign[:, cols]) * scale for
    the rows of group g, and partial[g] = (sum w_pos z, sum w_neg z) over those columns.
    The +-1 signs are exact in bf16/fp16, so the product runs on the tensor cores with float32
    accumulation. SPLIT (float32 h): each element is split exactly into three bf16 parts,
    x = hi + mid + lo (8 significand bits each), and the three products are accumulated: every
    product is exact, as in an IEEE float32 dot, without its register spills or TF32 rounding.
    h [N, H] (row n at row_starts), z [N, r] contiguous in h's dtype; logp/w_pos/w_neg [N] float32;
    partial [G, 2, r] float32.
    FROM_ADV: w_pos_ptr/w_neg_ptr are the advantages and mask (row_weights), and program (g, 0)
    writes weight[g, WT_POS], weight[g, WT_NEG] = (sum a+, sum a-) (weight [G, SLOTS] float32)."""
    pid_g, pid_r, cols, cmask = _program_cols(sketch_dim, BLOCK_R)
    acc_pos, acc_neg, w_tot_pos, w_tot_neg = _zero_sums(BLOCK_R)
    row0 = pid_g * rows_per_group
    for start in range(0, rows_per_group, BLOCK_M):
        rows, rmask = _tile_rows(row0 + start, n_rows, BLOCK_M)
        acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        h_rows = h_ptr + row_starts(rows, row_len, stride_b, stride_t)[:, None]
        for k0 in range(0, hidden, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
            x = tl.load(h_rows + ks[None, :],
                        mask=rmask[:, None] & (ks[None, :] < hidden), other=0.0)
            if SPLIT:
                signs = sign_tile(ks, cols, seed_mixed, tl.bfloat16)
                hi = x.to(tl.bfloat16)
                rest = x - hi.to(tl.float32)
                mid = rest.to(tl.bfloat16)
                lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)
                acc = _sign_dot(hi, signs, acc, IEEE)
                acc = _sign_dot(mid, signs, acc, IEEE)
                acc = _sign_dot(lo, signs, acc, IEEE)
            else:
                acc = _sign_dot(x, sign_tile(ks, cols, seed_mixed, x.dtype), acc, IEEE)
        lp = tl.load(logp_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
        z = acc * neg_expm1(lp)[:, None] * scale
        mask = rmask[:, None] & cmask[None, :]
        tl.store(z_ptr + rows[:, None] * sketch_dim + cols[None, :], z.to(z_ptr.dtype.element_ty), mask=mask)
        if SUMS:
            wp, wn = row_weights(w_pos_ptr, w_neg_ptr, rows, rmask, FROM_ADV)
            if FROM_ADV:
                w_tot_pos += tl.sum(wp, axis=0)
                w_tot_neg += tl.sum(wn, axis=0)
            acc_pos, acc_neg = _add_sums(z, wp, wn, acc_pos, acc_neg)
    _store_sums(partial_ptr, weight_ptr, pid_g, pid_r, cols, cmask, sketch_dim, acc_pos, acc_neg, w_tot_pos,
                w_tot_neg, SUMS, FROM_ADV)


def scaled_rows(x: torch.Tensor, scale: Optional[torch.Tensor], w_pos: Optional[torch.Tensor],
                w_neg: Optional[torch.Tensor], store: bool):
    """Host side of _scaled_rows_kernel, one read of x: -> (y = scale x [N, D] in x's dtype or
    None, sums [2, D] float32 = (sum w_pos scale x, sum w_neg scale x) or None when no weights
    are given). scale/w_pos/w_neg float32 [N] contiguous or None (scale None: 1)."""
    n, d = row_count(x), x.shape[-1]
    sums = w_pos is not None
    out = empty(n, d, dtype=x.dtype, device=x.device) if store else None
    partial = empty(scaled_rows_groups(n)[1], 2, d, dtype=torch.float32, device=x.device) if sums else None
    launch_scaled_rows(x, scale, w_pos, w_neg, out=out, partial=partial, weight=None, sum_cols=d)
    return out, sum_partials(partial) if sums else None


def scaled_rows_groups(n_rows: int):
    """-> (rows_per_group, n_groups) of _scaled_rows_kernel over n_rows rows."""
    return row_groups(n_rows, SCALED_ROWS["BLOCK_N"])


def launch_scaled_rows(x, scale, w_pos, w_neg, out, partial, weight, sum_cols: int):
    """One launch of _scaled_rows_kernel over x [N, D] with SCALED_ROWS' tiles; out, partial
    [G, 2, sum_cols] and weight [G, SLOTS] (G from scaled_rows_groups) are None or written.
    sum_cols: D, or 0 when only the weight stat is wanted (the side sums given)."""
    n, d = row_count(x), x.shape[-1]
    rows_per_group, n_groups = scaled_rows_groups(n)
    block_d = min(SCALED_ROWS["BLOCK_D"], triton.next_power_of_2(d))
    _scaled_rows_kernel[(n_groups, max(1, triton.cdiv(sum_cols, block_d)))](
        x_ptr=x, scale_ptr=scale, w_pos_ptr=w_pos, w_neg_ptr=w_neg, out_ptr=out, partial_ptr=partial,
        weight_ptr=weight, n_rows=n, n_cols=sum_cols, rows_per_group=rows_per_group, **row_layout(x),
        **dict(SCALED_ROWS, BLOCK_D=block_d))


def row_scale(logp: torch.Tensor) -> torch.Tensor:
    """logp [N] -> scale [N] float32 contiguous = 1 - exp(logp) = -expm1(logp) (accurate near 0)."""
    return (-torch.expm1(logp.to(torch.float32))).contiguous()


def sketch_config(r: int, h: int, split: bool) -> dict:
    """SKETCH_ROWS for sketch width r and hidden size h: narrower tiles for small r or h, and
    SKETCH_BLOCK_K_SPLIT-wide K steps for float32 h (split)."""
    block_r = max(16, min(SKETCH_ROWS["BLOCK_R"], triton.next_power_of_2(r)))
    block_k = max(16, min(SKETCH_BLOCK_K_SPLIT if split else SKETCH_ROWS["BLOCK_K"], triton.next_power_of_2(h)))
    return dict(SKETCH_ROWS, BLOCK_R=block_r, BLOCK_K=block_k, SPLIT=split, num_warps=4 if block_r <= 64 else 8)


def sketch_rows(hidden: torch.Tensor, logp: torch.Tensor, w_pos, w_neg, sketch_dim: int, seed: int,
                z_dtype: torch.dtype, sums: bool, from_adv: bool):
    """One launch of _sketch_rows_kernel over hidden [N, H] (logp [N] float32): -> (z [N, r] in
    z_dtype, partial [G, 2, r] float32 or None, weight stat [G, SLOTS] float32 or None). w_pos/w_neg
    are the side weights, or with from_adv the advantages and mask (the fused call, which also
    gets the weight stat)."""
    f32 = torch.float32
    n, h = row_count(hidden), hidden.shape[-1]
    r = sketch_dim
    cfg = sketch_config(r, h, split=hidden.dtype == f32)
    rows_per_group, n_groups = row_groups(n, cfg["BLOCK_M"])
    z = empty(n, r, dtype=z_dtype, device=hidden.device)
    partial = empty(n_groups, 2, r, dtype=f32, device=hidden.device) if sums else None
    stat = empty(n_groups, SLOTS, dtype=f32, device=hidden.device) if from_adv else None
    _sketch_rows_kernel[(n_groups, triton.cdiv(r, cfg["BLOCK_R"]))](
        h_ptr=hidden, logp_ptr=logp, w_pos_ptr=w_pos, w_neg_ptr=w_neg, z_ptr=z, partial_ptr=partial, weight_ptr=stat,
        n_rows=n, hidden=h, sketch_dim=r, rows_per_group=rows_per_group, seed_mixed=seed_argument(seed),
        scale=sketch_scale(r), IEEE=os.environ.get("TRITON_INTERPRET") == "1", **row_layout(hidden), **cfg)
    return z, partial, stat


def written_vectors(hidden: torch.Tensor, logp: torch.Tensor, a_pos: Optional[torch.Tensor],
                    a_neg: Optional[torch.Tensor], sketch_dim: Optional[int], seed: int,
                    z_dtype: Optional[torch.dtype] = None):
    """One read of hidden that writes the vectors: -> (v = (1 - exp(logp)) h [N, H] in hidden's
    dtype, or z = v @ sketch_matrix(H, r, seed) [N, r] in z_dtype (default hidden's); side sums [2, D] float32 =
    (sum a_pos v, sum a_neg v) from the float32 values before the cast, or None when a_pos is None).
    hidden [N, H] float32/bf16/fp16 contiguous; logp [N]; a_pos/a_neg [N] float32 contiguous or None.
    Used by token_sketch and by the fused LM head (fused_linear_logprob_sketch)."""
    f32 = torch.float32
    logp = logp.to(f32).contiguous()
    if sketch_dim is None:
        return scaled_rows(hidden, row_scale(logp), a_pos, a_neg, store=True)
    z, partial, _ = sketch_rows(hidden, logp, a_pos, a_neg, sketch_dim, seed, z_dtype or hidden.dtype,
                                sums=a_pos is not None, from_adv=False)
    return z, sum_partials(partial) if partial is not None else None


def token_vectors(hidden: torch.Tensor, logp: torch.Tensor, a_pos: torch.Tensor, a_neg: torch.Tensor,
                  sketch_dim: Optional[int], seed: int):
    """Pipeline kernel (see delta_kernels/pipeline.py): one read of hidden.

    hidden [N, H] float32/bf16/fp16 contiguous; logp, a_pos, a_neg [N] (cast to float32).
    Returns (v, sums [2, D] float32 = (sum a_pos v, sum a_neg v)). Exact (sketch_dim None):
    v = ScaledRows(hidden, 1 - exp(logp)), nothing [N, H] written, v never rounded to hidden's
    dtype. Sketched: v = z = (1 - exp(logp)) h @ sketch_matrix(H, r, seed) [N, r] in float32
    (written once; small, and not rounded to hidden's dtype, as on cpp and cuda)."""
    f32 = torch.float32
    a_pos, a_neg = a_pos.to(f32).contiguous(), a_neg.to(f32).contiguous()
    if sketch_dim is None:
        v = ScaledRows(hidden, row_scale(logp))
        return v, scaled_rows(hidden, v.scale, a_pos, a_neg, store=False)[1]
    return written_vectors(hidden, logp, a_pos, a_neg, sketch_dim, seed, z_dtype=f32)


def side_sums(v, a_pos: torch.Tensor, a_neg: torch.Tensor) -> torch.Tensor:
    """Pipeline kernel: the side sums of given vectors, the same row kernel without a store.
    v [N, D] float32/bf16/fp16 contiguous, or ScaledRows(rows [N, D], scale [N] float32) (each
    row's weight a[t] * scale[t] applied to the loaded row); a_pos/a_neg [N] -> sums [2, D] float32."""
    f32 = torch.float32
    rows, scale = rows_and_scale(v)
    return scaled_rows(rows, scale, a_pos.to(f32).contiguous(), a_neg.to(f32).contiguous(), store=False)[1]


def token_sketch(hidden2d: torch.Tensor, logp1d: torch.Tensor, sketch_dim: Optional[int], seed: int):
    """Backend entry of delta_kernels.token_sketch: v or z [N, D] in hidden's dtype (no sums)."""
    return written_vectors(hidden2d, logp1d, None, None, sketch_dim, seed)[0]
