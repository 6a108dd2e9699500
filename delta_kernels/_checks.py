"""Argument checking, done once in Python before any backend runs.

Every public call validates here and hands backends flat, contiguous tensors; kernels
assume valid input. Errors name the argument and say what was expected.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def fail(name: str, msg: str) -> None:
    raise ValueError(f"{name}: {msg}")


def check_tensor(name: str, x, *, floating: bool = True) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if floating and x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating dtype (float16, bfloat16, float32, float64), got {x.dtype}")
    return x


def check_finite(name: str, x: torch.Tensor) -> None:
    """Raise naming the first non-finite element. The common case is one streaming sum (any
    NaN or inf makes it non-finite) and one device sync; the exact index search runs only when
    the sum is not finite (a NaN/inf, or a sum that overflowed: then nothing is raised)."""
    if x.numel() == 0:
        return
    if bool(torch.isfinite(x.sum())):
        return
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        flat = int(bad.reshape(-1).nonzero()[0, 0])
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), x.shape)) if x.dim() else ()
        raise ValueError(f"{name}: non-finite value {x[idx].item()} at index {list(idx)}")


def check_devices(**tensors) -> torch.device:
    """All tensors on one device (non-tensors are left to the type checks); returns it."""
    devices = {n: t.device for n, t in tensors.items() if isinstance(t, torch.Tensor)}
    if not devices:
        raise TypeError(f"{next(iter(tensors))}: expected a torch.Tensor")
    first_name, first = next(iter(devices.items()))
    for n, d in devices.items():
        if d != first:
            raise ValueError(f"{n}: on {d}, but {first_name} is on {first}; all tensors must share one device")
    return first


def check_mask(mask, shape, check_values: bool) -> torch.Tensor:
    """bool, or 0/1 of any real dtype, shaped like logp -> flat bool."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask: expected a torch.Tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(shape):
        fail("mask", f"shape {list(mask.shape)} does not match logp's {list(shape)}")
    if mask.dtype == torch.bool:
        return mask.reshape(-1)
    if mask.is_complex():
        raise TypeError(f"mask: expected bool or 0/1 values, got {mask.dtype}")
    if check_values and bool(((mask != 0) & (mask != 1)).any()):
        fail("mask", "values must be 0 or 1 (or bool)")
    return (mask != 0).reshape(-1)


def check_logp(name: str, logp, check_values: bool) -> torch.Tensor:
    check_tensor(name, logp)
    if logp.dim() not in (1, 2):
        fail(name, f"expected [N] or [B, T], got shape {list(logp.shape)}")
    if check_values:
        check_finite(name, logp)
        if bool((logp > 0).any()):
            flat = int((logp.reshape(-1) > 0).nonzero()[0, 0])
            fail(name, f"log-probabilities must be <= 0; found {logp.reshape(-1)[flat].item()} at flat index {flat}")
    return logp


def check_advantages(advantages, logp: torch.Tensor, check_values: bool) -> torch.Tensor:
    """Shaped like logp, or [B] per sequence when logp is [B, T]; returns flat [N]."""
    check_tensor("advantages", advantages)
    if tuple(advantages.shape) == tuple(logp.shape):
        adv = advantages
    elif logp.dim() == 2 and tuple(advantages.shape) == (logp.shape[0],):
        adv = advantages[:, None].expand(logp.shape)
    else:
        fail("advantages", f"shape {list(advantages.shape)} must equal logp's {list(logp.shape)}"
             + (f" or be [B] = [{logp.shape[0]}]" if logp.dim() == 2 else ""))
    if check_values:
        check_finite("advantages", advantages)
    return adv.reshape(-1)


def check_token_weights(name: str, x, shape, mask: torch.Tensor, check_values: bool) -> None:
    """Optional per-token factors (coef, rollout_is_weights) shaped like logp; finite at the
    valid positions (mask: bool, flat or shaped like logp). Padding is not read."""
    if x is None:
        return
    check_tensor(name, x)
    if tuple(x.shape) != tuple(shape):
        fail(name, f"shape {list(x.shape)} does not match logp's {list(shape)}")
    if check_values:
        check_finite(name, torch.where(mask.reshape(x.shape), x, 0))


