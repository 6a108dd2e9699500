// delta_kernels._cuda: raw device pointers, sizes and the stream as integers. Links the static
// CUDA runtime and not libtorch, so it imports on a machine without a GPU driver; calls then
// raise RuntimeError with the CUDA error string.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "kernels.cuh"

namespace py = pybind11;

static void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("delta_kernels._cuda.") + what + ": " + cudaGetErrorString(err));
}

template <typename T>
static T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }
static cudaStream_t stream_of(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "delta-kernels CUDA kernels (pointers and stream as integers; see delta_kernels/backends/cuda.py)";
  m.def("device_count", [] {
    int n = 0;
    check(cudaGetDeviceCount(&n), "device_count");
    return n;
  });
  m.def("reduction_chunks", &dk::cuda::reduction_chunks);
  m.def("surrogate_tiles", &dk::cuda::surrogate_tiles);
  m.def("row_pass", [](int dtype, uintptr_t x, uintptr_t scale, int64_t N, int64_t D, uintptr_t w, uintptr_t c,
                       uintptr_t gamma, uintptr_t a_pos, uintptr_t a_neg, uintptr_t m_out, uintptr_t out,
                       uintptr_t partial, uintptr_t sums, uintptr_t stream) {
    check(dk::cuda::row_pass(dtype, ptr<const void>(x), ptr<const float>(scale), N, D, ptr<const float>(w),
                             ptr<const float>(c), ptr<const float>(gamma), ptr<const float>(a_pos),
                             ptr<const float>(a_neg), ptr<float>(m_out), ptr<void>(out), ptr<float>(partial),
                             ptr<float>(sums), stream_of(stream)),
          "row_pass");
  }, "0 for an unused pointer; see kernels.cuh");
  m.def("token_vectors", [](int dtype, uintptr_t hidden, uintptr_t logp, uintptr_t a_pos, uintptr_t a_neg, int64_t N,
                            int64_t H, int64_t r, uint32_t seed, bool out_f32, uintptr_t out, uintptr_t scale_ws,
                            uintptr_t partial, uintptr_t sums, uintptr_t stream) {
    check(dk::cuda::token_vectors(dtype, ptr<const void>(hidden), ptr<const float>(logp), ptr<const float>(a_pos),
                                  ptr<const float>(a_neg), N, H, r, seed, out_f32, ptr<void>(out),
                                  ptr<float>(scale_ws), ptr<float>(partial), ptr<float>(sums), stream_of(stream)),
          "token_vectors");
  });
  m.def("clipped_surrogate", [](uintptr_t logp, uintptr_t old_logp, uintptr_t adv, uintptr_t mask, uintptr_t coef,
                                uintptr_t is_weight, int64_t B, int64_t T, float clip_low, float clip_high,
                                float clip_c, uintptr_t partial, uintptr_t grad, uintptr_t stream) {
    check(dk::cuda::clipped_surrogate(ptr<const float>(logp), ptr<const float>(old_logp), ptr<const float>(adv),
                                      ptr<const uint8_t>(mask), ptr<const float>(coef), ptr<const float>(is_weight), B,
                                      T, clip_low, clip_high, clip_c, ptr<float>(partial), ptr<float>(grad),
                                      stream_of(stream)),
          "clipped_surrogate");
  });
}
