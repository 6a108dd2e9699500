// FIPO's weights fused into the weighted dual-clip surrogate on the CPU (the cpp backend's
// clipped_surrogate_loss(..., credit="fipo")). OpenMP over rows; a row is walked backwards once for
// its weights (fipo_row.h, written into the row of grad, still in cache) and then forwards by the
// surrogate's tiles, which read each weight back and overwrite it with the token's gradient. The
// metrics' row partials are reduced here too, in row order. Masked tokens are never read.
#include <algorithm>
#include <vector>

#include "../common/surrogate_math.h"
#include "fipo_row.h"
#include "kernels.h"

namespace dk {
namespace cpu {

void fipo_surrogate(const float* logp, const float* old_logp, const float* adv, const uint8_t* mask,
                    const float* coef, const float* is_weight, int64_t B, int64_t T, double gamma, float log_clip_c,
                    float fipo_clip_c, float lower, float upper, bool clip_lower, float safety_thresh, float at_upper,
                    float at_lower, float clip_low, float clip_high, float clip_c, double* rows, float* grad,
                    uint8_t* keep, float* metrics) {
  const FipoParams p{gamma, log_clip_c, fipo_clip_c, lower, upper, clip_lower, safety_thresh, at_upper, at_lower};
  std::vector<FipoRowStats> stats(static_cast<size_t>(B));
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < B; ++row) {
    const int64_t base = row * T;
    float* g = grad + base;  // the row's weights until the surrogate overwrites them
    const bool kept = fipo_row(logp + base, old_logp + base, adv + base, mask + base, T, p, g, nullptr, stats[row]);
    keep[row] = kept;
    double* out = rows + row * kStats;
    std::fill(out, out + kStats, 0.0);
    if (!kept) {  // a dropped row leaves the loss: its tokens are padding to the surrogate
      std::fill(g, g + T, 0.0f);
      continue;
    }
    for (int64_t t0 = 0; t0 < T; t0 += kSurrogateTile) {
      double acc[kStats] = {0, 0, 0, 0, 0};
      const int64_t t_end = std::min(T, t0 + kSurrogateTile);
      for (int64_t i = base + t0; i < base + t_end; ++i) {
        if (!mask[i]) continue;  // grad is already 0 there
        const float w = coef != nullptr ? coef[i] * grad[i] : grad[i];
        surrogate_accumulate_valid(i, adv[i] * w, logp, old_logp, is_weight, clip_low, clip_high, clip_c, grad, acc);
      }
      for (int s = 0; s < kStats; ++s) out[s] += acc[s];
    }
  }
  int64_t count = 0, at_bound = 0, dropped = 0;
  double w_sum = 0.0;
  float w_min = std::numeric_limits<float>::infinity(), w_max = -w_min;
  for (int64_t row = 0; row < B; ++row) {
    const FipoRowStats& s = stats[row];
    count += s.count;
    at_bound += s.at_bound;
    dropped += !keep[row];
    w_sum += static_cast<float>(s.w_sum);  // the row sum in float32, as fipo_weights' row_stats hold it
    w_min = std::min(w_min, s.w_min);
    w_max = std::max(w_max, s.w_max);
  }
  const float n = static_cast<float>(std::max<int64_t>(count, 1));
  metrics[0] = static_cast<float>(w_sum) / n;
  metrics[1] = count > 0 ? w_min : 0.0f;
  metrics[2] = count > 0 ? w_max : 0.0f;
  metrics[3] = static_cast<float>(dropped);
  metrics[4] = static_cast<float>(at_bound) / n;
}

}  // namespace cpu
}  // namespace dk
