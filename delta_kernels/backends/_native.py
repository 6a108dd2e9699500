"""What the native backends share: the calls of the delta_kernels:: custom ops (backends/_ops.py)
on the pipeline's arguments, the helpers of the op bodies (dtype codes, raw pointers: only op
bodies take them), and the phases built from the ops (the surrogate's kernel computes the row
partials and each token's d l / d logp in the forward pass; delta_kernels.aggregation turns the
partials into the loss and the row weights)."""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

from .._checks import DeltaConfig, TokenBatch
from ..aggregation import aggregate
from ..pipeline import PassKernels, run_coefficients
from ._ops import call, tokens

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def dtype_code(t: torch.Tensor) -> int:
    try:
        return DTYPE_CODES[t.dtype]
    except KeyError:
        raise TypeError(f"native kernels take float32, bfloat16 or float16, got {t.dtype}") from None


def ptr(t: torch.Tensor) -> int:
    """The data pointer of a contiguous tensor (op bodies only)."""
    assert t.is_contiguous()
    return t.data_ptr()


def opt_ptr(t) -> Optional[int]:
    """ptr(t), or None (an unused pointer argument of the native calls) for None."""
    return None if t is None else ptr(t)


def row_layout(x: torch.Tensor) -> Tuple[int, int, Optional[Tuple[int, int, int]]]:
    """A row operand of the passes (hidden, or vectors: [N, D], or the caller's [B, T, D] view
    with a contiguous last dim, read in place; _checks.rows_for) -> (N, D, row_strides):
    row_strides = (T, stride_b, stride_t) in elements (row n = b T + t starts at b stride_b +
    t stride_t; csrc/common/row_strides.h), None for a contiguous array."""
    d = x.shape[-1]
    assert x.dim() in (2, 3) and (x.stride(-1) == 1 or d <= 1)
    n = tokens(x)
    if x.is_contiguous():
        return n, d, None
    if x.dim() == 2:
        return n, d, (max(n, 1), 0, x.stride(0))
    return n, d, (x.shape[1], x.stride(0), x.stride(1))


def f32(t: torch.Tensor) -> torch.Tensor:
    """float32, contiguous (a no-op for contiguous float32)."""
    return t.to(torch.float32).contiguous()


def rows_of(logp: torch.Tensor):
    """[N] -> (1, N); [B, T] -> (B, T)."""
    return (1, logp.shape[0]) if logp.dim() == 1 else (logp.shape[0], logp.shape[1])


class SurrogateLoss(torch.autograd.Function):
    """loss = aggregate(rows) over the row statistics and each token's w_t d l_t / d logp_t that
    one native kernel returned (delta_kernels::clipped_surrogate, or a kernel that fuses credit
    weights into it); backward scales that token gradient by the row weights (the op's own
    autograd formula composed with aggregate's, in one node: less host time per call than the
    op's autograd wrapper and aggregate's graph). logp only links the loss to the graph."""

    @staticmethod
    def forward(ctx, logp, rows, token_grad, agg):
        loss, metrics, row_weight = aggregate(rows, agg, token_grad.shape[1])
        ctx.save_for_backward(token_grad, row_weight.to(token_grad.dtype))
        metrics = torch.stack([metrics["clip_frac"], metrics["clip_frac_lower"], metrics["ppo_kl"]]).float()
        ctx.mark_non_differentiable(metrics)
        return loss.float(), metrics

    @staticmethod
    def backward(ctx, grad_loss, _grad_metrics):
        token_grad, row_weight = ctx.saved_tensors
        return token_grad * (row_weight * grad_loss)[:, None], None, None, None


def surrogate_inputs(logp, old_logp, adv, mask, coef, rollout_is_weights):
    """The kernels' [B, T] float32 contiguous views ([N] is one row): logp (detached), old_logp,
    adv, mask, coef, rollout_is_weights (None stays None)."""
    shape = rows_of(logp)
    flat = [None if t is None else f32(t).reshape(shape) for t in (logp.detach(), old_logp, adv, coef,
                                                                  rollout_is_weights)]
    return flat[0], flat[1], flat[2], mask.reshape(shape).contiguous(), flat[3], flat[4]


def surrogate_result(logp, rows, token_grad, agg):
    """(loss, {clip_frac, clip_frac_lower, ppo_kl}) from a surrogate kernel's outputs."""
    loss, metrics = SurrogateLoss.apply(f32(logp).reshape(rows_of(logp)), rows, token_grad, agg)
    return loss, dict(clip_frac=metrics[0], clip_frac_lower=metrics[1], ppo_kl=metrics[2])


