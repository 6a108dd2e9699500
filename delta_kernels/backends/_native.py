"""Helpers shared by the native wrappers: dtype and aggregation codes, raw pointers, the
surrogate's autograd Function (the kernels compute d loss / d logp in the forward pass)."""
from __future__ import annotations

from types import SimpleNamespace
from typing import NamedTuple

import torch

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# csrc/common/surrogate_math.h SurrogateAgg
AGG_CODES = {"token-mean": 0, "seq-mean-token-sum": 1, "seq-mean-token-mean": 2, "seq-mean-token-sum-norm": 3}


def dtype_code(t: torch.Tensor) -> int:
    try:
        return DTYPE_CODES[t.dtype]
    except KeyError:
        raise TypeError(f"native kernels take float32, bfloat16 or float16, got {t.dtype}") from None


def ptr(t: torch.Tensor) -> int:
    assert t.is_contiguous()
    return t.data_ptr()


def f32(t: torch.Tensor) -> torch.Tensor:
    """float32, contiguous (a no-op for contiguous float32)."""
    return t.to(torch.float32).contiguous()


def rows_of(logp: torch.Tensor):
    """[N] -> (1, N); [B, T] -> (B, T)."""
    return (1, logp.shape[0]) if logp.dim() == 1 else (logp.shape[0], logp.shape[1])


class SurrogateFunction(torch.autograd.Function):
    """loss = kernel(logp, ...): forward runs ``kernel`` which returns (loss [], metrics [3],
    dloss_dlogp like logp, float32); backward scales the saved derivative."""

    @staticmethod
    def forward(ctx, logp, kernel):
        loss, metrics, grad = kernel(logp.detach())
        ctx.save_for_backward(grad)
        ctx.logp_dtype = logp.dtype
        ctx.mark_non_differentiable(metrics)
        return loss, metrics

    @staticmethod
    def backward(ctx, grad_loss, grad_metrics):
        (grad,) = ctx.saved_tensors
        return (grad * grad_loss).to(ctx.logp_dtype), None


def surrogate_with_grad(logp, kernel):
    """-> (loss, {clip_frac, clip_frac_lower, ppo_kl}), differentiable in logp."""
    loss, metrics = SurrogateFunction.apply(logp, kernel)
    return loss, dict(clip_frac=metrics[0], clip_frac_lower=metrics[1], ppo_kl=metrics[2])


class ScaledRows(NamedTuple):
    """Token vectors v[t] = scale[t] * rows[t] that are never materialised: the native passes
    read the hidden states and scale each row on the fly (one read of h per pass, no [N, H] write)."""
    rows: torch.Tensor   # [N, H] hidden states, f32/bf16/f16
    scale: torch.Tensor  # [N] float32, 1 - exp(logp)


def rows_and_scale(v):
    """-> (the row tensor, pointer to the per-row scale or 0)."""
    return (v.rows, ptr(v.scale)) if isinstance(v, ScaledRows) else (v, 0)


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
