// Row helpers of the CPU kernels: loads of a row chunk to float32, a lane-split dot product of a
// group of rows and a multi-row axpy, written with GCC vector types so that one source compiles
// to SSE2 (the baseline build) and to AVX2 (the hot block functions are compiled twice, see
// DK_AVX2 and simd_level()). No -ffast-math and no FMA: every target computes each lane as a
// multiply then an add, so the AVX2 and SSE2 paths give the same bits, and the lanes are combined
// in one fixed order, so the result depends on neither the thread nor the group a row is in.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "../common/dtypes.h"
#include "../common/row_strides.h"

// F8 values never cross a non-inlined call, so the AVX ABI note for them does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace dk {
namespace cpu {

constexpr int64_t kLanes = 16;   // independent accumulators of a dot product (lane = i mod 16)
constexpr int64_t kChunk = 256;  // row elements converted to float32 at a time (a multiple of kLanes)
constexpr int kGroup = 4;        // rows read together: 4 streams of h in flight per thread
constexpr int kPrefetchGroups = 1;  // software prefetch runs this many groups ahead

#define DK_INLINE inline __attribute__((always_inline))
// The block functions' AVX2 clones. avx2 only (no fma): the compiler cannot contract a*b+c.
#define DK_AVX2 __attribute__((target("avx2")))

// 1 when the block functions run their AVX2 clones, 0 for the SSE2 baseline (the same bits).
// DELTA_KERNELS_CPU_SIMD=baseline forces the baseline (tests compare the two).
int simd_level();

typedef float F8 __attribute__((vector_size(32)));  // 8 lanes: one ymm (AVX2) or two xmm (SSE2)

DK_INLINE F8 load8(const float* p) {
  F8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
DK_INLINE void store8(float* p, const F8& v) { std::memcpy(p, &v, sizeof v); }
DK_INLINE F8 splat8(float a) { return F8{a, a, a, a, a, a, a, a}; }

// dst[0:n] = float(src[0:n]), n <= kChunk.
template <int DT>
DK_INLINE void load_chunk(const typename Elem<DT>::T* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = Elem<DT>::load(src, i);
}
template <>
DK_INLINE void load_chunk<kBFloat16>(const uint16_t* src, int64_t n, float* dst) {
  uint32_t bits[kChunk];
  for (int64_t i = 0; i < n; ++i) bits[i] = static_cast<uint32_t>(src[i]) << 16;
  std::memcpy(dst, bits, static_cast<size_t>(n) * 4);
}

// xs[g] = float view of x[g][c0 : c0 + len] for G rows: the rows themselves for float32, else
// each row's chunk converted into buf[g] (len <= kChunk).
template <int DT, int G>
DK_INLINE void chunk_views(const typename Elem<DT>::T* const* x, int64_t c0, int64_t len,
                           float (*buf)[kChunk], const float** xs) {
  for (int g = 0; g < G; ++g) {
    if constexpr (DT == kFloat32) {
      xs[g] = x[g] + c0;
    } else {
      load_chunk<DT>(x[g] + c0, len, buf[g]);
      xs[g] = buf[g];
    }
  }
}

// out[g] = sum_i x[g][i] * w[i] for G rows read together. Each row has its own 16 lanes
// (lane = i mod 16, accumulated in increasing i), added as a fixed pairwise tree: a row's result
// does not depend on G or on the rows beside it. x rows of dtype DT, w float32.
// The rows of the next group, for software prefetch: the first row and the pitch (elements)
// between rows; first null: nothing to prefetch.
template <typename T>
struct RowsAhead {
  const T* first = nullptr;
  int64_t pitch = 0;
};

// The kGroup rows from token `first` on, when they exist (< N) and lie one pitch apart (one batch
// entry of the row layout); else nothing.
template <typename T>
DK_INLINE RowsAhead<T> rows_ahead(const T* base, const RowStrides& rs, int64_t first, int64_t N) {
  if (first + kGroup > N || !rs.one_entry(first, kGroup)) return {};
  return {base + rs.offset(first), rs.stride_t};
}

// Software prefetch of element i of G rows from next: the rows of the next group, fetched while
// this group is read. The hardware prefetcher stops at every 4 KiB page (one row of H = 1024
// floats), so without this each row starts with a stall.
template <int DT, int G>
DK_INLINE void prefetch_rows(const RowsAhead<typename Elem<DT>::T>& next, int64_t i) {
  if (next.first != nullptr)
    for (int g = 0; g < G; ++g) __builtin_prefetch(next.first + g * next.pitch + i, 0, 3);
}

// out[g] = sum_i (s[g] x[g][i] - c[i]) w[i] for G rows read together: the margin of a row about
// the centre c, subtracted element by element before the dot so that a component the rows share
// cancels exactly instead of in the rounded dot (its float32 error then does not grow with that
// offset). Each row has its own 16 lanes (lane = i mod 16, accumulated in increasing i), added as
// a fixed pairwise tree: a row's result does not depend on G or on the rows beside it. x rows of
// dtype DT; s, c, w float32. next: the rows to prefetch (see prefetch_rows), or none.
template <int DT, int G>
DK_INLINE void centered_dot_rows(const typename Elem<DT>::T* const* x, const float* s, const float* c,
                                 const float* w, int64_t n, float* out,
                                 const RowsAhead<typename Elem<DT>::T>& next = {}) {
  F8 acc[G][2], sv[G];
  for (int g = 0; g < G; ++g) {
    acc[g][0] = acc[g][1] = splat8(0.0f);
    sv[g] = splat8(s[g]);
  }
  alignas(64) float buf[DT == kFloat32 ? 1 : G][kChunk];
  const int64_t full = n - n % kLanes;
  for (int64_t c0 = 0; c0 < full; c0 += kChunk) {
    const int64_t len = std::min(kChunk, full - c0);
    const float* xs[G];
    chunk_views<DT, G>(x, c0, len, buf, xs);
    const float* ws = w + c0;
    const float* cs = c + c0;
    for (int64_t i = 0; i < len; i += kLanes) {
      const F8 w0 = load8(ws + i), w1 = load8(ws + i + 8);
      const F8 k0 = load8(cs + i), k1 = load8(cs + i + 8);
      prefetch_rows<DT, G>(next, c0 + i);
      for (int g = 0; g < G; ++g) {
        acc[g][0] += (sv[g] * load8(xs[g] + i) - k0) * w0;
        acc[g][1] += (sv[g] * load8(xs[g] + i + 8) - k1) * w1;
      }
    }
  }
  for (int g = 0; g < G; ++g) {
    alignas(32) float lanes[kLanes];
    store8(lanes, acc[g][0]);
    store8(lanes + 8, acc[g][1]);
    for (int64_t i = full; i < n; ++i) lanes[i - full] += (s[g] * Elem<DT>::load(x[g], i) - c[i]) * w[i];
    for (int64_t width = kLanes / 2; width >= 1; width /= 2)
      for (int64_t l = 0; l < width; ++l) lanes[l] += lanes[l + width];
    out[g] = lanes[0];
  }
}

// y[0:n] += c[0] x[0][0:n], then += c[1] x[1][0:n], ... (the same bits as K axpys in row order),
// with y loaded and stored once per 8 elements. x rows of dtype DT; next: kGroup rows to
// prefetch (see prefetch_rows), or none.
template <int DT, int K>
DK_INLINE void axpy_rows_k(const float* c, const typename Elem<DT>::T* const* x, float* y, int64_t n,
                           const RowsAhead<typename Elem<DT>::T>& next = {}) {
  alignas(64) float buf[DT == kFloat32 ? 1 : K][kChunk];
  F8 cv[K];
  for (int k = 0; k < K; ++k) cv[k] = splat8(c[k]);
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const int64_t len = std::min(kChunk, n - c0);
    const float* xs[K];
    chunk_views<DT, K>(x, c0, len, buf, xs);
    float* ys = y + c0;
    const int64_t full = len - len % 8;
    for (int64_t i = 0; i < full; i += 8) {
      if (i % 16 == 0) prefetch_rows<DT, kGroup>(next, c0 + i);
      F8 acc = load8(ys + i);
      for (int k = 0; k < K; ++k) acc += cv[k] * load8(xs[k] + i);
      store8(ys + i, acc);
    }
    for (int64_t i = full; i < len; ++i) {
      float acc = ys[i];
      for (int k = 0; k < K; ++k) acc += c[k] * xs[k][i];
      ys[i] = acc;
    }
  }
}

// axpy_rows_k for a run-time count k <= kGroup.
template <int DT>
DK_INLINE void axpy_rows(int k, const float* c, const typename Elem<DT>::T* const* x, float* y, int64_t n,
                         const RowsAhead<typename Elem<DT>::T>& next = {}) {
  static_assert(kGroup == 4, "axpy_rows dispatches counts 1..4");
  switch (k) {
    case 1: return axpy_rows_k<DT, 1>(c, x, y, n, next);
    case 2: return axpy_rows_k<DT, 2>(c, x, y, n, next);
    case 3: return axpy_rows_k<DT, 3>(c, x, y, n, next);
    case 4: return axpy_rows_k<DT, 4>(c, x, y, n, next);
    default: return;
  }
}

// y[0:n] += a * x[0:n] (one row).
template <int DT>
DK_INLINE void axpy_row(float a, const typename Elem<DT>::T* x, float* y, int64_t n) {
  axpy_rows_k<DT, 1>(&a, &x, y, n);
}

// y[0:n] += c[0] (s[0] x[0][0:n] - z[0:n]), then += c[1] (s[1] x[1][0:n] - z[0:n]), ... in row order:
// sums of rows about a centre z, subtracted element by element (a component the rows share with z
// cancels exactly instead of in the rounded sum). x rows of dtype DT; c, s, z float32.
template <int DT, int K>
DK_INLINE void centred_axpy_rows_k(const float* c, const float* s, const typename Elem<DT>::T* const* x,
                                   const float* z, float* y, int64_t n) {
  alignas(64) float buf[DT == kFloat32 ? 1 : K][kChunk];
  F8 cv[K], sv[K];
  for (int k = 0; k < K; ++k) {
    cv[k] = splat8(c[k]);
    sv[k] = splat8(s[k]);
  }
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const int64_t len = std::min(kChunk, n - c0);
    const float* xs[K];
    chunk_views<DT, K>(x, c0, len, buf, xs);
    float* ys = y + c0;
    const float* zs = z + c0;
    const int64_t full = len - len % 8;
    for (int64_t i = 0; i < full; i += 8) {
      F8 acc = load8(ys + i);
      const F8 zv = load8(zs + i);
      for (int k = 0; k < K; ++k) acc += cv[k] * (sv[k] * load8(xs[k] + i) - zv);
      store8(ys + i, acc);
    }
    for (int64_t i = full; i < len; ++i) {
      float acc = ys[i];
      for (int k = 0; k < K; ++k) acc += c[k] * (s[k] * xs[k][i] - zs[i]);
      ys[i] = acc;
    }
  }
}

