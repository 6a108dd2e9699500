// CUDA kernels of delta_kernels._cuda. Inputs are valid device pointers (Python checks them);
// every launcher returns the cudaError_t of its launch.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace dk {
namespace cuda {

// v = (1 - exp(logp)) h in hidden's dtype (codes of common/dtypes.h), [N, H].
cudaError_t token_vectors(int dtype, const void* hidden, const float* logp, int64_t N, int64_t H, void* out,
                          cudaStream_t stream);

}  // namespace cuda
}  // namespace dk
