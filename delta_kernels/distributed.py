"""Global statistics over a torch.distributed process group."""
from __future__ import annotations

import torch


def group_sum(process_group):
    """A ``reduce`` callable for the coefficient pipelines: the elementwise sum of a tensor
    over every rank of ``process_group`` (one all_reduce per call), or the identity."""
    if process_group is None:
        return None
    import torch.distributed as dist

    def reduce(t: torch.Tensor) -> torch.Tensor:
        t = t.detach().clone().contiguous()
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=process_group)
        return t

    return reduce
