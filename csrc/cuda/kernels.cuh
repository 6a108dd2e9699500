// CUDA kernels of delta_kernels._cuda. Inputs are valid device pointers (Python checks them and
// allocates outputs and workspaces); every launcher returns the cudaError_t of its launches.
// dtype codes: common/dtypes.h. Reductions are two-stage in a fixed order (no float atomics).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/row_strides.h"

namespace dk {
namespace cuda {

// Number of token chunks of the reductions over N tokens (a function of N only); the partial
// workspace of row_pass / token_vectors holds reduction_chunk_count(N) * 2 * D floats.
int64_t reduction_chunk_count(int64_t N);

// Widest row whose sums row_pass computes: the block's partial sums [2, D] live in shared
// memory above 4,096 columns (128 KiB at this width, within sm_80's and sm_90's per-block limit).
constexpr int64_t kMaxSumsWidth = 16384;

// One pass over x [n_tokens, width] (dtype; its rows where `rows` says: a [B, T, D] view read in
// place, common/row_strides.h), v[t] = scale[t] x[t]. Null pointers are unused:
//   scale null: v = x;
//   w, centre non-null: margins [N] = 2 (v - centre).w, centre [D] subtracted element by element;
//   sums non-null (partial: reduction_chunk_count(N) * 2 * D floats of workspace, width <=
//   kMaxSumsWidth): sums [2, D] = (sum p[t] v[t], sum q[t] v[t]) with p, q = a_pos, a_neg, or with
//   gamma [2] non-null the gated sigmoid(m/gamma[0]) a_pos, sigmoid(-m/gamma[1]) a_neg, of v[t] - centre;
//   out non-null: v written to out [N, D] (contiguous) in x's dtype.
// Rows are read as 16-byte vectors when x, out, w and centre are 16-byte aligned and a row and the
// row strides are multiples of 16 bytes, else element by element (the same sums, possibly other
// rounding; docs/backends.md, "Strided rows").
struct RowPassParams {
  int dtype;
  const void* x;
  RowStrides rows;
  const float* scale;
  int64_t n_tokens;
  int64_t width;
  const float* w;
  const float* centre;
  const float* gamma;
  const float* a_pos;
  const float* a_neg;
  float* margins;
  void* out;
  float* partial;
  float* sums;
};
cudaError_t row_pass(const RowPassParams& p, cudaStream_t stream);

// v = (1 - exp(logp)) hidden [N, H] (its rows where `rows` says, as in row_pass), or the sketch
// z = v @ R [N, r] (sketch_dim r > 0, on the tensor cores), written to out [N, D] in hidden's dtype
// (float32 when out_f32); sums non-null: side sums [2, D] of the written vectors (partial as in
// row_pass, D <= kMaxSumsWidth). scale_ws: N floats of workspace (exact vectors).
struct TokenVectorsParams {
  int dtype;
  const void* hidden;
  RowStrides rows;
  const float* logp;
  const float* a_pos;
  const float* a_neg;
  int64_t n_tokens;
  int64_t hidden_size;
  int64_t sketch_dim;
  uint32_t seed;
  bool out_f32;
  void* out;
  float* scale_ws;
  float* partial;
  float* sums;
};
cudaError_t token_vectors(const TokenVectorsParams& p, cudaStream_t stream);

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
