// FIPO's weights fused into the weighted dual-clip surrogate on the CPU (the cpp backend's
// clipped_surrogate_loss(..., credit="fipo")). OpenMP over groups of rows. A row is walked twice:
// backwards for the discounted future KL only (fipo_row.h's recurrence; kScanRows rows side by side,
// so that their serial double-precision chains overlap), written into the row of grad; then forwards
// by the surrogate's tiles, where each token's exp of the log-ratio serves both FIPO's safety clamp
// and drop count and the surrogate, its weight is formed as fipo_row forms it, and the future KL in
// grad is overwritten by the token's gradient. A dropped row is zeroed at its end. The metrics' row
// partials are reduced here too, in row order. Bit-equal to fipo_weights then clipped_surrogate on
// mask & keep with coef * weights (tests/test_fipo.py); masked tokens are never read.
#include <algorithm>
#include <vector>

#include "../common/surrogate_math.h"
#include "fipo_row.h"
#include "kernels.h"

namespace dk {
namespace cpu {
namespace {
constexpr int64_t kScanRows = 4;

// grad[r * T + t] = (float) F_t of rows [0, n) (n <= kScanRows) of the [n, T] block at row 0; padding unwritten.
void future_kl_rows(const float* logp, const float* old_logp, const uint8_t* mask, int64_t n, int64_t T,
                    const FipoParams& p, float* out) {
  double f[kScanRows] = {0.0, 0.0, 0.0, 0.0};
  for (int64_t t = T - 1; t >= 0; --t) {
    for (int64_t r = 0; r < kScanRows; ++r) {
      if (r >= n) break;
      const int64_t i = r * T + t;
      if (!mask[i]) {
        f[r] *= p.gamma;
        continue;
      }
      f[r] = future_kl_step(clamped_log_ratio(logp[i] - old_logp[i]), f[r], p);
      out[i] = static_cast<float>(f[r]);
    }
  }
}
}  // namespace

void fipo_surrogate(const float* logp, const float* old_logp, const float* adv, const uint8_t* mask,
                    const float* coef, const float* is_weight, int64_t B, int64_t T, double gamma, float log_clip_c,
                    float fipo_clip_c, float lower, float upper, bool clip_lower, float safety_thresh, float at_upper,
                    float at_lower, float clip_low, float clip_high, float clip_c, double* rows, float* grad,
                    uint8_t* keep, float* metrics) {
  const FipoParams p{gamma, log_clip_c, fipo_clip_c, lower, upper, clip_lower, safety_thresh, at_upper, at_lower};
  std::vector<FipoRowStats> stats(static_cast<size_t>(B));
  const int64_t groups = (B + kScanRows - 1) / kScanRows;
#pragma omp parallel for schedule(static)
  for (int64_t group = 0; group < groups; ++group) {
    const int64_t row0 = group * kScanRows, n = std::min(kScanRows, B - row0);
    future_kl_rows(logp + row0 * T, old_logp + row0 * T, mask + row0 * T, n, T, p, grad + row0 * T);
    for (int64_t row = row0; row < row0 + n; ++row) {
      const int64_t base = row * T;
      FipoRowStats s;  // in registers: grad's stores could alias stats[row]
      int64_t dropped = 0;
      double* out = rows + row * kStats;
      std::fill(out, out + kStats, 0.0);
      for (int64_t t0 = 0; t0 < T; t0 += kSurrogateTile) {
        double acc[kStats] = {0, 0, 0, 0, 0};
        const int64_t t_end = std::min(T, t0 + kSurrogateTile);
        for (int64_t i = base + t0; i < base + t_end; ++i) {
          if (!mask[i]) {
            grad[i] = 0.0f;
            continue;
          }
          const float diff = logp[i] - old_logp[i];
          const float ratio = std::exp(clamped_log_ratio(diff));
          float w = fipo_clipped_weight(grad[i], p);
          if (adv[i] < 0.0f) {
            if (ratio > p.safety_thresh) w = std::min(std::max(w, 0.8f), 1.0f);
            dropped += ratio > p.clip_c;
          }
          ++s.count;
          s.w_sum += w;
          s.w_min = std::min(s.w_min, w);
          s.w_max = std::max(s.w_max, w);
          s.at_bound += (w >= p.at_upper) | (w <= p.at_lower);
          const float cw = coef != nullptr ? coef[i] * w : w;
          surrogate_add(i, surrogate_token_at(diff, ratio, adv[i] * cw, clip_low, clip_high, clip_c), is_weight,
                        grad, acc);
        }
        for (int k = 0; k < kStats; ++k) out[k] += acc[k];
      }
      stats[row] = s;
      keep[row] = dropped <= 1;
      if (!keep[row]) {  // a dropped row leaves the loss: its tokens are padding to the surrogate
        std::fill(grad + base, grad + base + T, 0.0f);
        std::fill(out, out + kStats, 0.0);
      }
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
