"""FIPO future-KL weights in Triton: one kernel, one program per block of BLOCK_R rows.

Each program reads its rows once, from their end, in chunks of BLOCK_T tokens loaded in reverse,
and counts each row's dual-clipped negative tokens on the way (keep).
Inside a chunk the discounted sum is an associative scan over pairs (n, v), n counting the
tokens the pair spans: (n1, v1) then (n2, v2) -> (n1 + n2, v1 * gamma^n2 + v2), with
gamma^n = exp2(-n / decay_rate) taken in log space, never as a running product, so the scan
stays exact for long rows and decay rates up to 1e4 and gamma^n underflows cleanly to 0. The
sum carried in from the later chunk is scaled by gamma^(j + 1) the same way. float32 throughout.
Masked tokens are never read.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from .._alloc import empty
from .._checks import FipoConfig
from ..reference.fipo import call_native, fipo_fake_outputs, native_scalars

BLOCK_R = 4      # rows per program
BLOCK_T = 256    # tokens per chunk of the scan


@triton.jit
def _discounted_combine(n1, v1, k1, n2, v2, k2):
    """(n tokens, their discounted sum v, 1 / decay_rate k) of a span, then the next span."""
    return n1 + n2, v1 * tl.exp2(-n2 * k2) + v2, k2


@triton.jit
def weight_stats_init(BLOCK: tl.constexpr):
    """Zeroed per-lane accumulators of the weights' metric partials: (count, sum, at a bound, min, max)."""
    zero = tl.zeros([BLOCK], dtype=tl.float32)
    return zero, zero, zero, tl.full([BLOCK], float("inf"), tl.float32), tl.full([BLOCK], float("-inf"), tl.float32)


@triton.jit
def _row_terms(logp_ptr, old_ptr, adv_ptr, mask_ptr, idx, inb):
    """(valid, A, D = clamp(logp - old_logp, -20, 20)) of a [BLOCK_R, BLOCK_T] tile; padding reads 0."""
    valid = (tl.load(mask_ptr + idx, mask=inb, other=0) != 0) & inb
    d = tl.load(logp_ptr + idx, mask=valid, other=0.0).to(tl.float32) \
        - tl.load(old_ptr + idx, mask=valid, other=0.0).to(tl.float32)
    a = tl.load(adv_ptr + idx, mask=valid, other=0.0).to(tl.float32)
    return valid, a, tl.minimum(tl.maximum(d, -20.0), 20.0)


