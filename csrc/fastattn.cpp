// The fastattn._C module: op schemas (defined once here; each device registers its kernels in
// its own file) and a pybind11 module with build information.
#include <torch/extension.h>

#ifdef _OPENMP
#include <omp.h>
#endif

TORCH_LIBRARY(fastattn, m) {
  // Fused forward: returns (out [B, H, Lq, D], lse [B, H, Lq]). ``table`` [Ht, N, D] holds every
  // relative term's rows; ``terms`` describes each term (see csrc/include/cra_common.h).
  m.def("circular_relative_attention(Tensor q, Tensor k, Tensor v, Tensor table, Tensor coords, "
        "int[] terms, float alpha, float scale, bool causal, Tensor? key_padding_mask, "
        "float dropout_p, int seed) -> (Tensor, Tensor)");
  // Returns (dq, dk, dv, dtable).
  m.def("circular_relative_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, "
        "Tensor out, Tensor lse, Tensor table, Tensor coords, int[] terms, float alpha, "
        "float scale, bool causal, Tensor? key_padding_mask, float dropout_p, int seed) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
}

namespace py = pybind11;

static py::dict build_info() {
  py::dict info;
  py::list backends;
  backends.append("cpp");
#ifdef FASTATTN_WITH_CUDA
  backends.append("cuda");
  info["cuda_archs"] = FASTATTN_CUDA_ARCHS;
#else
  info["cuda_archs"] = "";
#endif
  info["backends"] = backends;
#ifdef _OPENMP
  info["openmp"] = true;
  info["omp_max_threads"] = omp_get_max_threads();
#else
  info["openmp"] = false;
  info["omp_max_threads"] = 1;
#endif
  info["aten_threads"] = at::get_num_threads();
  info["torch_version_built"] = FASTATTN_TORCH_VERSION;
  return info;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastattn compiled kernels (ops are registered under torch.ops.fastattn)";
  m.def("build_info", &build_info, "Backends, CUDA archs and threading this extension was built with");
}
