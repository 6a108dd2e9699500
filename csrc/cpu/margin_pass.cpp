// Margins of a discriminator, m[t] = 2 (v[t].w + b), and optionally the gated side sums
//   sums = (sum_t sigmoid(m[t]/gamma+) a_pos[t] v[t], sum_t sigmoid(-m[t]/gamma-) a_neg[t] v[t]),
// in one read of v (each row is dotted, then added while it is still in cache). With scale [N]
// the vectors are v[t] = scale[t] x[t] and are never materialised.
#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels.h"
#include "row_ops.h"

namespace dk {
namespace cpu {
namespace {

inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

// 2 (v[t].w + b) with v[t] = scale[t] x[t] (scale null: v = x).
template <int DT>
inline float margin(const typename Elem<DT>::T* row, const float* scale, int64_t t, const float* w, int64_t D,
                    float bias) {
  const float dot = dot_row<DT>(row, w, D);
  return 2.0f * ((scale ? scale[t] * dot : dot) + bias);
}

template <int DT>
void margin_pass_impl(const void* v_, const float* scale, const float* w, const float* b, int64_t N, int64_t D,
                      const float* gamma,
                      const float* a_pos, const float* a_neg, float* m, float* sums) {
  const auto* v = static_cast<const typename Elem<DT>::T*>(v_);
  const float bias = *b;
  if (gamma == nullptr) {
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < N; ++t) m[t] = margin<DT>(v + t * D, scale, t, w, D, bias);
    return;
  }
  const float gp = gamma[0], gn = gamma[1];
  const int64_t block = reduction_block(N);
  const int64_t n_blocks = (N + block - 1) / block;
  std::vector<float> partial(static_cast<size_t>(std::max<int64_t>(n_blocks, 1) * 2 * D), 0.0f);
#pragma omp parallel for schedule(static)
  for (int64_t blk = 0; blk < n_blocks; ++blk) {
    float* ps = partial.data() + blk * 2 * D;
    float* ns = ps + D;
    const int64_t t_end = std::min(N, (blk + 1) * block);
    for (int64_t t = blk * block; t < t_end; ++t) {
      const auto* row = v + t * D;
      const float mt = margin<DT>(row, scale, t, w, D, bias);
      m[t] = mt;
      const float st = scale ? scale[t] : 1.0f;
      if (a_pos[t] != 0.0f) axpy_row<DT>(sigmoid(mt / gp) * a_pos[t] * st, row, ps, D);
      if (a_neg[t] != 0.0f) axpy_row<DT>(sigmoid(-mt / gn) * a_neg[t] * st, row, ns, D);
    }
  }
  combine_partials(partial.data(), n_blocks, 2 * D, sums);
}

}  // namespace

void margin_pass(int dtype, const void* v, const float* scale, const float* w, const float* b, int64_t N, int64_t D, const float* gamma,
                 const float* a_pos, const float* a_neg, float* m, float* sums) {
  switch (dtype) {
    case kFloat32: return margin_pass_impl<kFloat32>(v, scale, w, b, N, D, gamma, a_pos, a_neg, m, sums);
    case kBFloat16: return margin_pass_impl<kBFloat16>(v, scale, w, b, N, D, gamma, a_pos, a_neg, m, sums);
    default: return margin_pass_impl<kFloat16>(v, scale, w, b, N, D, gamma, a_pos, a_neg, m, sums);
  }
}

}  // namespace cpu
}  // namespace dk
