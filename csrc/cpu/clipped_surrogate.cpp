// Phase C on the CPU: the weighted dual-clip surrogate, its aggregation (verl's agg_loss), the
// metrics and d loss / d logp, in one pass over [B, T] plus a scaling pass for the gradient.
// Sums run over fixed tiles of a row (kTile tokens), in double, combined in tile then row order.
#include <algorithm>
#include <vector>

#include "../common/surrogate_math.h"
#include "kernels.h"

namespace dk {
namespace cpu {
namespace {
constexpr int64_t kTile = 1024;
}  // namespace

void clipped_surrogate(const float* logp, const float* old_logp, const float* adv, const uint8_t* mask,
                       const float* coef, int64_t B, int64_t T, float clip_low, float clip_high, float clip_c,
                       int agg, float* out, float* grad) {
  const int64_t tiles = std::max<int64_t>((T + kTile - 1) / kTile, 1);
  std::vector<double> partial(static_cast<size_t>(B * tiles * kStats), 0.0);
#pragma omp parallel for schedule(static)
  for (int64_t job = 0; job < B * tiles; ++job) {
    const int64_t row = job / tiles, tile = job % tiles;
    double acc[kStats] = {0, 0, 0, 0, 0};
    const int64_t t_end = std::min(T, (tile + 1) * kTile);
    for (int64_t c = tile * kTile; c < t_end; ++c)
      surrogate_accumulate(row * T + c, logp, old_logp, adv, mask, coef, clip_low, clip_high, clip_c, grad, acc);
    std::copy(acc, acc + kStats, partial.data() + job * kStats);
  }
  // Rows in order: row sums from their tiles, then the totals.
  std::vector<double> row_loss(static_cast<size_t>(B)), row_valid(static_cast<size_t>(B));
  double total[kStats] = {0, 0, 0, 0, 0};
  for (int64_t row = 0; row < B; ++row) {
    double rs[kStats] = {0, 0, 0, 0, 0};
    for (int64_t tile = 0; tile < tiles; ++tile)
      for (int s = 0; s < kStats; ++s) rs[s] += partial[(row * tiles + tile) * kStats + s];
    for (int s = 0; s < kStats; ++s) total[s] += rs[s];
    row_loss[row] = rs[kStatLoss];
    row_valid[row] = rs[kStatValid];
  }
  const double n = std::max(total[kStatValid], 1.0);
  double loss = 0.0;
  if (agg == kTokenMean) {
    loss = total[kStatLoss] / n;
  } else if (agg == kSeqMeanTokenMean) {
    for (int64_t row = 0; row < B; ++row) loss += row_loss[row] / std::max(row_valid[row], 1.0);
    loss /= static_cast<double>(B);
  } else {
    loss = total[kStatLoss] / static_cast<double>(agg == kSeqMeanTokenSum ? B : T);
  }
  out[0] = static_cast<float>(loss);
  out[1] = static_cast<float>(total[kStatClip] / n);
  out[2] = static_cast<float>(total[kStatClipLower] / n);
  out[3] = static_cast<float>(total[kStatKl] / n);
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < B; ++row) {
    const float w = surrogate_row_weight(agg, static_cast<float>(total[kStatValid]), static_cast<float>(row_valid[row]), B, T);
    float* g = grad + row * T;
    for (int64_t c = 0; c < T; ++c) g[c] *= w;
  }
}

}  // namespace cpu
}  // namespace dk
