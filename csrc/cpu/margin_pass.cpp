// Margins of a discriminator, m[t] = 2 (v[t] - c).w with c the centroids' midpoint (subtracted
// element by element: exact under an offset the vectors share), and optionally the gated side sums
// about c: sums = (sum_t sigmoid(m[t]/gamma+) a_pos[t] (v[t] - c), sum_t sigmoid(-m[t]/gamma-) a_neg[t] (v[t] - c)),
// in one read of v: rows are dotted kGroup at a time (several streams in flight), then the
// group's nonzero terms are added to the block's partial sums while the rows are still in cache.
// With scale [N] the vectors are v[t] = scale[t] x[t] and are never materialised.
#include <cmath>

#include "kernels.h"
#include "pass_blocks.h"
#include "row_ops.h"

namespace dk {
namespace cpu {
namespace {

inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

struct MarginArgs {
  const void* v;
  RowStrides rs;       // where v's rows live
  const float* scale;  // null: v as stored
  const float* w;
  const float* centre;  // c [D]
  int64_t D;
  float gamma_pos, gamma_neg;
  const float* a_pos;
  const float* a_neg;
  float* m;
  int64_t N;
};

// Tokens [t0, t1): margins, and with Gated the gated sums added to ps / ns ([D] each).
template <int DT, bool Gated>
DK_INLINE void margin_block(const MarginArgs& a, int64_t t0, int64_t t1, float* ps, float* ns) {
  using T = typename Elem<DT>::T;
  const T* v = static_cast<const T*>(a.v);
  const int64_t D = a.D;
  for (int64_t t = t0; t < t1; t += kGroup) {
    const int g = static_cast<int>(std::min<int64_t>(kGroup, t1 - t));
    const T* rows[kGroup];
    float dot[kGroup], s[kGroup];
    for (int k = 0; k < g; ++k) {
      rows[k] = v + a.rs.offset(t + k);
      s[k] = a.scale ? a.scale[t + k] : 1.0f;
    }
    if (g == kGroup) {
      centered_dot_rows<DT, kGroup>(rows, s, a.centre, a.w, D, dot,
                                    rows_ahead(v, a.rs, t + kPrefetchGroups * kGroup, a.N));
    } else {
      for (int k = 0; k < g; ++k) centered_dot_rows<DT, 1>(rows + k, s + k, a.centre, a.w, D, dot + k);
    }
    float mt[kGroup];
    for (int k = 0; k < g; ++k) {
      mt[k] = 2.0f * dot[k];
      a.m[t + k] = mt[k];
    }
    if constexpr (Gated) {
      // The group's terms of each side, in token order (the same bits as one axpy per token).
      float gp[kGroup], gn[kGroup];
      for (int k = 0; k < g; ++k) {
        gp[k] = a.a_pos[t + k] != 0.0f ? sigmoid(mt[k] / a.gamma_pos) : 0.0f;  // only the terms side_terms keeps
        gn[k] = a.a_neg[t + k] != 0.0f ? sigmoid(-mt[k] / a.gamma_neg) : 0.0f;
      }
      const SideTerms<T> st = side_terms<T>(g, t, rows, a.a_pos, a.a_neg, a.scale, gp, gn, /*fold_scale=*/false);
      centred_axpy_rows<DT>(st.n_pos, st.pos_coef, st.pos_scale, st.pos_rows, a.centre, ps, D);
      centred_axpy_rows<DT>(st.n_neg, st.neg_coef, st.neg_scale, st.neg_rows, a.centre, ns, D);
    }
  }
}

template <int DT, bool Gated>
void margin_block_base(const MarginArgs& a, int64_t t0, int64_t t1, float* ps, float* ns) {
  margin_block<DT, Gated>(a, t0, t1, ps, ns);
}
template <int DT, bool Gated>
DK_AVX2 void margin_block_avx2(const MarginArgs& a, int64_t t0, int64_t t1, float* ps, float* ns) {
  margin_block<DT, Gated>(a, t0, t1, ps, ns);
}

template <int DT>
void margin_pass_impl(const MarginArgs& a, int64_t N, bool gated, float* sums) {
  const bool avx2 = simd_level() == 1;
  if (!gated) {
    auto* fn = avx2 ? margin_block_avx2<DT, false> : margin_block_base<DT, false>;
    // Per-token results only: any split and schedule give the same bits.
    const int64_t block = reduction_block_tokens(N);
    const int64_t n_blocks = (N + block - 1) / block;
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t blk = 0; blk < n_blocks; ++blk) fn(a, blk * block, std::min(N, (blk + 1) * block), nullptr, nullptr);
    return;
  }
  auto* fn = avx2 ? margin_block_avx2<DT, true> : margin_block_base<DT, true>;
  run_reduction_blocks(N, 2, a.D, sums, [&](int64_t t0, int64_t t1, float* partial) {
    fn(a, t0, t1, partial, partial + a.D + kSidePad);
  });
}

}  // namespace

void margin_pass(int dtype, const void* v, const RowStrides& rows, const float* scale, const float* w, const float* c,
                 int64_t N, int64_t D, const float* gamma, const float* a_pos, const float* a_neg, float* m,
                 float* sums) {
  const bool gated = gamma != nullptr;
  const MarginArgs a{v, rows, scale, w, c, D, gated ? gamma[0] : 1.0f, gated ? gamma[1] : 1.0f, a_pos, a_neg, m, N};
  switch (dtype) {
    case kFloat32: return margin_pass_impl<kFloat32>(a, N, gated, sums);
    case kBFloat16: return margin_pass_impl<kBFloat16>(a, N, gated, sums);
    default: return margin_pass_impl<kFloat16>(a, N, gated, sums);
  }
}

}  // namespace cpu
}  // namespace dk
