"""Phase A for the full LM-head gradient: ``head_gradient_sketch`` and ``head_sketch_matrices``.

The gradient of log pi(y | h) = log_softmax((h W^T + b) / T)[y] with respect to the head W [V, H]
is the outer product g = (e_y - p) h^T / T, so <g_i, g_j> = ((e_yi - p_i).(e_yj - p_j)) (h_i.h_j) / T^2.
A Kronecker sketch keeps that structure: z_i = u_i (x) s_i with

    u_i = S1^T (e_yi - p_i) / T  [r1],     s_i = S2^T h_i  [r2],     E[z_i.z_j] = <g_i, g_j>,

S1 [V, r1] and S2 [H, r2] hashed sign matrices (sketch_matrix.py). ``delta_coefficients(None,
logp, advantages, mask, head_vectors=(u, s))`` runs DelTA on z without forming it
(delta_kernels/head_factors.py). p is never held as [N, V]: the fused LM head's vocabulary loop
adds one [rows, V_tile] x [V_tile, r1] product per tile (``softmax_sketch`` of the LM-head backends).

The matrices (bitwise the same on every backend; the seeds make them independent):
    S2 = sketch_matrix(H, r2, seed)                     (R of the hidden-state sketch, same seed)
    S1 = sketch_matrix(V, r1, seed ^ VOCAB_SEED_XOR)    (a different row key for every seed, so no
                                                         row of S1 repeats a row of S2)
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import _checks as C
from ._backends import LM_HEAD, resolve
from .fused_linear.api import _check_hidden, _check_lm_head, _check_logits_finite, check_targets_and_temperature
from .sketch_matrix import row_signs, sketch_matrix, sketch_scale

VOCAB_SEED_XOR = 0x5BD1E995  # S1's seed is seed ^ this: never equal to S2's
MAX_VOCAB = 2**31            # S1's row indices are hashed as 32-bit integers, indexed in int32 by the kernels


def vocab_seed(seed: int) -> int:
    """The seed of S1 for a call's ``seed``."""
    return seed ^ VOCAB_SEED_XOR


