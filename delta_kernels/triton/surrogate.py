"""Phase C in Triton: the weighted dual-clip DAPO surrogate, forward and backward.

Forward: one kernel; program (row, tile) owns SURROGATE["BLOCK"] consecutive tokens of a row (a sequence
of [B, T]; an [N] batch is one row) and writes their partial sums, the columns of
delta_kernels.aggregation.STATS over valid tokens, to partial [B, tiles, 5] float32. The tiles
of a row are added in order (torch, no atomics) and delta_kernels.aggregation.aggregate turns
the rows into the loss, the metrics and the row weights (no host synchronisation). Backward:
one kernel recomputes each token's derivative and scales it by its row weight and its
rollout_is_weights entry. Per-token semantics follow delta_kernels/reference/surrogate.py
exactly (clamp(-20, 20), the ratio clamp bounds as float32, and torch's half-and-half
gradient where max/min tie). Padding is don't-care: loads are masked by the token mask, so
values at masked positions are never read.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import triton
import triton.language as tl

from .._alloc import empty
from .._checks import FipoConfig, SurrogateConfig
from ..aggregation import STATS, Aggregation, aggregate
from ..reference.fipo import METRICS as FIPO_METRICS
from .fipo import fipo_weights, weight_stats_init

# 1,024 tokens per program (fewer for short rows), 4 warps, for both kernels: 40 / 38 registers, no spills,
# 12 CTAs/SM (register-bound; AOT table, benchmarks/results/aot_sm90.md).
SURROGATE = dict(BLOCK=1024, num_warps=4)


@triton.jit
def _token_terms(logp_ptr, old_ptr, adv_ptr, mask_ptr, coef_ptr, weight_ptr, keep_ptr, idx, inb, row_len,
                 lo, hi, clip_c, HAS_COEF: tl.constexpr, HAS_CREDIT: tl.constexpr):
    """Loads one tile of tokens (only the valid ones: padding reads as 0) and returns (valid,
    A, log_ratio, in_clamp, ratio, pg1, pg2, clip1, pg3), float32 except the masks. With
    HAS_CREDIT, an in-loss credit's weights multiply coef (A = adv (coef w), the product the
    unfused call forms) and a row whose keep is 0 is padding."""
    valid = (tl.load(mask_ptr + idx, mask=inb, other=0) != 0) & inb
    if HAS_CREDIT:
        valid = valid & (tl.load(keep_ptr + idx // row_len, mask=valid, other=0) != 0)
    x = tl.load(logp_ptr + idx, mask=valid, other=0.0).to(tl.float32) \
        - tl.load(old_ptr + idx, mask=valid, other=0.0).to(tl.float32)
    a = tl.load(adv_ptr + idx, mask=valid, other=0.0).to(tl.float32)
    if HAS_CREDIT:
        w = tl.load(weight_ptr + idx, mask=valid, other=0.0)
        if HAS_COEF:
            w = tl.load(coef_ptr + idx, mask=valid, other=0.0).to(tl.float32) * w
        a = a * w
    elif HAS_COEF:
        a = a * tl.load(coef_ptr + idx, mask=valid, other=0.0).to(tl.float32)
    in_clamp = (x >= -20.0) & (x <= 20.0)
    log_ratio = tl.minimum(tl.maximum(x, -20.0), 20.0)
    ratio = tl.exp(log_ratio)
    pg1 = -a * ratio
    pg2 = -a * tl.minimum(tl.maximum(ratio, lo), hi)
    clip1 = tl.maximum(pg1, pg2)
    pg3 = -a * clip_c
    return valid, a, log_ratio, in_clamp, ratio, pg1, pg2, clip1, pg3


@triton.jit
def _credit_metrics(stats_ptr, keep_ptr, metrics_ptr, n_rows, BLOCK: tl.constexpr):
    """FIPO's metrics [5] (weight mean, min, max over valid tokens, 0 without any; rows dropped;
    the fraction at a clip bound) from its kernel's row partials stats [n_rows, 5] (count, sum,
    min, max, at bound) and keep [n_rows], reduced in row-block order by one program."""
    count, w_sum, at_bound, w_min, w_max = weight_stats_init(BLOCK)
    dropped = tl.zeros([BLOCK], dtype=tl.float32)
    for r0 in range(0, n_rows, BLOCK):
        r = r0 + tl.arange(0, BLOCK).to(tl.int64)
        rin = r < n_rows
        count += tl.load(stats_ptr + r * 5, mask=rin, other=0.0)
        w_sum += tl.load(stats_ptr + r * 5 + 1, mask=rin, other=0.0)
        w_min = tl.minimum(w_min, tl.load(stats_ptr + r * 5 + 2, mask=rin, other=float("inf")))
        w_max = tl.maximum(w_max, tl.load(stats_ptr + r * 5 + 3, mask=rin, other=float("-inf")))
        at_bound += tl.load(stats_ptr + r * 5 + 4, mask=rin, other=0.0)
        dropped += tl.where(rin & (tl.load(keep_ptr + r, mask=rin, other=1) == 0), 1.0, 0.0)
    n = tl.sum(count, axis=0)
    some = n > 0
    tl.store(metrics_ptr, tl.sum(w_sum, axis=0) / tl.maximum(n, 1.0))
    tl.store(metrics_ptr + 1, tl.where(some, tl.min(w_min, axis=0), 0.0))
    tl.store(metrics_ptr + 2, tl.where(some, tl.max(w_max, axis=0), 0.0))
    tl.store(metrics_ptr + 3, tl.sum(dropped, axis=0))
    tl.store(metrics_ptr + 4, tl.sum(at_bound, axis=0) / tl.maximum(n, 1.0))


# absent inputs are None pointers: constexpr flags derived once from them
_OPTIONAL = dict(HAS_COEF=lambda a: a["coef_ptr"] is not None, HAS_ISW=lambda a: a["isw_ptr"] is not None,
                 HAS_CREDIT=lambda a: a["weight_ptr"] is not None)


@triton.heuristics(_OPTIONAL)
@triton.jit
def _surrogate_fwd_kernel(logp_ptr, old_ptr, adv_ptr, mask_ptr, coef_ptr, isw_ptr, weight_ptr, keep_ptr, stats_ptr,
                          metrics_ptr, partial_ptr, n_rows, row_len, tiles, lo, hi, clip_c,
                          HAS_COEF: tl.constexpr, HAS_ISW: tl.constexpr, HAS_CREDIT: tl.constexpr,
                          BLOCK: tl.constexpr):
    """Program g = row * tiles + tile: tokens [tile*BLOCK, min((tile+1)*BLOCK, row_len)) of
    the row; partial[g] = (sum w l, count, sum clipped, sum clipped_lower, sum -log_ratio) over
    valid tokens, float32. logp/old/adv/coef/isw [B*T] any float dtype; mask [B*T] uint8.
    HAS_CREDIT: FIPO's weights [B*T] float32 and keep [B] uint8 (see _token_terms); program 0
    also writes FIPO's metrics from its row partials (_credit_metrics)."""
    pid = tl.program_id(0).to(tl.int64)
    row = pid // tiles
    offs = (pid % tiles) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    inb = offs < row_len
    idx = row * row_len + offs
    valid, a, log_ratio, in_clamp, ratio, pg1, pg2, clip1, pg3 = _token_terms(
        logp_ptr, old_ptr, adv_ptr, mask_ptr, coef_ptr, weight_ptr, keep_ptr, idx, inb, row_len, lo, hi, clip_c,
        HAS_COEF, HAS_CREDIT)
    if HAS_CREDIT:
        if pid == 0:
            _credit_metrics(stats_ptr, keep_ptr, metrics_ptr, n_rows, BLOCK)
    loss = tl.where(a < 0, tl.minimum(clip1, pg3), clip1)
    if HAS_ISW:
        loss = loss * tl.load(isw_ptr + idx, mask=valid, other=0.0).to(tl.float32)
    base = partial_ptr + pid * 5
    tl.store(base, tl.sum(tl.where(valid, loss, 0.0), axis=0))
    tl.store(base + 1, tl.sum(valid.to(tl.float32), axis=0))
    tl.store(base + 2, tl.sum(tl.where(valid & (pg2 > pg1), 1.0, 0.0), axis=0))
    tl.store(base + 3, tl.sum(tl.where(valid & (clip1 > pg3) & (a < 0), 1.0, 0.0), axis=0))
    tl.store(base + 4, tl.sum(tl.where(valid, -log_ratio, 0.0), axis=0))


