// Per-token math of the dual-clip DAPO surrogate (delta_kernels/reference/surrogate.py), for C++ and CUDA.
// The derivative follows torch's autograd rules: clamp passes the gradient on its closed range,
// maximum/minimum split it in halves on ties.
#pragma once
#include <math.h>
#include <stdint.h>

#include "sketch_hash.h"  // DK_HD

namespace dk {

struct TokenLoss {
  float loss;       // l
  float dloss;      // d l / d logp
  float log_ratio;  // clamp(logp - old_logp, -20, 20)
  bool clipped;     // pg2 > pg1
  bool clipped_lower;  // A < 0 and clip1 > pg3
};

DK_HD float clamped_log_ratio(float diff) { return diff < -20.0f ? -20.0f : (diff > 20.0f ? 20.0f : diff); }

// A is the weighted advantage (advantages * coef) of a valid token, diff = logp - old_logp and
// ratio = expf(clamped_log_ratio(diff)) (for a caller that has the ratio already).
DK_HD TokenLoss surrogate_token_at(float diff, float ratio, float A, float clip_low, float clip_high, float clip_c) {
  TokenLoss r;
  const float lr = clamped_log_ratio(diff);
  const float in_range = (diff >= -20.0f && diff <= 20.0f) ? 1.0f : 0.0f;
  const float lo = 1.0f - clip_low, hi = 1.0f + clip_high;
  const float cratio = ratio < lo ? lo : (ratio > hi ? hi : ratio);
  const float pg1 = -A * ratio;
  const float pg2 = -A * cratio;
  const float d1 = -A * ratio * in_range;
  const float d2 = (ratio >= lo && ratio <= hi) ? d1 : 0.0f;
  const float clip1 = pg1 > pg2 ? pg1 : pg2;
  const float dclip1 = pg1 > pg2 ? d1 : (pg1 < pg2 ? d2 : 0.5f * (d1 + d2));
  const float pg3 = -A * clip_c;
  if (A < 0.0f) {
    r.loss = clip1 < pg3 ? clip1 : pg3;
    r.dloss = clip1 < pg3 ? dclip1 : (clip1 == pg3 ? 0.5f * dclip1 : 0.0f);
  } else {
    r.loss = clip1;
    r.dloss = dclip1;
  }
  r.log_ratio = lr;
  r.clipped = pg2 > pg1;
  r.clipped_lower = (clip1 > pg3) && (A < 0.0f);
  return r;
}

DK_HD TokenLoss surrogate_token(float logp, float old_logp, float A, float clip_low, float clip_high, float clip_c) {
  const float diff = logp - old_logp;
  return surrogate_token_at(diff, expf(clamped_log_ratio(diff)), A, clip_low, clip_high, clip_c);
}

// The per-row statistics both backends sum (delta_kernels/aggregation.py STATS, same order):
// w l, valid count, clipped, clipped_lower, -log_ratio.
enum SurrogateStat : int { kStatLoss = 0, kStatValid, kStatClip, kStatClipLower, kStatKl, kStats };

// One valid token at flat index t with loss terms r: writes w d l / d logp to grad[t] and adds its
// statistics to acc[kStats] (float on the GPU, double on the CPU). w = is_weight[t], or 1 when
// is_weight is null.
template <typename Acc>
DK_HD void surrogate_add(int64_t t, const TokenLoss& r, const float* is_weight, float* grad, Acc* acc) {
  const float w = is_weight != nullptr ? is_weight[t] : 1.0f;
  grad[t] = r.dloss * w;
  acc[kStatLoss] += static_cast<Acc>(r.loss * w);
  acc[kStatValid] += Acc(1);
  acc[kStatClip] += r.clipped ? Acc(1) : Acc(0);
  acc[kStatClipLower] += r.clipped_lower ? Acc(1) : Acc(0);
  acc[kStatKl] += static_cast<Acc>(-r.log_ratio);
}

// One token of row-major [B, T] at flat index t (A = adv[t] coef[t], coef null: 1), as surrogate_add.
// Padding is don't-care: a masked token writes grad 0 and reads nothing else.
template <typename Acc>
DK_HD void surrogate_accumulate(int64_t t, const float* logp, const float* old_logp, const float* adv,
                                const uint8_t* mask, const float* coef, const float* is_weight, float clip_low,
                                float clip_high, float clip_c, float* grad, Acc* acc) {
  if (!mask[t]) {
    grad[t] = 0.0f;
    return;
  }
  float A = adv[t];
  if (coef != nullptr) A *= coef[t];
  surrogate_add(t, surrogate_token(logp[t], old_logp[t], A, clip_low, clip_high, clip_c), is_weight, grad, acc);
}

}  // namespace dk
