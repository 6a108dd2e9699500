// delta_kernels._cpp: raw host pointers and sizes as integers; Python validates everything.
#include <pybind11/pybind11.h>

#include "kernels.h"

namespace py = pybind11;

template <typename T>
static T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

PYBIND11_MODULE(_cpp, m) {
  m.doc() = "delta-kernels C++ CPU kernels (pointers as integers; see delta_kernels/backends/cpp.py)";
  m.def("sketch_matrix", [](uintptr_t out, int64_t H, int64_t r, uint32_t seed) {
    py::gil_scoped_release nogil;
    dk::cpu::sketch_matrix(ptr<float>(out), H, r, seed);
  });
  m.def("token_vectors", [](int dtype, uintptr_t hidden, uintptr_t logp, uintptr_t a_pos, uintptr_t a_neg, int64_t N,
                            int64_t H, int64_t r, uint32_t seed, bool out_f32, uintptr_t out, uintptr_t sums) {
    py::gil_scoped_release nogil;
    dk::cpu::token_vectors(dtype, ptr<const void>(hidden), ptr<const float>(logp), ptr<const float>(a_pos),
                           ptr<const float>(a_neg), N, H, r, seed, out_f32, ptr<void>(out), ptr<float>(sums));
  });
  m.def("side_sums", [](int dtype, uintptr_t v, uintptr_t scale, uintptr_t a_pos, uintptr_t a_neg, int64_t N, int64_t D,
                        uintptr_t sums) {
    py::gil_scoped_release nogil;
    dk::cpu::side_sums(dtype, ptr<const void>(v), ptr<const float>(scale), ptr<const float>(a_pos), ptr<const float>(a_neg), N, D,
                       ptr<float>(sums));
  });
  m.def("margin_pass", [](int dtype, uintptr_t v, uintptr_t scale, uintptr_t w, uintptr_t c, int64_t N, int64_t D, uintptr_t gamma,
                          uintptr_t a_pos, uintptr_t a_neg, uintptr_t m_out, uintptr_t sums) {
    py::gil_scoped_release nogil;
    dk::cpu::margin_pass(dtype, ptr<const void>(v), ptr<const float>(scale), ptr<const float>(w), ptr<const float>(c), N, D,
                         ptr<const float>(gamma), ptr<const float>(a_pos), ptr<const float>(a_neg),
                         ptr<float>(m_out), ptr<float>(sums));
  }, "scale = 0: v as stored; gamma = 0: plain margins (a_pos, a_neg, sums unused)");
  m.def("clipped_surrogate", [](uintptr_t logp, uintptr_t old_logp, uintptr_t adv, uintptr_t mask, uintptr_t coef,
                                uintptr_t is_weight, int64_t B, int64_t T, float clip_low, float clip_high,
                                float clip_c, uintptr_t rows, uintptr_t grad) {
    py::gil_scoped_release nogil;
    dk::cpu::clipped_surrogate(ptr<const float>(logp), ptr<const float>(old_logp), ptr<const float>(adv),
                               ptr<const uint8_t>(mask), ptr<const float>(coef), ptr<const float>(is_weight), B, T,
                               clip_low, clip_high, clip_c, ptr<double>(rows), ptr<float>(grad));
  }, "coef = 0, is_weight = 0: none");
  m.def("reduction_block", &dk::cpu::reduction_block);
  m.def("simd_level", &dk::cpu::simd_level,
        "1: the row passes run their AVX2 clones, 0: the SSE2 baseline (DELTA_KERNELS_CPU_SIMD=baseline); same bits");
}
