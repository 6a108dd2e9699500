"""Reference FIPO future-KL weights (the float64-capable oracle of delta_kernels.fipo_weights).

Spec: docs/design.md, "FIPO". The reverse discounted sum is taken in chunks of SCAN_CHUNK
tokens: inside a chunk as one matrix product with the powers gamma^j = exp2(-j / decay_rate)
(log space: no repeated products, underflow goes to 0), across chunks by a carried value.
"""
from __future__ import annotations

import functools
from typing import Tuple

import torch

from .._checks import FipoConfig, compute_dtype

SCAN_CHUNK = 128
METRICS = ("weight_mean", "weight_min", "weight_max", "rows_dropped", "clip_frac")  # credit="fipo"'s


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
    if torch.compiler.is_compiling():  # traced as it is (dynamo does not keep an lru_cache)
        return _log_in(float(cfg.clip_c), dtype)
    return _log_in_cached(float(cfg.clip_c), dtype)


def _log_in(value: float, dtype: torch.dtype) -> float:
    return float(torch.log(torch.tensor(value, dtype=dtype)))


_log_in_cached = functools.lru_cache(maxsize=64)(_log_in)  # eager: once per value, no torch op per loss call


def native_scalars(cfg: FipoConfig) -> tuple:
    """The scalar arguments of the native fipo ops, float32 compute: (decay_rate, log_clip_c,
    clip_c, lower, upper, clip_lower, safety_thresh, at_upper, at_lower)."""
    lower, upper = cfg.bounds()
    return (cfg.decay_rate, log_clip_c(cfg, torch.float32), cfg.clip_c, lower, upper, cfg.future_kl_clip_ratio > 0,
            cfg.safety_thresh, *cfg.at_bound_limits())


def fipo_fake_outputs(logp: torch.Tensor) -> tuple:
    """The native ops' outputs as empty tensors (their register_fake): weights, keep, future_kl, row_stats."""
    rows, cols = logp.shape
    f32 = torch.float32
    return (logp.new_empty(rows, cols, dtype=f32), logp.new_empty(rows, dtype=torch.bool),
            logp.new_empty(rows, cols, dtype=f32), logp.new_empty(rows, 5, dtype=f32))


def call_native(op, body, *args):
    """The native fipo kernel: through its torch.library op while torch.compile traces (one opaque
    node, fake outputs), else its body directly (the op's Python dispatch costs more than the
    kernel at N = 32k on a CPU)."""
    return (op if torch.compiler.is_compiling() else body)(*args)


def fipo_weights(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                 cfg: FipoConfig) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logp, old_logp, adv [B, T] (any float dtype), mask [B, T] bool -> (weights [B, T],
    keep [B] bool, future_kl [B, T], row_stats [B, 5] (see row_stats)) in the compute dtype
    (float64 if any input is, else float32); weights and future_kl are 0 at padding, whose
    values are never read."""
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
    weights = torch.where(mask, f, zero)
    return weights, ~dropped, torch.where(mask, future_kl, zero), row_stats(weights, mask, cfg)


def row_stats(weights: torch.Tensor, mask: torch.Tensor, cfg: FipoConfig) -> torch.Tensor:
    """[B, len(ROW_STATS)] per row over valid tokens: count, sum of weights, min (+inf for an
    empty row), max (-inf), tokens at a clip bound (FipoConfig.at_bound_limits)."""
    hi, lo = cfg.at_bound_limits()
    inf = torch.tensor(float("inf"), dtype=weights.dtype, device=weights.device)
    if weights.shape[1] == 0:
        none = torch.zeros(weights.shape[0], dtype=weights.dtype, device=weights.device)
        return torch.stack([none, none, none + inf, none - inf, none], 1)
    at_bound = mask & ((weights >= hi) | (weights <= lo))
    return torch.stack([mask.sum(1).to(weights.dtype), weights.sum(1), torch.where(mask, weights, inf).amin(1),
                        torch.where(mask, weights, -inf).amax(1), at_bound.sum(1).to(weights.dtype)], 1)
