// C++ CPU kernels (OpenMP). Inputs are valid, contiguous and on the host: Python checks them.
// Reductions run over fixed token blocks (a function of N only) and combine the blocks in
// order, so results do not depend on the number of threads.
#pragma once
#include <cstdint>

namespace dk {
namespace cpu {

int64_t reduction_block(int64_t n_tokens);

// R as float32 [H, r] (delta_kernels/sketch_matrix.py).
void sketch_matrix(float* out, int64_t H, int64_t r, uint32_t seed);

// v = (1 - exp(logp)) h, or z = v @ R when r > 0, written in hidden's dtype to out [N, D];
// sums [2, D] = (sum a_pos v, sum a_neg v) in float32 (from the unrounded vectors).
void token_vectors(int dtype, const void* hidden, const float* logp, const float* a_pos, const float* a_neg,
                   int64_t N, int64_t H, int64_t r, uint32_t seed, void* out, float* sums);

}  // namespace cpu
}  // namespace dk
