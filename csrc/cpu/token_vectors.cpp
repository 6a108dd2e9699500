// Phase A on the CPU: token-gradient vectors (or their sketch) and the side sums, one read of h.
#include <algorithm>
#include <cmath>
#include <vector>

#include <omp.h>

#include "../common/sketch_hash.h"
#include "kernels.h"
#include "row_ops.h"

namespace dk {
namespace cpu {

int64_t reduction_block_tokens(int64_t n_tokens) { return std::max<int64_t>(64, (n_tokens + 1023) / 1024); }

void sketch_matrix(float* out, int64_t H, int64_t r, uint32_t seed) {
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(r)));
  const uint32_t s = mix32(seed);
  std::vector<uint32_t> cols(r);
  for (int64_t j = 0; j < r; ++j) cols[j] = sketch_col_key(static_cast<uint32_t>(j));
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < H; ++i) {
    const uint32_t a = sketch_row_key(s, static_cast<uint32_t>(i));
    float* row = out + i * r;
    for (int64_t j = 0; j < r; ++j) row[j] = sketch_sign(a, cols[j]) * scale;
  }
}

namespace {

constexpr int64_t kSketchGroup = 4;  // tokens that share each read of a row of R
constexpr int64_t kPanel = 8;        // sketch columns accumulated in registers at a time

// R [H, r] row-major -> column panels of kPanel columns, each [H, kPanel] contiguous.
std::vector<float> pack_panels(const float* R, int64_t H, int64_t r) {
  const int64_t n_panels = (r + kPanel - 1) / kPanel;
  std::vector<float> out(static_cast<size_t>(n_panels * H * kPanel), 0.0f);
  for (int64_t p = 0; p < n_panels; ++p)
    for (int64_t i = 0; i < H; ++i)
      for (int64_t c = 0; c < kPanel && p * kPanel + c < r; ++c) out[(p * H + i) * kPanel + c] = R[i * r + p * kPanel + c];
  return out;
}

// z[k][j] = sum_i v[k][i] R[i][j] for g <= kSketchGroup rows of v ([g, H] float32), summed in i
// order with one accumulator per (k, j) (a multiply then an add, as every target computes it): the
// same bits as the plain triple loop, with kSketchGroup x kPanel accumulators in registers and R
// streamed once per token group. Compiled for SSE2 and AVX2 like the row passes (row_ops.h).
DK_INLINE void sketch_group(const float* __restrict__ v, int64_t g, int64_t H, const float* __restrict__ panels,
                            int64_t r, float* __restrict__ z) {
  const int64_t n_panels = (r + kPanel - 1) / kPanel;
  for (int64_t p = 0; p < n_panels; ++p) {
    const float* __restrict__ P = panels + p * H * kPanel;
    alignas(32) float acc[kSketchGroup][kPanel] = {};
    if (g == kSketchGroup) {
      F8 a0 = {}, a1 = {}, a2 = {}, a3 = {};
      const float *v0 = v, *v1 = v + H, *v2 = v + 2 * H, *v3 = v + 3 * H;
      for (int64_t i = 0; i < H; ++i) {
        const F8 pi = load8(P + i * kPanel);
        a0 += v0[i] * pi;
        a1 += v1[i] * pi;
        a2 += v2[i] * pi;
        a3 += v3[i] * pi;
      }
      store8(acc[0], a0), store8(acc[1], a1), store8(acc[2], a2), store8(acc[3], a3);
    } else {
      for (int64_t i = 0; i < H; ++i) {
        const float* pi = P + i * kPanel;
        for (int64_t k = 0; k < g; ++k)
          for (int64_t c = 0; c < kPanel; ++c) acc[k][c] += v[k * H + i] * pi[c];
      }
    }
    const int64_t cols = std::min(kPanel, r - p * kPanel);
    for (int64_t k = 0; k < g; ++k)
      for (int64_t c = 0; c < cols; ++c) z[k * r + p * kPanel + c] = acc[k][c];
  }
}

void sketch_group_base(const float* v, int64_t g, int64_t H, const float* panels, int64_t r, float* z) {
  sketch_group(v, g, H, panels, r, z);
}
DK_AVX2 void sketch_group_avx2(const float* v, int64_t g, int64_t H, const float* panels, int64_t r, float* z) {
  sketch_group(v, g, H, panels, r, z);
}

template <int DT>
void token_vectors_impl(const void* hidden_, const RowStrides& rs, const float* logp, const float* a_pos, const float* a_neg, int64_t N,
                        int64_t H, int64_t r, uint32_t seed, bool out_f32, void* out_, float* sums) {
  using E = Elem<DT>;
  const auto* hidden = static_cast<const typename E::T*>(hidden_);
  auto* out = static_cast<typename E::T*>(out_);
  const int64_t D = r > 0 ? r : H;
  std::vector<float> panels;  // R in column panels of kPanel: panels[p][i][0:kPanel], zero-padded
  if (r > 0) {
    std::vector<float> R(static_cast<size_t>(H * r));
    sketch_matrix(R.data(), H, r, seed);
    panels = pack_panels(R.data(), H, r);
  }
  auto* sketch_fn = simd_level() == 1 ? sketch_group_avx2 : sketch_group_base;
  const int64_t block = reduction_block_tokens(N);
  const int64_t n_blocks = (N + block - 1) / block;
  std::vector<float> partial(static_cast<size_t>(std::max<int64_t>(n_blocks, 1) * 2 * D), 0.0f);
  // Scratch rows of every thread, allocated here (an allocation failure inside the parallel
  // region could not leave it: std::bad_alloc reaches Python as MemoryError from here) and
  // bounded by the work: no more threads than token blocks.
  const int n_threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(omp_get_max_threads(), n_blocks)));
  const size_t v_len = static_cast<size_t>(kSketchGroup * H), z_len = static_cast<size_t>(kSketchGroup * D);
  std::vector<float> scratch(static_cast<size_t>(n_threads) * (v_len + z_len));
