// delta_kernels._cuda: device pointers and the stream as integers, passed by keyword (keyword-only
// arguments; an optional pointer is None when unused; row_strides as in csrc/cpu/bindings.cpp).
// Links the static CUDA runtime and not libtorch, so it imports on a machine without a GPU driver;
// calls then raise RuntimeError with the CUDA error string.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <stdexcept>
#include <string>

#include "kernels.cuh"

namespace py = pybind11;
using Ptr = uintptr_t;
using OptPtr = std::optional<uintptr_t>;

static void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("delta_kernels._cuda.") + what + ": " + cudaGetErrorString(err));
}

template <typename T>
static T* ptr(Ptr p) { return reinterpret_cast<T*>(p); }
template <typename T>
static T* ptr(const OptPtr& p) { return p ? reinterpret_cast<T*>(*p) : nullptr; }
static cudaStream_t stream_of(Ptr s) { return reinterpret_cast<cudaStream_t>(s); }

// Row layout of a row operand (csrc/common/row_strides.h): the kernels divide row indices in 32 bits.
static dk::RowStrides device_rows(const dk::OptRowStrides& s, int64_t n_tokens, int64_t width) {
  if (n_tokens >= (int64_t{1} << 32)) throw std::invalid_argument("delta_kernels._cuda: n_tokens must be below 2^32");
  return dk::row_strides_or_dense(s, n_tokens, width);
}

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "delta-kernels CUDA kernels (pointers and stream as integers; see delta_kernels/backends/cuda.py)";
  m.def("device_count", [] {
    int n = 0;
    check(cudaGetDeviceCount(&n), "device_count");
    return n;
  });
  m.def("reduction_chunk_count", &dk::cuda::reduction_chunk_count, py::arg("n_tokens"),
        "token chunks of the reductions over n_tokens (partial workspace: count * 2 * width floats)");
  m.def("surrogate_tiles", &dk::cuda::surrogate_tiles, py::arg("cols"));
  m.attr("MAX_SUMS_WIDTH") = dk::cuda::kMaxSumsWidth;
  m.def("row_pass", [](int dtype, Ptr x, const dk::OptRowStrides& rows, OptPtr scale, int64_t n_tokens,
                       int64_t width, OptPtr w, OptPtr centre, OptPtr gamma, OptPtr a_pos, OptPtr a_neg,
                       OptPtr margins, OptPtr out, OptPtr partial, OptPtr sums, Ptr stream) {
    const dk::cuda::RowPassParams p{dtype, ptr<const void>(x), device_rows(rows, n_tokens, width),
                                    ptr<const float>(scale), n_tokens, width,
                                    ptr<const float>(w), ptr<const float>(centre), ptr<const float>(gamma),
                                    ptr<const float>(a_pos), ptr<const float>(a_neg), ptr<float>(margins),
                                    ptr<void>(out), ptr<float>(partial), ptr<float>(sums)};
    check(dk::cuda::row_pass(p, stream_of(stream)), "row_pass");
  }, py::kw_only(), py::arg("dtype"), py::arg("x"), py::arg("row_strides") = py::none(),
     py::arg("scale") = py::none(), py::arg("n_tokens"),
     py::arg("width"), py::arg("w") = py::none(), py::arg("centre") = py::none(), py::arg("gamma") = py::none(),
     py::arg("a_pos") = py::none(), py::arg("a_neg") = py::none(), py::arg("margins") = py::none(),
     py::arg("out") = py::none(), py::arg("partial") = py::none(), py::arg("sums") = py::none(),
     py::arg("stream"), "see RowPassParams in csrc/cuda/kernels.cuh");
  m.def("token_vectors", [](int dtype, Ptr hidden, const dk::OptRowStrides& rows, Ptr logp, Ptr a_pos,
                            Ptr a_neg, int64_t n_tokens, int64_t hidden_size, int64_t sketch_dim, uint32_t seed,
                            bool out_f32, Ptr out, Ptr scale_ws, Ptr partial, OptPtr sums, Ptr stream) {
    const dk::cuda::TokenVectorsParams p{dtype, ptr<const void>(hidden),
                                         device_rows(rows, n_tokens, hidden_size), ptr<const float>(logp),
                                         ptr<const float>(a_pos), ptr<const float>(a_neg), n_tokens, hidden_size,
                                         sketch_dim, seed, out_f32, ptr<void>(out), ptr<float>(scale_ws),
                                         ptr<float>(partial), ptr<float>(sums)};
    check(dk::cuda::token_vectors(p, stream_of(stream)), "token_vectors");
  }, py::kw_only(), py::arg("dtype"), py::arg("hidden"), py::arg("row_strides") = py::none(), py::arg("logp"),
     py::arg("a_pos"), py::arg("a_neg"), py::arg("n_tokens"), py::arg("hidden_size"), py::arg("sketch_dim") = 0,
     py::arg("seed") = 0, py::arg("out_f32") = false, py::arg("out"), py::arg("scale_ws"), py::arg("partial"),
     py::arg("sums") = py::none(), py::arg("stream"), "sketch_dim 0: exact vectors; see csrc/cuda/kernels.cuh");
  m.def("clipped_surrogate", [](Ptr logp, Ptr old_logp, Ptr adv, Ptr mask, OptPtr coef, OptPtr is_weight,
                                int64_t rows, int64_t cols, float clip_low, float clip_high, float clip_c,
                                Ptr partial, Ptr grad, Ptr stream) {
    check(dk::cuda::clipped_surrogate(ptr<const float>(logp), ptr<const float>(old_logp), ptr<const float>(adv),
                                      ptr<const uint8_t>(mask), ptr<const float>(coef),
                                      ptr<const float>(is_weight), rows, cols, clip_low, clip_high, clip_c,
                                      ptr<float>(partial), ptr<float>(grad), stream_of(stream)),
          "clipped_surrogate");
  }, py::kw_only(), py::arg("logp"), py::arg("old_logp"), py::arg("adv"), py::arg("mask"),
     py::arg("coef") = py::none(), py::arg("is_weight") = py::none(), py::arg("rows"), py::arg("cols"),
     py::arg("clip_low"), py::arg("clip_high"), py::arg("clip_c"), py::arg("partial"), py::arg("grad"),
     py::arg("stream"));
}
