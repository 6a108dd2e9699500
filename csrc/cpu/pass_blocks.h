// The fixed-block reduction shared by the CPU passes: tokens split into blocks of
// reduction_block_tokens(N) (a function of N only), each block's partial sums accumulated by one thread
// in token order, the partials combined in block order. The result depends neither on the number
// of threads nor on the schedule. The partial buffer (up to 16 MiB) is kept per calling thread
// and each block zeroes its own slice, so a call neither allocates nor faults in fresh pages.
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

#include "kernels.h"
#include "row_ops.h"

namespace dk {
namespace cpu {

// Floats between the per-side partial rows: D + kSidePad, so that a side's row of partial sums
// and a row of h (H = 1024 floats = 4 KiB) do not share their address bits below 4 KiB (loads
// of h would wait on the stores of the sums: 4K aliasing).
constexpr int64_t kSidePad = 24;

// block_fn(t0, t1, sums) adds tokens [t0, t1) into sums[s * (D + kSidePad) + j], s < sides,
// j < D (zeroed here first); out [sides, D] gets the block sums combined in block order.
template <typename BlockFn>
void run_reduction_blocks(int64_t N, int sides, int64_t D, float* out, const BlockFn& block_fn) {
  const int64_t block = reduction_block_tokens(N);
  const int64_t n_blocks = (N + block - 1) / block;
  const int64_t side_stride = D + kSidePad, stride = sides * side_stride;
  if (n_blocks == 0) {
    std::fill(out, out + sides * D, 0.0f);
    return;
  }
  // Reused up to kKeepFloats (16 MiB); a larger call uses a buffer of its own.
  constexpr size_t kKeepFloats = size_t{1} << 22;
  const size_t need = static_cast<size_t>(n_blocks * stride);
  thread_local std::vector<float> kept;
  std::vector<float> own;
  std::vector<float>& partial = need <= kKeepFloats ? kept : own;
  if (partial.size() < need) partial.resize(need);
  float* base = partial.data();
  // Dynamic: a block's partial does not depend on which thread ran it, and a thread that the OS
  // preempts (a busy 2-core machine) does not hold up half of the pass.
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t blk = 0; blk < n_blocks; ++blk) {
    float* p = base + blk * stride;
    std::fill(p, p + stride, 0.0f);
    block_fn(blk * block, std::min(N, (blk + 1) * block), p);
  }
  // out[s, j] = sum over blocks, in block order.
#pragma omp parallel for schedule(static)
  for (int64_t s = 0; s < sides; ++s) {
    float* o = out + s * D;
    std::fill(o, o + D, 0.0f);
    for (int64_t blk = 0; blk < n_blocks; ++blk) {
      const float* p = base + blk * stride + s * side_stride;
      for (int64_t j = 0; j < D; ++j) o[j] += p[j];
    }
  }
}

}  // namespace cpu
}  // namespace dk
