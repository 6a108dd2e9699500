"""Reference FIPO future-KL weights (the float64-capable oracle of delta_kernels.fipo_weights).

Spec: docs/design.md, "FIPO". The reverse discounted sum is taken in chunks of SCAN_CHUNK
tokens: inside a chunk as one matrix product with the powers gamma^j = exp2(-j / decay_rate)
(log space: no repeated products, underflow goes to 0), across chunks by a carried value.
"""
from __future__ import annotations

from typing import Tuple

import torch

from .._checks import FipoConfig, compute_dtype

SCAN_CHUNK = 128


def discounted_future_sum(x: torch.Tensor, decay_rate: float) -> torch.Tensor:
    """x [B, T] -> F [B, T], F_t = sum_{k >= t} gamma^(k - t) x_k, gamma = 2^(-1 / decay_rate),
    in x's dtype."""
    rows, cols = x.shape
    out = torch.empty_like(x)
    j = torch.arange(SCAN_CHUNK, device=x.device, dtype=x.dtype)
    dist = j[None, :] - j[:, None]                                   # [t, k] = k - t
    decay = torch.where(dist >= 0, torch.exp2(-dist.clamp_min(0) / decay_rate), torch.zeros((), dtype=x.dtype))
    carry = x.new_zeros(rows)                                         # F at the first token after the chunk
    for end in range(cols, 0, -SCAN_CHUNK):
        start = max(0, end - SCAN_CHUNK)
        n = end - start
        to_end = torch.exp2(-(n - j[:n]) / decay_rate)                # gamma^(end - t)
        out[:, start:end] = x[:, start:end] @ decay[:n, :n].T + carry[:, None] * to_end
        carry = out[:, start]
    return out


def log_clip_c(cfg: FipoConfig, dtype: torch.dtype) -> float:
    """log c as the authors compute it: torch.log of c in the compute dtype (the participation bound)."""
    return float(torch.log(torch.tensor(cfg.clip_c, dtype=dtype)))


def fipo_weights(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                 cfg: FipoConfig) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logp, old_logp, adv [B, T] (any float dtype), mask [B, T] bool -> (weights [B, T],
    keep [B] bool, future_kl [B, T]) in the compute dtype (float64 if any input is, else
    float32); weights and future_kl are 0 at padding, whose values are never read."""
    dtype = compute_dtype(logp.dtype, old_logp.dtype, adv.dtype)
    zero = torch.zeros((), dtype=dtype, device=logp.device)
    delta = torch.where(mask, logp.to(dtype) - old_logp.to(dtype), zero).clamp(-20.0, 20.0)
    a = torch.where(mask, adv.to(dtype), zero)
    ratio = torch.exp(delta)
    takes_part = mask & (delta <= log_clip_c(cfg, dtype))
    future_kl = discounted_future_sum(torch.where(takes_part, delta, zero), cfg.decay_rate)
    lower, upper = cfg.bounds()
    f = torch.exp(future_kl)
    f = f.clamp(lower, upper) if cfg.future_kl_clip_ratio > 0 else f.clamp(max=upper)
    f = torch.where((a < 0) & (ratio > cfg.safety_thresh), f.clamp(0.8, 1.0), f)
    dropped = (mask & (a < 0) & (ratio > cfg.clip_c)).sum(1) > 1
    return torch.where(mask, f, zero), ~dropped, torch.where(mask, future_kl, zero)
