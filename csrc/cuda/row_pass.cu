// The passes over [N, D] rows on the GPU: side sums, exact token vectors, margins and gated sums.
// One block per fixed chunk of tokens (reduction_chunk(N)); per token the block dots the row with w
// (fixed-order block_sum) when margins are asked for, then each thread adds its own columns into
// the chunk's partial row [2, D] (no atomics); a second kernel adds the chunks in order.
#include "../common/dtypes.h"
#include "common.cuh"
#include "kernels.cuh"

namespace dk {
namespace cuda {
namespace {

// x [N, D] of T; v[t] = scale[t] x[t] (scale null: 1). w non-null: m[t] = 2 (v[t] - c).w, the
// centre c [D] subtracted element by element (exact under an offset the rows share).
// Weights: gate (gamma non-null): sigmoid(m/gamma+) a_pos, sigmoid(-m/gamma-) a_neg, summed over the
// rows about the centre, v[t] - c; else a_pos, a_neg over v[t] (a_pos null: no sums). A zero weight
// stays zero (a padding row may hold anything: it is skipped, never multiplied in). out non-null: v
// written there.
template <typename T>
__global__ void row_pass_kernel(const T* __restrict__ x, const float* __restrict__ scale, int64_t N, int64_t D,
                                int64_t chunk, const float* __restrict__ w, const float* __restrict__ c,
                                const float* __restrict__ gamma, const float* __restrict__ a_pos,
                                const float* __restrict__ a_neg, float* __restrict__ m, T* __restrict__ out,
                                float* __restrict__ partial) {
  __shared__ float red[kThreads / 32];
  const int64_t blk = blockIdx.x;
  const int64_t t0 = blk * chunk;
  const int64_t t1 = t0 + chunk < N ? t0 + chunk : N;
  float* ps = partial == nullptr ? nullptr : partial + blk * 2 * D;
  float* ns = ps == nullptr ? nullptr : ps + D;
  if (ps != nullptr)
    for (int64_t j = threadIdx.x; j < 2 * D; j += kThreads) ps[j] = 0.0f;
  for (int64_t t = t0; t < t1; ++t) {
    const T* row = x + t * D;
    const float s = scale == nullptr ? 1.0f : scale[t];
    float wp = a_pos == nullptr ? 0.0f : a_pos[t];
    float wn = a_neg == nullptr ? 0.0f : a_neg[t];
    if (w != nullptr) {
      float acc = 0.0f;
      for (int64_t j = threadIdx.x; j < D; j += kThreads) acc += (s * to_f(row[j]) - c[j]) * w[j];
      const float mt = 2.0f * block_sum(acc, red);
      if (threadIdx.x == 0) m[t] = mt;
      if (gamma != nullptr) {
        if (wp != 0.0f) wp *= 1.0f / (1.0f + expf(-mt / gamma[0]));
        if (wn != 0.0f) wn *= 1.0f / (1.0f + expf(mt / gamma[1]));
      }
    }
    const bool centred = gamma != nullptr;  // gated sums: of v - c (scale applied to the row)
    if (!centred && wp != 0.0f) wp *= s;
    if (!centred && wn != 0.0f) wn *= s;
    if (out != nullptr || (ps != nullptr && (wp != 0.0f || wn != 0.0f))) {
      for (int64_t j = threadIdx.x; j < D; j += kThreads) {
        const float xj = to_f(row[j]);
        if (out != nullptr) out[t * D + j] = from_f<T>(s * xj);
        if (ps != nullptr) {
          const float vj = centred ? s * xj - c[j] : xj;
          if (wp != 0.0f) ps[j] += wp * vj;
          if (wn != 0.0f) ns[j] += wn * vj;
        }
      }
    }
  }
}

// sums[j] = sum over chunks, in order, of partial[c][j], j < width.
__global__ void combine_chunks_kernel(const float* __restrict__ partial, int64_t n_chunks, int64_t width,
                                      float* __restrict__ sums) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= width) return;
  float acc = 0.0f;
  for (int64_t c = 0; c < n_chunks; ++c) acc += partial[c * width + j];
  sums[j] = acc;
}

template <typename T>
cudaError_t launch(const void* x, const float* scale, int64_t N, int64_t D, const float* w, const float* c,
                   const float* gamma, const float* a_pos, const float* a_neg, float* m, void* out, float* partial,
                   float* sums, cudaStream_t stream) {
  const int64_t chunk = reduction_chunk(N);
  const int64_t n_chunks = (N + chunk - 1) / chunk;
  if (sums != nullptr && n_chunks == 0) {  // no tokens: zero sums
    return cudaMemsetAsync(sums, 0, static_cast<size_t>(2 * D) * sizeof(float), stream);
  }
  if (n_chunks == 0) return cudaSuccess;
  row_pass_kernel<T><<<static_cast<unsigned>(n_chunks), kThreads, 0, stream>>>(
      static_cast<const T*>(x), scale, N, D, chunk, w, c, gamma, a_pos, a_neg, m, static_cast<T*>(out),
      sums == nullptr ? nullptr : partial);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || sums == nullptr) return err;
  combine_chunks_kernel<<<static_cast<unsigned>((2 * D + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      partial, n_chunks, 2 * D, sums);
  return cudaGetLastError();
}

}  // namespace

int64_t reduction_chunks(int64_t N) { return (N + reduction_chunk(N) - 1) / reduction_chunk(N); }

cudaError_t row_pass(int dtype, const void* x, const float* scale, int64_t N, int64_t D, const float* w,
                     const float* c, const float* gamma, const float* a_pos, const float* a_neg, float* m, void* out,
                     float* partial, float* sums, cudaStream_t stream) {
  switch (dtype) {
    case kFloat32:
      return launch<float>(x, scale, N, D, w, c, gamma, a_pos, a_neg, m, out, partial, sums, stream);
    case kBFloat16:
      return launch<__nv_bfloat16>(x, scale, N, D, w, c, gamma, a_pos, a_neg, m, out, partial, sums, stream);
    default:
      return launch<__half>(x, scale, N, D, w, c, gamma, a_pos, a_neg, m, out, partial, sums, stream);
  }
}

}  // namespace cuda
}  // namespace dk