@triton.heuristics(_OPTIONAL)
@triton.jit
def _surrogate_bwd_kernel(logp_ptr, old_ptr, adv_ptr, mask_ptr, coef_ptr, isw_ptr, weight_ptr, keep_ptr, row_weight_ptr,
                          grad_out_ptr, grad_ptr, n_tokens, row_len, lo, hi, clip_c,
                          HAS_COEF: tl.constexpr, HAS_ISW: tl.constexpr, HAS_CREDIT: tl.constexpr,
                          BLOCK: tl.constexpr):
    """grad[t] = grad_out * row_weight[t // row_len] * w[t] * d l[t] / d logp[t] on valid
    tokens, 0 at padding. Follows torch autograd of the reference: clamp passes gradient on
    [min, max] inclusive, maximum/minimum split it half-and-half on ties. grad [N] in logp's dtype."""
    pid = tl.program_id(0).to(tl.int64)
    idx = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    inb = idx < n_tokens
    valid, a, log_ratio, in_clamp, ratio, pg1, pg2, clip1, pg3 = _token_terms(
        logp_ptr, old_ptr, adv_ptr, mask_ptr, coef_ptr, weight_ptr, keep_ptr, idx, inb, row_len, lo, hi, clip_c,
        HAS_COEF, HAS_CREDIT)
    w1 = tl.where(pg1 > pg2, 1.0, tl.where(pg1 == pg2, 0.5, 0.0))
    in_bounds = ((ratio >= lo) & (ratio <= hi)).to(tl.float32)
    d_clip1 = -a * (w1 + (1.0 - w1) * in_bounds)           # d clip1 / d ratio
    w_min = tl.where(clip1 < pg3, 1.0, tl.where(clip1 == pg3, 0.5, 0.0))
    d_loss = tl.where(a < 0, d_clip1 * w_min, d_clip1)
    d_logp = tl.where(in_clamp, d_loss * ratio, 0.0)
    scale = tl.load(row_weight_ptr + idx // row_len, mask=valid, other=0.0) * tl.load(grad_out_ptr)
    if HAS_ISW:
        scale = scale * tl.load(isw_ptr + idx, mask=valid, other=0.0).to(tl.float32)
    grad = tl.where(valid, d_logp * scale, 0.0)
    tl.store(grad_ptr + idx, grad.to(grad_ptr.dtype.element_ty), mask=inb)


def _bounds(cfg: SurrogateConfig):
    return 1.0 - cfg.clip_low, 1.0 + cfg.clip_high, float(cfg.clip_c)


class _ClippedSurrogate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, old_logp, adv, mask_u8, coef, isw, cfg: SurrogateConfig, agg: Aggregation, credit):
        """credit: None, or FIPO's (weights [B, T] float32, keep [B] uint8, row stats [B, 5],
        metrics [5] to fill) from its kernel."""
        n = logp.numel()
        n_rows, row_len = (1, n) if logp.dim() == 1 else tuple(logp.shape)
        lo, hi, clip_c = _bounds(cfg)
        flat = [t.reshape(-1) for t in (logp.detach(), old_logp, adv, mask_u8)]
        coef_flat = None if coef is None else coef.reshape(-1)
        isw_flat = None if isw is None else isw.reshape(-1)
        weights, keep, stats, credit_metrics = (None, None, None, None) if credit is None else credit
        weights = None if weights is None else weights.reshape(-1)
        block = min(SURROGATE["BLOCK"], triton.next_power_of_2(max(row_len, 16)))
        tiles = max(1, triton.cdiv(row_len, block))
        partial = empty(n_rows, tiles, len(STATS), dtype=torch.float32, device=logp.device)
        if n_rows > 0:
            _surrogate_fwd_kernel[(n_rows * tiles,)](
                logp_ptr=flat[0], old_ptr=flat[1], adv_ptr=flat[2], mask_ptr=flat[3], coef_ptr=coef_flat,
                isw_ptr=isw_flat, weight_ptr=weights, keep_ptr=keep, stats_ptr=stats, metrics_ptr=credit_metrics,
                partial_ptr=partial, n_rows=n_rows, row_len=row_len, tiles=tiles, lo=lo, hi=hi, clip_c=clip_c,
                **dict(SURROGATE, BLOCK=block))
        loss, metrics, row_weight = aggregate(partial.sum(1), agg, row_len)
        ctx.save_for_backward(*flat, coef_flat, isw_flat, weights, keep, row_weight.contiguous())
        ctx.meta = (logp.shape, logp.dtype, n, row_len, lo, hi, clip_c)
        metrics = (metrics["clip_frac"], metrics["clip_frac_lower"], metrics["ppo_kl"])
        ctx.mark_non_differentiable(*metrics)
        return (loss,) + metrics

    @staticmethod
    def backward(ctx, grad_loss, *grad_metrics):
        logp, old, adv, mask_u8, coef, isw, weights, keep, row_weight = ctx.saved_tensors
        shape, dtype, n, row_len, lo, hi, clip_c = ctx.meta
        grad = empty(n, dtype=dtype, device=logp.device)
        grad_out = grad_loss.to(torch.float32).reshape(1).contiguous()
        if n > 0:
            _surrogate_bwd_kernel[(triton.cdiv(n, SURROGATE["BLOCK"]),)](
                logp_ptr=logp, old_ptr=old, adv_ptr=adv, mask_ptr=mask_u8, coef_ptr=coef, isw_ptr=isw,
                weight_ptr=weights, keep_ptr=keep, row_weight_ptr=row_weight, grad_out_ptr=grad_out, grad_ptr=grad,
                n_tokens=n, row_len=row_len, lo=lo, hi=hi, clip_c=clip_c, **SURROGATE)
        return grad.reshape(shape), None, None, None, None, None, None, None, None


