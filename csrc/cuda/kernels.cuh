// CUDA kernels of delta_kernels._cuda. Inputs are valid device pointers (Python checks them and
// allocates outputs and workspaces); every launcher returns the cudaError_t of its launches.
// dtype codes: common/dtypes.h. Reductions are two-stage in a fixed order (no float atomics).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace dk {
namespace cuda {

// Number of token chunks of the reductions over N tokens (a function of N only); the partial
// workspace of row_pass / token_vectors holds reduction_chunks(N) * 2 * D floats.
int64_t reduction_chunks(int64_t N);

// One pass over x [N, D] (dtype), v[t] = scale[t] x[t] (scale may be null):
//   w, c non-null: m [N] = 2 (v - c).w, c [D] subtracted element by element;
//   a_pos, a_neg non-null: sums [2, D] = (sum p[t] v[t], sum q[t] v[t]) with p, q = a_pos, a_neg, or
//   with gamma [2] non-null the gated sigmoid(m/gamma[0]) a_pos, sigmoid(-m/gamma[1]) a_neg, of v[t] - c;
//   out non-null: v written to out [N, D] in x's dtype.
cudaError_t row_pass(int dtype, const void* x, const float* scale, int64_t N, int64_t D, const float* w,
                     const float* c, const float* gamma, const float* a_pos, const float* a_neg, float* m, void* out,
                     float* partial, float* sums, cudaStream_t stream);

// v = (1 - exp(logp)) h [N, H], or z = v @ R [N, r] (r > 0), written to out in hidden's dtype
// (float32 when out_f32); sums non-null: side sums [2, D] of the written vectors. scale_ws [N]
// floats of workspace (exact vectors), partial as in row_pass.
cudaError_t token_vectors(int dtype, const void* hidden, const float* logp, const float* a_pos, const float* a_neg,
                          int64_t N, int64_t H, int64_t r, uint32_t seed, bool out_f32, void* out, float* scale_ws,
                          float* partial, float* sums, cudaStream_t stream);

// Tiles per row of clipped_surrogate's partial sums, for rows of T tokens.
int64_t surrogate_tiles(int64_t T);

// Weighted dual-clip surrogate over [B, T] float32 inputs (mask bytes; coef and is_weight may be
// null): partial [B, surrogate_tiles(T), kStats] (common/surrogate_math.h SurrogateStat) = per-
// (row, tile) partial sums; grad [B, T] = is_weight d l / d logp per token (0 at padding).
cudaError_t clipped_surrogate(const float* logp, const float* old_logp, const float* adv, const uint8_t* mask,
                              const float* coef, const float* is_weight, int64_t B, int64_t T, float clip_low,
                              float clip_high, float clip_c, float* partial, float* grad, cudaStream_t stream);

}  // namespace cuda
}  // namespace dk
