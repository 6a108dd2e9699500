// Phase A on the GPU: token-gradient vectors v = (1 - exp(logp)) h (one read of h, side sums fused
// through row_pass), or the sketch z = v @ R on the tensor cores with R's signs hashed in-kernel
// from (seed, i, j).
#include "../common/dtypes.h"
#include "../common/sketch_hash.h"
#include "common.cuh"
#include "kernels.cuh"

#include <mma.h>

namespace dk {
namespace cuda {
namespace {

// The sketch z = v @ R on the tensor cores (WMMA, 16 x 16 x 16, float32 accumulation). R's entries
// are +-1 (the 1/sqrt(r) and the per-token scale s = 1 - exp(logp) are applied to the float32
// sums), exact in bf16 and fp16; bf16 and fp16 rows are exact too, and a float32 row is split into
// three bf16 parts (8 + 8 + 8 significand bits), each multiplied in: every product is exact and
// only the float32 accumulation rounds. A block computes a [kTileTokens, kTileCols] tile of z over
// H in steps of kStepRows, hashing R's [kStepRows, kTileCols] signs into shared memory per step
// (row and column keys hashed once, one mix per sign);
// warp w owns tokens [16 w, 16 w + 16) of the tile. Grid: (column tiles, token tiles), column tiles
// fastest, so the blocks that read the same rows of h run together and share them through L2.
constexpr int kTileTokens = 16 * (kThreads / 32);  // 128: 16 per warp
constexpr int kTileCols = 64;                       // 4 fragments of 16 per warp
constexpr int kStepRows = 32;                       // 2 mma steps of 16 per step of H
constexpr int kLdA = kStepRows + 8;                 // padded leading dimensions (multiples of 8
constexpr int kLdB = kTileCols + 8;                 // halves, every fragment 32-byte aligned)
constexpr int kLdC = kTileCols + 4;

// The multiplicand type of the tensor cores and the parts a row element splits into.
template <typename T> struct MmaOf { using M = __nv_bfloat16; static constexpr int kParts = 1; };
template <> struct MmaOf<__half> { using M = __half; static constexpr int kParts = 1; };
template <> struct MmaOf<float> { using M = __nv_bfloat16; static constexpr int kParts = 3; };

template <typename T, int P, typename M>
__device__ __forceinline__ void split_parts(T x, M (&part)[P]) {
  if constexpr (P == 1) {
    part[0] = static_cast<M>(x);
  } else {
    float rest = to_f(x);
#pragma unroll
    for (int k = 0; k < P; ++k) {
      part[k] = __float2bfloat16_rn(rest);
      rest -= __bfloat162float(part[k]);
    }
  }
}

template <typename T, typename O>
__global__ void __launch_bounds__(kThreads) sketch_kernel(const T* __restrict__ hidden, const RowStrides rows,
                                                          const float* __restrict__ logp, int64_t N, int64_t H,
                                                          int64_t r, uint32_t seed_mixed, float inv_sqrt_r,
                                                          O* __restrict__ out) {
  using M = typename MmaOf<T>::M;
  constexpr int P = MmaOf<T>::kParts;
  namespace wmma = nvcuda::wmma;
  constexpr int kBytesA = P * kTileTokens * kLdA * 2, kBytesB = kStepRows * kLdB * 2;
  constexpr int kBytesC = kTileTokens * kLdC * 4;
  constexpr int kBytes = kBytesA + kBytesB > kBytesC ? kBytesA + kBytesB : kBytesC;
  __shared__ __align__(128) unsigned char smem[kBytes];
  M* a_tile = reinterpret_cast<M*>(smem);             // [P][kTileTokens][kLdA]: parts of h's rows
  M* b_tile = reinterpret_cast<M*>(smem + kBytesA);   // [kStepRows][kLdB]: +-1
  float* c_tile = reinterpret_cast<float*>(smem);     // [kTileTokens][kLdC], after the last step
  __shared__ uint32_t col_keys[kTileCols], row_keys[kStepRows];
  __shared__ int64_t row_start[kTileTokens];  // where the tile's rows of h start (rows.offset)
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kTileCols;
  const int64_t t0 = static_cast<int64_t>(blockIdx.y) * kTileTokens;
  const int warp = threadIdx.x / 32;
  if (threadIdx.x < kTileCols) col_keys[threadIdx.x] = sketch_col_key(static_cast<uint32_t>(j0 + threadIdx.x));
  if (threadIdx.x < kTileTokens) row_start[threadIdx.x] = rows.offset(t0 + threadIdx.x);
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kTileCols / 16];
#pragma unroll
  for (int n = 0; n < kTileCols / 16; ++n) wmma::fill_fragment(acc[n], 0.0f);
  for (int64_t i0 = 0; i0 < H; i0 += kStepRows) {
    __syncthreads();  // the previous step's tiles are consumed (and col_keys, row_start written)
    if (threadIdx.x < kStepRows)
      row_keys[threadIdx.x] = sketch_row_key(seed_mixed, static_cast<uint32_t>(i0 + threadIdx.x));
    // h rows [t0, t0 + kTileTokens) x columns [i0, i0 + kStepRows), zero outside [N, H).
    for (int e = threadIdx.x; e < kTileTokens * kStepRows; e += kThreads) {
      const int row = e / kStepRows, col = e % kStepRows;
      const int64_t t = t0 + row, i = i0 + col;
      M part[P];
      // volatile: read per element, not kept in registers across the steps of H (float32 rows would spill)
      const int64_t start = static_cast<volatile int64_t*>(row_start)[row];
      split_parts<T, P, M>(t < N && i < H ? hidden[start + i] : static_cast<T>(0.0f), part);
#pragma unroll
      for (int k = 0; k < P; ++k) a_tile[(k * kTileTokens + row) * kLdA + col] = part[k];
    }
    __syncthreads();  // row_keys written
    // R's signs for rows [i0, i0 + kStepRows) x columns [j0, j0 + kTileCols), zero outside [H, r).
    for (int e = threadIdx.x; e < kStepRows * kTileCols; e += kThreads) {
      const int row = e / kTileCols, col = e % kTileCols;
      const int64_t i = i0 + row, j = j0 + col;
      const float sign = i < H && j < r ? sketch_sign(row_keys[row], col_keys[col]) : 0.0f;
      b_tile[row * kLdB + col] = static_cast<M>(sign);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kStepRows; kk += 16) {
#pragma unroll
      for (int k = 0; k < P; ++k) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, M, wmma::row_major> a;
        wmma::load_matrix_sync(a, a_tile + (k * kTileTokens + warp * 16) * kLdA + kk, kLdA);
#pragma unroll
        for (int n = 0; n < kTileCols / 16; ++n) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, M, wmma::row_major> b;
          wmma::load_matrix_sync(b, b_tile + kk * kLdB + n * 16, kLdB);
          wmma::mma_sync(acc[n], a, b, acc[n]);
        }
      }
    }
  }
  __syncthreads();  // the tiles are consumed: c_tile reuses their memory
#pragma unroll
  for (int n = 0; n < kTileCols / 16; ++n)
    wmma::store_matrix_sync(c_tile + warp * 16 * kLdC + n * 16, acc[n], kLdC, wmma::mem_row_major);
  __syncthreads();
  for (int e = threadIdx.x; e < kTileTokens * kTileCols; e += kThreads) {
    const int row = e / kTileCols, col = e % kTileCols;
    const int64_t t = t0 + row, j = j0 + col;
    if (t < N && j < r) out[t * r + j] = from_f<O>(c_tile[row * kLdC + col] * (-expm1f(logp[t]) * inv_sqrt_r));
  }
}