def clipped_surrogate_loss(logp, old_logp, adv, mask, coef, rollout_is_weights, cfg, agg):
    """The native backends' phase C: (loss, {clip_frac, clip_frac_lower, ppo_kl}) float32,
    differentiable in logp (SurrogateLoss)."""
    rows, token_grad = call("clipped_surrogate", *surrogate_inputs(logp, old_logp, adv, mask, coef,
                                                                   rollout_is_weights),
                            cfg.clip_low, cfg.clip_high, cfg.clip_c)
    return surrogate_result(logp, rows, token_grad, agg)


class ScaledRows(NamedTuple):
    """Token vectors v[t] = scale[t] * rows[t] that are never materialised: the native passes
    read the hidden states and scale each row on the fly (one read of h per pass, no [N, H] write)."""
    rows: torch.Tensor   # [N, H] hidden states, f32/bf16/f16 (or the caller's [B, T, H] view: row_layout)
    scale: torch.Tensor  # [N] float32, 1 - exp(logp)


def rows_and_scale(v):
    """-> (the row tensor, the per-row scale or None)."""
    return (v.rows, v.scale) if isinstance(v, ScaledRows) else (v, None)


def token_vectors(hidden, logp, a_pos, a_neg, sketch_dim: Optional[int], seed: int, out_dtype=None):
    """hidden [N, H] (f32/bf16/f16; or a [B, T, H] view, row_layout), logp, a_pos, a_neg [N] -> (v [N, D]
    in out_dtype (default hidden's; else float32), sums [2, D] f32)."""
    out_dtype = out_dtype or hidden.dtype
    assert out_dtype in (hidden.dtype, torch.float32)
    return call("token_vectors", hidden, f32(logp), f32(a_pos), f32(a_neg), sketch_dim or 0, seed,
                out_dtype != hidden.dtype)


def side_sums(v, a_pos, a_neg):
    """v [N, D] (a tensor or ScaledRows) -> sums [2, D] f32 = (sum a_pos v, sum a_neg v)."""
    rows, scale = rows_and_scale(v)
    return call("side_sums", rows, scale, f32(a_pos), f32(a_neg))


def margin_pass(v, w, c, gate):
    """v [N, D] (a tensor or ScaledRows), w [D], c [D] -> (m [N] = 2 (v - c).w f32, gated sums [2, D] f32
    or None); gate = (gamma [2], a_pos, a_neg)."""
    rows, scale = rows_and_scale(v)
    if gate is None:
        return call("margins", rows, scale, f32(w), f32(c)), None
    return call("gated_margins", rows, scale, f32(w), f32(c), *(f32(x) for x in gate))


def pipeline_kernels(token_vectors, side_sums, margin_pass) -> PassKernels:
    """The three passes of delta_kernels.pipeline's contract for a native backend. The sketch z
    is materialised in float32 ([N, r], small; no rounding to hidden's dtype); exact vectors stay
    implicit as ScaledRows(hidden, 1 - exp(logp)), their side sums from one read of h."""
    def pipeline_token_vectors(hidden, logp, a_pos, a_neg, sketch_dim, seed):
        if sketch_dim is not None:
            return token_vectors(hidden, logp, a_pos, a_neg, sketch_dim, seed, out_dtype=torch.float32)
        v = ScaledRows(hidden, f32(-torch.expm1(logp.to(torch.float32))))
        return v, side_sums(v, a_pos, a_neg)

    return PassKernels(token_vectors=pipeline_token_vectors, side_sums=side_sums, margin_pass=margin_pass)


def native_phases(token_vectors, pipeline: PassKernels):
    """-> (token_sketch, delta_coefficients) of a native backend, from its token_vectors kernel
    and its pipeline_kernels (the contract of delta_kernels.reference)."""
    def token_sketch(hidden, logp, sketch_dim: Optional[int], seed: int):
        zeros = torch.zeros(tokens(hidden), dtype=torch.float32, device=hidden.device)
        return token_vectors(hidden, logp, zeros, zeros, sketch_dim, seed)[0]

    def delta_coefficients(batch: TokenBatch, cfg: DeltaConfig, sketch_dim: Optional[int], seed: int, reduce=None):
        return run_coefficients(pipeline, batch, cfg, sketch_dim, seed, reduce)

    return token_sketch, delta_coefficients
