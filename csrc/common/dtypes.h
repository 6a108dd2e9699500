// Element types crossing the bindings, as integer codes, and float conversions on the CPU.
#pragma once
#include <cstdint>
#include <cstring>

namespace dk {

enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

inline float bf16_to_float(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, NaN kept quiet
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

#ifndef __CUDACC__
template <int D> struct Elem;
template <> struct Elem<kFloat32> {
  using T = float;
  static float load(const T* p, int64_t i) { return p[i]; }
  static void store(T* p, int64_t i, float v) { p[i] = v; }
};
template <> struct Elem<kBFloat16> {
  using T = uint16_t;
  static float load(const T* p, int64_t i) { return bf16_to_float(p[i]); }
  static void store(T* p, int64_t i, float v) { p[i] = float_to_bf16(v); }
};
template <> struct Elem<kFloat16> {
  using T = _Float16;
  static float load(const T* p, int64_t i) { return static_cast<float>(p[i]); }
  static void store(T* p, int64_t i, float v) { p[i] = static_cast<_Float16>(v); }
};
#endif

}  // namespace dk
