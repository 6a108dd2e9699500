// Phase C on the GPU: per-token dual-clip loss and d loss / d logp (common/surrogate_math.h),
// block partials per (row, tile of 1024 tokens), a one-thread fixed-order combine, a scaling pass.
#include "../common/surrogate_math.h"
#include "common.cuh"
#include "kernels.cuh"

namespace dk {
namespace cuda {
namespace {

constexpr int64_t kTile = 1024;

__global__ void token_kernel(const float* __restrict__ logp, const float* __restrict__ old_logp,
                             const float* __restrict__ adv, const uint8_t* __restrict__ mask,
                             const float* __restrict__ coef, int64_t B, int64_t T, int64_t tiles, float clip_low,
                             float clip_high, float clip_c, float* __restrict__ grad, float* __restrict__ partial) {
  __shared__ float red[kThreads / 32];
  const int64_t tile = blockIdx.x;
  // grid.y is capped at 65535: each block walks rows blockIdx.y, blockIdx.y + gridDim.y, ...
  for (int64_t row = blockIdx.y; row < B; row += gridDim.y) {
    float acc[kStats] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    const int64_t c_end = (tile + 1) * kTile < T ? (tile + 1) * kTile : T;
    for (int64_t c = tile * kTile + threadIdx.x; c < c_end; c += kThreads)
      surrogate_accumulate(row * T + c, logp, old_logp, adv, mask, coef, clip_low, clip_high, clip_c, grad, acc);
    for (int s = 0; s < kStats; ++s) {
      const float total = block_sum(acc[s], red);
      if (threadIdx.x == 0) partial[(row * tiles + tile) * kStats + s] = total;
    }
  }
}

// One thread: rows in order, tiles in order. out [4]; row_weight [B] = d loss / d (token loss) per row.
__global__ void combine_kernel(const float* __restrict__ partial, int64_t B, int64_t T, int64_t tiles, int agg,
                               float* __restrict__ out, float* __restrict__ row_weight) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  float total[kStats] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  float seq_mean = 0.0f;
  for (int64_t row = 0; row < B; ++row) {
    float rs[kStats] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    for (int64_t tile = 0; tile < tiles; ++tile)
      for (int s = 0; s < kStats; ++s) rs[s] += partial[(row * tiles + tile) * kStats + s];
    for (int s = 0; s < kStats; ++s) total[s] += rs[s];
    seq_mean += rs[0] / (rs[1] > 1.0f ? rs[1] : 1.0f);
    row_weight[row] = rs[1];  // row's valid count for now
  }
  const float n = total[1] > 1.0f ? total[1] : 1.0f;
  float loss;
  if (agg == kTokenMean) loss = total[0] / n;
  else if (agg == kSeqMeanTokenMean) loss = seq_mean / static_cast<float>(B);
  else loss = total[0] / static_cast<float>(agg == kSeqMeanTokenSum ? B : T);
  out[0] = loss;
  out[1] = total[2] / n;
  out[2] = total[3] / n;
  out[3] = total[4] / n;
  for (int64_t row = 0; row < B; ++row) row_weight[row] = surrogate_row_weight(agg, total[1], row_weight[row], B, T);
}

__global__ void scale_kernel(float* __restrict__ grad, const float* __restrict__ row_weight, int64_t B, int64_t T) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (t < B * T) grad[t] *= row_weight[t / T];
}

}  // namespace

int64_t surrogate_workspace(int64_t B, int64_t T) {
  const int64_t tiles = (T + kTile - 1) / kTile;
  return B * (tiles > 0 ? tiles : 1) * kStats + B;
}

cudaError_t clipped_surrogate(const float* logp, const float* old_logp, const float* adv, const uint8_t* mask,
                              const float* coef, int64_t B, int64_t T, float clip_low, float clip_high, float clip_c,
                              int agg, float* out, float* grad, float* workspace, cudaStream_t stream) {
  const int64_t tiles = (T + kTile - 1) / kTile > 0 ? (T + kTile - 1) / kTile : 1;
  float* partial = workspace;
  float* row_weight = workspace + B * tiles * kStats;
  if (B * T > 0) {
    const unsigned rows_y = static_cast<unsigned>(B < 65535 ? B : 65535);
    token_kernel<<<dim3(static_cast<unsigned>(tiles), rows_y), kThreads, 0, stream>>>(
        logp, old_logp, adv, mask, coef, B, T, tiles, clip_low, clip_high, clip_c, grad, partial);
  } else {
    cudaError_t err = cudaMemsetAsync(partial, 0, static_cast<size_t>(B * tiles * kStats) * 4, stream);
    if (err != cudaSuccess) return err;
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  combine_kernel<<<1, 32, 0, stream>>>(partial, B, T, tiles, agg, out, row_weight);
  err = cudaGetLastError();
  if (err != cudaSuccess || B * T == 0) return err;
  scale_kernel<<<static_cast<unsigned>((B * T + kThreads - 1) / kThreads), kThreads, 0, stream>>>(grad, row_weight,
                                                                                                   B, T);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace dk