def clipped_surrogate_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                           coef, rollout_is_weights, cfg: SurrogateConfig, agg: Aggregation,
                           credit: FipoConfig = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Backend entry, same contract as the reference: all inputs shaped like logp ([N] or
    [B, T]); mask bool; coef and rollout_is_weights None or like logp. Returns (loss [],
    {clip_frac, clip_frac_lower, ppo_kl}) float32; the loss is differentiable in logp
    (gradient in logp's dtype). With ``credit`` (FIPO's FipoConfig, [B, T] inputs): FIPO's
    kernel (triton/fipo.py) then the surrogate's, which reads the weights and keep and reduces
    FIPO's metrics: one launch more than without; returns (loss, metrics, FIPO's metrics)."""
    tensors = [t.contiguous() for t in (logp, old_logp, adv)]
    mask_u8 = mask.contiguous().view(torch.uint8)
    extra = [None if t is None else t.contiguous() for t in (coef, rollout_is_weights)]
    fipo = None
    if credit is not None:
        weights, keep, _, row_stats = fipo_weights(logp.detach(), old_logp, adv, mask, credit)
        fipo = (weights, keep.view(torch.uint8), row_stats, empty(len(FIPO_METRICS), dtype=torch.float32,
                                                                   device=logp.device))
    loss, clip_frac, clip_frac_lower, ppo_kl = _ClippedSurrogate.apply(*tensors, mask_u8, *extra, cfg, agg, fipo)
    metrics = dict(clip_frac=clip_frac, clip_frac_lower=clip_frac_lower, ppo_kl=ppo_kl)
    if fipo is None:
        return loss, metrics
    return loss, metrics, dict(zip(FIPO_METRICS, fipo[3].unbind()))


clipped_surrogate_loss.fused_credit = ("fipo",)  # credit.registry.FUSED_CREDIT
