// 16-byte row vectors of the CUDA row kernels: VEC elements of T loaded and stored as one 128-bit
// access (LDG.E.128 / STG.E.128; tests/test_cuda_sass.py checks the SASS), or one element when the
// row is not 16-byte aligned (VEC = 1, the scalar fallback). Elements are unpacked with bit
// operations on the four 32-bit words, so the vector stays in registers.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "common.cuh"

namespace dk {
namespace cuda {

// Elements of T per 16 bytes.
template <typename T> constexpr int kVec16 = 16 / static_cast<int>(sizeof(T));

__device__ __forceinline__ uint32_t word_of(const uint4& u, int k) {
  return k == 0 ? u.x : k == 1 ? u.y : k == 2 ? u.z : u.w;
}
__device__ __forceinline__ void set_word(uint4& u, int k, uint32_t v) {
  if (k == 0) u.x = v; else if (k == 1) u.y = v; else if (k == 2) u.z = v; else u.w = v;
}

// float <-> the bits of one element of T (the low 16 bits for 2-byte types).
template <typename T> __device__ __forceinline__ float float_of_bits(uint32_t b);
template <> __device__ __forceinline__ float float_of_bits<float>(uint32_t b) { return __uint_as_float(b); }
template <> __device__ __forceinline__ float float_of_bits<__nv_bfloat16>(uint32_t b) {
  return __uint_as_float(b << 16);
}
template <> __device__ __forceinline__ float float_of_bits<__half>(uint32_t b) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(b & 0xffffu)));
}
template <typename T> __device__ __forceinline__ uint32_t bits_of_float(float x);
template <> __device__ __forceinline__ uint32_t bits_of_float<float>(float x) { return __float_as_uint(x); }
template <> __device__ __forceinline__ uint32_t bits_of_float<__nv_bfloat16>(float x) {
  return __bfloat16_as_ushort(__float2bfloat16(x));
}
template <> __device__ __forceinline__ uint32_t bits_of_float<__half>(float x) {
  return __half_as_ushort(__float2half(x));
}

template <typename T, int VEC> struct RowVec;

// One element (the scalar fallback).
template <typename T> struct RowVec<T, 1> {
  T e;
  __device__ __forceinline__ void load(const T* p) { e = p[0]; }
  __device__ __forceinline__ float get(int) const { return to_f(e); }
  __device__ __forceinline__ void set(int, float x) { e = from_f<T>(x); }
  __device__ __forceinline__ void store(T* p) const { p[0] = e; }
};

// 16 bytes: p must be 16-byte aligned.
template <typename T> struct RowVec<T, kVec16<T>> {
  static constexpr int kPerWord = 4 / static_cast<int>(sizeof(T));
  static constexpr int kBits = 8 * static_cast<int>(sizeof(T));
  uint4 u;
  __device__ __forceinline__ void load(const T* p) { u = __ldg(reinterpret_cast<const uint4*>(p)); }
  __device__ __forceinline__ float get(int i) const {
    const uint32_t w = word_of(u, i / kPerWord);
    return float_of_bits<T>(kPerWord == 1 ? w : w >> (kBits * (i % kPerWord)));
  }
  __device__ __forceinline__ void set(int i, float x) {
    const int k = i / kPerWord;
    if (kPerWord == 1) {
      set_word(u, k, bits_of_float<T>(x));
    } else {
      const int sh = kBits * (i % kPerWord);
      const uint32_t mask = 0xffffu << sh;
      set_word(u, k, (word_of(u, k) & ~mask) | (bits_of_float<T>(x) << sh));
    }
  }
  __device__ __forceinline__ void store(T* p) const { *reinterpret_cast<uint4*>(p) = u; }
};

// f[0:VEC] = p[0:VEC] (float32): float4 loads when VEC is a multiple of 4 (p 16-byte aligned).
template <int VEC>
__device__ __forceinline__ void load_floats(const float* p, float (&f)[VEC]) {
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int i = 0; i < VEC; i += 4) {
      const float4 q = __ldg(reinterpret_cast<const float4*>(p + i));
      f[i] = q.x;
      f[i + 1] = q.y;
      f[i + 2] = q.z;
      f[i + 3] = q.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) f[i] = __ldg(p + i);
  }
}

}  // namespace cuda
}  // namespace dk
