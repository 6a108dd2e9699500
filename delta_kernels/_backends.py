"""Backend registry and selection. Backends never call each other; the API picks one.

Each backend module exposes the same three internal functions on validated, flat inputs:
``token_sketch``, ``delta_coefficients`` and ``clipped_surrogate_loss`` (see reference/).
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Dict, List

import torch

BACKENDS = ("auto", "torch", "cpp", "cuda", "triton")
_MODULES = {
    "torch": "delta_kernels.reference",
    "cpp": "delta_kernels.backends.cpp",
    "cuda": "delta_kernels.backends.cuda",
    "triton": "delta_kernels.triton",
}
_errors: Dict[str, str] = {}


def _load(name: str):
    try:
        return importlib.import_module(_MODULES[name])
    except ImportError as e:  # not built, or triton missing
        _errors[name] = f"{type(e).__name__}: {e}"
        return None


def _runs_on(name: str, device: torch.device) -> bool:
    if device.type == "meta":  # no data to read (the public calls refuse meta tensors before this)
        return False
    if name == "torch":
        return True
    if name == "cpp":
        return device.type == "cpu"
    if name == "cuda":
        return device.type == "cuda"
    # triton: CUDA tensors, or CPU tensors under the interpreter (TRITON_INTERPRET=1)
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def available_backends() -> List[str]:
    """Names of the backends that import on this machine (whatever the device)."""
    return [n for n in _MODULES if _load(n) is not None]


def resolve(backend: str, device: torch.device, dtype: torch.dtype, op: str) -> ModuleType:
    """The backend module for a call. ``auto``: CUDA tensors take triton, else cuda, else
    torch (triton first: it is the main GPU path and the fused LM-head kernels live there);
    CPU tensors take cpp when built, else torch. float64 inputs always take torch (the fast
    backends compute in float32). ``op`` is the function the call needs; auto skips a
    backend that lacks it, and any backend that does not run on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend == "auto":
        order = ["torch"] if dtype == torch.float64 else (
            ["triton", "cuda", "torch"] if device.type == "cuda" else ["cpp", "torch"])
        for name in order:
            if not _runs_on(name, device):  # never a backend whose device test fails
                continue
            mod = _load(name)
            if mod is not None and hasattr(mod, op):
                return mod
    if not _runs_on(backend, device):
        raise ValueError(f"backend: {backend!r} does not run on {device.type} tensors")
    if backend != "torch" and dtype == torch.float64:
        raise TypeError(f"backend: {backend!r} computes in float32 and takes float16/bfloat16/float32 "
                        "inputs; use backend='torch' for float64")
    mod = _load(backend)
    if mod is None:
        raise RuntimeError(f"backend: {backend!r} is not available here ({_errors.get(backend)})")
    if not hasattr(mod, op):
        raise NotImplementedError(f"backend: {backend!r} does not implement {op}")
    return mod
