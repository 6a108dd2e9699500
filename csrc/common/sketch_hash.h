// The sketch matrix hash of delta_kernels/sketch_matrix.py, for C++ and CUDA.
// R[i, j] = (h_ij < 2^31 ? +1 : -1) * float(1/sqrt(r)), h_ij = mix32(mix32(i ^ mix32(seed)) ^ mix32(j + 0x9e3779b9)).
#pragma once
#include <cstdint>

#ifdef __CUDACC__
#define DK_HD __host__ __device__ __forceinline__
#else
#define DK_HD inline
#endif

namespace dk {

DK_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

DK_HD uint32_t sketch_row_key(uint32_t seed_mixed, uint32_t i) { return mix32(i ^ seed_mixed); }
DK_HD uint32_t sketch_col_key(uint32_t j) { return mix32(j + 0x9e3779b9u); }
// +1.0f or -1.0f
DK_HD float sketch_sign(uint32_t row_key, uint32_t col_key) {
  return (mix32(row_key ^ col_key) >> 31) ? -1.0f : 1.0f;
}

}  // namespace dk
