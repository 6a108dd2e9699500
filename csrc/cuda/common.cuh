// Device helpers of the CUDA kernels: float conversions and deterministic block reductions.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace dk {
namespace cuda {

constexpr int kThreads = 256;  // every kernel of this module runs 256-thread blocks

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }

// Sum over a 256-thread block in a fixed order (xor tree in each warp, then warps in order).
// Every thread gets the result. smem: 8 floats, reused after the call returns.
__device__ __forceinline__ float block_sum(float x, float* smem) {
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  __syncthreads();
  if (lane == 0) smem[warp] = x;
  __syncthreads();
  float total = 0.0f;
  for (int w = 0; w < kThreads / 32; ++w) total += smem[w];
  return total;
}

// Tokens per chunk of the reductions over tokens: a function of N only (at most ~512 chunks).
inline int64_t reduction_chunk_tokens(int64_t n_tokens) {
  const int64_t c = (n_tokens + 511) / 512;
  return c < 32 ? 32 : c;
}

}  // namespace cuda
}  // namespace dk
