"""The part of every framework adapter (TRL, verl, OpenRLHF) that is not framework-specific.

An adapter captures the hidden states entering the LM head during the framework's own
old-log-prob pass, aligns them with the response log-probs (``response_hidden_states`` for
``[prompt | response]`` rows, ``action_hidden_states`` for OpenRLHF's S - 1 action columns),
and, once the framework's advantages exist, calls one of

* ``fold``: one ``delta_coefficients`` call over the whole batch (hidden states or the
  per-token vectors the workers sent), or
* ``fold_accumulated``: ``DeltaAccumulator.finalize`` over the chunks added during the pass,

which return a ``DeltaFold``: the folded advantages ``advantages * coef * mask`` in the
advantages' dtype (the framework's loss then runs unchanged), the ``DeltaResult`` and the seven
``delta/*`` metrics. Options of ``DeltaSpec`` reach every adapter through these two calls.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch

from ..accumulator import DeltaAccumulator
from ..coefficients import DeltaResult, delta_coefficients
from .capture import response_hidden_states
from .options import DeltaSpec

METRIC_NAMES = ("coef_std", "coef_min", "coef_max", "gamma_pos", "gamma_neg", "n_pos", "n_neg")

__all__ = ["DeltaSpec", "DeltaFold", "METRIC_NAMES", "fold", "fold_accumulated", "delta_metrics",
           "response_hidden_states", "action_hidden_states"]


@dataclass
class DeltaFold:
    """What an adapter writes back: ``advantages`` (like the input advantages' tokens, their dtype),
    ``result`` (coef [B, T] float32, stats) and ``metrics`` ({"delta/<name>": float})."""
    advantages: torch.Tensor
    result: DeltaResult
    metrics: Dict[str, float]


def action_hidden_states(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Hidden states aligned with log-probs over all S - 1 next-token positions: [B, S - 1, H].

    hidden: the body output, [B, S, H] (padded rows) or [1, nnz, H] (rows packed by dropping
    the positions where ``attention_mask`` [B, S] is 0, row-major, as ``unpad_input`` does).
    The packed tokens are scattered back to their [B, S] positions (zeros elsewhere); column j
    then predicts token j + 1 (OpenRLHF's action log-probs: ``log_probs[:, :-1]``).
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden: expected [B, S, H] or [1, nnz, H], got shape {list(hidden.shape)}")
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask: expected [B, S], got shape {list(attention_mask.shape)}")
    keep = attention_mask.to(hidden.device).bool()
    if tuple(hidden.shape[:2]) != tuple(keep.shape):
        nnz = int(keep.sum())
        if hidden.shape[0] != 1 or hidden.shape[1] < nnz:
            raise ValueError(f"hidden: shape {list(hidden.shape)} is neither [B, S, H] = {list(keep.shape)} + [H] "
                             f"nor packed [1, >= {nnz}, H] for the {nnz} tokens of attention_mask")
        full = hidden.new_zeros(*keep.shape, hidden.shape[-1])
        full[keep] = hidden[0, :nnz]
        hidden = full
    return hidden[:, :-1]


def fold(spec: DeltaSpec, advantages: torch.Tensor, log_probs: torch.Tensor, mask: torch.Tensor, *,
         hidden: Optional[torch.Tensor] = None, vectors: Optional[torch.Tensor] = None, process_group=None,
         gather: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> DeltaFold:
    """One ``delta_coefficients`` call over a batch: advantages [B] or [B, T], log_probs and mask
    [B, T] (log-probs are clamped to <= 0: a fused head's rounding), and exactly one of hidden
    [B, T, H] and vectors [B, T, D] (``token_sketch``'s output, exact v or z). ``gather`` (see
    ``delta_metrics``) only for the metrics; ``process_group`` makes the statistics global.
    With ``spec.vectors == "head"`` the vectors are [u | s] (``spec.vocab_sketch_dim`` columns of u,
    then s: what the verl workers send) and run as ``head_vectors=(u, s)``."""
    mask = mask.bool()
    given = dict(vectors=vectors)
    if spec.vectors == "head" and vectors is not None:
        r1 = spec.vocab_sketch_dim
        given = dict(head_vectors=(vectors[..., :r1], vectors[..., r1:]))
    result = delta_coefficients(hidden, log_probs.clamp_max(0) * mask, advantages, mask, process_group=process_group,
                                **given, **spec.coefficient_kwargs())
    return _folded(advantages, result, mask, gather)


def fold_accumulated(acc: DeltaAccumulator, advantages, mask: torch.Tensor,
                     gather: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> DeltaFold:
    """``acc.finalize(advantages, mask)``, the adds' results joined along their first dim: adds
    of shape [b_i, T] (advantages [sum b] or [sum b, T], mask [sum b, T]) or flat [n_i]
    (advantages and mask [sum n]); either also as lists, one per add. The mask is a late mask
    ANDed with the add masks."""
    results = acc.finalize(advantages, mask=mask)
    first = results[0]
    stats = dataclasses.replace(first.stats, pred=torch.cat([r.stats.pred for r in results]))
    result = DeltaResult(coef=torch.cat([r.coef for r in results]),
                         weighted_advantages=torch.cat([r.weighted_advantages for r in results]), stats=stats)
    adv = torch.cat(list(advantages)) if isinstance(advantages, (list, tuple)) else advantages
    full_mask = torch.cat(list(mask)) if isinstance(mask, (list, tuple)) else mask
    return _folded(adv, result, full_mask.bool() & (result.coef != 0), gather)


def _folded(advantages, result: DeltaResult, mask, gather) -> DeltaFold:
    return DeltaFold(result.weighted_advantages.to(advantages.dtype), result, delta_metrics(result, mask, gather))


def delta_metrics(result: DeltaResult, mask: torch.Tensor,
                  gather: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> Dict[str, float]:
    """``delta/{coef_std, coef_min, coef_max}`` over the valid tokens (population std) and
    ``delta/{gamma_pos, gamma_neg, n_pos, n_neg}`` from the statistics.

    gather: None (this process holds the whole batch) or a function that concatenates a [1, 5]
    float tensor over processes (e.g. ``accelerator.gather``), for coefficients split over ranks."""
    coef = result.coef[mask.to(result.coef.device).bool()].float()
    big = torch.finfo(torch.float32).max
    empty = torch.tensor(-big, device=coef.device)
    local = torch.stack([coef.sum(), (coef * coef).sum(), torch.tensor(float(coef.numel()), device=coef.device),
                         -coef.min() if coef.numel() else empty, coef.max() if coef.numel() else empty])
    rows = local[None] if gather is None else gather(local[None]).reshape(-1, 5)
    n = rows[:, 2].sum()
    mean = rows[:, 0].sum() / n.clamp_min(1)
    std = (rows[:, 1].sum() / n.clamp_min(1) - mean * mean).clamp_min(0).sqrt()
    lo, hi = (-rows[:, 3].max(), rows[:, 4].max()) if float(n) > 0 else (torch.tensor(0.0), torch.tensor(0.0))
    st = result.stats
    values = (std, lo, hi, st.gamma_pos, st.gamma_neg, st.n_pos, st.n_neg)
    return {f"delta/{name}": float(v) for name, v in zip(METRIC_NAMES, values)}

