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

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "delta-kernels CUDA kernels (pointers and stream as integers; see delta_kernels/backends/cuda.py)";
  m.def("device_count", [] {
    int n = 0;
    check(cudaGetDeviceCount(&n), "device_count");
    return n;
  });
  m.def("token_vectors", [](int dtype, uintptr_t hidden, uintptr_t logp, int64_t N, int64_t H, uintptr_t out,
                            uintptr_t stream) {
    check(dk::cuda::token_vectors(dtype, ptr<const void>(hidden), ptr<const float>(logp), N, H, ptr<void>(out),
                                  reinterpret_cast<cudaStream_t>(stream)),
          "token_vectors");
  });
}
