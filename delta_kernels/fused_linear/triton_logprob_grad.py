"""Triton: backward of logp = log_softmax((h W^T + b) / T)[y] for a per-token dL/dlogp g.

    dx[t, j] = g[t] / T * (onehot(j == y_t) - exp(x[t, j] - lse[t]))
    dH = dx W,   dW = dx^T H,   db = sum_t dx

The vocabulary is walked in chunks of CHUNK columns. For each chunk, kernel
``_logprob_grad_logits_kernel`` recomputes the logits tiles in registers (``logits_tile``)
and writes dx for the chunk, [N, CHUNK] in the input dtype (the only buffer that grows with
V; its size is bounded by CHUNK_BYTES); the two gradient GEMMs of the chunk then run in
cuBLAS (float32 accumulation; dH accumulates across chunks in a float32 buffer, in fixed
chunk order, no atomics). Rows with g = 0 give exactly zero. Padding is don't-care: with
``valid`` a row that is not valid loads zeros for h and g (selected, never multiplied), its
dx row is 0, it is zeroed in the H of the dW GEMM (a NaN row times a zero dx is NaN), and its
d hidden is 0.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .._alloc import empty
from .triton_logits_tile import OPTIONAL, logits_tile, read_rows, row_block

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # the interpreter's bf16 dot quirk only (UPCAST)
# The forward's tiles (triton_logprob.TILE): 194 registers and no spills for bf16, 1 CTA/SM (AOT table,
# benchmarks/results/aot_sm90.md). Read at call time (tests: smaller).
TILE = dict(BLOCK_N=128, BLOCK_V=128, BLOCK_H=64, num_warps=8, num_stages=3)
CHUNK_BYTES = 512 * 2**20  # size cap of the dx buffer


@triton.heuristics(OPTIONAL)
@triton.jit
def _logprob_grad_logits_kernel(h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, g_ptr, valid_ptr, dx_ptr, N, V, H,
                                temperature, c0, width, n_blocks,
                                HAS_BIAS: tl.constexpr, HAS_VALID: tl.constexpr, IEEE: tl.constexpr,
                                UPCAST: tl.constexpr,
                                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    rows, row_ok, pid_v = row_block(N, n_blocks, BLOCK_N)
    h_ok = read_rows(valid_ptr, rows, row_ok, HAS_VALID)  # rows whose h and g are read
    local = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)   # column inside the chunk
    col_ok = local < width
    cols = c0 + local
    x = logits_tile(h_ptr, w_ptr, b_ptr, rows, h_ok, cols, col_ok, H, temperature,
                    HAS_BIAS, IEEE, UPCAST, BLOCK_N, BLOCK_V, BLOCK_H)
    y = tl.load(y_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g = tl.load(g_ptr + rows, mask=h_ok, other=0.0) / temperature
    onehot = (cols[None, :] == y[:, None]).to(tl.float32)
    dx = g[:, None] * (onehot - tl.exp(x - lse[:, None]))
    tl.store(dx_ptr + rows[:, None] * width + local[None, :], dx.to(dx_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with a float32 result (bf16/fp16 GEMM with float32 output on CUDA)."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError):
            pass
    return (a @ b).float() if a.is_cuda else a.float() @ b.float()


def logprob_backward(hidden, weight, bias, targets, temperature: float, lse, grad_logp,
                     need_hidden: bool, need_weight: bool, need_bias: bool, valid=None):
    """-> (d hidden [N, H], d weight [V, H], d bias [V]) in the inputs' dtypes, or None where
    not needed. lse and grad_logp are float32 [N]; valid [N] bool or None (all valid)."""
    n, hdim = hidden.shape
    vocab = weight.shape[0]
    elem = hidden.element_size()
    block_n, block_v = TILE["BLOCK_N"], TILE["BLOCK_V"]
    chunk = max(block_v, (CHUNK_BYTES // max(n * elem, 1)) // block_v * block_v)
    chunk = min(chunk, triton.cdiv(vocab, block_v) * block_v)
    n_blocks = triton.cdiv(n, block_n)
    buf = torch.empty(n * chunk, dtype=hidden.dtype, device=hidden.device)
    g = grad_logp.to(torch.float32).contiguous()
    # the H of dW = dx^T H: padded rows zeroed (one [N, H] copy, only when the weight gradient is needed)
    h_mm = hidden if valid is None or not need_weight else hidden.masked_fill(~valid[:, None], 0)
    dh_acc = torch.zeros(n, hdim, dtype=torch.float32, device=hidden.device) if need_hidden else None
    dw = empty(vocab, hdim, dtype=weight.dtype, device=hidden.device) if need_weight else None
    db = empty(vocab, dtype=bias.dtype, device=hidden.device) if need_bias else None
    for c0 in range(0, vocab, chunk):
        width = min(chunk, vocab - c0)
        dx = buf[:n * width].view(n, width)
        _logprob_grad_logits_kernel[(n_blocks * triton.cdiv(width, block_v),)](
            h_ptr=hidden, w_ptr=weight, b_ptr=bias, y_ptr=targets, lse_ptr=lse, g_ptr=g, valid_ptr=valid, dx_ptr=dx,
            N=n, V=vocab, H=hdim, temperature=float(temperature), c0=c0, width=width, n_blocks=n_blocks,
            IEEE=hidden.dtype == torch.float32, UPCAST=INTERPRET and hidden.dtype == torch.bfloat16, **TILE)
        if need_hidden:
            dh_acc += _mm_f32(dx, weight[c0:c0 + width])
        if need_weight:
            if hidden.is_cuda:  # float32 accumulation inside cuBLAS, written in place
                torch.mm(dx.T, h_mm, out=dw[c0:c0 + width])
            else:
                dw[c0:c0 + width] = _mm_f32(dx.T, h_mm).to(weight.dtype)
        if need_bias:
            db[c0:c0 + width] = dx.sum(0, dtype=torch.float32).to(bias.dtype)
    if dh_acc is not None and valid is not None:
        dh_acc.masked_fill_(~valid[:, None], 0.0)  # +0, not the -0 of a zero dx row times W
    return (None if dh_acc is None else dh_acc.to(hidden.dtype), dw, db)
