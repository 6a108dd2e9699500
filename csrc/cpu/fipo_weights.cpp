// FIPO's future-KL influence weights on the CPU (delta_kernels/credit/fipo.py; the float64
// reference is delta_kernels/reference/fipo.py). OpenMP over rows; each row is read once, backwards
// (fipo_row.h): the discounted sum, the weights, the count of dual-clipped negative tokens that
// decides keep, and the row's metric partials. Masked tokens are never read.
#include "fipo_row.h"
#include "kernels.h"

namespace dk {
namespace cpu {

void fipo_weights(const float* logp, const float* old_logp, const float* adv, const uint8_t* mask, int64_t B,
                  int64_t T, double gamma, float log_clip_c, float clip_c, float lower, float upper,
                  bool clip_lower, float safety_thresh, float at_upper, float at_lower, float* weights,
                  float* future_kl, uint8_t* keep, float* row_stats) {
  const FipoParams p{gamma, log_clip_c, clip_c, lower, upper, clip_lower, safety_thresh, at_upper, at_lower};
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < B; ++row) {
    const int64_t base = row * T;
    FipoRowStats s;
    keep[row] = fipo_row(logp + base, old_logp + base, adv + base, mask + base, T, p, weights + base,
                         future_kl + base, s);
    float* stats = row_stats + row * 5;
    stats[0] = static_cast<float>(s.count);
    stats[1] = static_cast<float>(s.w_sum);
    stats[2] = s.w_min;
    stats[3] = s.w_max;
    stats[4] = static_cast<float>(s.at_bound);
  }
}

}  // namespace cpu
}  // namespace dk