// centred_axpy_rows_k for a run-time count k <= kGroup.
template <int DT>
DK_INLINE void centred_axpy_rows(int k, const float* c, const float* s, const typename Elem<DT>::T* const* x,
                                 const float* z, float* y, int64_t n) {
  static_assert(kGroup == 4, "centred_axpy_rows dispatches counts 1..4");
  switch (k) {
    case 1: return centred_axpy_rows_k<DT, 1>(c, s, x, z, y, n);
    case 2: return centred_axpy_rows_k<DT, 2>(c, s, x, z, y, n);
    case 3: return centred_axpy_rows_k<DT, 3>(c, s, x, z, y, n);
    case 4: return centred_axpy_rows_k<DT, 4>(c, s, x, z, y, n);
    default: return;
  }
}

// Blocks of reduction_block_tokens(N) tokens: out[j] = sum over blocks, in block order, of partial[blk][j].
inline void combine_partials(const float* partial, int64_t n_blocks, int64_t width, float* out) {
#pragma omp parallel for schedule(static)
  for (int64_t j = 0; j < width; ++j) {
    float acc = 0.0f;
    for (int64_t blk = 0; blk < n_blocks; ++blk) acc += partial[blk * width + j];
    out[j] = acc;
  }
}

// The nonzero terms of each side among a group of g <= kGroup rows starting at token t, in token
// order, as the side-sum axpys take them: coefficient (gate[k] * a[t+k]) * scale[t+k], where a null
// gate or scale stands for 1 (so the side sums and the gated sums share the same rounding order);
// with fold_scale false the coefficient is gate[k] * a[t+k] and the row's scale is kept apart.
template <typename T>
struct SideTerms {
  const T* pos_rows[kGroup];
  const T* neg_rows[kGroup];
  float pos_coef[kGroup], neg_coef[kGroup];
  float pos_scale[kGroup], neg_scale[kGroup];  // scale[t+k] of each term
  int n_pos = 0, n_neg = 0;
};

template <typename T>
DK_INLINE SideTerms<T> side_terms(int g, int64_t t, const T* const* rows, const float* a_pos, const float* a_neg,
                                  const float* scale, const float* gate_pos, const float* gate_neg,
                                  bool fold_scale = true) {
  SideTerms<T> s;
  for (int k = 0; k < g; ++k) {
    const int64_t tk = t + k;
    const float st = scale ? scale[tk] : 1.0f;
    const float fold = fold_scale ? st : 1.0f;
    if (a_pos[tk] != 0.0f) {
      s.pos_coef[s.n_pos] = (gate_pos ? gate_pos[k] * a_pos[tk] : a_pos[tk]) * fold;
      s.pos_scale[s.n_pos] = st;
      s.pos_rows[s.n_pos++] = rows[k];
    }
    if (a_neg[tk] != 0.0f) {
      s.neg_coef[s.n_neg] = (gate_neg ? gate_neg[k] * a_neg[tk] : a_neg[tk]) * fold;
      s.neg_scale[s.n_neg] = st;
      s.neg_rows[s.n_neg++] = rows[k];
    }
  }
  return s;
}

}  // namespace cpu
}  // namespace dk
