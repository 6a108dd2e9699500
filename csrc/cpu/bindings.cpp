// delta_kernels._cpp: host pointers and sizes as integers, passed by keyword (keyword-only
// arguments; an optional pointer is None when unused). Python validates everything. row_strides:
// (T, stride_b, stride_t) of a [B, T, D] row operand read in place (common/row_strides.h), in
// elements; None: a contiguous [N, D] array.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>

#include "kernels.h"

namespace py = pybind11;
using Ptr = uintptr_t;
using OptPtr = std::optional<uintptr_t>;

template <typename T>
static T* ptr(Ptr p) { return reinterpret_cast<T*>(p); }
template <typename T>
static T* ptr(const OptPtr& p) { return p ? reinterpret_cast<T*>(*p) : nullptr; }

PYBIND11_MODULE(_cpp, m) {
  m.doc() = "delta-kernels C++ CPU kernels (pointers as integers; see delta_kernels/backends/cpp.py)";
  m.def("sketch_matrix", [](Ptr out, int64_t hidden_size, int64_t sketch_dim, uint32_t seed) {
    py::gil_scoped_release nogil;
    dk::cpu::sketch_matrix(ptr<float>(out), hidden_size, sketch_dim, seed);
  }, py::kw_only(), py::arg("out"), py::arg("hidden_size"), py::arg("sketch_dim"), py::arg("seed"));
  m.def("token_vectors", [](int dtype, Ptr hidden, const dk::OptRowStrides& rows, Ptr logp, Ptr a_pos, Ptr a_neg,
                            int64_t n_tokens, int64_t hidden_size, int64_t sketch_dim, uint32_t seed, bool out_f32,
                            Ptr out, Ptr sums) {
    py::gil_scoped_release nogil;
    dk::cpu::token_vectors(dtype, ptr<const void>(hidden), dk::row_strides_or_dense(rows, n_tokens, hidden_size),
                           ptr<const float>(logp), ptr<const float>(a_pos), ptr<const float>(a_neg), n_tokens,
                           hidden_size, sketch_dim, seed, out_f32, ptr<void>(out), ptr<float>(sums));
  }, py::kw_only(), py::arg("dtype"), py::arg("hidden"), py::arg("row_strides") = py::none(), py::arg("logp"),
     py::arg("a_pos"), py::arg("a_neg"), py::arg("n_tokens"), py::arg("hidden_size"), py::arg("sketch_dim") = 0, py::arg("seed") = 0,
     py::arg("out_f32") = false, py::arg("out"), py::arg("sums"), "sketch_dim 0: exact vectors");
  m.def("side_sums", [](int dtype, Ptr x, const dk::OptRowStrides& rows, OptPtr scale, Ptr a_pos, Ptr a_neg,
                        int64_t n_tokens, int64_t width, Ptr sums) {
    py::gil_scoped_release nogil;
    dk::cpu::side_sums(dtype, ptr<const void>(x), dk::row_strides_or_dense(rows, n_tokens, width),
                       ptr<const float>(scale), ptr<const float>(a_pos), ptr<const float>(a_neg), n_tokens, width,
                       ptr<float>(sums));
  }, py::kw_only(), py::arg("dtype"), py::arg("x"), py::arg("row_strides") = py::none(), py::arg("scale") = py::none(),
     py::arg("a_pos"), py::arg("a_neg"), py::arg("n_tokens"), py::arg("width"), py::arg("sums"),
     "scale None: the rows as stored");
  m.def("margin_pass", [](int dtype, Ptr x, const dk::OptRowStrides& rows, OptPtr scale, Ptr w, Ptr centre,
                          int64_t n_tokens, int64_t width, OptPtr gamma, OptPtr a_pos, OptPtr a_neg, Ptr margins,
                          OptPtr sums) {
    py::gil_scoped_release nogil;
    dk::cpu::margin_pass(dtype, ptr<const void>(x), dk::row_strides_or_dense(rows, n_tokens, width),
                         ptr<const float>(scale), ptr<const float>(w), ptr<const float>(centre), n_tokens, width, ptr<const float>(gamma),
                         ptr<const float>(a_pos), ptr<const float>(a_neg), ptr<float>(margins), ptr<float>(sums));
  }, py::kw_only(), py::arg("dtype"), py::arg("x"), py::arg("row_strides") = py::none(), py::arg("scale") = py::none(),
     py::arg("w"), py::arg("centre"), py::arg("n_tokens"), py::arg("width"), py::arg("gamma") = py::none(), py::arg("a_pos") = py::none(),
     py::arg("a_neg") = py::none(), py::arg("margins"), py::arg("sums") = py::none(),
     "scale None: the rows as stored; gamma None: plain margins (a_pos, a_neg, sums unused)");
  m.def("clipped_surrogate", [](Ptr logp, Ptr old_logp, Ptr adv, Ptr mask, OptPtr coef, OptPtr is_weight,
                                int64_t rows, int64_t cols, float clip_low, float clip_high, float clip_c,
                                Ptr row_stats, Ptr grad) {
    py::gil_scoped_release nogil;
    dk::cpu::clipped_surrogate(ptr<const float>(logp), ptr<const float>(old_logp), ptr<const float>(adv),
                               ptr<const uint8_t>(mask), ptr<const float>(coef), ptr<const float>(is_weight), rows,
                               cols, clip_low, clip_high, clip_c, ptr<double>(row_stats), ptr<float>(grad));
  }, py::kw_only(), py::arg("logp"), py::arg("old_logp"), py::arg("adv"), py::arg("mask"),
     py::arg("coef") = py::none(), py::arg("is_weight") = py::none(), py::arg("rows"), py::arg("cols"),
     py::arg("clip_low"), py::arg("clip_high"), py::arg("clip_c"), py::arg("row_stats"), py::arg("grad"));
  m.def("fipo_weights", [](Ptr logp, Ptr old_logp, Ptr adv, Ptr mask, int64_t rows, int64_t cols, double gamma,
                           float log_clip_c, float clip_c, float lower, float upper, bool clip_lower,
                           float safety_thresh, float at_upper, float at_lower, Ptr weights, Ptr future_kl, Ptr keep,
                           Ptr row_stats) {
    py::gil_scoped_release nogil;
    dk::cpu::fipo_weights(ptr<const float>(logp), ptr<const float>(old_logp), ptr<const float>(adv),
                          ptr<const uint8_t>(mask), rows, cols, gamma, log_clip_c, clip_c, lower, upper, clip_lower,
                          safety_thresh, at_upper, at_lower, ptr<float>(weights), ptr<float>(future_kl),
                          ptr<uint8_t>(keep), ptr<float>(row_stats));
  }, py::kw_only(), py::arg("logp"), py::arg("old_logp"), py::arg("adv"), py::arg("mask"), py::arg("rows"),
     py::arg("cols"), py::arg("gamma"), py::arg("log_clip_c"), py::arg("clip_c"), py::arg("lower"), py::arg("upper"),
     py::arg("clip_lower"), py::arg("safety_thresh"), py::arg("at_upper"), py::arg("at_lower"), py::arg("weights"),
     py::arg("future_kl"), py::arg("keep"), py::arg("row_stats"));
  m.def("fipo_surrogate", [](Ptr logp, Ptr old_logp, Ptr adv, Ptr mask, OptPtr coef, OptPtr is_weight, int64_t rows,
                             int64_t cols, double gamma, float log_clip_c, float fipo_clip_c, float lower, float upper,
                             bool clip_lower, float safety_thresh, float at_upper, float at_lower, float clip_low,
                             float clip_high, float clip_c, Ptr row_stats, Ptr grad, Ptr keep, Ptr metrics) {
    py::gil_scoped_release nogil;
    dk::cpu::fipo_surrogate(ptr<const float>(logp), ptr<const float>(old_logp), ptr<const float>(adv),
                            ptr<const uint8_t>(mask), ptr<const float>(coef), ptr<const float>(is_weight), rows, cols,
                            gamma, log_clip_c, fipo_clip_c, lower, upper, clip_lower, safety_thresh, at_upper,
                            at_lower, clip_low, clip_high, clip_c, ptr<double>(row_stats), ptr<float>(grad),
                            ptr<uint8_t>(keep), ptr<float>(metrics));
  }, py::kw_only(), py::arg("logp"), py::arg("old_logp"), py::arg("adv"), py::arg("mask"),
     py::arg("coef") = py::none(), py::arg("is_weight") = py::none(), py::arg("rows"), py::arg("cols"),
     py::arg("gamma"), py::arg("log_clip_c"), py::arg("fipo_clip_c"), py::arg("lower"), py::arg("upper"),
     py::arg("clip_lower"), py::arg("safety_thresh"), py::arg("at_upper"), py::arg("at_lower"), py::arg("clip_low"),
     py::arg("clip_high"), py::arg("clip_c"), py::arg("row_stats"), py::arg("grad"), py::arg("keep"),
     py::arg("metrics"));
  m.def("reduction_block_tokens", &dk::cpu::reduction_block_tokens, py::arg("n_tokens"),
        "tokens per block of the CPU reductions over n_tokens");
  m.def("simd_level", &dk::cpu::simd_level,
        "1: the row passes run their AVX2 clones, 0: the SSE2 baseline (DELTA_KERNELS_CPU_SIMD=baseline); same bits");
}
