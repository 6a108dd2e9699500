"""High-entropy tokens (the 80/20 rule; in the loss): only the valid tokens whose entropy is at
least the (1 - top_quantile) quantile of all valid tokens of all ranks take part.

Equal to TRL 1.16's ``GRPOTrainer.get_high_entropy_mask(entropies, mask, 1 - top_quantile)``:
the threshold is torch.quantile's linear interpolation over the valid entropies in float32,
found by selection (two kthvalue calls; one sort under torch.compile, no host read) rather than
torch.quantile, so there is no 2^24-element limit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import _checks as C
from ..distributed import check_group
from .registry import IN_LOSS, CreditInputs, CreditMethod, CreditWeights, register


def check_top_quantile(top_quantile) -> float:
    if isinstance(top_quantile, bool) or not isinstance(top_quantile, (int, float)) or not 0 < top_quantile <= 1:
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


def quantile_ranks(count: torch.Tensor, q: float):
    """torch.quantile's linear-interpolation ranks among ``count`` (0-dim int64) sorted values:
    rank = q (count - 1) formed in float32 as torch does; -> (below, above: 0-dim int64, the
    truncation and the ceiling of rank clamped to [0, count - 1]; weight = rank - trunc(rank))."""
    rank = torch.full((), q, dtype=torch.float32, device=count.device) * (count - 1)
    last = (count - 1).clamp_min(0)
    below = rank.to(torch.int64).clamp_min(0).minimum(last)
    above = rank.ceil().to(torch.int64).clamp_min(0).minimum(last)
    return below, above, rank - rank.trunc()


def linear_quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile(values, q) (values 1-D float32, non-empty, no NaN) by selection: the two
    order statistics around the rank (kthvalue, so no 2^24-element limit), interpolated with
    torch.lerp. Reads the rank on the host (eager only)."""
    below, above, weight = quantile_ranks(torch.tensor(values.numel(), device=values.device), q)
    lo = values.kthvalue(int(below) + 1).values
    hi = lo if int(above) == int(below) else values.kthvalue(int(above) + 1).values
    return torch.lerp(lo, hi, weight)


def sorted_quantile(keyed: torch.Tensor, count: torch.Tensor, q: float) -> torch.Tensor:
    """linear_quantile's value with no host read (under torch.compile): ``keyed`` 1-D float32 holds
    the ``count`` values and +inf elsewhere; a sort puts the values first, the same ranks index it.
    +inf when count is 0."""
    ordered = keyed.sort().values
    below, above, weight = quantile_ranks(count, q)
    lo, hi = ordered.gather(0, torch.stack([below, above]))  # a tensor index: no host read
    return torch.lerp(lo, hi, weight)


def entropy_threshold(entropy: torch.Tensor, mask: torch.Tensor, top_quantile: float = 0.2,
                      process_group=None, check_values: bool = True):
    """-> (threshold [] float32, +inf when no rank has a valid token; valid [B, T] bool; count []
    int64: the valid tokens of every rank). Eager selects the order statistics (faster than a
    sort); under torch.compile one sort finds the same ones (docs/reliability.md)."""
    top_quantile = check_top_quantile(top_quantile)
    check_group(process_group)
    C.check_devices(entropy=entropy, mask=mask)
    entropy = C.check_tensor("entropy", entropy)
    valid = C.check_mask(mask, entropy.shape, check_values).reshape(entropy.shape)
    if check_values:
        C.check_finite("entropy", entropy, valid)
    e = entropy.detach().float()
    q = 1 - top_quantile
    if C.compiling():
        if process_group is not None:
            C.fail("process_group", "the entropy quantile over ranks gathers sizes on the host: call it "
                                    "outside torch.compile (or without credit_group)")
        count = valid.sum()
        if valid.numel() == 0:
            return e.new_full((), math.inf), valid, count
        return sorted_quantile(torch.where(valid, e, math.inf).reshape(-1), count, q), valid, count
    gathered = _gather_valid(e[valid], process_group)
    count = torch.tensor(gathered.numel(), device=e.device)
    if gathered.numel() == 0:
        return e.new_full((), math.inf), valid, count
    return linear_quantile(gathered, q), valid, count


def entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, *, top_quantile: float = 0.2, process_group=None,
                 check_values: bool = True) -> torch.Tensor:
    """The high-entropy tokens: valid tokens with entropy >= the (1 - top_quantile) quantile of
    the valid entropies of every rank of ``process_group`` (TRL's get_high_entropy_mask).

    Args:
        entropy: [B, T] (any shape) per-token entropies, any float dtype (the fused LM head's
            ``entropy=True`` output, or the caller's). mask: like entropy, bool or 0/1.
        top_quantile: in (0, 1], the fraction of tokens kept (1 keeps every valid token).
        process_group: None (this call's tokens) or a torch.distributed group: the quantile is
            taken over the valid tokens of all its ranks (two all_gather calls; eager only).
        check_values: entropy finite at valid positions (a device sync).
    Returns:
        bool, shaped like entropy; False at padding, all False when no rank has a valid token.
    """
    thr, valid, _ = entropy_threshold(entropy, mask, top_quantile, process_group, check_values)
    return _at_least(entropy, thr, valid)


def _at_least(entropy: torch.Tensor, thr: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """valid & (entropy >= thr), compared in float32 or wider as TRL does."""
    e = entropy.detach()
    return (e.to(torch.promote_types(e.dtype, torch.float32)) >= thr) & valid


@dataclass(frozen=True)
class EntropyOptions:
    """The entropy method's options."""
    top_quantile: float = 0.2

    def __post_init__(self):
        check_top_quantile(self.top_quantile)


def _compute(inputs: CreditInputs, options: EntropyOptions) -> CreditWeights:
    thr, valid, count = entropy_threshold(inputs.entropy, inputs.mask, options.top_quantile, inputs.process_group,
                                          False)
    kept = _at_least(inputs.entropy, thr, valid)
    metrics = dict(threshold=torch.where(count > 0, thr, 0.0),
                   kept_frac=kept.sum().float() / valid.sum().clamp_min(1))
    return CreditWeights(weights=kept.float(), metrics=metrics)


METHOD = register(CreditMethod(
    name="entropy", kind=IN_LOSS, inputs=("entropy", "mask"), depends_on_theta=True,
    metrics=("threshold", "kept_frac"), options=EntropyOptions, compute=_compute,
    summary="train only the top_quantile highest-entropy valid tokens (TRL's top_entropy_quantile)"))
