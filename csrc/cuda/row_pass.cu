// The passes over [N, D] rows on the GPU: side sums, exact token vectors, margins and gated sums.
// One block per fixed chunk of tokens (reduction_chunk_tokens(N)). Per token the block reads the
// row as 16-byte vectors (element by element when the row is not 16-byte aligned), kThreads * 16
// elements per tile with 16 / VEC loads per thread issued together, and, for rows of at most
// kRegWidth, the next token's row in flight meanwhile; with margins it dots the row with w
// (fixed-order block_sum), then each thread adds its own columns into the chunk's partial sums,
// held in registers (D <= kRegWidth) or in shared memory (one row [2, D] per block) and written to
// global memory once per block. A second kernel adds the chunks in order: no atomics, the same
// bits on every run.
#include "../common/dtypes.h"
#include "common.cuh"
#include "kernels.cuh"
#include "row_vec.cuh"

namespace dk {
namespace cuda {
namespace {

constexpr int kPerThread = 16;                    // row elements per thread per tile
constexpr int64_t kRegWidth = kThreads * kPerThread;  // widest row whose sums stay in registers
// Resident 256-thread blocks per SM that the register budget must allow: 3 for 2-byte rows (<= 80
// registers: 2 rows x 2 x 16 bytes in flight per thread); 2 for float32 (4 + 4 vectors of a row in
// registers, <= 128 registers, no spill).
template <typename T> constexpr int kMinBlocks = sizeof(T) == 2 ? 3 : 2;

// x [N, D] of T, row t at x + p.rows.offset(t) (a [B, T, D] view read in place), VEC elements per load (D % VEC == 0
// and every row pointer 16-byte aligned when VEC > 1). v[t] = scale[t] x[t] (scale null: 1). w non-null: m[t] = 2
// (v[t] - c).w, the centre c [D] subtracted element by element (exact under an offset the rows share). Weights: gate
// (gamma non-null): sigmoid(m/gamma+) a_pos, sigmoid(-m/gamma-) a_neg, summed over the rows about the centre, v[t] -
// c; else a_pos, a_neg over v[t] (a_pos null: no sums). A zero weight stays zero (a padding row may hold anything:
// it is skipped, never multiplied in). out non-null: v written there. Regs: D <= kRegWidth, the sums in registers
// and the row read once per token; else the sums in shared memory [2, D] and the row read once more for the sums
// (from L1/L2). A row is read only when needed (written out, dotted, or with a nonzero weight).
template <typename T, int VEC, bool Regs>
__global__ void __launch_bounds__(kThreads, kMinBlocks<T>) row_pass_kernel(const RowPassParams p, int64_t chunk) {
  constexpr int K = kPerThread / VEC;  // loads per thread per tile
  extern __shared__ float shared_sums[];  // !Regs: [2, D]
  __shared__ float red[kThreads / 32];
  const T* x = static_cast<const T*>(p.x);
  T* out = static_cast<T*>(p.out);
  const int64_t D = p.width;
  const int64_t n_tiles = Regs ? 1 : (D + kRegWidth - 1) / kRegWidth;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * chunk;
  const int64_t t1 = t0 + chunk < p.n_tokens ? t0 + chunk : p.n_tokens;
  const bool want_sums = p.partial != nullptr;
  const bool centred = p.gamma != nullptr;  // gated sums: of v - c (scale applied to the row)
  // Column of element e of vector k of tile: tile * kRegWidth + (k * kThreads + threadIdx.x) * VEC + e.
  auto col0 = [&](int64_t tile, int k) {
    return tile * kRegWidth + (static_cast<int64_t>(k) * kThreads + threadIdx.x) * VEC;
  };
  float acc_pos[Regs ? kPerThread : 1], acc_neg[Regs ? kPerThread : 1];
#pragma unroll
  for (int i = 0; i < (Regs ? kPerThread : 1); ++i) acc_pos[i] = acc_neg[i] = 0.0f;
  if (!Regs && want_sums) {
    for (int64_t j = threadIdx.x; j < 2 * D; j += kThreads) shared_sums[j] = 0.0f;
    __syncthreads();
  }
  // A token's row is read when it is written out, dotted with w or has a nonzero weight.
  auto needs_row = [&](int64_t t) {
    return out != nullptr || p.w != nullptr ||
           (want_sums && ((p.a_pos != nullptr && p.a_pos[t] != 0.0f) || (p.a_neg != nullptr && p.a_neg[t] != 0.0f)));
  };
  auto load_tile = [&](const T* row, int64_t tile, RowVec<T, VEC>(&dst)[K]) {
#pragma unroll
    for (int k = 0; k < K; ++k)
      if (col0(tile, k) < D) dst[k].load(row + col0(tile, k));
  };
  // Regs: the row of token t + 1 is loaded while token t is dotted and added (two rows in flight).
  RowVec<T, VEC> v[K], next[K];
  // Row starts stepped token by token (p.rows.step; one division per block, none per token).
  const T* next_row = x + p.rows.offset(t0);
  int64_t place = t0 - p.rows.entry(t0) * p.rows.T;  // next_row's place in its batch entry
  if (Regs && t0 < t1 && needs_row(t0)) load_tile(next_row, 0, next);
  for (int64_t t = t0; t < t1; ++t) {
    const T* row = next_row;
    next_row += p.rows.step(place);
    place = place + 1 < p.rows.T ? place + 1 : 0;
    if (Regs) {
#pragma unroll
      for (int k = 0; k < K; ++k) v[k] = next[k];
      if (t + 1 < t1 && needs_row(t + 1)) load_tile(next_row, 0, next);
    }
    const float s = p.scale == nullptr ? 1.0f : p.scale[t];
    float wp = p.a_pos == nullptr ? 0.0f : p.a_pos[t];
    float wn = p.a_neg == nullptr ? 0.0f : p.a_neg[t];
    if (p.w != nullptr) {
      float dot = 0.0f;
      for (int64_t tile = 0; tile < n_tiles; ++tile) {
        if (!Regs) load_tile(row, tile, v);
#pragma unroll
        for (int k = 0; k < K; ++k) {
          const int64_t j = col0(tile, k);
          if (j < D) {
            float cj[VEC], wj[VEC];
            load_floats<VEC>(p.centre + j, cj);
            load_floats<VEC>(p.w + j, wj);
#pragma unroll
            for (int e = 0; e < VEC; ++e) dot += (s * v[k].get(e) - cj[e]) * wj[e];
          }
        }
      }
      const float mt = 2.0f * block_sum(dot, red);
      if (threadIdx.x == 0) p.margins[t] = mt;
      if (centred) {
        if (wp != 0.0f) wp *= 1.0f / (1.0f + expf(-mt / p.gamma[0]));
        if (wn != 0.0f) wn *= 1.0f / (1.0f + expf(mt / p.gamma[1]));
      }
    }
    if (!centred && wp != 0.0f) wp *= s;
    if (!centred && wn != 0.0f) wn *= s;
    const bool add = want_sums && (wp != 0.0f || wn != 0.0f);
    if (out == nullptr && !add) continue;
    for (int64_t tile = 0; tile < n_tiles; ++tile) {
      if (!Regs) load_tile(row, tile, v);  // Regs: the row is still in v
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int64_t j = col0(tile, k);
        if (j >= D) continue;
        RowVec<T, VEC> o = v[k];  // every element overwritten when out is written
        float cj[VEC];
        if (add && centred) load_floats<VEC>(p.centre + j, cj);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const float xj = v[k].get(e);
          if (out != nullptr) o.set(e, s * xj);
          if (!add) continue;
          const float vj = centred ? s * xj - cj[e] : xj;
          if (Regs) {
            if (wp != 0.0f) acc_pos[k * VEC + e] += wp * vj;
            if (wn != 0.0f) acc_neg[k * VEC + e] += wn * vj;
          } else {
            if (wp != 0.0f) shared_sums[j + e] += wp * vj;
            if (wn != 0.0f) shared_sums[D + j + e] += wn * vj;
          }
        }
        if (out != nullptr) o.store(out + t * D + j);
      }
    }
  }
  if (!want_sums) return;
  float* ps = p.partial + static_cast<int64_t>(blockIdx.x) * 2 * D;  // this chunk's [2, D]
  if (Regs) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t j = col0(0, k);
      if (j >= D) continue;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        ps[j + e] = acc_pos[k * VEC + e];
        ps[D + j + e] = acc_neg[k * VEC + e];
      }
    }
  } else {
    __syncthreads();
    for (int64_t j = threadIdx.x; j < 2 * D; j += kThreads) ps[j] = shared_sums[j];
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

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

template <typename T, int VEC, bool Regs>
cudaError_t launch_rows(const RowPassParams& p, int64_t chunk, int64_t n_chunks, cudaStream_t stream) {
  const size_t smem = Regs || p.partial == nullptr ? 0 : static_cast<size_t>(2 * p.width) * sizeof(float);
  if (smem > 48 * 1024) {
    cudaError_t err = cudaFuncSetAttribute(row_pass_kernel<T, VEC, Regs>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  row_pass_kernel<T, VEC, Regs><<<static_cast<unsigned>(n_chunks), kThreads, smem, stream>>>(p, chunk);
  return cudaGetLastError();
}

// 16-byte vectors when every row start (the base pointer and both row strides) and the centre and
// weight vectors allow them, else scalars (docs/backends.md, "Strided rows").
template <typename T>
cudaError_t launch(const RowPassParams& p, int64_t chunk, int64_t n_chunks, cudaStream_t stream) {
  constexpr int V = kVec16<T>;
  const bool rows16 = aligned16(p.x) && p.rows.stride_b % V == 0 && p.rows.stride_t % V == 0;
  const bool vec = p.width % V == 0 && rows16 && aligned16(p.out) && aligned16(p.w) && aligned16(p.centre);
  const bool regs = p.width <= kRegWidth;
  if (vec) return regs ? launch_rows<T, V, true>(p, chunk, n_chunks, stream)
                       : launch_rows<T, V, false>(p, chunk, n_chunks, stream);
  return regs ? launch_rows<T, 1, true>(p, chunk, n_chunks, stream)
              : launch_rows<T, 1, false>(p, chunk, n_chunks, stream);
}

}  // namespace

int64_t reduction_chunk_count(int64_t N) { return (N + reduction_chunk_tokens(N) - 1) / reduction_chunk_tokens(N); }

cudaError_t row_pass(const RowPassParams& params, cudaStream_t stream) {
  RowPassParams p = params;
  if (p.sums == nullptr) p.partial = nullptr;  // the partial workspace serves the sums only
  if (p.partial != nullptr && p.width > kMaxSumsWidth) return cudaErrorInvalidValue;
  const int64_t chunk = reduction_chunk_tokens(p.n_tokens);
  const int64_t n_chunks = reduction_chunk_count(p.n_tokens);
  if (n_chunks == 0) {  // no tokens: zero sums
    return p.sums == nullptr ? cudaSuccess
                             : cudaMemsetAsync(p.sums, 0, static_cast<size_t>(2 * p.width) * sizeof(float), stream);
  }
  cudaError_t err;
  switch (p.dtype) {
    case kFloat32: err = launch<float>(p, chunk, n_chunks, stream); break;
    case kBFloat16: err = launch<__nv_bfloat16>(p, chunk, n_chunks, stream); break;
    default: err = launch<__half>(p, chunk, n_chunks, stream); break;
  }
  if (err != cudaSuccess || p.sums == nullptr) return err;
  combine_chunks_kernel<<<static_cast<unsigned>((2 * p.width + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      p.partial, n_chunks, 2 * p.width, p.sums);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace dk
