"""One [BLOCK_N, BLOCK_V] tile of tempered logits, computed in registers (shared by the
forward and backward kernels; it never reaches global memory).

    x[n, j] = (sum_k h[n, k] w[j, k] + b[j]) / temperature,   float32 accumulation.

``rows`` and ``cols`` are int64 offsets (so rows * H cannot overflow); rows or columns
outside the matrix load zeros (callers mask them). ``UPCAST`` (set only under
TRITON_INTERPRET=1 for bfloat16) feeds float32 operands to tl.dot.
"""
import triton
import triton.language as tl

# The head kernels' absent inputs are None pointers, turned into constexpr flags once (triton.heuristics):
# bias (all three kernels) and the token mask (the log-prob forward and backward, padding rows read as 0).
HAS_BIAS = dict(HAS_BIAS=lambda a: a["b_ptr"] is not None)
OPTIONAL = dict(HAS_BIAS, HAS_VALID=lambda a: a["valid_ptr"] is not None)


@triton.jit
def logits_tile(h_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, H, temperature,
                HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        k_ok = ks < H
        hk = tl.load(h_ptr + rows[:, None] * H + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wk = tl.load(w_ptr + cols[None, :] * H + ks[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        if UPCAST:  # the CPU interpreter's tl.dot mishandles bfloat16 operands (triton 3.9)
            hk = hk.to(tl.float32)
            wk = wk.to(tl.float32)
        if IEEE:  # float32 inputs: exact float32 products (no TF32)
            acc = tl.dot(hk, wk, acc, input_precision="ieee")
        else:     # bf16/fp16 inputs: tensor-core products, float32 accumulation
            acc = tl.dot(hk, wk, acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return acc / temperature