template <typename T, typename O>
cudaError_t launch_sketch(const void* hidden, const RowStrides& rows, const float* logp, int64_t N, int64_t H,
                          int64_t r, uint32_t seed, void* out, cudaStream_t stream) {
  const float inv_sqrt_r = static_cast<float>(1.0 / sqrt(static_cast<double>(r)));
  const dim3 grid(static_cast<unsigned>((r + kTileCols - 1) / kTileCols),
                  static_cast<unsigned>((N + kTileTokens - 1) / kTileTokens));
  sketch_kernel<T, O><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(hidden), rows, logp, N, H, r,
                                                     mix32(seed), inv_sqrt_r, static_cast<O*>(out));
  return cudaGetLastError();
}

template <typename T>
cudaError_t sketch(bool out_f32, const void* hidden, const RowStrides& rows, const float* logp, int64_t N,
                   int64_t H, int64_t r, uint32_t seed, void* out, cudaStream_t stream) {
  return out_f32 ? launch_sketch<T, float>(hidden, rows, logp, N, H, r, seed, out, stream)
                 : launch_sketch<T, T>(hidden, rows, logp, N, H, r, seed, out, stream);
}

// v = s h written to out, as one row_pass over h with the scale s = 1 - exp(logp) per token.
__global__ void row_scale_kernel(const float* __restrict__ logp, int64_t N, float* __restrict__ s) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (t < N) s[t] = -expm1f(logp[t]);
}

}  // namespace

cudaError_t token_vectors(const TokenVectorsParams& p, cudaStream_t stream) {
  const int64_t N = p.n_tokens, H = p.hidden_size, r = p.sketch_dim;
  RowPassParams pass{};  // the side sums (and, for exact vectors, v itself) through one row_pass
  pass.n_tokens = N;
  pass.a_pos = p.sums ? p.a_pos : nullptr;
  pass.a_neg = p.sums ? p.a_neg : nullptr;
  pass.partial = p.partial;
  pass.sums = p.sums;
  if (r > 0) {
    if (N > 0) {
      cudaError_t err;
      switch (p.dtype) {
        case kFloat32:
          err = sketch<float>(p.out_f32, p.hidden, p.rows, p.logp, N, H, r, p.seed, p.out, stream);
          break;
        case kBFloat16:
          err = sketch<__nv_bfloat16>(p.out_f32, p.hidden, p.rows, p.logp, N, H, r, p.seed, p.out, stream);
          break;
        default:
          err = sketch<__half>(p.out_f32, p.hidden, p.rows, p.logp, N, H, r, p.seed, p.out, stream);
          break;
      }
      if (err != cudaSuccess || p.sums == nullptr) return err;
    }
    pass.dtype = p.out_f32 ? static_cast<int>(kFloat32) : p.dtype;
    pass.x = p.out;
    pass.rows = RowStrides::dense(N, r);  // z as written
    pass.width = r;
    return row_pass(pass, stream);
  }
  if (N > 0) {
    row_scale_kernel<<<static_cast<unsigned>((N + kThreads - 1) / kThreads), kThreads, 0, stream>>>(p.logp, N,
                                                                                                    p.scale_ws);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  pass.dtype = p.dtype;
  pass.x = p.hidden;
  pass.rows = p.rows;  // h read in place
  pass.scale = p.scale_ws;
  pass.width = H;
  pass.out = p.out;
  return row_pass(pass, stream);
}

}  // namespace cuda
}  // namespace dk
