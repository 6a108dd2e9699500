// Phase A on the GPU: token-gradient vectors, one read of h.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../common/dtypes.h"
#include "kernels.cuh"

namespace dk {
namespace cuda {
namespace {

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }

// One block row-strides over tokens; threads stride over H. 64-bit offsets throughout.
template <typename T>
__global__ void token_vectors_kernel(const T* __restrict__ hidden, const float* __restrict__ logp, int64_t N,
                                     int64_t H, T* __restrict__ out) {
  for (int64_t t = blockIdx.x; t < N; t += gridDim.x) {
    const float s = -expm1f(logp[t]);
    const int64_t base = t * H;
    for (int64_t i = threadIdx.x; i < H; i += blockDim.x) out[base + i] = from_f<T>(s * to_f(hidden[base + i]));
  }
}

template <typename T>
cudaError_t launch(const void* hidden, const float* logp, int64_t N, int64_t H, void* out, cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  const int blocks = static_cast<int>(N < 65535 ? N : 65535);
  token_vectors_kernel<T><<<blocks, 256, 0, stream>>>(static_cast<const T*>(hidden), logp, N, H, static_cast<T*>(out));
  return cudaGetLastError();
}

}  // namespace

cudaError_t token_vectors(int dtype, const void* hidden, const float* logp, int64_t N, int64_t H, void* out,
                          cudaStream_t stream) {
  switch (dtype) {
    case kFloat32: return launch<float>(hidden, logp, N, H, out, stream);
    case kBFloat16: return launch<__nv_bfloat16>(hidden, logp, N, H, out, stream);
    default: return launch<__half>(hidden, logp, N, H, out, stream);
  }
}

}  // namespace cuda
}  // namespace dk
