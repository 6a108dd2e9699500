// FIPO's future-KL influence weights on the CPU (delta_kernels/credit/fipo.py; the float64
// reference is delta_kernels/reference/fipo.py). OpenMP over rows; each row is read once, backwards:
// the discounted sum F_t = x_t + gamma F_{t+1} accumulated in double, the weights, and the count
// of dual-clipped negative tokens that decides keep. Masked tokens are never read.
#include <algorithm>
#include <cmath>

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
                  bool clip_lower, float safety_thresh, float* weights, float* future_kl, uint8_t* keep) {
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < B; ++row) {
    const int64_t base = row * T;
    int64_t dropped = 0;
    double f_next = 0.0;
    for (int64_t t = T - 1; t >= 0; --t) {
      const int64_t i = base + t;
      if (!mask[i]) {  // padding adds nothing: F passes through it, discounted
        f_next *= gamma;
        weights[i] = 0.0f;
        future_kl[i] = 0.0f;
        continue;
      }
      const float d = log_ratio(logp, old_logp, i);
      const float ratio = std::exp(d);
      f_next = (d <= log_clip_c ? static_cast<double>(d) : 0.0) + gamma * f_next;
      const float fkl = static_cast<float>(f_next);
      float w = std::exp(fkl);
      w = clip_lower ? std::min(std::max(w, lower), upper) : std::min(w, upper);
      if (adv[i] < 0.0f) {
        if (ratio > safety_thresh) w = std::min(std::max(w, 0.8f), 1.0f);
        dropped += ratio > clip_c;
      }
      weights[i] = w;
      future_kl[i] = fkl;
    }
    keep[row] = dropped <= 1;
  }
}

}  // namespace cpu
}  // namespace dk
