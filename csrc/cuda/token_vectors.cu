// Phase A on the GPU: token-gradient vectors v = (1 - exp(logp)) h (one read of h, side sums fused
// through row_pass), or the sketch z = v @ R with R generated in-kernel from (seed, i, j).
#include "../common/dtypes.h"
#include "../common/sketch_hash.h"
#include "common.cuh"
#include "kernels.cuh"

namespace dk {
namespace cuda {
namespace {

// One block per token (grid-strided): the row v in shared memory, each thread owns columns j.
// z[t, j] = scale * sum_i v[i] sign(i, j), summed over i in order.
template <typename T, typename O>
__global__ void sketch_kernel(const T* __restrict__ hidden, const float* __restrict__ logp, int64_t N, int64_t H,
                              int64_t r, uint32_t seed_mixed, float scale, O* __restrict__ out) {
  extern __shared__ float vrow[];
  for (int64_t t = blockIdx.x; t < N; t += gridDim.x) {
    const float s = -expm1f(logp[t]);
    __syncthreads();
    for (int64_t i = threadIdx.x; i < H; i += kThreads) vrow[i] = s * to_f(hidden[t * H + i]);
    __syncthreads();
    for (int64_t j = threadIdx.x; j < r; j += kThreads) {
      const uint32_t col = sketch_col_key(static_cast<uint32_t>(j));
      float acc = 0.0f;
      for (int64_t i = 0; i < H; ++i)
        acc += vrow[i] * sketch_sign(sketch_row_key(seed_mixed, static_cast<uint32_t>(i)), col);
      out[t * r + j] = from_f<O>(acc * scale);
    }
  }
}

template <typename T, typename O>
cudaError_t launch_sketch(const void* hidden, const float* logp, int64_t N, int64_t H, int64_t r, uint32_t seed,
                          void* out, cudaStream_t stream) {
  const size_t smem = static_cast<size_t>(H) * sizeof(float);
  if (smem > 48 * 1024) {
    cudaError_t err = cudaFuncSetAttribute(sketch_kernel<T, O>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  const float scale = static_cast<float>(1.0 / sqrt(static_cast<double>(r)));
  const unsigned blocks = static_cast<unsigned>(N < 65535 ? N : 65535);
  sketch_kernel<T, O><<<blocks, kThreads, smem, stream>>>(static_cast<const T*>(hidden), logp, N, H, r, mix32(seed),
                                                          scale, static_cast<O*>(out));
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

cudaError_t token_vectors(int dtype, const void* hidden, const float* logp, const float* a_pos, const float* a_neg,
                          int64_t N, int64_t H, int64_t r, uint32_t seed, bool out_f32, void* out, float* scale_ws,
                          float* partial, float* sums, cudaStream_t stream) {
  if (N == 0) return sums ? cudaMemsetAsync(sums, 0, static_cast<size_t>(2 * (r > 0 ? r : H)) * 4, stream)
                          : cudaSuccess;
  if (r > 0) {
    cudaError_t err;
    switch (dtype) {
      case kFloat32: err = sketch<float>(out_f32, hidden, logp, N, H, r, seed, out, stream); break;
      case kBFloat16: err = sketch<__nv_bfloat16>(out_f32, hidden, logp, N, H, r, seed, out, stream); break;
      default: err = sketch<__half>(out_f32, hidden, logp, N, H, r, seed, out, stream); break;
    }
    if (err != cudaSuccess || sums == nullptr) return err;
    return row_pass(out_f32 ? static_cast<int>(kFloat32) : dtype, out, nullptr, N, r, nullptr, nullptr, nullptr,
                    a_pos, a_neg, nullptr, nullptr, partial, sums, stream);
  }
  row_scale_kernel<<<static_cast<unsigned>((N + kThreads - 1) / kThreads), kThreads, 0, stream>>>(logp, N, scale_ws);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  return row_pass(dtype, hidden, scale_ws, N, H, nullptr, nullptr, nullptr, sums ? a_pos : nullptr,
                  sums ? a_neg : nullptr, nullptr, out, partial, sums, stream);
}

}  // namespace cuda
}  // namespace dk
