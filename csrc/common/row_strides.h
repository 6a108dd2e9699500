// Where the rows of a [N, D] kernel operand live: the caller's [B, T, D] view (e.g. the response
// slice hidden[:, prompt_len:] of [B, S, D] hidden states) read in place. Row n = b * T + t
// (b = n / T, t = n % T) starts b * stride_b + t * stride_t elements after the base pointer; the
// D elements of a row are consecutive (last-dim stride 1: Python copies any other view, see
// delta_kernels/_checks.py rows_for). A contiguous [N, D] array is RowStrides::dense(N, D).
#pragma once
#include <array>
#include <cstdint>
#include <optional>

#ifdef __CUDACC__
#define DK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DK_HOST_DEVICE inline
#endif

namespace dk {

struct RowStrides {
  int64_t T;         // rows per batch entry (>= 1)
  int64_t stride_b;  // elements between batch entries
  int64_t stride_t;  // elements between consecutive rows of one entry

  // b = n / T. On the GPU a 32-bit division: inline, where a 64-bit one calls a subroutine that
  // spills registers (row counts below 2^32: the CUDA bindings refuse more).
  DK_HOST_DEVICE int64_t entry(int64_t n) const {
#ifdef __CUDA_ARCH__
    return static_cast<int64_t>(static_cast<uint32_t>(n) / static_cast<uint32_t>(T));
#else
    return n / T;
#endif
  }
  DK_HOST_DEVICE int64_t offset(int64_t n) const {
    const int64_t b = entry(n);
    return b * stride_b + (n - b * T) * stride_t;
  }
  // The start of row n + 1 from that of row n (at place t = n - b T in its entry): stride_t on,
  // or to the next entry's first row after the last of one.
  DK_HOST_DEVICE int64_t step(int64_t t) const { return t + 1 < T ? stride_t : stride_b - (T - 1) * stride_t; }
  // Rows n .. n + g - 1 lie in one batch entry, stride_t apart.
  DK_HOST_DEVICE bool one_entry(int64_t n, int64_t g) const { return n / T == (n + g - 1) / T; }
  DK_HOST_DEVICE static RowStrides dense(int64_t N, int64_t D) { return {N > 0 ? N : 1, N * D, D}; }
};

// The bindings' row_strides argument: (T, stride_b, stride_t), or None for a contiguous [N, D] array.
using OptRowStrides = std::optional<std::array<int64_t, 3>>;
inline RowStrides row_strides_or_dense(const OptRowStrides& s, int64_t N, int64_t D) {
  return s ? RowStrides{(*s)[0] > 0 ? (*s)[0] : 1, (*s)[1], (*s)[2]} : RowStrides::dense(N, D);
}

}  // namespace dk
