// Phase A on the GPU: token-gradient vectors v = (1 - exp(logp)) h (one read of h, side sums fused
// through row_pass), or the sketch z = v @ R with R's signs hashed in-kernel from (seed, i, j).
#include "../common/dtypes.h"
#include "../common/sketch_hash.h"
#include "common.cuh"
#include "kernels.cuh"

namespace dk {
namespace cuda {
namespace {

constexpr int kSketchGroups = kThreads / kMaxSketchDim;  // thread groups splitting a row's sum over i
constexpr unsigned kSketchBlocks = 1024;                  // grid cap: each block builds R's signs once

// Grid-strided over tokens. Each block first builds the signs of R [H, r] in shared memory, one
// 64-bit word per row i (bit j set where R[i, j] < 0), hashed once per block; then per token,
// thread (g, j) adds +-h[t, i] over its group's quarter of i in order, and the groups' partials are
// added in group order: z[t, j] = (1 - exp(logp[t])) / sqrt(r) * sum_i h[t, i] sign(i, j).
template <typename T, typename O>
__global__ void __launch_bounds__(kThreads) sketch_kernel(const T* __restrict__ hidden,
                                                          const float* __restrict__ logp, int64_t N, int64_t H,
                                                          int r, uint32_t seed_mixed, float inv_sqrt_r,
                                                          O* __restrict__ out) {
  extern __shared__ unsigned long long neg_bits[];  // [H]
  __shared__ uint32_t col_keys[kMaxSketchDim];
  __shared__ float part[kSketchGroups][kMaxSketchDim];
  if (threadIdx.x < r) col_keys[threadIdx.x] = sketch_col_key(threadIdx.x);
  __syncthreads();
  for (int64_t i = threadIdx.x; i < H; i += kThreads) {
    const uint32_t row_key = sketch_row_key(seed_mixed, static_cast<uint32_t>(i));
    unsigned long long bits = 0;
    for (int j = 0; j < r; ++j)
      if (sketch_sign(row_key, col_keys[j]) < 0.0f) bits |= 1ull << j;
    neg_bits[i] = bits;
  }
  __syncthreads();
  const int g = threadIdx.x / kMaxSketchDim, j = threadIdx.x % kMaxSketchDim;
  const int64_t span = (H + kSketchGroups - 1) / kSketchGroups;
  const int64_t i0 = g * span, i1 = i0 + span < H ? i0 + span : H;
  for (int64_t t = blockIdx.x; t < N; t += gridDim.x) {
    const T* row = hidden + t * H;
    float acc = 0.0f;
    if (j < r)
      for (int64_t i = i0; i < i1; ++i) {
        const float h = to_f(row[i]);
        acc += ((neg_bits[i] >> j) & 1ull) ? -h : h;
      }
    part[g][j] = acc;
    __syncthreads();
    if (g == 0 && j < r) {
      float z = 0.0f;
      for (int k = 0; k < kSketchGroups; ++k) z += part[k][j];
      out[t * r + j] = from_f<O>(z * (-expm1f(logp[t]) * inv_sqrt_r));
    }
    __syncthreads();
  }
}

template <typename T, typename O>
cudaError_t launch_sketch(const void* hidden, const float* logp, int64_t N, int64_t H, int64_t r, uint32_t seed,
                          void* out, cudaStream_t stream) {
  const size_t smem = static_cast<size_t>(H) * sizeof(unsigned long long);
  if (smem > 48 * 1024) {
    cudaError_t err = cudaFuncSetAttribute(sketch_kernel<T, O>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  const float inv_sqrt_r = static_cast<float>(1.0 / sqrt(static_cast<double>(r)));
  const unsigned blocks = static_cast<unsigned>(N < kSketchBlocks ? N : kSketchBlocks);
  sketch_kernel<T, O><<<blocks, kThreads, smem, stream>>>(static_cast<const T*>(hidden), logp, N, H,
                                                          static_cast<int>(r), mix32(seed), inv_sqrt_r,
                                                          static_cast<O*>(out));
  return cudaGetLastError();
}

template <typename T>
cudaError_t sketch(bool out_f32, const void* hidden, const float* logp, int64_t N, int64_t H, int64_t r,
                   uint32_t seed, void* out, cudaStream_t stream) {
  return out_f32 ? launch_sketch<T, float>(hidden, logp, N, H, r, seed, out, stream)
                 : launch_sketch<T, T>(hidden, logp, N, H, r, seed, out, stream);
}

// v = s h written to out, as one row_pass over h with the scale s = 1 - exp(logp) per token.
__global__ void row_scale_kernel(const float* __restrict__ logp, int64_t N, float* __restrict__ s) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (t < N) s[t] = -expm1f(logp[t]);
}

}  // namespace

cudaError_t token_vectors(const TokenVectorsParams& p, cudaStream_t stream) {
  const int64_t N = p.n_tokens, H = p.hidden_size, r = p.sketch_dim;
  if (r > kMaxSketchDim || (r > 0 && H > kMaxSketchHidden)) return cudaErrorInvalidValue;
  RowPassParams rows{};  // the side sums (and, for exact vectors, v itself) through one row_pass
  rows.n_tokens = N;
  rows.a_pos = p.sums ? p.a_pos : nullptr;
  rows.a_neg = p.sums ? p.a_neg : nullptr;
  rows.partial = p.partial;
  rows.sums = p.sums;
  if (r > 0) {
    if (N > 0) {
      cudaError_t err;
      switch (p.dtype) {
        case kFloat32: err = sketch<float>(p.out_f32, p.hidden, p.logp, N, H, r, p.seed, p.out, stream); break;
        case kBFloat16: err = sketch<__nv_bfloat16>(p.out_f32, p.hidden, p.logp, N, H, r, p.seed, p.out, stream); break;
        default: err = sketch<__half>(p.out_f32, p.hidden, p.logp, N, H, r, p.seed, p.out, stream); break;
      }
      if (err != cudaSuccess || p.sums == nullptr) return err;
    }
    rows.dtype = p.out_f32 ? static_cast<int>(kFloat32) : p.dtype;
    rows.x = p.out;
    rows.width = r;
    return row_pass(rows, stream);
  }
  if (N > 0) {
    row_scale_kernel<<<static_cast<unsigned>((N + kThreads - 1) / kThreads), kThreads, 0, stream>>>(p.logp, N,
                                                                                                    p.scale_ws);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  rows.dtype = p.dtype;
  rows.x = p.hidden;
  rows.scale = p.scale_ws;
  rows.width = H;
  rows.out = p.out;
  return row_pass(rows, stream);
}

}  // namespace cuda
}  // namespace dk
