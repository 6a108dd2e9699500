// Side sums of token vectors: sums [2, D] = (sum_t a_pos[t] v[t], sum_t a_neg[t] v[t]), one read of v.
// With scale [N], v[t] = scale[t] x[t] (the vectors of hidden states, not materialised).
#include <algorithm>
#include <vector>

#include "kernels.h"
#include "row_ops.h"

namespace dk {
namespace cpu {
namespace {

template <int DT>
void side_sums_impl(const void* v_, const float* scale, const float* a_pos, const float* a_neg, int64_t N, int64_t D, float* sums) {
  const auto* v = static_cast<const typename Elem<DT>::T*>(v_);
  const int64_t block = reduction_block(N);
  const int64_t n_blocks = (N + block - 1) / block;
  std::vector<float> partial(static_cast<size_t>(std::max<int64_t>(n_blocks, 1) * 2 * D), 0.0f);
#pragma omp parallel for schedule(static)
  for (int64_t blk = 0; blk < n_blocks; ++blk) {
    float* ps = partial.data() + blk * 2 * D;
    float* ns = ps + D;
    const int64_t t_end = std::min(N, (blk + 1) * block);
    for (int64_t t = blk * block; t < t_end; ++t) {
      const float st = scale ? scale[t] : 1.0f;
      if (a_pos[t] != 0.0f) axpy_row<DT>(a_pos[t] * st, v + t * D, ps, D);
      if (a_neg[t] != 0.0f) axpy_row<DT>(a_neg[t] * st, v + t * D, ns, D);
    }
  }
  combine_partials(partial.data(), n_blocks, 2 * D, sums);
}

}  // namespace

void side_sums(int dtype, const void* v, const float* scale, const float* a_pos, const float* a_neg, int64_t N, int64_t D, float* sums) {
  switch (dtype) {
    case kFloat32: return side_sums_impl<kFloat32>(v, scale, a_pos, a_neg, N, D, sums);
    case kBFloat16: return side_sums_impl<kBFloat16>(v, scale, a_pos, a_neg, N, D, sums);
    default: return side_sums_impl<kFloat16>(v, scale, a_pos, a_neg, N, D, sums);
  }
}

}  // namespace cpu
}  // namespace dk