@triton.jit
def _fipo_weights_kernel(logp_ptr, old_ptr, adv_ptr, mask_ptr, weights_ptr, future_kl_ptr, keep_ptr, stats_ptr,
                         rows, cols, inv_decay, log_clip_c, clip_c, lower, upper, safety_thresh, at_upper, at_lower,
                         CLIP_LOWER: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr):
    """Rows [pid * BLOCK_R, ...) of [rows, cols]: keep [rows] uint8, weights and future_kl
    [rows, cols] float32 (0 at padding), stats [rows, 5] float32 (count, sum, min, max of the
    valid weights, weights at a clip bound). logp/old/adv any float dtype; mask uint8."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    r_in = r < rows
    j = tl.arange(0, BLOCK_T).to(tl.int64)
    dropped = tl.zeros([BLOCK_R], dtype=tl.int32)
    count, w_sum, at_bound, w_min, w_max = weight_stats_init(BLOCK_R)
    carry = tl.zeros([BLOCK_R], dtype=tl.float32)       # F at the first token after the chunk
    to_carry = tl.exp2(-(j + 1).to(tl.float32) * inv_decay)
    for c0 in range(0, cols, BLOCK_T):
        t = cols - 1 - c0 - j                            # the chunk's tokens, last first
        inb = r_in[:, None] & (t >= 0)[None, :]
        idx = r[:, None] * cols + t[None, :]
        valid, a, d = _row_terms(logp_ptr, old_ptr, adv_ptr, mask_ptr, idx, inb)
        x = tl.where(valid & (d <= log_clip_c), d, 0.0)
        n = tl.full([BLOCK_R, BLOCK_T], 1.0, tl.float32)
        k = tl.full([BLOCK_R, BLOCK_T], inv_decay, tl.float32)
        _, local, _ = tl.associative_scan((n, x, k), 1, _discounted_combine)
        f = local + carry[:, None] * to_carry[None, :]
        carry = tl.sum(tl.where((j == BLOCK_T - 1)[None, :], f, 0.0), axis=1)
        w = tl.exp(f)
        if CLIP_LOWER:
            w = tl.minimum(tl.maximum(w, lower), upper)
        else:
            w = tl.minimum(w, upper)
        ratio = tl.exp(d)
        w = tl.where((a < 0) & (ratio > safety_thresh), tl.minimum(tl.maximum(w, 0.8), 1.0), w)
        dropped += tl.sum((valid & (a < 0) & (ratio > clip_c)).to(tl.int32), axis=1)
        w = tl.where(valid, w, 0.0)
        count += tl.sum(valid.to(tl.float32), axis=1)
        w_sum += tl.sum(w, axis=1)
        w_min = tl.minimum(w_min, tl.min(tl.where(valid, w, float("inf")), axis=1))
        w_max = tl.maximum(w_max, tl.max(tl.where(valid, w, float("-inf")), axis=1))
        at_bound += tl.sum((valid & ((w >= at_upper) | (w <= at_lower))).to(tl.float32), axis=1)
        tl.store(weights_ptr + idx, w, mask=inb)
        tl.store(future_kl_ptr + idx, tl.where(valid, f, 0.0), mask=inb)
    tl.store(keep_ptr + r, (dropped <= 1).to(tl.uint8), mask=r_in)
    stats = stats_ptr + r * 5
    tl.store(stats, count, mask=r_in)
    tl.store(stats + 1, w_sum, mask=r_in)
    tl.store(stats + 2, w_min, mask=r_in)
    tl.store(stats + 3, w_max, mask=r_in)
    tl.store(stats + 4, at_bound, mask=r_in)


def _fipo_weights_body(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                       decay_rate: float, log_clip_c: float, clip_c: float, lower: float, upper: float,
                       clip_lower: bool, safety_thresh: float, at_upper: float,
                       at_lower: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, T] contiguous inputs, mask bool -> (weights, keep [B] bool, future_kl, row_stats [B, 5]), float32."""
    return launch_fipo_weights(_fipo_weights_kernel, logp, old_logp, adv, mask, decay_rate, log_clip_c, clip_c,
                               lower, upper, clip_lower, safety_thresh, at_upper, at_lower)


_fipo_weights_op = torch.library.custom_op("delta_kernels::fipo_weights_triton", _fipo_weights_body,
                                           mutates_args=())


@_fipo_weights_op.register_fake
def _(logp, old_logp, adv, mask, *scalars):
    return fipo_fake_outputs(logp)


def launch_fipo_weights(kernel, logp, old_logp, adv, mask, decay_rate, log_clip_c, clip_c, lower, upper, clip_lower,
                        safety_thresh, at_upper, at_lower):
    """The op's body: allocate and launch ``kernel`` (benchmarks/aot_table.py calls it on meta tensors,
    where the op would take its fake). A plain custom op, not torch.library.triton_op: triton_op's
    fake tracing runs the kernel, which the interpreter (the tests) cannot do on fake tensors."""
    rows, cols = logp.shape
    weights = empty(rows, cols, dtype=torch.float32, device=logp.device)
    future_kl = empty(rows, cols, dtype=torch.float32, device=logp.device)
    keep = empty(rows, dtype=torch.bool, device=logp.device)
    row_stats = empty(rows, 5, dtype=torch.float32, device=logp.device)
    if rows > 0:
        kernel[(triton.cdiv(rows, BLOCK_R),)](
            logp_ptr=logp, old_ptr=old_logp, adv_ptr=adv, mask_ptr=mask.view(torch.uint8), weights_ptr=weights,
            future_kl_ptr=future_kl, keep_ptr=keep.view(torch.uint8), stats_ptr=row_stats, rows=rows, cols=cols,
            inv_decay=1.0 / decay_rate, log_clip_c=log_clip_c, clip_c=clip_c, lower=lower, upper=upper,
            safety_thresh=safety_thresh, at_upper=at_upper, at_lower=at_lower, CLIP_LOWER=clip_lower,
            BLOCK_R=BLOCK_R, BLOCK_T=BLOCK_T)
    return weights, keep, future_kl, row_stats


def fipo_weights(logp, old_logp, adv, mask, cfg: FipoConfig):
    """Backend entry (delta_kernels.reference.fipo_weights' contract), float32 results."""
    return call_native(_fipo_weights_op, _fipo_weights_body, logp.contiguous(), old_logp.contiguous(),
                       adv.contiguous(), mask.contiguous(), *native_scalars(cfg))
