"""Helpers shared by the native wrappers: dtype codes, raw pointers, the surrogate's autograd
Function (the kernels compute the row partials and each token's d l / d logp in the forward
pass; delta_kernels.aggregation turns the partials into the loss and the row weights)."""
from __future__ import annotations

from types import SimpleNamespace
from typing import NamedTuple, Optional

import torch

from .._checks import DeltaConfig, TokenBatch
from ..aggregation import aggregate
from ..pipeline import run_coefficients

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def dtype_code(t: torch.Tensor) -> int:
    try:
        return DTYPE_CODES[t.dtype]
    except KeyError:
        raise TypeError(f"native kernels take float32, bfloat16 or float16, got {t.dtype}") from None


def ptr(t: torch.Tensor) -> int:
    assert t.is_contiguous()
    return t.data_ptr()


def opt_ptr(t) -> Optional[int]:
    """ptr(t), or None (an unused pointer argument of the native calls) for None."""
    return None if t is None else ptr(t)


def f32(t: torch.Tensor) -> torch.Tensor:
    """float32, contiguous (a no-op for contiguous float32)."""
    return t.to(torch.float32).contiguous()


def rows_of(logp: torch.Tensor):
    """[N] -> (1, N); [B, T] -> (B, T)."""
    return (1, logp.shape[0]) if logp.dim() == 1 else (logp.shape[0], logp.shape[1])


class SurrogateFunction(torch.autograd.Function):
    """loss = aggregate(rows): ``kernel(logp)`` returns (rows [B, 5] of aggregation.STATS,
    token_grad [B, T] = w_t d l_t / d logp_t, 0 at padding); backward scales each row of the
    saved token gradient by its row weight."""

    @staticmethod
    def forward(ctx, logp, kernel, agg):
        rows, token_grad = kernel(logp.detach())
        loss, metrics, row_weight = aggregate(rows, agg, token_grad.shape[1])
        ctx.save_for_backward(token_grad, row_weight.to(token_grad.dtype))
        ctx.logp_shape, ctx.logp_dtype = logp.shape, logp.dtype
        metrics = torch.stack([metrics["clip_frac"], metrics["clip_frac_lower"], metrics["ppo_kl"]]).float()
        ctx.mark_non_differentiable(metrics)
        return loss.float(), metrics

    @staticmethod
    def backward(ctx, grad_loss, grad_metrics):
        token_grad, row_weight = ctx.saved_tensors
        grad = token_grad * (row_weight * grad_loss)[:, None]
        return grad.reshape(ctx.logp_shape).to(ctx.logp_dtype), None, None


def native_surrogate(launch):
    """-> the backend's clipped_surrogate_loss(logp, old_logp, adv, mask, coef, rollout_is_weights,
    cfg, agg) = (loss, {clip_frac, clip_frac_lower, ppo_kl}) float32, differentiable in logp.
    ``launch(cfg, logp, old_logp, adv, mask, coef, is_weight, B, T)`` runs the kernel on float32
    contiguous inputs (mask bool; coef, is_weight or None) and returns (rows [B, 5], token_grad [B, T])."""
    def clipped_surrogate_loss(logp, old_logp, adv, mask, coef, rollout_is_weights, cfg, agg):
        rows, cols = rows_of(logp)
        inputs = [f32(old_logp), f32(adv), mask.contiguous()] + [None if t is None else f32(t)
                                                                for t in (coef, rollout_is_weights)]
        loss, metrics = SurrogateFunction.apply(logp, lambda lp: launch(cfg, f32(lp), *inputs, rows, cols), agg)
        return loss, dict(clip_frac=metrics[0], clip_frac_lower=metrics[1], ppo_kl=metrics[2])

    return clipped_surrogate_loss


class ScaledRows(NamedTuple):
    """Token vectors v[t] = scale[t] * rows[t] that are never materialised: the native passes
    read the hidden states and scale each row on the fly (one read of h per pass, no [N, H] write)."""
    rows: torch.Tensor   # [N, H] hidden states, f32/bf16/f16
    scale: torch.Tensor  # [N] float32, 1 - exp(logp)


def rows_and_scale(v):
    """-> (the row tensor, pointer to the per-row scale or None)."""
    return (v.rows, ptr(v.scale)) if isinstance(v, ScaledRows) else (v, None)


def pipeline_kernels(token_vectors, side_sums, margin_pass) -> SimpleNamespace:
    """The three passes of delta_kernels.pipeline's contract for a native backend. The sketch z
    is materialised in float32 ([N, r], small; no rounding to hidden's dtype); exact vectors stay
    implicit as ScaledRows(hidden, 1 - exp(logp)), their side sums from one read of h."""
    def pipeline_token_vectors(hidden, logp, a_pos, a_neg, sketch_dim, seed):
        if sketch_dim is not None:
            return token_vectors(hidden, logp, a_pos, a_neg, sketch_dim, seed, out_dtype=torch.float32)
        v = ScaledRows(hidden, f32(-torch.expm1(logp.to(torch.float32))))
        return v, side_sums(v, a_pos, a_neg)

    return SimpleNamespace(token_vectors=pipeline_token_vectors, side_sums=side_sums, margin_pass=margin_pass)


def native_phases(token_vectors, pipeline: SimpleNamespace):
    """-> (token_sketch, delta_coefficients) of a native backend, from its token_vectors kernel
    and its pipeline_kernels (the contract of delta_kernels.reference)."""
    def token_sketch(hidden, logp, sketch_dim: Optional[int], seed: int):
        zeros = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        return token_vectors(hidden, logp, zeros, zeros, sketch_dim, seed)[0]

    def delta_coefficients(batch: TokenBatch, cfg: DeltaConfig, sketch_dim: Optional[int], seed: int, reduce=None):
        return run_coefficients(pipeline, batch, cfg, sketch_dim, seed, reduce)

    return token_sketch, delta_coefficients
