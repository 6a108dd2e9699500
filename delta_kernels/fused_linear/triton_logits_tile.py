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


@triton.jit
def row_block(N, n_blocks, BLOCK_N: tl.constexpr):
    """Program pid = split * n_blocks + block of the head kernels: (the block's rows [BLOCK_N] int64,
    their mask rows < N, the split or column-block index)."""
    pid = tl.program_id(0).to(tl.int64)
    rows = (pid % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    return rows, rows < N, pid // n_blocks


@triton.jit
def read_rows(valid_ptr, rows, row_ok, HAS_VALID: tl.constexpr):
    """The rows whose h (and g) are read: with HAS_VALID only the valid ones (a padded row loads zeros)."""
    ok = row_ok
    if HAS_VALID:
        ok = row_ok & (tl.load(valid_ptr + rows, mask=row_ok, other=0) != 0)
    return ok


@triton.jit
def split_logits(h_ptr, w_ptr, b_ptr, rows, h_ok, v_lo, j, cols_per_split, V, H, temperature, m,
                 HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """Step j of a split's online softmax over columns [v_lo, v_lo + cols_per_split): (cols, col_ok,
    the logits x (-inf past the split or V), the new running max m_new, m_safe = m_new or 0 where it
    is still -inf: a tile past V (only in the last split) keeps every term finite)."""
    cols = v_lo + j + tl.arange(0, BLOCK_V)
    col_ok = (cols < V) & (cols < v_lo + cols_per_split)
    x = logits_tile(h_ptr, w_ptr, b_ptr, rows, h_ok, cols, col_ok, H, temperature,
                    HAS_BIAS, IEEE, UPCAST, BLOCK_N, BLOCK_V, BLOCK_H)
    x = tl.where(col_ok[None, :], x, float("-inf"))
    m_new = tl.maximum(m, tl.max(x, axis=1))
    return cols, col_ok, x, m_new, tl.where(m_new == float("-inf"), 0.0, m_new)
