"""The fused LM-head algorithm in chunked plain torch (CPU tensors; float64-capable).

Same algorithm as the Triton kernels: logits exist only as one [ROWS, COLS] chunk at a time,
in the compute dtype (float32, or float64 for float64 inputs). Logits are
``x = (hidden @ weight.T + bias) / temperature``.

Internal functions (validated, contiguous inputs; hidden [N, H], weight [V, H], bias [V] or
None, targets [N] int64; valid [N] bool or None = every row valid):
    logprob(...)          -> logp [N], lse [N], entropy [N] or None      one pass over V
    token_vectors(...)    -> v or z [N, D] in hidden's dtype, side sums [2, D] or None
    softmax_sketch(...)   -> softmax(x) @ S1 [N, r1] (S1 a sketch_matrix)             one pass over V
    logprob_backward(...) -> d hidden, d weight, d bias from dL/dlogp     recomputes logits

Padding is don't-care (docs/reliability.md): a row with valid False is selected out
(``torch.where``, never multiplied by 0: a NaN row times 0 is NaN) before any matmul, so it
enters no sum over tokens, and its outputs (logp, entropy, v or z, d hidden) are 0.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._alloc import empty
from ..sketch_matrix import sketch_matrix

ROWS = 2048  # tokens per chunk
COLS = 4096  # vocabulary columns per chunk


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows(hidden, r0: int, r1: int, valid, cdt):
    """Rows r0:r1 of hidden in cdt, invalid rows zeroed (selected, not multiplied); and their
    validity [r1 - r0, 1] (None: every row valid)."""
    h_c = hidden[r0:r1].to(cdt)
    if valid is None:
        return h_c, None
    ok = valid[r0:r1, None]
    return torch.where(ok, h_c, 0.0), ok


def _logits(h_c: torch.Tensor, weight: torch.Tensor, bias, v0: int, v1: int, temperature: float, cdt):
    """[rows, v1 - v0] logits chunk in cdt."""
    x = h_c @ weight[v0:v1].to(cdt).T
    if bias is not None:
        x = x + bias[v0:v1].to(cdt)
    return x / temperature


def logprob(hidden, weight, bias, targets, temperature: float, want_entropy: bool, valid=None):
    """Online log-sum-exp over vocabulary chunks.

    Returns logp [N] (clamped to <= 0), lse [N] (of the tempered logits) and entropy [N]
    (or None), in float32 (float64 for float64 inputs); logp and entropy are 0 where not valid."""
    n, cdt = hidden.shape[0], _compute_dtype(hidden.dtype)
    vocab = weight.shape[0]
    logp = empty(n, dtype=cdt, device=hidden.device)
    lse = empty(n, dtype=cdt, device=hidden.device)
    ent = empty(n, dtype=cdt, device=hidden.device) if want_entropy else None
    for r0 in range(0, n, ROWS):
        r1 = min(r0 + ROWS, n)
        (h_c, ok), y = _rows(hidden, r0, r1, valid, cdt), targets[r0:r1]
        m = torch.full((r1 - r0,), float("-inf"), dtype=cdt, device=hidden.device)
        s = torch.zeros_like(m)
        t = torch.zeros_like(m)   # sum exp(x - m) (x - m): entropy = log s - t / s
        x_y = torch.zeros_like(m)
        for v0 in range(0, vocab, COLS):
            v1 = min(v0 + COLS, vocab)
            x = _logits(h_c, weight, bias, v0, v1, temperature, cdt)
            idx = y - v0
            inside = (idx >= 0) & (idx < v1 - v0)
            x_y = x_y + torch.where(inside, x.gather(1, idx.clamp(0, v1 - v0 - 1)[:, None])[:, 0], 0.0)
            if not want_entropy:  # running log-sum-exp, one fused torch reduction per chunk
                m = torch.logaddexp(m, torch.logsumexp(x, 1))
                continue
            m_new = torch.maximum(m, x.max(1).values)
            alpha = torch.exp(m - m_new)
            p = torch.exp(x - m_new[:, None])
            t = alpha * (t + torch.where(s > 0, s * (m - m_new), 0.0)) + (p * (x - m_new[:, None])).sum(1)
            s = alpha * s + p.sum(1)
            m = m_new
        lse[r0:r1] = m + torch.log(s) if want_entropy else m
        logp[r0:r1] = _zero_padding((x_y - lse[r0:r1]).clamp_max(0.0), ok)
        if want_entropy:
            ent[r0:r1] = _zero_padding((torch.log(s) - t / s).clamp_min(0.0), ok)
    return logp, lse, ent


def _zero_padding(x: torch.Tensor, ok) -> torch.Tensor:
    """x with its rows that are not valid set to 0 (ok [rows, 1] bool or None)."""
    if ok is None:
        return x
    return torch.where(ok if x.dim() == 2 else ok[:, 0], x, 0.0)


def token_vectors(hidden, logp, a_pos: Optional[torch.Tensor], a_neg: Optional[torch.Tensor],
                  sketch_dim: Optional[int], seed: int, valid=None):
    """v = (1 - exp(logp)) h, or z = v @ R (0 where not valid); with a_pos/a_neg also
    (sum a+ v, sum a- v) from the compute-dtype vectors before rounding to hidden's dtype."""
    n, hdim = hidden.shape
    cdt = _compute_dtype(hidden.dtype)
    d = hdim if sketch_dim is None else sketch_dim
    out = empty(n, d, dtype=hidden.dtype, device=hidden.device)
    sums = None if a_pos is None else torch.zeros(2, d, dtype=cdt, device=hidden.device)
    r = None if sketch_dim is None else sketch_matrix(hdim, sketch_dim, seed, dtype=cdt, device=hidden.device)
    for r0 in range(0, n, ROWS):
        r1 = min(r0 + ROWS, n)
        h_c, ok = _rows(hidden, r0, r1, valid, cdt)
        v = -torch.expm1(logp[r0:r1].to(cdt))[:, None] * h_c
        if r is not None:
            v = v @ r
        v = _zero_padding(v, ok)  # +0, not the -0 of -expm1(0) * 0
        out[r0:r1] = v.to(hidden.dtype)
        if sums is not None:
            sums += torch.stack([a_pos[r0:r1].to(cdt), a_neg[r0:r1].to(cdt)]) @ v
    return out, sums


