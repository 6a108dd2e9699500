// Phase C on the GPU: per-token dual-clip loss and w d l / d logp (common/surrogate_math.h), and
// block partial sums per (row, tile of 1024 tokens): partial [B, tiles, kStats]. Python sums the
// tiles of each row in order and forms the aggregation (delta_kernels/aggregation.py).
#include "../common/surrogate_math.h"
#include "common.cuh"
#include "kernels.cuh"

namespace dk {
namespace cuda {
namespace {

constexpr int64_t kTile = 1024;

__global__ void token_kernel(const float* __restrict__ logp, const float* __restrict__ old_logp,
                             const float* __restrict__ adv, const uint8_t* __restrict__ mask,
                             const float* __restrict__ coef, const float* __restrict__ is_weight, int64_t B, int64_t T,
                             int64_t tiles, float clip_low, float clip_high, float clip_c, float* __restrict__ grad,
                             float* __restrict__ partial) {
  __shared__ float red[kThreads / 32];
  const int64_t tile = blockIdx.x;
  // grid.y is capped at 65535: each block walks rows blockIdx.y, blockIdx.y + gridDim.y, ...
  for (int64_t row = blockIdx.y; row < B; row += gridDim.y) {
    float acc[kStats] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    const int64_t c_end = (tile + 1) * kTile < T ? (tile + 1) * kTile : T;
    for (int64_t c = tile * kTile + threadIdx.x; c < c_end; c += kThreads)
      surrogate_accumulate(row * T + c, logp, old_logp, adv, mask, coef, is_weight, clip_low, clip_high, clip_c, grad,
                           acc);
    for (int s = 0; s < kStats; ++s) {
      const float total = block_sum(acc[s], red);
      if (threadIdx.x == 0) partial[(row * tiles + tile) * kStats + s] = total;
    }
  }
}

}  // namespace

int64_t surrogate_tiles(int64_t T) {
  const int64_t tiles = (T + kTile - 1) / kTile;
  return tiles > 0 ? tiles : 1;
}

cudaError_t clipped_surrogate(const float* logp, const float* old_logp, const float* adv, const uint8_t* mask,
                              const float* coef, const float* is_weight, int64_t B, int64_t T, float clip_low,
                              float clip_high, float clip_c, float* partial, float* grad, cudaStream_t stream) {
  const int64_t tiles = surrogate_tiles(T);
  if (B == 0) return cudaSuccess;
  if (T == 0) return cudaMemsetAsync(partial, 0, static_cast<size_t>(B * tiles * kStats) * sizeof(float), stream);
  const unsigned rows_y = static_cast<unsigned>(B < 65535 ? B : 65535);
  token_kernel<<<dim3(static_cast<unsigned>(tiles), rows_y), kThreads, 0, stream>>>(
      logp, old_logp, adv, mask, coef, is_weight, B, T, tiles, clip_low, clip_high, clip_c, grad, partial);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace dk
