"""Phase C in Triton: the weighted dual-clip DAPO surrogate, forward and backward.

Forward: one kernel; program g owns a row of tokens (a sequence for the seq-* aggregations, a
block of consecutive tokens for token-mean) and writes the row's partial sums
(sum l, count, sum clipped, sum clipped_lower, sum -log_ratio) over valid tokens, [G, 5]
float32. The aggregation and the metrics are formed from those partials with a few tiny
torch ops (fixed-order sums; no host synchronisation). Backward: one kernel recomputes each
token's derivative and scales it by the row weight of the aggregation. Per-token semantics
follow delta_kernels/reference/surrogate.py exactly (clamp(-20, 20), the ratio clamp bounds
as float32, and torch's half-and-half gradient where max/min tie).
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import triton
import triton.language as tl

from .._alloc import empty
from .._checks import SurrogateConfig
from .row_partials import row_groups, sum_partials

BLOCK_T = 1024   # tokens per tile
N_STATS = 5      # loss_sum, count, clip_sum, clip_lower_sum, neg_log_ratio_sum


@triton.jit
def _token_terms(logp_ptr, old_ptr, adv_ptr, mask_ptr, coef_ptr, idx, inb,
                 lo, hi, clip_c, HAS_COEF: tl.constexpr):
    """Loads one tile of tokens and returns (valid, A, log_ratio, in_clamp, ratio, pg1, pg2,
    clip1, pg3), float32 except the masks."""
    valid = (tl.load(mask_ptr + idx, mask=inb, other=0) != 0) & inb
    x = tl.load(logp_ptr + idx, mask=inb, other=0.0).to(tl.float32) \
        - tl.load(old_ptr + idx, mask=inb, other=0.0).to(tl.float32)
    a = tl.load(adv_ptr + idx, mask=inb, other=0.0).to(tl.float32) * valid.to(tl.float32)
    if HAS_COEF:
        a = a * tl.load(coef_ptr + idx, mask=inb, other=0.0).to(tl.float32)
    in_clamp = (x >= -20.0) & (x <= 20.0)
    log_ratio = tl.minimum(tl.maximum(x, -20.0), 20.0)
    ratio = tl.exp(log_ratio)
    pg1 = -a * ratio
    pg2 = -a * tl.minimum(tl.maximum(ratio, lo), hi)
    clip1 = tl.maximum(pg1, pg2)
    pg3 = -a * clip_c
    return valid, a, log_ratio, in_clamp, ratio, pg1, pg2, clip1, pg3


@triton.jit
def _surrogate_fwd_kernel(logp_ptr, old_ptr, adv_ptr, mask_ptr, coef_ptr, partial_ptr,
                          n_tokens, row_len, lo, hi, clip_c,
                          HAS_COEF: tl.constexpr, BLOCK: tl.constexpr):
    """Program g: tokens [g*row_len, min((g+1)*row_len, n_tokens)); partial[g] = (sum l,
    count, sum clipped, sum clipped_lower, sum -log_ratio) over valid tokens, float32.
    logp/old/adv/coef [N] any float dtype; mask [N] uint8; partial [G, 5] float32."""
    pid = tl.program_id(0).to(tl.int64)
    row0 = pid * row_len
    s_loss = tl.zeros([BLOCK], dtype=tl.float32)
    s_count = tl.zeros([BLOCK], dtype=tl.float32)
    s_clip = tl.zeros([BLOCK], dtype=tl.float32)
    s_lower = tl.zeros([BLOCK], dtype=tl.float32)
    s_kl = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, row_len, BLOCK):
        offs = start + tl.arange(0, BLOCK).to(tl.int64)
        idx = row0 + offs
        inb = (offs < row_len) & (idx < n_tokens)
        valid, a, log_ratio, in_clamp, ratio, pg1, pg2, clip1, pg3 = _token_terms(
            logp_ptr, old_ptr, adv_ptr, mask_ptr, coef_ptr, idx, inb, lo, hi, clip_c, HAS_COEF)
        loss = tl.where(a < 0, tl.minimum(clip1, pg3), clip1)
        vf = valid.to(tl.float32)
        s_loss += tl.where(valid, loss, 0.0)
        s_count += vf
        s_clip += tl.where(valid & (pg2 > pg1), 1.0, 0.0)
        s_lower += tl.where(valid & (clip1 > pg3) & (a < 0), 1.0, 0.0)
        s_kl += tl.where(valid, -log_ratio, 0.0)
    base = partial_ptr + pid * 5
    tl.store(base, tl.sum(s_loss, axis=0))
    tl.store(base + 1, tl.sum(s_count, axis=0))
    tl.store(base + 2, tl.sum(s_clip, axis=0))
    tl.store(base + 3, tl.sum(s_lower, axis=0))
    tl.store(base + 4, tl.sum(s_kl, axis=0))


@triton.jit
def _surrogate_bwd_kernel(logp_ptr, old_ptr, adv_ptr, mask_ptr, coef_ptr, row_scale_ptr, grad_out_ptr, grad_ptr,
                          n_tokens, row_len, lo, hi, clip_c,
                          HAS_COEF: tl.constexpr, BLOCK: tl.constexpr):
    """grad[t] = grad_out * row_scale[t // row_len] * valid[t] * d l[t] / d logp[t].
    Follows torch autograd of the reference: clamp passes gradient on [min, max] inclusive,
    maximum/minimum split it half-and-half on ties. grad [N] in logp's dtype."""
    pid = tl.program_id(0).to(tl.int64)
    idx = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    inb = idx < n_tokens
    valid, a, log_ratio, in_clamp, ratio, pg1, pg2, clip1, pg3 = _token_terms(
        logp_ptr, old_ptr, adv_ptr, mask_ptr, coef_ptr, idx, inb, lo, hi, clip_c, HAS_COEF)
    w1 = tl.where(pg1 > pg2, 1.0, tl.where(pg1 == pg2, 0.5, 0.0))
    in_bounds = ((ratio >= lo) & (ratio <= hi)).to(tl.float32)
    d_clip1 = -a * (w1 + (1.0 - w1) * in_bounds)           # d clip1 / d ratio
    w_min = tl.where(clip1 < pg3, 1.0, tl.where(clip1 == pg3, 0.5, 0.0))
    d_loss = tl.where(a < 0, d_clip1 * w_min, d_clip1)
    d_logp = tl.where(in_clamp, d_loss * ratio, 0.0)
    scale = tl.load(row_scale_ptr + idx // row_len, mask=inb, other=0.0) * tl.load(grad_out_ptr)
    grad = tl.where(valid, d_logp * scale, 0.0)
    tl.store(grad_ptr + idx, grad.to(grad_ptr.dtype.element_ty), mask=inb)


def _layout(shape, agg: str, n: int):
    """-> (row_len, n_rows): sequences for seq-* modes, token blocks for token-mean."""
    if agg == "token-mean":
        return row_groups(n, BLOCK_T)
    return shape[-1], shape[0]


def _bounds(cfg: SurrogateConfig):
    return 1.0 - cfg.clip_low, 1.0 + cfg.clip_high, float(cfg.clip_c)


class _ClippedSurrogate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, old_logp, adv, mask_u8, coef, cfg: SurrogateConfig):
        n = logp.numel()
        seq_len = logp.shape[-1] if logp.dim() == 2 else n
        row_len, n_rows = _layout(logp.shape, cfg.agg, n)
        lo, hi, clip_c = _bounds(cfg)
        flat = [t.reshape(-1) for t in (logp.detach(), old_logp, adv, mask_u8)]
        coef_flat = flat[0] if coef is None else coef.reshape(-1)
        partial = empty(n_rows, N_STATS, dtype=torch.float32, device=logp.device)
        block = min(BLOCK_T, triton.next_power_of_2(max(row_len, 16)))
        _surrogate_fwd_kernel[(n_rows,)](*flat, coef_flat, partial, n, row_len, lo, hi, clip_c,
                                         HAS_COEF=coef is not None, BLOCK=block, num_warps=4)
        totals = sum_partials(partial)
        count = totals[1].clamp_min(1)
        if cfg.agg == "token-mean":
            loss = totals[0] / count
            row_scale = (1.0 / count).expand(n_rows)
        elif cfg.agg == "seq-mean-token-sum":
            loss = partial[:, 0].mean()
            # max: an empty [0, T] batch has no rows (the loss is the reference's NaN)
            row_scale = torch.full((n_rows,), 1.0 / max(n_rows, 1), dtype=torch.float32, device=logp.device)
        elif cfg.agg == "seq-mean-token-mean":
            seq_count = partial[:, 1].clamp_min(1)
            loss = (partial[:, 0] / seq_count).mean()
            row_scale = 1.0 / (seq_count * n_rows)
        else:  # seq-mean-token-sum-norm
            loss = totals[0] / seq_len
            row_scale = torch.full((n_rows,), 1.0 / seq_len, dtype=torch.float32, device=logp.device)
        ctx.save_for_backward(*flat, coef_flat, row_scale.contiguous())
        ctx.meta = (logp.shape, logp.dtype, n, row_len, lo, hi, clip_c, coef is not None)
        metrics = (totals[2] / count, totals[3] / count, totals[4] / count)
        ctx.mark_non_differentiable(*metrics)
        return (loss,) + metrics

    @staticmethod
    def backward(ctx, grad_loss, *grad_metrics):
        logp, old, adv, mask_u8, coef, row_scale = ctx.saved_tensors
        shape, dtype, n, row_len, lo, hi, clip_c, has_coef = ctx.meta
        grad = empty(n, dtype=dtype, device=logp.device)
        grad_out = grad_loss.to(torch.float32).reshape(1).contiguous()
        block = BLOCK_T
        _surrogate_bwd_kernel[(triton.cdiv(n, block),)](logp, old, adv, mask_u8, coef, row_scale, grad_out, grad,
                                                        n, row_len, lo, hi, clip_c,
                                                        HAS_COEF=has_coef, BLOCK=block, num_warps=4)
        return grad.reshape(shape), None, None, None, None, None


def clipped_surrogate_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                           coef, cfg: SurrogateConfig) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Backend entry, same contract as the reference: all inputs shaped like logp ([N] or
    [B, T]); mask bool; coef None or like logp. Returns (loss [], {clip_frac, clip_frac_lower,
    ppo_kl}) float32; the loss is differentiable in logp (gradient in logp's dtype)."""
    tensors = [t.contiguous() for t in (logp, old_logp, adv)]
    mask_u8 = mask.contiguous().view(torch.uint8)
    loss, clip_frac, clip_frac_lower, ppo_kl = _ClippedSurrogate.apply(
        tensors[0], tensors[1], tensors[2], mask_u8, None if coef is None else coef.contiguous(), cfg)
    return loss, dict(clip_frac=clip_frac, clip_frac_lower=clip_frac_lower, ppo_kl=ppo_kl)