def softmax_sketch(hidden, weight, bias, temperature: float, sketch_dim: int, seed: int):
    """p @ S1, p = softmax(x) per row, S1 = sketch_matrix(V, sketch_dim, seed): [N, sketch_dim] in the
    compute dtype, in one pass over the vocabulary (online: the running sum of exp(x - m) @ S1
    is rescaled with the running max m, as the normaliser is; divided by the normaliser at the end)."""
    n, cdt = hidden.shape[0], _compute_dtype(hidden.dtype)
    vocab = weight.shape[0]
    s1 = sketch_matrix(vocab, sketch_dim, seed, dtype=cdt, device=hidden.device)
    out = empty(n, sketch_dim, dtype=cdt, device=hidden.device)
    for r0 in range(0, n, ROWS):
        r1 = min(r0 + ROWS, n)
        h_c = hidden[r0:r1].to(cdt)
        m = torch.full((r1 - r0,), float("-inf"), dtype=cdt, device=hidden.device)
        s = torch.zeros_like(m)
        acc = torch.zeros(r1 - r0, sketch_dim, dtype=cdt, device=hidden.device)
        for v0 in range(0, vocab, COLS):
            v1 = min(v0 + COLS, vocab)
            x = _logits(h_c, weight, bias, v0, v1, temperature, cdt)
            m_new = torch.maximum(m, x.max(1).values)
            alpha = torch.exp(m - m_new)
            p = torch.exp_(x.sub_(m_new[:, None]))  # in place: the chunk's logits are not needed again
            s = alpha * s + p.sum(1)
            acc = alpha[:, None] * acc + p @ s1[v0:v1]
            m = m_new
        out[r0:r1] = acc / s[:, None]
    return out


def logprob_backward(hidden, weight, bias, targets, temperature: float, lse, grad_logp,
                     need_hidden: bool, need_weight: bool, need_bias: bool, valid=None):
    """d logp[t] / d x[t, j] = onehot(j == y_t) - softmax(x[t])_j, and x = (h W^T + b) / T.

    Recomputes each logits chunk, forms dx = g / T * (onehot - p) in the compute dtype and
    accumulates dH = dx W, dW = dx^T H, db = sum_t dx (fixed chunk order). Rows with
    g = 0 contribute exactly zero; rows that are not valid are selected out (h and g zeroed), and
    their d hidden is 0."""
    n, hdim = hidden.shape
    vocab = weight.shape[0]
    cdt = _compute_dtype(hidden.dtype)
    dh = empty(n, hdim, dtype=hidden.dtype, device=hidden.device) if need_hidden else None
    dw = torch.zeros(vocab, hdim, dtype=cdt, device=hidden.device) if need_weight else None
    db = torch.zeros(vocab, dtype=cdt, device=hidden.device) if need_bias else None
    for r0 in range(0, n, ROWS):
        r1 = min(r0 + ROWS, n)
        (h_c, ok), y = _rows(hidden, r0, r1, valid, cdt), targets[r0:r1]
        g = _zero_padding((grad_logp[r0:r1].to(cdt) / temperature)[:, None], ok)
        dh_c = torch.zeros(r1 - r0, hdim, dtype=cdt, device=hidden.device) if need_hidden else None
        for v0 in range(0, vocab, COLS):
            v1 = min(v0 + COLS, vocab)
            x = _logits(h_c, weight, bias, v0, v1, temperature, cdt)
            dx = -torch.exp(x - lse[r0:r1, None].to(cdt))
            idx = y - v0  # + 1 at each row's target inside this chunk (+ 0 elsewhere: no data-dependent shapes)
            inside = (idx >= 0) & (idx < v1 - v0)
            dx.scatter_add_(1, idx.clamp(0, v1 - v0 - 1)[:, None], inside[:, None].to(cdt))
            dx = dx * g
            if need_hidden:
                dh_c += dx @ weight[v0:v1].to(cdt)
            if need_weight:
                dw[v0:v1] += dx.T @ h_c
            if need_bias:
                db[v0:v1] += dx.sum(0)
        if need_hidden:
            dh[r0:r1] = _zero_padding(dh_c, ok).to(hidden.dtype)
    return (dh,
            None if dw is None else dw.to(weight.dtype),
            None if db is None else db.to(bias.dtype))
