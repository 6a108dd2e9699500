// Row helpers of the CPU kernels: loads of a row chunk to float32, a lane-split dot product and
// an axpy, written so that -O3 vectorises them without -ffast-math (each lane is independent;
// the lanes are combined in one fixed order, so the result does not depend on the thread).
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#ifdef __SSE2__
#include <emmintrin.h>
#endif

#include "../common/dtypes.h"

namespace dk {
namespace cpu {

constexpr int64_t kLanes = 16;   // independent accumulators of dot()
constexpr int64_t kChunk = 256;  // row elements converted to float32 at a time

// dst[0:n] = float(src[0:n]), n <= kChunk.
template <int DT>
inline void load_chunk(const typename Elem<DT>::T* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = Elem<DT>::load(src, i);
}
template <>
inline void load_chunk<kBFloat16>(const uint16_t* src, int64_t n, float* dst) {
  uint32_t bits[kChunk];
  for (int64_t i = 0; i < n; ++i) bits[i] = static_cast<uint32_t>(src[i]) << 16;
  std::memcpy(dst, bits, static_cast<size_t>(n) * 4);
}

// sum_i x[i] * w[i] over 16 lanes (lane = i mod 16), lanes added as a fixed pairwise tree.
// x is a row of dtype DT, w float32. Never inlined, so every caller gets the same bits.
template <int DT>
__attribute__((noinline)) float dot_row(const typename Elem<DT>::T* x, const float* w, int64_t n) {
  float acc[kLanes] = {0};
  alignas(64) float buf[kChunk];
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const int64_t len = std::min(kChunk, n - c0);
    const float* xs;
    if constexpr (DT == kFloat32) {
      xs = x + c0;
    } else {
      load_chunk<DT>(x + c0, len, buf);
      xs = buf;
    }
    const float* ws = w + c0;
    const int64_t full = len - len % kLanes;
#ifdef __SSE2__
    // The same lanes as the portable loop below, kept in four registers.
    __m128 a0 = _mm_loadu_ps(acc), a1 = _mm_loadu_ps(acc + 4), a2 = _mm_loadu_ps(acc + 8), a3 = _mm_loadu_ps(acc + 12);
    for (int64_t i = 0; i < full; i += kLanes) {
      a0 = _mm_add_ps(a0, _mm_mul_ps(_mm_loadu_ps(xs + i), _mm_loadu_ps(ws + i)));
      a1 = _mm_add_ps(a1, _mm_mul_ps(_mm_loadu_ps(xs + i + 4), _mm_loadu_ps(ws + i + 4)));
      a2 = _mm_add_ps(a2, _mm_mul_ps(_mm_loadu_ps(xs + i + 8), _mm_loadu_ps(ws + i + 8)));
      a3 = _mm_add_ps(a3, _mm_mul_ps(_mm_loadu_ps(xs + i + 12), _mm_loadu_ps(ws + i + 12)));
    }
    _mm_storeu_ps(acc, a0), _mm_storeu_ps(acc + 4, a1), _mm_storeu_ps(acc + 8, a2), _mm_storeu_ps(acc + 12, a3);
#else
    for (int64_t i = 0; i < full; i += kLanes)
      for (int64_t l = 0; l < kLanes; ++l) acc[l] += xs[i + l] * ws[i + l];
#endif
    for (int64_t i = full; i < len; ++i) acc[i - full] += xs[i] * ws[i];
  }
  for (int64_t width = kLanes / 2; width >= 1; width /= 2)
    for (int64_t l = 0; l < width; ++l) acc[l] += acc[l + width];
  return acc[0];
}

// y[0:n] += a * x[0:n], x of dtype DT.
template <int DT>
inline void axpy_row(float a, const typename Elem<DT>::T* x, float* y, int64_t n) {
  if constexpr (DT == kFloat32) {
    for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
  } else {
    alignas(64) float buf[kChunk];
    for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
      const int64_t len = std::min(kChunk, n - c0);
      load_chunk<DT>(x + c0, len, buf);
      float* ys = y + c0;
      for (int64_t i = 0; i < len; ++i) ys[i] += a * buf[i];
    }
  }
}

// Blocks of reduction_block(N) tokens: out[j] = sum over blocks, in block order, of partial[blk][j].
inline void combine_partials(const float* partial, int64_t n_blocks, int64_t width, float* out) {
#pragma omp parallel for schedule(static)
  for (int64_t j = 0; j < width; ++j) {
    float acc = 0.0f;
    for (int64_t blk = 0; blk < n_blocks; ++blk) acc += partial[blk * width + j];
    out[j] = acc;
  }
}

}  // namespace cpu
}  // namespace dk
