// CPU-emulated build of the CUDA sparse-autoencoder kernels (tests/test_sae_ops.py, -k cuda_emu).
// The kernels (../cuda/sae.cu) run under csrc/include/fa_cuda.h's emulator; the functions below
// take the torch ops' arguments on CPU tensors and go through the same glue as the real CUDA
// build (csrc/include/sae_cuda_glue.h), with stream = nullptr.
#include <torch/extension.h>

#include "../cuda/sae.cu"
#include "sae_cuda_glue.h"

namespace {

namespace G = fastattn::sae_cuda_glue;

// The SM count steers only the TopK encoder's column splits; tests vary it to cover the merge.
int g_num_sms = 4;
// The device's opt-in shared memory per block (an A100's by default); tests lower it to an
// sm_86/89's 99 KB to run the TopK encoder's workspace lists at small k.
size_t g_max_smem = 166912;

G::Env env() { return {c10::DeviceType::CPU, nullptr, g_num_sms, g_max_smem}; }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("set_num_sms", [](int s) { g_num_sms = s; }, "SM count assumed by the TopK column splits");
  m.def("set_max_smem", [](int64_t b) { g_max_smem = static_cast<size_t>(b); },
        "opt-in shared memory per block of the emulated device (bytes)");
  m.def("topk_smem_lists", [](const at::Tensor& like, int64_t k) {
    return fastattn::sae_cuda::topk_smem_lists(G::dtype_of(like), k, g_max_smem);
  });
  m.def("topk_splits", [](int64_t N, int64_t n, int64_t k) { return fastattn::sae_cuda::topk_splits(N, n, k, g_num_sms); });
  m.def("topk_encode", [](const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b, int64_t k) {
    return G::topk_encode(x, w, b, k, env());
  });
  m.def("topk_encode_backward", [](const at::Tensor& g, const at::Tensor& x, const at::Tensor& w, const at::Tensor& i) {
    return G::topk_encode_backward(g, x, w, i, env());
  });
  m.def("sparse_decode", [](const at::Tensor& v, const at::Tensor& i, const at::Tensor& w,
                            const std::optional<at::Tensor>& b) { return G::sparse_decode(v, i, w, b, env()); });
  m.def("sparse_decode_backward", [](const at::Tensor& g, const at::Tensor& v, const at::Tensor& i, const at::Tensor& w) {
    return G::sparse_decode_backward(g, v, i, w, env());
  });
  m.def("binary_encode", [](const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b,
                            bool return_code, int64_t ste) { return G::binary_encode(x, w, b, return_code, ste, env()); });
  m.def("binary_encode_backward", [](const at::Tensor& g, const at::Tensor& x, const at::Tensor& w,
                                     const std::optional<at::Tensor>& b, int64_t ste) {
    return G::binary_encode_backward(g, x, w, b, ste, env());
  });
  m.def("binary_covariance_penalty", [](const at::Tensor& h, bool compute_grad) {
    return G::binary_covariance_penalty(h, compute_grad, env());
  });
}
