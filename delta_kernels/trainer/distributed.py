"""Data-parallel training under torchrun: process group from the environment, the gradient
all-reduce, the loss scale that makes it the global token-mean, metrics over ranks, and a
parameter checksum to prove that every rank holds the same model.

Layout: the prompts of a step are drawn identically on every rank and split between them, each
prompt with all its responses (GRPO groups stay on one rank); DelTA's statistics are all-reduced
inside delta_coefficients(process_group=...); gradients are averaged before each optimizer step.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Dict, Optional

import torch

# metrics reduced by min / max over ranks; every other metric is averaged
_MIN_SUFFIX, _MAX_SUFFIX = "_min", "_max"  # per-step metrics reduced by min / max (coef_min, fipo/weight_max, ...)


@dataclass
class DistContext:
    group: Optional[object]  # the process group (None: one process)
    rank: int = 0
    world: int = 1
    owns_group: bool = False  # this module initialised the default group and destroys it at the end

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(device: torch.device) -> DistContext:
    """A DistContext from torchrun's variables (WORLD_SIZE, RANK, MASTER_ADDR, MASTER_PORT): gloo on
    the CPU, NCCL on CUDA (each rank on cuda:LOCAL_RANK). WORLD_SIZE unset or 1: one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(group=None)
    import torch.distributed as dist
    owns = not dist.is_initialized()
    if owns:
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistContext(group=dist.group.WORLD, rank=dist.get_rank(), world=dist.get_world_size(), owns_group=owns)


def finish(ctx: DistContext) -> None:
    """Every rank waits here at the end of a run (rank 0 still evaluates and writes outputs after
    the last step), so that no rank tears its gloo group down while a peer still uses it: that
    aborted the early rank ("terminate called without an active exception")."""
    if ctx.group is not None:
        import torch.distributed as dist
        dist.barrier(group=ctx.group)


def shutdown(ctx: DistContext) -> None:
    if ctx.owns_group:
        import torch.distributed as dist
        dist.destroy_process_group()


def sampling_seed(seed: int, rank: int) -> int:
    """Seed of a rank's response-sampling generator (distinct per rank and from ``seed`` itself)."""
    return (seed * 1_000_003 + 7919 * (rank + 1)) % (2 ** 63)


def broadcast_parameters(model: torch.nn.Module, group) -> None:
    """Rank 0's parameters and buffers on every rank (after an identical but independent warm start)."""
    import torch.distributed as dist
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0, group=group)


def global_token_share(mask: torch.Tensor, agg: str, group) -> torch.Tensor:
    """world * local / global count of the aggregation's units (valid tokens for token-mean;
    non-empty sequences for seq-mean-token-sum / seq-mean-token-mean, as delta_kernels.aggregation
    leaves fully masked rows out). Multiplying each rank's loss by it before the gradient average
    gives the gradient of the loss over the concatenated batch."""
    import torch.distributed as dist
    if agg == "token-mean":
        local = mask.sum()
    elif agg in ("seq-mean-token-sum", "seq-mean-token-mean"):
        local = mask.reshape(mask.shape[0], -1).any(-1).sum()
    else:
        raise ValueError(f"agg {agg!r}: data-parallel updates support token-mean, seq-mean-token-sum and "
                         "seq-mean-token-mean")
    counts = local.to(torch.float64).reshape(1)
    total = counts.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return (counts * dist.get_world_size(group) / total.clamp_min(1)).reshape(()).to(torch.float32)


def average_gradients(model: torch.nn.Module, group) -> None:
    """Mean of every parameter's gradient over the ranks, one all_reduce of one flat buffer
    (a missing gradient counts as zero). Every rank ends with the same gradients."""
    import torch.distributed as dist
    params = [p for p in model.parameters() if p.requires_grad]
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    flat /= dist.get_world_size(group)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
        offset += n


def reduce_metrics(metrics: Dict[str, float], group) -> Dict[str, float]:
    """Per-step metrics over the ranks: mean, except min / max for the keys ending in _min / _max
    (coef_min, fipo/weight_min, ...). Keys must
    be the same on every rank (they are: one rl_step code path)."""
    import torch.distributed as dist
    keys = sorted(metrics)
    vals = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
    mean = vals.clone()
    dist.all_reduce(mean, op=dist.ReduceOp.SUM, group=group)
    mean /= dist.get_world_size(group)
    lo, hi = vals.clone(), vals.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
    out = {}
    for i, k in enumerate(keys):
        out[k] = float(lo[i] if k.endswith(_MIN_SUFFIX) else hi[i] if k.endswith(_MAX_SUFFIX) else mean[i])
    return out


def parameter_checksum(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter's bytes, in named order (equal iff the models are bit-identical)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def gather_objects(obj, ctx: DistContext):
    """[obj of rank 0, obj of rank 1, ...] on every rank; [obj] for one process."""
    if ctx.group is None:
        return [obj]
    import torch.distributed as dist
    out = [None] * ctx.world
    dist.all_gather_object(out, obj, group=ctx.group)
    return out
