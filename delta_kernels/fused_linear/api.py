"""Public API of the fused LM-head kernels: argument checks once, then one backend.

Logits are ``x = (hidden @ weight.T + bias) / temperature`` (the LM head's output divided by
the sampling temperature, as verl and vLLM apply it); log-probs, entropy and the surrogate
are those of softmax(x). No [tokens x vocab] tensor is ever held: the vocabulary is
streamed in tiles (triton) or chunks (torch) with an online log-sum-exp in float32.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch

from .. import _checks as C
from .._backends import LM_HEAD, resolve
from .._formulas import side_masks
from ..reference.surrogate import clipped_surrogate_loss as _surrogate_from_logp
from ..credit.registry import NONE, credit_spec, in_loss_credit
from ..surrogate import surrogate_aggregation


def _check_lm_head(hidden, weight, targets, bias, temperature, check_values: bool):
    """-> hidden [N, H], weight [V, H], targets [N] int64, bias [V] or None (all contiguous),
    and the token shape (targets' shape): _check_masked_lm_head without a mask."""
    return _check_masked_lm_head(hidden, weight, targets, bias, temperature, check_values, None)[:5]


def _check_masked_lm_head(hidden, weight, targets, bias, temperature, check_values: bool, mask):
    """-> hidden [N, H], weight [V, H], targets [N] int64, bias [V] or None (all contiguous),
    the token shape (targets' shape) and valid [N] bool (mask, or None without one). Padding is
    don't-care: the value checks of hidden and targets look only at valid positions."""
    hidden = _check_hidden(hidden)
    hdim = hidden.shape[-1]
    weight = C.check_tensor("weight", weight)
    if weight.dim() != 2 or weight.shape[1] != hdim:
        C.fail("weight", f"expected [V, H] with H = {hdim} (hidden's last dim), got shape {list(weight.shape)}")
    vocab = weight.shape[0]
    if vocab < 1:
        C.fail("weight", "vocabulary size must be >= 1")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight: dtype {weight.dtype} does not match hidden's {hidden.dtype}")
    if bias is not None:
        bias = C.check_tensor("bias", bias)
        if tuple(bias.shape) != (vocab,):
            C.fail("bias", f"expected shape [{vocab}] (weight's rows), got {list(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias: dtype {bias.dtype} does not match hidden's {hidden.dtype}")
    C.check_devices(hidden=hidden, weight=weight, targets=targets, bias=bias, mask=mask)
    valid = None if mask is None else C.check_mask(mask, hidden.shape[:-1], check_values)
    y, shape = check_targets_and_temperature(hidden, vocab, targets, temperature, check_values, valid)
    if check_values and bias is not None:
        C.check_finite("bias", bias)
    return (hidden.reshape(-1, hdim).contiguous(), weight.contiguous(), y, None if bias is None else bias.contiguous(),
            shape, valid)


def _check_hidden(hidden) -> torch.Tensor:
    hidden = C.check_tensor("hidden", hidden)
    if hidden.dim() < 2:
        C.fail("hidden", f"expected [N, H] or [B, T, H], got shape {list(hidden.shape)}")
    if hidden.shape[-1] < 1:
        C.fail("hidden", "hidden size must be >= 1")
    return hidden


def check_targets_and_temperature(hidden: torch.Tensor, vocab: int, targets, temperature, check_values: bool,
                                  valid: Optional[torch.Tensor] = None):
    """The LM head's per-token inputs besides its matrix (hidden admitted, on targets' device):
    -> targets [N] int64 contiguous, token shape. With check_values: targets in [0, vocab),
    hidden finite, at the ``valid`` positions ([N] bool) only when given."""
    targets = C.check_tensor("targets", targets, floating=False)
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets: expected int64 (or int32) token ids, got {targets.dtype}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        C.fail("targets", f"shape {list(targets.shape)} must equal hidden's leading dims {list(hidden.shape[:-1])}")
    if targets.numel() < 1:
        C.fail("targets", "no tokens")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature <= 0:
        C.fail("temperature", f"must be a finite number > 0, got {temperature!r}")
    tiny = torch.finfo(torch.float64 if hidden.dtype == torch.float64 else torch.float32).tiny
    if temperature < tiny:  # 1 / temperature would overflow the compute dtype
        C.fail("temperature", f"{temperature!r} is below {tiny:.3g}, the smallest normal number of the compute dtype")
    if check_values:
        bad = (targets < 0) | (targets >= vocab)
        if valid is not None:
            bad &= valid.reshape(bad.shape)
        if C.compiling():
            C.assert_on_device(~bad, "targets", f"a value is out of range [0, V={vocab})")
        elif bool(bad.any()):
            flat = int(bad.reshape(-1).nonzero()[0, 0])
            C.fail("targets", f"value {int(targets.reshape(-1)[flat])} at flat index {flat} is out of range "
                              f"[0, V={vocab})")
        C.check_finite("hidden", hidden, None if valid is None else valid.reshape(hidden.shape[:-1]))
    return targets.reshape(-1).to(torch.int64).contiguous(), tuple(targets.shape)


def _check_logits_finite(logp: torch.Tensor, temperature: float) -> None:
    """From finite inputs a non-finite log-prob means the logits overflowed (one device sync)."""
    overflow = (f"the logits (hidden @ weight.T + bias) / {temperature!r} overflow the compute dtype; raise the "
                "temperature or scale the LM head")
    if C.compiling():
        C.assert_on_device(torch.isfinite(logp.detach()), "temperature", overflow)
    elif not bool(torch.isfinite(logp.detach().sum())):
        C.fail("temperature", overflow)


@torch.no_grad()
def fused_linear_logprob_sketch(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                                bias: Optional[torch.Tensor] = None, temperature: float = 1.0,
                                sketch_dim: Optional[int] = None, seed: int = 0, entropy: bool = False,
                                advantages: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                                backend: str = "auto", check_values: bool = True):
    """Phase A from the LM head: log-probs, token vectors (or their sketch) and side sums in one
    pass over the vocabulary, without [N, V] logits.

    Args:
        hidden: [N, H] or [B, T, H] hidden states entering the LM head; float16/bfloat16/float32
            (float64 with backend="torch").
        weight: [V, H] LM-head matrix, hidden's dtype. bias: optional [V], hidden's dtype.
        targets: token ids shaped like hidden's leading dims, int64 (or int32), in [0, V).
        temperature: > 0; logits are (hidden @ weight.T + bias) / temperature.
        sketch_dim: r; when set, returns z = v @ R with R = sketch_matrix(H, r, seed), else v.
        seed: seed of R, in [0, 2**32).
        entropy: also return the entropy of softmax(logits) per token.
        advantages, mask: give both to get the side sums (advantages shaped like targets, or [B]
            for [B, T]; mask bool or 0/1 shaped like targets). Padding (mask 0) is don't-care: any
            hidden, target or advantage there is accepted, enters no sum, and its outputs are 0.
        backend: "auto" or a registered backend that lists the lm_head op (see
            delta_kernels._backends; "auto" takes the highest priority one for the device).
        check_values: check target range and finiteness, at valid positions (device syncs).
    Returns:
        logp: shaped like targets, float32 (float64 for float64), log p(target) <= 0.
        entropy: like logp, or None.
        sketch: [..., D] in hidden's dtype, v = (1 - exp(logp)) hidden (D = H) or z (D = r).
        side_sums: [2, D] float32 (float64 for float64), (sum a+ v, sum a- v) with
            a+ = max(adv, 0) * mask, a- = max(-adv, 0) * mask; or None.
    The outputs feed ``delta_coefficients(None, logp, advantages, mask, vectors=sketch,
    side_sums=side_sums, sketch_dim=sketch_dim)``.
    """
    if (advantages is None) != (mask is None):
        C.fail("advantages" if advantages is None else "mask", "advantages and mask go together (side sums need both)")
    h, w, y, b, shape, valid = _check_masked_lm_head(hidden, weight, targets, bias, temperature, check_values, mask)
    C.check_sketch_args(sketch_dim, seed)
    a_pos = a_neg = None
    if advantages is not None:
        C.check_devices(hidden=hidden, advantages=advantages)
        ref = torch.empty(shape, device="meta")
        adv = C.check_advantages(advantages, ref, check_values, valid.reshape(shape))
        cdt = torch.float64 if h.dtype == torch.float64 else torch.float32
        _, _, _, a_pos, a_neg = side_masks(adv.contiguous(), valid.contiguous(), cdt)
        a_pos, a_neg = a_pos.contiguous(), a_neg.contiguous()
    ops = resolve(backend, h.device, h.dtype, LM_HEAD)
    logp, _, ent = ops.logprob(h, w, b, y, float(temperature), entropy, valid=valid)
    if check_values:
        _check_logits_finite(logp, temperature)
    vec, sums = ops.token_vectors(h, logp, a_pos, a_neg, sketch_dim, seed, valid=valid)
    return (logp.reshape(shape), None if ent is None else ent.reshape(shape),
            vec.reshape(*shape, vec.shape[-1]), sums)


class _FusedLinearLogprob(torch.autograd.Function):
    """(hidden [N, H], weight [V, H], bias [V] or None) -> logp [N] (and entropy [N], not
    differentiable; empty when not asked). Backward recomputes the logits tiles. Rows that are
    not ``valid`` ([N] bool) are selected out: 0 outputs, 0 hidden gradient, no weight gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, ops, want_entropy, valid):
        logp, lse, ent = ops.logprob(hidden, weight, bias, targets, temperature, want_entropy, valid=valid)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, valid)
        ctx.temperature, ctx.ops = temperature, ops
        ent = ent if ent is not None else logp.new_empty(0)
        ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, _grad_ent):
        hidden, weight, bias, targets, lse, valid = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if grad_logp is None or not (need_h or need_w or need_b):
            return None, None, None, None, None, None, None, None
        dh, dw, db = ctx.ops.logprob_backward(hidden, weight, bias, targets, ctx.temperature, lse,
                                              grad_logp.contiguous(), need_h, need_w, need_b and bias is not None,
                                              valid=valid)
        return dh, dw, db, None, None, None, None, None


def fused_linear_clipped_surrogate_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                        old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                                        coef: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                                        temperature: float = 1.0, clip_low: float = 0.2, clip_high: float = 0.28,
                                        clip_c: float = 10.0, agg: str = "token-mean", dp_size: int = 1,
                                        batch_num_tokens: Optional[float] = None,
                                        global_batch_size: Optional[float] = None,
                                        loss_scale_factor: Optional[float] = None,
                                        rollout_is_weights: Optional[torch.Tensor] = None,
                                        return_logp: bool = False, entropy: bool = False, credit=None,
                                        credit_group=None, backend: str = "auto",
                                        check_values: bool = True) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Weighted dual-clip DAPO surrogate straight from the LM head (phase C), no [N, V] logits.

    logp = log_softmax((hidden @ weight.T + bias) / temperature)[targets], then exactly the
    surrogate of ``clipped_surrogate_loss`` with A = advantages * coef on valid tokens:
    ratio = exp(clamp(logp - old_logp, -20, 20)), l = max(-A ratio, -A clamp(ratio, 1-clip_low,
    1+clip_high)), for A < 0 l = min(l, -A clip_c), times rollout_is_weights, aggregated by
    ``agg`` and verl's normalisers (delta_kernels.aggregation, verl 0.9.1's agg_loss).

    Args:
        hidden: [N, H] or [B, T, H] (requires grad as needed). weight: [V, H]. bias: [V] or None.
        targets: int64 token ids shaped like hidden's leading dims, in [0, V).
        old_logp: like targets. advantages: like targets, or [B] for [B, T].
        mask: like targets, bool or 0/1; padding (0) is don't-care: any value of any per-token input
            there is accepted and enters neither the loss nor a gradient. coef: optional per-token
            coefficients like targets.
        temperature > 0; clip_low, clip_high, clip_c, agg, dp_size, batch_num_tokens,
        global_batch_size, loss_scale_factor, rollout_is_weights: as clipped_surrogate_loss.
        return_logp / entropy: add the detached per-token "logp" / "entropy" to metrics.
        credit: optional in-loss credit spec ("fipo", "entropy", "fipo*entropy" or a
            delta_kernels.credit.credit_spec), as clipped_surrogate_loss's: its weights come from
            the logp (and entropy) computed here, so [B, T] is held once for them; the entropy
            method makes the head emit entropy. credit_group: group of the entropy quantile.
        backend: "auto" or a registered backend that lists the lm_head op (see
            delta_kernels._backends; "auto" takes the highest priority one for the device).
    Returns:
        (loss [], metrics {clip_frac, clip_frac_lower, ppo_kl[, logp][, entropy]}), float32
        (float64 for float64); logp and entropy are 0 at padding. loss.backward() gives gradients
        for hidden (0 at padding), weight and bias (masked tokens contribute none), accumulated in
        float32.
    """
    cfg = C.SurrogateConfig(clip_low=clip_low, clip_high=clip_high, clip_c=clip_c)
    h, w, y, b, shape, flat_valid = _check_masked_lm_head(hidden, weight, targets, bias, temperature, check_values,
                                                          mask)
    ref = torch.empty(shape, device="meta")
    C.check_devices(hidden=hidden, old_logp=old_logp, advantages=advantages, mask=mask, coef=coef,
                    rollout_is_weights=rollout_is_weights)
    old_logp = C.check_logp("old_logp", old_logp, False)
    if tuple(old_logp.shape) != shape:
        C.fail("old_logp", f"shape {list(old_logp.shape)} does not match targets' {list(shape)}")
    aggregation = surrogate_aggregation(agg, shape, dp_size, batch_num_tokens, global_batch_size, loss_scale_factor)
    valid = flat_valid.reshape(shape)
    if check_values:  # padding is don't-care: only valid positions are looked at
        C.check_values_of_logp("old_logp", old_logp, valid)
    adv = C.check_advantages(advantages, ref, False).reshape(shape)
    if check_values:
        C.check_finite("advantages", adv, valid)
    coef = C.check_token_weights("coef", coef, shape, valid, check_values)
    rollout_is_weights = C.check_token_weights("rollout_is_weights", rollout_is_weights, shape, valid, check_values)
    C.check_representable("clip_c", clip_c, torch.float64 if h.dtype == torch.float64 else torch.float32)
    ops = resolve(backend, h.device, h.dtype, LM_HEAD)
    spec = credit_spec(NONE if credit is None else credit)
    want_entropy = entropy or any("entropy" in m.inputs for m in spec.methods)
    logp, ent = _FusedLinearLogprob.apply(h, w, b, y, float(temperature), ops, want_entropy, flat_valid.contiguous())
    if check_values:
        _check_logits_finite(logp, temperature)
    logp = logp.reshape(shape)
    valid, coef, credit_metrics = in_loss_credit(spec, logp, old_logp, adv, valid, coef,
                                                 ent.reshape(shape) if want_entropy else None, clip_c, credit_group,
                                                 "torch" if h.dtype == torch.float64 else "auto")
    detach = (lambda t: None if t is None else t.detach())  # noqa: E731
    loss, metrics = _surrogate_from_logp(logp, old_logp.detach(), adv.detach(), valid, detach(coef),
                                         detach(rollout_is_weights), cfg, aggregation)
    metrics.update(credit_metrics)
    if return_logp:
        metrics["logp"] = logp.detach()
    if entropy:
        metrics["entropy"] = ent.reshape(shape)
    return loss, metrics
