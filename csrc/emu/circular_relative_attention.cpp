// CPU emulation of the CUDA circular relative attention kernels (tests only; see README.md here).
// The same checks, plan and launchers as the real glue (csrc/include/cra_cuda_torch.h), on CPU
// tensors (float32, float16, bfloat16). `max_smem` plays the device's opt-in shared-memory
// limit per block (default: an A100's 163 KB), so tests can force the smaller tile plans.
#include <torch/extension.h>

#include "../cuda/circular_relative_attention.cu"
#include "cra_cuda_torch.h"

namespace {

using fastattn::cra_cuda::Device;

constexpr int64_t kA100Smem = 166912;

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const at::Tensor& table, const at::Tensor& coords,
                                           std::vector<int64_t> terms, double alpha, double scale, bool causal,
                                           const std::optional<at::Tensor>& kpm, double dropout_p, int64_t seed,
                                           int64_t max_smem, int64_t target_blocks) {
  return fastattn::cra_cuda::forward_tensors(q, k, v, table, coords, terms, alpha, scale, causal, kpm, dropout_p,
                                             seed, Device{(size_t)max_smem, nullptr, true, (int)target_blocks});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& table, const at::Tensor& coords, std::vector<int64_t> terms,
    double alpha, double scale, bool causal, const std::optional<at::Tensor>& kpm, double dropout_p, int64_t seed,
    int64_t max_smem, int64_t target_blocks) {
  return fastattn::cra_cuda::backward_tensors(grad_out, q, k, v, out, lse, table, coords, terms, alpha, scale,
                                              causal, kpm, dropout_p, seed,
                                              Device{(size_t)max_smem, nullptr, true, (int)target_blocks});
}

// The tile plan the kernels would use (for tests and for sizing on a real device).
pybind11::dict plan(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& table,
                    const at::Tensor& coords, std::vector<int64_t> terms, bool causal, bool backward,
                    int64_t max_smem, int64_t target_blocks) {
  const Device dev{(size_t)max_smem, nullptr, true, (int)target_blocks};
  const auto a = fastattn::cra_cuda::make_args(q, k, v, table, coords, terms, 1.0, 1.0, causal, std::nullopt, 0.0,
                                               0, dev);
  const auto p = fastattn::cra_cuda::make_plan_or_throw(a, (int)q.element_size(), backward, dev);
  pybind11::dict d;
  d["BQ"] = p.BQ; d["BK"] = p.BK; d["BANDP"] = p.BANDP; d["SP"] = p.SP; d["smem"] = p.smem;
  d["splits"] = p.splits; d["G"] = p.G; d["ws_floats"] = p.ws_floats; d["vec"] = a.vec;
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "CUDA circular relative attention kernels run by the CPU emulator (tests)";
  m.def("forward", &forward, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("table"), py::arg("coords"),
        py::arg("terms"), py::arg("alpha"), py::arg("scale"), py::arg("causal"), py::arg("key_padding_mask"),
        py::arg("dropout_p"), py::arg("seed"), py::arg("max_smem") = kA100Smem,
        py::arg("target_blocks") = fastattn::cra_cuda::kTargetBlocks);
  m.def("backward", &backward, py::arg("grad_out"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"),
        py::arg("lse"), py::arg("table"), py::arg("coords"), py::arg("terms"), py::arg("alpha"), py::arg("scale"),
        py::arg("causal"), py::arg("key_padding_mask"), py::arg("dropout_p"), py::arg("seed"),
        py::arg("max_smem") = kA100Smem, py::arg("target_blocks") = fastattn::cra_cuda::kTargetBlocks);
  m.def("plan", &plan, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("table"), py::arg("coords"),
        py::arg("terms"), py::arg("causal") = true, py::arg("backward") = false, py::arg("max_smem") = kA100Smem,
        py::arg("target_blocks") = fastattn::cra_cuda::kTargetBlocks);
}
