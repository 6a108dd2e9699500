"""Global statistics over a torch.distributed process group."""
from __future__ import annotations

import torch


def check_group(process_group) -> None:
    """None, or a torch.distributed ProcessGroup (e.g. torch.distributed.group.WORLD), named in the error."""
    if process_group is None:
        return
    import torch.distributed as dist
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group: expected None or a torch.distributed ProcessGroup (for all ranks: "
                        f"torch.distributed.group.WORLD), got {type(process_group).__name__} {process_group!r}")
    if not dist.is_initialized():
        raise RuntimeError("process_group: torch.distributed is not initialised (call init_process_group first)")


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
