"""Helpers shared by the native wrappers: dtype codes and raw pointers."""
from __future__ import annotations

import torch

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def dtype_code(t: torch.Tensor) -> int:
    try:
        return DTYPE_CODES[t.dtype]
    except KeyError:
        raise TypeError(f"native kernels take float32, bfloat16 or float16, got {t.dtype}") from None


def ptr(t: torch.Tensor) -> int:
    assert t.is_contiguous()
    return t.data_ptr()
