"""High-entropy tokens (the 80/20 rule; in the loss): only the valid tokens whose entropy is at
least the (1 - top_quantile) quantile of all valid tokens of all ranks take part.

Equal to TRL 1.16's ``GRPOTrainer.get_high_entropy_mask(entropies, mask, 1 - top_quantile)``:
the threshold is torch.quantile's linear interpolation over the valid entropies in float32,
found by selection (two kthvalue calls) rather than a sort, so there is no 2^24-element limit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import _checks as C
from ..distributed import check_group
from .registry import IN_LOSS, CreditInputs, CreditMethod, CreditWeights, register


def check_top_quantile(top_quantile) -> float:
    if isinstance(top_quantile, bool) or not isinstance(top_quantile, (int, float)) \
            or not math.isfinite(top_quantile) or not 0 < top_quantile <= 1:
        C.fail("top_quantile", f"must be in (0, 1] (the fraction of tokens kept), got {top_quantile!r}")
    return float(top_quantile)


def _gather_valid(values: torch.Tensor, process_group) -> torch.Tensor:
    """The 1-D values of every rank of ``process_group``, concatenated in rank order."""
    if process_group is None:
        return values
    import torch.distributed as dist
    world = dist.get_world_size(process_group)
    count = torch.tensor([values.numel()], dtype=torch.int64, device=values.device)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=process_group)
    sizes = [int(c) for c in counts]
    padded = values.new_zeros(max(sizes))
    padded[:values.numel()] = values
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=process_group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def linear_quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile(values, q) (linear interpolation, values 1-D float32, non-empty, no NaN),
    by selection: the rank q (n - 1) is formed in float32 as torch does, then the two order
    statistics around it are interpolated with torch.lerp."""
    n = values.numel()
    rank = torch.tensor(q, dtype=values.dtype) * (n - 1)
    below = int(rank)                      # truncation, as torch's conversion to int64
    above = min(math.ceil(float(rank)), n - 1)
    lo = values.kthvalue(below + 1).values
    hi = lo if above == below else values.kthvalue(above + 1).values
    return torch.lerp(lo, hi, (rank - below).to(values.device))


def entropy_threshold(entropy: torch.Tensor, mask: torch.Tensor, top_quantile: float = 0.2,
                      process_group=None, check_values: bool = True):
    """-> (threshold [] float32, valid [B, T] bool), threshold None when no rank has a valid token."""
    top_quantile = check_top_quantile(top_quantile)
    check_group(process_group)
    C.check_devices(entropy=entropy, mask=mask)
    entropy = C.check_tensor("entropy", entropy)
    valid = C.check_mask(mask, entropy.shape, check_values).reshape(entropy.shape)
    if check_values:
        C.check_finite("entropy", entropy, valid)
    gathered = _gather_valid(entropy.detach()[valid].float(), process_group)
    if gathered.numel() == 0:
        return None, valid
    return linear_quantile(gathered, 1 - top_quantile), valid


def entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, *, top_quantile: float = 0.2, process_group=None,
                 check_values: bool = True) -> torch.Tensor:
    """The high-entropy tokens: valid tokens with entropy >= the (1 - top_quantile) quantile of
    the valid entropies of every rank of ``process_group`` (TRL's get_high_entropy_mask).

    Args:
        entropy: [B, T] (any shape) per-token entropies, any float dtype (the fused LM head's
            ``entropy=True`` output, or the caller's). mask: like entropy, bool or 0/1.
        top_quantile: in (0, 1], the fraction of tokens kept (1 keeps every valid token).
        process_group: None (this call's tokens) or a torch.distributed group: the quantile is
            taken over the valid tokens of all its ranks (two all_gather calls).
        check_values: entropy finite at valid positions (a device sync).
    Returns:
        bool, shaped like entropy; False at padding, all False when no rank has a valid token.
    """
    thr, valid = entropy_threshold(entropy, mask, top_quantile, process_group, check_values)
    return _at_least(entropy, thr, valid)


def _at_least(entropy: torch.Tensor, thr, valid: torch.Tensor) -> torch.Tensor:
    """valid & (entropy >= thr), compared in float32 or wider as TRL does; all False for thr None."""
    if thr is None:
        return torch.zeros_like(valid)
    e = entropy.detach()
    return (e.to(torch.promote_types(e.dtype, torch.float32)) >= thr) & valid


@dataclass(frozen=True)
class EntropyOptions:
    """The entropy method's options."""
    top_quantile: float = 0.2

    def __post_init__(self):
        check_top_quantile(self.top_quantile)


def _compute(inputs: CreditInputs, options: EntropyOptions) -> CreditWeights:
    thr, valid = entropy_threshold(inputs.entropy, inputs.mask, options.top_quantile, inputs.process_group, False)
    kept = _at_least(inputs.entropy, thr, valid)
    n = valid.sum().clamp_min(1)
    metrics = dict(threshold=torch.zeros((), device=valid.device) if thr is None else thr,
                   kept_frac=kept.sum().float() / n)
    return CreditWeights(weights=kept.float(), metrics=metrics)


METHOD = register(CreditMethod(
    name="entropy", kind=IN_LOSS, inputs=("entropy", "mask"), depends_on_theta=True,
    metrics=("threshold", "kept_frac"), options=EntropyOptions, compute=_compute,
    summary="train only the top_quantile highest-entropy valid tokens (TRL's top_entropy_quantile)"))
