"""Loss aggregation, written once for every backend: verl 0.9.1's ``agg_loss``.

Every surrogate backend reduces its tokens to per-row partial sums (a row is a sequence of a
[B, T] batch; an [N] batch is one row), the columns of ``STATS``:

    loss         sum of w_t l_t over the row's valid tokens (w_t: rollout_is_weights, or 1)
    count        number of valid tokens
    clip         valid tokens with pg2 > pg1
    clip_lower   valid tokens with A < 0 and clip1 > pg3
    neg_log_ratio  sum of -clamp(logp - old_logp, -20, 20) over valid tokens

Every mode is linear in the row loss sums: loss = sum_r row_weight[r] * loss_r, with row
weights that depend only on the counts and the normalisers. ``aggregate`` forms them, so the
backward of every backend is d loss / d logp[t] = row_weight[row(t)] * w_t * d l_t / d logp[t].

    mode                     loss (n_r: valid tokens of row r, R: rows with n_r > 0)
    token-mean               dp * sum_r loss_r / (batch_num_tokens or sum_r n_r)
    token-sum                dp * sum_r loss_r
    seq-mean-token-sum       dp * sum_r loss_r / (global_batch_size or |R|)
    seq-mean-token-mean      dp * sum_{r in R} (loss_r / n_r) / (global_batch_size or |R|)
    seq-mean-token-sum-norm  dp * sum_r loss_r / (global_batch_size or |R|) / (loss_scale_factor or T)

A local denominator (token count, |R|, T) of zero is taken as 1: an all-masked batch gives loss
0 and zero gradients, where verl divides 0 by 0. The metrics are means over the call's valid
tokens, as in verl's compute_policy_loss_vanilla, whatever the mode.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from ._checks import fail

STATS = ("loss", "count", "clip", "clip_lower", "neg_log_ratio")  # columns of the row partials


@dataclass(frozen=True)
class Aggregation:
    """A mode and verl's normalisers (validated on construction).

    dp_size: data-parallel ranks (int >= 1); each rank's loss is scaled by it, as the
        gradient all-reduce averages over ranks. With dp_size > 1 the mode's global count is
        required (batch_num_tokens for token-mean, global_batch_size for the seq-mean modes).
    batch_num_tokens: valid tokens over the global batch (token-mean), > 0.
    global_batch_size: non-empty sequences over the global batch (seq-mean modes), > 0.
    loss_scale_factor: divisor of seq-mean-token-sum-norm (default: the row length T), > 0.
    A normaliser a mode does not use is ignored, as in verl.
    """
    mode: str = "token-mean"
    dp_size: int = 1
    batch_num_tokens: Optional[float] = None
    global_batch_size: Optional[float] = None
    loss_scale_factor: Optional[float] = None

    def __post_init__(self):
        if self.mode not in AGG_MODES:
            fail("agg", f"unknown aggregation mode {self.mode!r}; expected one of {', '.join(AGG_MODES)}")
        if isinstance(self.dp_size, bool) or not isinstance(self.dp_size, int):
            raise TypeError(f"dp_size: expected an int, got {type(self.dp_size).__name__}")
        if self.dp_size < 1:
            fail("dp_size", f"must be >= 1, got {self.dp_size}")
        for name in ("batch_num_tokens", "global_batch_size", "loss_scale_factor"):
            v = getattr(self, name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"{name}: expected a number or None, got {type(v).__name__}")
            if not (math.isfinite(v) and v > 0):
                fail(name, f"must be a finite number > 0, got {v!r}")
        needed = _GLOBAL_COUNT.get(self.mode)
        if self.dp_size > 1 and needed is not None and getattr(self, needed) is None:
            fail(needed, f"the global count is required when dp_size > 1 (agg={self.mode!r}, "
                         f"dp_size={self.dp_size}): each rank's local count would give a different scale")


def _token_mean(n: torch.Tensor, seq_len: int, a: Aggregation) -> torch.Tensor:
    tokens = n.sum().clamp_min(1) if a.batch_num_tokens is None else a.batch_num_tokens
    return (a.dp_size / tokens) * torch.ones_like(n)


def _token_sum(n: torch.Tensor, seq_len: int, a: Aggregation) -> torch.Tensor:
    return torch.full_like(n, float(a.dp_size))


def _sequences(n: torch.Tensor, a: Aggregation):
    """Global (or local non-empty) sequence count."""
    return (n > 0).sum().clamp_min(1).to(n.dtype) if a.global_batch_size is None else a.global_batch_size


def _seq_mean_token_sum(n: torch.Tensor, seq_len: int, a: Aggregation) -> torch.Tensor:
    return (a.dp_size / _sequences(n, a)) * torch.ones_like(n)


def _seq_mean_token_mean(n: torch.Tensor, seq_len: int, a: Aggregation) -> torch.Tensor:
    return a.dp_size / (_sequences(n, a) * n.clamp_min(1))


def _seq_mean_token_sum_norm(n: torch.Tensor, seq_len: int, a: Aggregation) -> torch.Tensor:
    scale = max(seq_len, 1) if a.loss_scale_factor is None else a.loss_scale_factor
    return (a.dp_size / (_sequences(n, a) * scale)) * torch.ones_like(n)


# mode -> row weights [R] from the valid counts [R] and the row length. The one list of modes.
_ROW_WEIGHTS: Dict[str, Callable[[torch.Tensor, int, Aggregation], torch.Tensor]] = {
    "token-mean": _token_mean,
    "token-sum": _token_sum,
    "seq-mean-token-sum": _seq_mean_token_sum,
    "seq-mean-token-mean": _seq_mean_token_mean,
    "seq-mean-token-sum-norm": _seq_mean_token_sum_norm,
}
AGG_MODES = tuple(_ROW_WEIGHTS)
SEQUENCE_MODES = tuple(m for m in AGG_MODES if m.startswith("seq-"))  # need [B, T] rows
# the normaliser that dp_size > 1 requires, per mode (token-sum needs none)
_GLOBAL_COUNT = {"token-mean": "batch_num_tokens", **{m: "global_batch_size" for m in SEQUENCE_MODES}}


def aggregate(rows: torch.Tensor, agg: Aggregation, seq_len: int
              ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor], torch.Tensor]:
    """rows [R, 5] (columns STATS; column 0 may carry autograd), the row length T ->
    (loss [], metrics {clip_frac, clip_frac_lower, ppo_kl}, row_weight [R]) in rows' dtype.
    row_weight[r] = d loss / d rows[r, 0]. No host synchronisation."""
    stats = rows.detach()
    weight = _ROW_WEIGHTS[agg.mode](stats[:, 1], seq_len, agg).to(rows.dtype)
    loss = (weight * rows[:, 0]).sum()
    total = stats.sum(0)
    n = total[1].clamp_min(1)
    metrics = dict(clip_frac=total[2] / n, clip_frac_lower=total[3] / n, ppo_kl=total[4] / n)
    return loss, metrics, weight


def trl_loss_aggregation(loss_type: str, mask: torch.Tensor, *, max_completion_length: Optional[int] = None,
                         num_items_in_batch=None, num_processes: int = 1, gradient_accumulation_steps: int = 1,
                         steps_per_generation: int = 1, training: bool = True) -> dict:
    """The aggregation keywords of ``clipped_surrogate_loss`` that reproduce TRL 1.16's
    GRPOTrainer loss normalisation for ``loss_type`` (trl/trainer/grpo_trainer.py, _compute_loss).

    Args:
        loss_type: "grpo", "bnpo", "dr_grpo" or "dapo".
        mask: [B, T] completion mask of this micro-batch (bool or 0/1); gives B and, for bnpo,
            the local token count (one device sync).
        max_completion_length: TRL's args.max_completion_length (dr_grpo).
        num_items_in_batch: valid tokens of the whole generation batch over all processes,
            int or 0-dim tensor (dapo; TRL's inputs["num_items_in_batch"]).
        num_processes: accelerator.num_processes (dapo).
        gradient_accumulation_steps: TRL's current_gradient_accumulation_steps.
        steps_per_generation: args.steps_per_generation (dapo).
        training: False for evaluation (TRL applies no accumulation scaling then).
    Returns:
        dict(agg=..., dp_size=..., batch_num_tokens=..., global_batch_size=...,
        loss_scale_factor=...), to pass as ``clipped_surrogate_loss(..., **kwargs)``:
        grpo     seq-mean-token-mean, global_batch_size = B * gas (TRL's mean keeps empty rows)
        bnpo     token-mean, batch_num_tokens = max(local tokens, 1) * gas
        dr_grpo  seq-mean-token-sum-norm, global_batch_size = B * gas,
                 loss_scale_factor = max_completion_length
        dapo     token-mean, dp_size = num_processes,
                 batch_num_tokens = max(num_items_in_batch, 1) * gas / steps_per_generation
        (gas = gradient_accumulation_steps when training, else 1; dapo in evaluation uses
        batch_num_tokens = max(num_items_in_batch, 1)).
    TRL's own per-token loss has no dual clip: pair this with a clip_c large enough never to
    bind to match its values exactly.
    """
    for name, v in (("num_processes", num_processes), ("gradient_accumulation_steps", gradient_accumulation_steps),
                    ("steps_per_generation", steps_per_generation)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            fail(name, f"must be an int >= 1, got {v!r}")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        fail("mask", f"expected the [B, T] completion mask, got {getattr(mask, 'shape', type(mask).__name__)}")
    gas = gradient_accumulation_steps if training else 1
    rows = mask.shape[0]
    out = dict(agg=None, dp_size=1, batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None)
    if loss_type == "grpo":
        out.update(agg="seq-mean-token-mean", global_batch_size=max(rows, 1) * gas)
    elif loss_type == "bnpo":
        out.update(agg="token-mean", batch_num_tokens=max(int((mask != 0).sum()), 1) * gas)
    elif loss_type == "dr_grpo":
        if isinstance(max_completion_length, bool) or not isinstance(max_completion_length, int) \
                or max_completion_length < 1:
            fail("max_completion_length", f"dr_grpo needs an int >= 1, got {max_completion_length!r}")
        out.update(agg="seq-mean-token-sum-norm", global_batch_size=max(rows, 1) * gas,
                   loss_scale_factor=max_completion_length)
    elif loss_type == "dapo":
        if num_items_in_batch is None:
            fail("num_items_in_batch", "dapo normalises by the generation batch's token count; pass TRL's "
                                       "inputs['num_items_in_batch']")
        items = max(float(num_items_in_batch), 1.0)
        scale = gas / steps_per_generation if training else 1.0
        out.update(agg="token-mean", dp_size=num_processes, batch_num_tokens=items * scale)
    else:
        fail("loss_type", f"unknown TRL loss type {loss_type!r}; expected one of grpo, bnpo, dr_grpo, dapo")
    return out
