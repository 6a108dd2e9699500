// C++ CPU kernels (OpenMP). Inputs are valid, contiguous and on the host: Python checks them; the
// [N, D] row operands (hidden, x, v) may be [B, T, D] views, read in place (rows: common/row_strides.h).
// Reductions run over fixed token blocks (a function of N only) and combine the blocks in
// order, so results do not depend on the number of threads. dtype codes: common/dtypes.h.
#pragma once
#include <cstdint>

#include "../common/row_strides.h"

namespace dk {
namespace cpu {

// Tokens per block of the CPU reductions over N tokens (a function of N only).
int64_t reduction_block_tokens(int64_t n_tokens);

// 1 when the row passes run their AVX2 clones, 0 for the SSE2 baseline; both give the same bits.
// DELTA_KERNELS_CPU_SIMD=baseline forces the baseline.
int simd_level();

// R as float32 [H, r] (delta_kernels/sketch_matrix.py).
void sketch_matrix(float* out, int64_t H, int64_t r, uint32_t seed);

// v = (1 - exp(logp)) h, or z = v @ R when r > 0, written to out [N, D] in hidden's dtype
// (float32 when out_f32); sums [2, D] = (sum a_pos v, sum a_neg v) in float32 (unrounded vectors).
void token_vectors(int dtype, const void* hidden, const RowStrides& rows, const float* logp, const float* a_pos,
                   const float* a_neg, int64_t N, int64_t H, int64_t r, uint32_t seed, bool out_f32, void* out,
                   float* sums);

// sums [2, D] = (sum a_pos v, sum a_neg v) in float32 of vectors v [N, D] (dtype), or of
// v[t] = scale[t] x[t] when scale [N] is not null (x then holds hidden states).
void side_sums(int dtype, const void* v, const RowStrides& rows, const float* scale, const float* a_pos,
               const float* a_neg, int64_t N, int64_t D, float* sums);

// m [N] = 2 (v - c).w in float32, c [D] (the centroids' midpoint) subtracted element by element.
// With gamma != nullptr (gamma [2], a_pos, a_neg [N]) also the gated sums about c, sums [2, D] =
// (sum sigmoid(m/gamma[0]) a_pos (v - c), sum sigmoid(-m/gamma[1]) a_neg (v - c)); m is the same
// with and without the gate. scale as in side_sums.
void margin_pass(int dtype, const void* v, const RowStrides& rows, const float* scale, const float* w, const float* c,
                 int64_t N, int64_t D, const float* gamma, const float* a_pos, const float* a_neg, float* m,
                 float* sums);

// The surrogate's row sums run over tiles of this many tokens, each in double from 0, added in tile order.
constexpr int64_t kSurrogateTile = 1024;

// Weighted dual-clip surrogate over [B, T] float32 inputs (mask as bytes; coef and is_weight
// may be null): rows [B, kStats] (common/surrogate_math.h SurrogateStat) = per-row partial sums,
// grad [B, T] = is_weight d l / d logp per token (0 at padding). Masked tokens are never read.
void clipped_surrogate(const float* logp, const float* old_logp, const float* adv, const uint8_t* mask,
                       const float* coef, const float* is_weight, int64_t B, int64_t T, float clip_low,
                       float clip_high, float clip_c, double* rows, float* grad);

// FIPO future-KL weights over [B, T] float32 inputs (mask as bytes): future_kl [B, T] = the
// discounted sum (gamma per step, accumulated in double) of the valid log-ratios <= log_clip_c
// from each token to the row's end; weights [B, T] = exp(future_kl) clamped to [lower, upper]
// (to <= upper without clip_lower), then to [0.8, 1] where adv < 0 and the ratio > safety_thresh;
// both 0 at padding. keep [B] = at most one valid token with adv < 0 and ratio > clip_c.
// row_stats [B, 5] over valid tokens: count, sum, min, max of the weights, weights >= at_upper or <= at_lower.
void fipo_weights(const float* logp, const float* old_logp, const float* adv, const uint8_t* mask, int64_t B,
                  int64_t T, double gamma, float log_clip_c, float clip_c, float lower, float upper,
                  bool clip_lower, float safety_thresh, float at_upper, float at_lower, float* weights,
                  float* future_kl, uint8_t* keep, float* row_stats);

// clipped_surrogate with FIPO's weights as coefficients (times coef when not null) and FIPO's
// dropped rows masked, in one call: each row's backward FIPO walk (fipo_row.h, the weights kept in
// grad's row) and then its surrogate tiles, as clipped_surrogate sums them (the same bits as
// fipo_weights followed by clipped_surrogate on mask & keep). keep [B] as fipo_weights';
// metrics [5] float32 over the valid tokens of every row: weight mean, min, max (0 without valid
// tokens), rows dropped, the fraction of weights at a clip bound.
void fipo_surrogate(const float* logp, const float* old_logp, const float* adv, const uint8_t* mask,
                    const float* coef, const float* is_weight, int64_t B, int64_t T, double gamma, float log_clip_c,
                    float fipo_clip_c, float lower, float upper, bool clip_lower, float safety_thresh, float at_upper,
                    float at_lower, float clip_low, float clip_high, float clip_c, double* rows, float* grad,
                    uint8_t* keep, float* metrics);

}  // namespace cpu
}  // namespace dk