#pragma omp parallel num_threads(n_threads)
  {
    // vrow: kSketchGroup rows of v (float32); zrow: their sketches.
    float* vrow = scratch.data() + static_cast<size_t>(omp_get_thread_num()) * (v_len + z_len);
    float* zrow = vrow + v_len;
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < n_blocks; ++blk) {
      float* ps = partial.data() + blk * 2 * D;
      float* ns = ps + D;
      const int64_t t_end = std::min(N, (blk + 1) * block);
      for (int64_t t0 = blk * block; t0 < t_end; t0 += kSketchGroup) {
        const int64_t g = std::min(kSketchGroup, t_end - t0);
        for (int64_t k = 0; k < g; ++k) {
          const float s = -std::expm1(logp[t0 + k]);
          const auto* hrow = hidden + rs.offset(t0 + k);
          float* vk = vrow + k * H;
          if constexpr (DT == kFloat32) {
            for (int64_t i = 0; i < H; ++i) vk[i] = s * hrow[i];
          } else {
            for (int64_t c0 = 0; c0 < H; c0 += kChunk) {
              const int64_t len = std::min(kChunk, H - c0);
              load_chunk<DT>(hrow + c0, len, vk + c0);
              for (int64_t i = c0; i < c0 + len; ++i) vk[i] *= s;
            }
          }
        }
        const float* rows = vrow;
        if (r > 0) {
          sketch_fn(vrow, g, H, panels.data(), r, zrow);
          rows = zrow;
        }
        for (int64_t k = 0; k < g; ++k) {
          const int64_t t = t0 + k;
          const float* row = rows + k * D;
          if (out_f32) {
            std::copy(row, row + D, static_cast<float*>(out_) + t * D);
          } else {
            auto* dst = out + t * D;
            for (int64_t j = 0; j < D; ++j) E::store(dst, j, row[j]);
          }
          if (a_pos[t] != 0.0f) axpy_row<kFloat32>(a_pos[t], row, ps, D);
          if (a_neg[t] != 0.0f) axpy_row<kFloat32>(a_neg[t], row, ns, D);
        }
      }
    }
  }
  combine_partials(partial.data(), n_blocks, 2 * D, sums);
}

}  // namespace

void token_vectors(int dtype, const void* hidden, const RowStrides& rows, const float* logp, const float* a_pos,
                   const float* a_neg, int64_t N, int64_t H, int64_t r, uint32_t seed, bool out_f32, void* out,
                   float* sums) {
  switch (dtype) {
    case kFloat32:
      return token_vectors_impl<kFloat32>(hidden, rows, logp, a_pos, a_neg, N, H, r, seed, out_f32, out, sums);
    case kBFloat16:
      return token_vectors_impl<kBFloat16>(hidden, rows, logp, a_pos, a_neg, N, H, r, seed, out_f32, out, sums);
    default:
      return token_vectors_impl<kFloat16>(hidden, rows, logp, a_pos, a_neg, N, H, r, seed, out_f32, out, sums);
  }
}

}  // namespace cpu
}  // namespace dk
