"""Helpers shared by the native wrappers: dtype and aggregation codes, raw pointers, the
surrogate's autograd Function (the kernels compute d loss / d logp in the forward pass)."""
from __future__ import annotations

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