def check_width(name: str, value: Optional[int]) -> None:
    """A sketch width: None (no sketch) or an int >= 1; errors name the argument."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int or None, got {type(value).__name__}")
    if value < 1:
        C.fail(name, f"must be >= 1, got {value}")


def _check_vocab(name: str, vocab_size: int) -> None:
    if vocab_size >= MAX_VOCAB:
        C.fail(name, f"vocabulary size {vocab_size} is beyond the int32 hash range of the vocabulary sketch "
                     f"(V < 2**31)")


def head_sketch_matrices(vocab_size: int, hidden_size: int, vocab_sketch_dim: int = 16, sketch_dim: int = 64,
                         seed: int = 0, *, dtype: torch.dtype = torch.float32,
                         device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(S1 [vocab_size, vocab_sketch_dim], S2 [hidden_size, sketch_dim]) of head_gradient_sketch,
    entries +-float32(1/sqrt(width)), cast to ``dtype``: S1 = sketch_matrix(V, r1, seed ^ VOCAB_SEED_XOR),
    S2 = sketch_matrix(H, r2, seed)."""
    for name, value in (("vocab_size", vocab_size), ("hidden_size", hidden_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            C.fail(name, f"must be an int >= 1, got {value!r}")
    _check_vocab("vocab_size", vocab_size)
    for name, value in (("vocab_sketch_dim", vocab_sketch_dim), ("sketch_dim", sketch_dim)):
        if value is None:
            raise TypeError(f"{name}: the matrices need a width (None means no sketch)")
        check_width(name, value)
    C.check_sketch_args(None, seed)
    return (sketch_matrix(vocab_size, vocab_sketch_dim, vocab_seed(seed), dtype=dtype, device=device),
            sketch_matrix(hidden_size, sketch_dim, seed, dtype=dtype, device=device))


def _check_logits(hidden, logits, targets, weight, bias, temperature, check_values: bool):
    """The ``logits=`` form: -> hidden [N, H], logits [N, V], targets [N] int64 (contiguous), token shape."""
    if weight is not None:
        C.fail("logits", "pass weight or logits, not both")
    if bias is not None:
        C.fail("bias", "is inside the logits already; pass it only with weight")
    hidden = _check_hidden(hidden)
    logits = C.check_tensor("logits", logits)
    if tuple(logits.shape[:-1]) != tuple(hidden.shape[:-1]) or logits.shape[-1] < 1:
        C.fail("logits", f"shape {list(logits.shape)} must be hidden's leading dims {list(hidden.shape[:-1])} "
                         "plus a vocabulary dim >= 1")
    _check_vocab("logits", logits.shape[-1])
    C.check_devices(hidden=hidden, logits=logits, targets=targets)
    y, shape = check_targets_and_temperature(hidden, logits.shape[-1], targets, temperature, check_values)
    if check_values:
        C.check_finite("logits", logits)
    return hidden.reshape(-1, hidden.shape[-1]), logits.reshape(-1, logits.shape[-1]), y, shape


def _vocab_factor(logits: torch.Tensor, y: torch.Tensor, temperature: float, r1: Optional[int], seed: int, cdt):
    """u from whole logits [N, V] (held by the caller, or an exact [N, V] result anyway):
    (e_y - p) / T, or its sketch (S1[y] - p @ S1) / T; plain torch ops on any device."""
    p = torch.softmax(logits.to(cdt) / temperature, dim=1)
    if r1 is None:
        return (torch.nn.functional.one_hot(y, logits.shape[1]).to(cdt) - p) / temperature
    s1 = sketch_matrix(logits.shape[1], r1, vocab_seed(seed), dtype=cdt, device=logits.device)
    return (s1[y] - p @ s1) / temperature


@torch.no_grad()
def head_gradient_sketch(hidden: torch.Tensor, weight: Optional[torch.Tensor], targets: torch.Tensor, *,
                         vocab_sketch_dim: Optional[int] = 16, sketch_dim: Optional[int] = 64, seed: int = 0,
                         temperature: float = 1.0, bias: Optional[torch.Tensor] = None,
                         logits: Optional[torch.Tensor] = None, backend: str = "auto",
                         check_values: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """The two factors of the sketched LM-head gradient of log pi(targets): z = u (x) s.

    Args:
        hidden: [N, H] or [B, T, H] hidden states entering the LM head (float16/bfloat16/float32;
            float64 with backend="torch").
        weight: [V, H] LM-head matrix in hidden's dtype; None when ``logits`` are given.
        targets: sampled token ids shaped like hidden's leading dims, int64 (or int32), in [0, V).
        vocab_sketch_dim: r1, or None for the exact u = (e_y - p) / T ([..., V]: small vocabularies).
        sketch_dim: r2, or None for the exact s = h.
        seed: seed of S1 and S2 (head_sketch_matrices), in [0, 2**32).
        temperature: > 0; p = softmax((hidden @ weight.T + bias) / temperature).
        bias: optional [V], hidden's dtype (with weight only).
        logits: [..., V] untempered logits h W^T + b, instead of weight, for loops that hold them.
        backend: "auto" or an LM-head backend ("torch": chunked torch, "triton"): computes p @ S1
            without [N, V] logits. Exact u, and u from given logits, are plain torch ops on any backend.
        check_values: check target range and finiteness (device syncs).
    Returns:
        u: [..., r1] (or [..., V]) = S1^T (e_y - p) / T, float32 (float64 for float64 inputs).
        s: [..., r2] (or [..., H]) = S2^T h, same dtype.
        u_i (x) s_i is the gradient of log pi(y_i) with respect to the head, flattened row-major
        ([V, H] -> V * H), sketched: feed (u, s) to delta_coefficients(..., head_vectors=(u, s)).
    """
    check_width("vocab_sketch_dim", vocab_sketch_dim)
    check_width("sketch_dim", sketch_dim)
    C.check_sketch_args(None, seed)
    if logits is None:
        if weight is None:
            C.fail("weight", "pass weight (or logits)")
        _check_vocab("weight", C.check_tensor("weight", weight).shape[0])
        h, w, y, b, shape = _check_lm_head(hidden, weight, targets, bias, temperature, check_values)
    else:
        h, x, y, shape = _check_logits(hidden, logits, targets, weight, bias, temperature, check_values)
    cdt = torch.float64 if h.dtype == torch.float64 else torch.float32
    ops = resolve(backend, h.device, h.dtype, LM_HEAD)  # also where torch ops do the work: a bad name is refused
    if logits is not None:
        u = _vocab_factor(x, y, temperature, vocab_sketch_dim, seed, cdt)
    elif vocab_sketch_dim is None:
        x = h.to(cdt) @ w.to(cdt).T + (0.0 if b is None else b.to(cdt))
        u = _vocab_factor(x, y, temperature, None, seed, cdt)
    else:
        p_sketch = ops.softmax_sketch(h, w, b, float(temperature), vocab_sketch_dim, vocab_seed(seed))
        if check_values:
            _check_logits_finite(p_sketch, temperature)
        picked = row_signs(y, vocab_sketch_dim, vocab_seed(seed)).to(cdt) * sketch_scale(vocab_sketch_dim)
        u = (picked - p_sketch.to(cdt)) / temperature
    hc = h.to(cdt)
    s = hc if sketch_dim is None else hc @ sketch_matrix(h.shape[1], sketch_dim, seed, dtype=cdt, device=h.device)
    return u.reshape(*shape, u.shape[-1]), s.reshape(*shape, s.shape[-1])
