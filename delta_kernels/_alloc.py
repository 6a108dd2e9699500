"""Output allocation for the backends, with a poison mode for tests.

Every backend allocates the buffers its kernels write through ``empty``. Under
``poisoned()`` (or DELTA_KERNELS_POISON=1) floating buffers start as NaN and integer ones
as -1, so an element a kernel forgot to write shows up in the result.
"""
from __future__ import annotations

import contextlib
import os

import torch

_poison = os.environ.get("DELTA_KERNELS_POISON") == "1"


def empty(*shape, dtype=torch.float32, device=None) -> torch.Tensor:
    t = torch.empty(*shape, dtype=dtype, device=device)
    if _poison:
        t.fill_(float("nan") if t.is_floating_point() else -1)
    return t


@contextlib.contextmanager
def poisoned(on: bool = True):
    global _poison
    old, _poison = _poison, on
    try:
        yield
    finally:
        _poison = old
