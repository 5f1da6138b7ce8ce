// Torch glue of the CUDA circular relative attention kernels (compiled only in CUDA builds):
// registers them for the CUDA dispatch key of the ops declared in csrc/fastattn.cpp. The
// tensor -> launcher code is shared with the CPU emulator's wrapper (cra_cuda_torch.h).
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include "cra_cuda_torch.h"

namespace fastattn::cra_cuda {
namespace {

Device cuda_device(const at::Tensor& q) {
  TORCH_CHECK(q.is_cuda(), "cuda backend: tensors must be on a CUDA device");
  int optin = 0;
  const cudaError_t e = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, q.get_device());
  if (e != cudaSuccess) (void)cudaGetLastError();  // not left for the launchers' fa_last_error()
  TORCH_CHECK(e == cudaSuccess, "cudaDeviceGetAttribute: ", cudaGetErrorString(e));
  return Device{(size_t)optin, c10::cuda::getCurrentCUDAStream(q.get_device()).stream(), false};
}

std::tuple<at::Tensor, at::Tensor> cra_forward_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& table, const at::Tensor& coords,
    at::IntArrayRef terms, double alpha, double scale, bool causal, const std::optional<at::Tensor>& kpm,
    double dropout_p, int64_t seed) {
  const c10::cuda::CUDAGuard guard(q.device());
  return forward_tensors(q, k, v, table, coords, terms, alpha, scale, causal, kpm, dropout_p, seed, cuda_device(q));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cra_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& table, const at::Tensor& coords, at::IntArrayRef terms, double alpha,
    double scale, bool causal, const std::optional<at::Tensor>& kpm, double dropout_p, int64_t seed) {
  const c10::cuda::CUDAGuard guard(q.device());
  return backward_tensors(grad_out, q, k, v, out, lse, table, coords, terms, alpha, scale, causal, kpm, dropout_p,
                          seed, cuda_device(q));
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  m.impl("circular_relative_attention", &cra_forward_cuda);
  m.impl("circular_relative_attention_backward", &cra_backward_cuda);
}

}  // namespace fastattn::cra_cuda
