"""Where a credit method puts its credit, measured against a task's decisive tokens.

- ``credit_auc``: ROC-AUC of the per-token coefficient against the decisive labels over the
  valid tokens (the probability that a random decisive token gets a larger coefficient than a
  random non-decisive one, ties counting 1/2). Uniform credit scores 0.5 by construction.
- ``oracle_coefficients``: the oracle credit, 1 on decisive tokens and ``floor`` elsewhere,
  renormalised to mean 1 over the valid tokens as DelTA's coefficients are.
- ``gradient_cosine``: the cosine of two flattened gradients (the trainer's gradient alignment
  compares the arm's policy gradient with the gradient of the decisive tokens alone).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def credit_auc(coef: torch.Tensor, decisive: torch.Tensor, mask: torch.Tensor) -> Optional[float]:
    """coef [B, T] float, decisive [B, T] bool, mask [B, T] bool -> AUC in [0, 1], or None when the
    valid tokens are all decisive or all not (no pair to rank). Ties get averaged ranks
    (Mann-Whitney U / (n_pos * n_neg))."""
    if not coef.shape == decisive.shape == mask.shape:
        raise ValueError(f"coef, decisive, mask: expected one shape, got {list(coef.shape)}, "
                         f"{list(decisive.shape)}, {list(mask.shape)}")
    mask = mask.bool()
    x = coef[mask].double().cpu()
    y = decisive[mask].bool().cpu()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    values, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()                    # 1-based rank of the last member of each tie group
    avg_rank = ends - (counts.double() - 1) / 2         # averaged rank of each distinct value
    rank_sum = avg_rank[inverse][y].sum().item()
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def oracle_coefficients(decisive: torch.Tensor, mask: torch.Tensor, floor: float, process_group=None) -> torch.Tensor:
    """[B, T] float32: ``1`` on decisive tokens, ``floor`` on the other valid tokens, 0 on padding,
    scaled to mean 1 over the valid tokens (over all ranks with a ``process_group``). A batch
    without a decisive token gets uniform coefficients (mask.float())."""
    mask = mask.bool()
    raw = torch.where(decisive.bool(), torch.ones_like(mask, dtype=torch.float32),
                      torch.full_like(mask, floor, dtype=torch.float32)) * mask
    sums = torch.stack([raw.sum(), mask.sum().float(), (decisive.bool() & mask).sum().float()])
    if process_group is not None:
        import torch.distributed as dist
        dist.all_reduce(sums, group=process_group)
    total, count, n_dec = sums.tolist()
    if n_dec == 0 or total <= 0:
        return mask.float()
    return raw * (count / total)


def gradient_cosine(a: Sequence[Optional[torch.Tensor]], b: Sequence[Optional[torch.Tensor]]) -> Optional[float]:
    """Cosine between two gradients given as per-parameter lists (None entries count as zeros);
    None when either is zero."""
    dot = na = nb = 0.0
    for x, y in zip(a, b):
        if x is not None:
            na += float(x.double().pow(2).sum())
        if y is not None:
            nb += float(y.double().pow(2).sum())
        if x is not None and y is not None:
            dot += float((x.double() * y.double()).sum())
    if na == 0.0 or nb == 0.0:
        return None
    return dot / (na ** 0.5 * nb ** 0.5)
