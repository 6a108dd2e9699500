// FIPO's future-KL influence weights on the CPU (delta_kernels/credit/fipo.py; the float64
// reference is delta_kernels/reference/fipo.py). OpenMP over rows; each row is read once, backwards:
// the discounted sum F_t = x_t + gamma F_{t+1} accumulated in double, the weights, and the count
// of dual-clipped negative tokens that decides keep, and the row's metric partials. Masked tokens
// are never read.
#include <algorithm>
#include <cmath>
#include <limits>

#include "kernels.h"

namespace dk {
namespace cpu {
namespace {
inline float log_ratio(const float* logp, const float* old_logp, int64_t i) {
  return std::min(std::max(logp[i] - old_logp[i], -20.0f), 20.0f);
}
}  // namespace

void fipo_weights(const float* logp, const float* old_logp, const float* adv, const uint8_t* mask, int64_t B,
                  int64_t T, double gamma, float log_clip_c, float clip_c, float lower, float upper,
                  bool clip_lower, float safety_thresh, float at_upper, float at_lower, float* weights,
                  float* future_kl, uint8_t* keep, float* row_stats) {
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < B; ++row) {
    const int64_t base = row * T;
    int64_t dropped = 0, count = 0, at_bound = 0;
    double f_next = 0.0, w_sum = 0.0;
    float w_min = std::numeric_limits<float>::infinity(), w_max = -w_min;
    for (int64_t t = T - 1; t >= 0; --t) {
      const int64_t i = base + t;
      if (!mask[i]) {  // padding adds nothing: F passes through it, discounted
        f_next *= gamma;
        weights[i] = 0.0f;
        future_kl[i] = 0.0f;
        continue;
      }
      const float d = log_ratio(logp, old_logp, i);
      f_next = (d <= log_clip_c ? static_cast<double>(d) : 0.0) + gamma * f_next;
      const float fkl = static_cast<float>(f_next);
      float w = std::exp(fkl);
      w = clip_lower ? std::min(std::max(w, lower), upper) : std::min(w, upper);
      if (adv[i] < 0.0f) {  // the ratio matters only here
        const float ratio = std::exp(d);
        if (ratio > safety_thresh) w = std::min(std::max(w, 0.8f), 1.0f);
        dropped += ratio > clip_c;
      }
      weights[i] = w;
      future_kl[i] = fkl;
      ++count;
      w_sum += w;
      w_min = std::min(w_min, w);
      w_max = std::max(w_max, w);
      at_bound += (w >= at_upper) | (w <= at_lower);
    }
    keep[row] = dropped <= 1;
    float* stats = row_stats + row * 5;
    stats[0] = static_cast<float>(count);
    stats[1] = static_cast<float>(w_sum);
    stats[2] = w_min;
    stats[3] = w_max;
    stats[4] = static_cast<float>(at_bound);
  }
}

}  // namespace cpu
}  // namespace dk