def check_hidden(name: str, hidden, logp: torch.Tensor, check_values: bool) -> torch.Tensor:
    """[..., H] with leading dims equal to logp's; returns [N, H]."""
    check_tensor(name, hidden)
    if hidden.dim() != logp.dim() + 1 or tuple(hidden.shape[:-1]) != tuple(logp.shape):
        fail(name, f"shape {list(hidden.shape)} must be logp's shape {list(logp.shape)} plus a hidden dim")
    if hidden.shape[-1] < 1:
        fail(name, "hidden size must be >= 1")
    if check_values:
        check_finite(name, hidden)
    return hidden.reshape(-1, hidden.shape[-1])


def check_sketch_args(sketch_dim: Optional[int], seed: int) -> None:
    if sketch_dim is not None:
        if isinstance(sketch_dim, bool) or not isinstance(sketch_dim, int):
            raise TypeError(f"sketch_dim: expected an int or None, got {type(sketch_dim).__name__}")
        if sketch_dim < 1:
            fail("sketch_dim", f"must be >= 1, got {sketch_dim}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
    if not 0 <= seed < 2**32:
        fail("seed", f"must be in [0, 2**32), got {seed}")


def check_finite_numbers(obj, names) -> None:
    """Each named attribute of ``obj`` is a finite int or float (not a bool)."""
    for n in names:
        v = getattr(obj, n)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v != v or abs(v) == float("inf"):
            fail(n, f"must be a finite number, got {v!r}")


@dataclass(frozen=True)
class DeltaConfig:
    """Scalar parameters of the coefficient pipeline (validated)."""
    k: int = 1
    lam_min: float = 0.8
    lam_max: float = 1.2
    eps: float = 1e-8

    def __post_init__(self):
        if isinstance(self.k, bool) or not isinstance(self.k, int):
            raise TypeError(f"k: expected an int, got {type(self.k).__name__}")
        if self.k < 0:
            fail("k", f"must be >= 0, got {self.k}")
        check_finite_numbers(self, ("lam_min", "lam_max", "eps"))
        if self.lam_min < 0:
            fail("lam_min", f"must be >= 0, got {self.lam_min}")
        if not self.lam_max > 0:
            fail("lam_max", f"must be > 0 (all coefficients would be zero), got {self.lam_max}")
        if self.lam_min > self.lam_max:
            fail("lam_min", f"lam_min={self.lam_min} is greater than lam_max={self.lam_max}")
        if not self.eps > 0:
            fail("eps", f"must be > 0, got {self.eps}")


@dataclass(frozen=True)
class SurrogateConfig:
    """The per-token clip parameters (the aggregation is delta_kernels.aggregation.Aggregation)."""
    clip_low: float = 0.2
    clip_high: float = 0.28
    clip_c: float = 10.0

    def __post_init__(self):
        check_finite_numbers(self, ("clip_low", "clip_high", "clip_c"))
        if not 0 <= self.clip_low < 1:
            fail("clip_low", f"must be in [0, 1), got {self.clip_low}")
        if self.clip_high < 0:
            fail("clip_high", f"must be >= 0, got {self.clip_high}")
        if self.clip_c <= 1:
            fail("clip_c", f"must be > 1 (dual-clip bound), got {self.clip_c}")


@dataclass
class TokenBatch:
    """Validated, flattened inputs of one call. ``shape`` is logp's original shape."""
    shape: Tuple[int, ...]
    logp: torch.Tensor                      # [N]
    advantages: torch.Tensor                # [N]
    mask: torch.Tensor                      # [N] bool
    hidden: Optional[torch.Tensor] = None   # [N, H]
    vectors: Optional[torch.Tensor] = None  # [N, D], precomputed v or z
    side_sums: Optional[torch.Tensor] = None  # [2, D], precomputed (sum a+ v, sum a- v) of vectors


def compute_dtype(*dtypes) -> torch.dtype:
    """float64 if any input is float64, else float32 (fp32 accumulation for low precision)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32
