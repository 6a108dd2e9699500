// Side sums of token vectors: sums [2, D] = (sum_t a_pos[t] v[t], sum_t a_neg[t] v[t]), one read of v.
// With scale [N], v[t] = scale[t] x[t] (the vectors of hidden states, not materialised). Rows are
// taken kGroup at a time and each side's nonzero terms added in token order.
#include <cstdlib>
#include <cstring>

#include "kernels.h"
#include "pass_blocks.h"
#include "row_ops.h"

namespace dk {
namespace cpu {

int simd_level() {
  static const int level = [] {
    const char* env = std::getenv("DELTA_KERNELS_CPU_SIMD");
    if (env != nullptr && std::strcmp(env, "baseline") == 0) return 0;
    return __builtin_cpu_supports("avx2") ? 1 : 0;
  }();
  return level;
}

namespace {

struct SideArgs {
  const void* v;
  RowStrides rs;       // where v's rows live
  const float* scale;  // null: v as stored
  const float* a_pos;
  const float* a_neg;
  int64_t D;
  int64_t N;
};

template <int DT>
DK_INLINE void side_block(const SideArgs& a, int64_t t0, int64_t t1, float* ps, float* ns) {
  using T = typename Elem<DT>::T;
  const T* v = static_cast<const T*>(a.v);
  for (int64_t t = t0; t < t1; t += kGroup) {
    const int g = static_cast<int>(std::min<int64_t>(kGroup, t1 - t));
    const T* rows[kGroup];
    for (int k = 0; k < g; ++k) rows[k] = v + a.rs.offset(t + k);
    const SideTerms<T> st = side_terms<T>(g, t, rows, a.a_pos, a.a_neg, a.scale, nullptr, nullptr);
    // Prefetch the next group while this one is added (by the first nonempty side's axpy).
    const RowsAhead<T> next = rows_ahead(v, a.rs, t + kPrefetchGroups * kGroup, a.N);
    axpy_rows<DT>(st.n_pos, st.pos_coef, st.pos_rows, ps, a.D, next);
    axpy_rows<DT>(st.n_neg, st.neg_coef, st.neg_rows, ns, a.D, st.n_pos > 0 ? RowsAhead<T>{} : next);
  }
}

template <int DT>
void side_block_base(const SideArgs& a, int64_t t0, int64_t t1, float* ps, float* ns) {
  side_block<DT>(a, t0, t1, ps, ns);
}
template <int DT>
DK_AVX2 void side_block_avx2(const SideArgs& a, int64_t t0, int64_t t1, float* ps, float* ns) {
  side_block<DT>(a, t0, t1, ps, ns);
}

template <int DT>
void side_sums_impl(const SideArgs& a, int64_t N, float* sums) {
  auto* fn = simd_level() == 1 ? side_block_avx2<DT> : side_block_base<DT>;
  run_reduction_blocks(N, 2, a.D, sums, [&](int64_t t0, int64_t t1, float* partial) {
    fn(a, t0, t1, partial, partial + a.D + kSidePad);
  });
}

}  // namespace

void side_sums(int dtype, const void* v, const RowStrides& rows, const float* scale, const float* a_pos,
               const float* a_neg, int64_t N, int64_t D, float* sums) {
  const SideArgs a{v, rows, scale, a_pos, a_neg, D, N};
  switch (dtype) {
    case kFloat32: return side_sums_impl<kFloat32>(a, N, sums);
    case kBFloat16: return side_sums_impl<kBFloat16>(a, N, sums);
    default: return side_sums_impl<kFloat16>(a, N, sums);
  }
}

}  // namespace cpu
}  // namespace dk
