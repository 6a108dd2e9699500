// delta_kernels._cpp: raw host pointers and sizes as integers; Python validates everything.
#include <pybind11/pybind11.h>

#include "kernels.h"

namespace py = pybind11;
using dk::cpu::token_vectors;

template <typename T>
static T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

PYBIND11_MODULE(_cpp, m) {
  m.doc() = "delta-kernels C++ CPU kernels (pointers as integers; see delta_kernels/backends/cpp.py)";
  m.def("sketch_matrix", [](uintptr_t out, int64_t H, int64_t r, uint32_t seed) {
    py::gil_scoped_release nogil;
    dk::cpu::sketch_matrix(ptr<float>(out), H, r, seed);
  });
  m.def("token_vectors", [](int dtype, uintptr_t hidden, uintptr_t logp, uintptr_t a_pos, uintptr_t a_neg, int64_t N,
                            int64_t H, int64_t r, uint32_t seed, uintptr_t out, uintptr_t sums) {
    py::gil_scoped_release nogil;
    token_vectors(dtype, ptr<const void>(hidden), ptr<const float>(logp), ptr<const float>(a_pos),
                  ptr<const float>(a_neg), N, H, r, seed, ptr<void>(out), ptr<float>(sums));
  });
  m.def("reduction_block", &dk::cpu::reduction_block);
}
