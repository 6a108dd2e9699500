// One row of FIPO's future-KL weights on the CPU: the backward walk shared by fipo_weights.cpp (the
// weights alone) and fipo_surrogate.cpp (the weights fused into the surrogate). Spec:
// delta_kernels/credit/fipo.py; the float64 reference is delta_kernels/reference/fipo.py.
#pragma once
#include <stdint.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "../common/surrogate_math.h"

namespace dk {
namespace cpu {

// The kernels' parameters (delta_kernels/reference/fipo.py native_scalars).
struct FipoParams {
  double gamma;  // 2^(-1 / decay_rate)
  float log_clip_c, clip_c, lower, upper;
  bool clip_lower;
  float safety_thresh, at_upper, at_lower;
  // A future KL <= below_lower has exp < lower (weight lower), >= above_upper has exp > upper (weight upper):
  // log of the bounds with a margin of 1e-5 (expf is within an ulp), so the weight needs no expf there.
  float below_lower = -std::numeric_limits<float>::infinity(), above_upper = std::numeric_limits<float>::infinity();

  FipoParams(double gamma_, float log_clip_c_, float clip_c_, float lower_, float upper_, bool clip_lower_,
             float safety_thresh_, float at_upper_, float at_lower_)
      : gamma(gamma_), log_clip_c(log_clip_c_), clip_c(clip_c_), lower(lower_), upper(upper_), clip_lower(clip_lower_),
        safety_thresh(safety_thresh_), at_upper(at_upper_), at_lower(at_lower_) {
    if (clip_lower && lower > 0.0f && lower <= upper) below_lower = static_cast<float>(std::log(lower) - 1e-5);
    if (upper > 0.0f) above_upper = static_cast<float>(std::log(upper) + 1e-5);
  }
};

// One step of the future-KL recurrence from the end of a row, for a valid token of clamped log-ratio d
// (clamped_log_ratio): F_t = x_t + gamma F_{t+1}, x_t = d when d <= log c, else 0; in double.
inline double future_kl_step(float d, double f_next, const FipoParams& p) {
  return (d <= p.log_clip_c ? static_cast<double>(d) : 0.0) + p.gamma * f_next;
}

// The weight clip of a future KL: exp(fkl) clamped to [lower, upper] (to <= upper without clip_lower).
inline float fipo_clipped_weight(float fkl, const FipoParams& p) {
  if (fkl <= p.below_lower) return p.lower;
  if (fkl >= p.above_upper) return p.upper;
  const float w = std::exp(fkl);
  return p.clip_lower ? std::min(std::max(w, p.lower), p.upper) : std::min(w, p.upper);
}

// A row's metric partials over its valid tokens: count, sum, min, max of the weights, weights at a bound.
struct FipoRowStats {
  int64_t count = 0, at_bound = 0;
  double w_sum = 0.0;
  float w_min = std::numeric_limits<float>::infinity(), w_max = -std::numeric_limits<float>::infinity();
};

// Walks tokens [0, T) of one row from the end: F_t = x_t + gamma F_{t+1} in double (x_t the valid
// log-ratio when <= log_clip_c, else 0; padding passes F through, discounted). Writes weights[t] and,
// when not null, future_kl[t] at every token (0 at padding). Returns whether the row is kept (at most one
// valid token with adv < 0 and ratio > clip_c).
inline bool fipo_row(const float* logp, const float* old_logp, const float* adv, const uint8_t* mask, int64_t T,
                     const FipoParams& p, float* weights, float* future_kl, FipoRowStats& s) {
  int64_t dropped = 0;
  double f_next = 0.0;
  for (int64_t t = T - 1; t >= 0; --t) {
    if (!mask[t]) {
      f_next *= p.gamma;
      weights[t] = 0.0f;
      if (future_kl != nullptr) future_kl[t] = 0.0f;
      continue;
    }
    const float d = clamped_log_ratio(logp[t] - old_logp[t]);
    f_next = future_kl_step(d, f_next, p);
    const float fkl = static_cast<float>(f_next);
    float w = fipo_clipped_weight(fkl, p);
    if (adv[t] < 0.0f) {  // the ratio matters only here
      const float ratio = std::exp(d);
      if (ratio > p.safety_thresh) w = std::min(std::max(w, 0.8f), 1.0f);
      dropped += ratio > p.clip_c;
    }
    weights[t] = w;
    if (future_kl != nullptr) future_kl[t] = fkl;
    ++s.count;
    s.w_sum += w;
    s.w_min = std::min(s.w_min, w);
    s.w_max = std::max(s.w_max, w);
    s.at_bound += (w >= p.at_upper) | (w <= p.at_lower);
  }
  return dropped <= 1;
}

}  // namespace cpu
}  // namespace dk
