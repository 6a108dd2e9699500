// Phase C on the CPU: the weighted dual-clip surrogate's per-row partial sums (the columns of
// delta_kernels/aggregation.py STATS) and each token's w d l / d logp, in one pass over [B, T].
// The aggregation (verl's agg_loss) and the row weights of the backward are formed in Python.
// Sums run over fixed tiles of a row (kSurrogateTile tokens), in double, combined in tile order.
#include <algorithm>
#include <vector>

#include "../common/surrogate_math.h"
#include "kernels.h"

namespace dk {
namespace cpu {
void clipped_surrogate(const float* logp, const float* old_logp, const float* adv, const uint8_t* mask,
                       const float* coef, const float* is_weight, int64_t B, int64_t T, float clip_low,
                       float clip_high, float clip_c, double* rows, float* grad) {
  const int64_t tiles = std::max<int64_t>((T + kSurrogateTile - 1) / kSurrogateTile, 1);
  std::vector<double> partial(static_cast<size_t>(B * tiles * kStats), 0.0);
#pragma omp parallel for schedule(static)
  for (int64_t job = 0; job < B * tiles; ++job) {
    const int64_t row = job / tiles, tile = job % tiles;
    double acc[kStats] = {0, 0, 0, 0, 0};
    const int64_t t_end = std::min(T, (tile + 1) * kSurrogateTile);
    for (int64_t c = tile * kSurrogateTile; c < t_end; ++c)
      surrogate_accumulate(row * T + c, logp, old_logp, adv, mask, coef, is_weight, clip_low, clip_high, clip_c,
                           grad, acc);
    std::copy(acc, acc + kStats, partial.data() + job * kStats);
  }
  for (int64_t row = 0; row < B; ++row) {
    double* out = rows + row * kStats;
    std::fill(out, out + kStats, 0.0);
    for (int64_t tile = 0; tile < tiles; ++tile)
      for (int s = 0; s < kStats; ++s) out[s] += partial[(row * tiles + tile) * kStats + s];
  }
}

}  // namespace cpu
}  // namespace dk
