// CUDA registrations of the sparse-autoencoder ops (schemas: csrc/cpu/sae_ops.cpp). Compiled only
// in CUDA builds (setup.py); the kernels are in sae.cu, the tensor glue in
// csrc/include/sae_cuda_glue.h (shared with the CPU emulator wrapper csrc/emu/sae.cpp).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <array>
#include <atomic>

#include "sae_cuda_glue.h"

namespace fastattn::cuda {
namespace {

namespace G = fastattn::sae_cuda_glue;

// SM count per device, queried once (it steers only the TopK encoder's column splits).
int num_sms(int device) {
  static std::array<std::atomic<int>, 64> cache{};
  if (device < 0 || device >= 64) return 132;
  int v = cache[device].load(std::memory_order_relaxed);
  if (v == 0) {
    if (cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || v <= 0) {
      (void)cudaGetLastError();  // else the next launcher's fa_last_error() would report it
      v = 132;
    }
    cache[device].store(v, std::memory_order_relaxed);
  }
  return v;
}

// Opt-in dynamic shared memory per block of a device, queried once (99 KB on sm_86/89 runs the
// sm_80 binary with less shared memory than an A100: the TopK encoder sizes its lists by it).
size_t max_smem(int device) {
  static std::array<std::atomic<int>, 64> cache{};
  if (device < 0 || device >= 64) device = -1;
  int v = device >= 0 ? cache[device].load(std::memory_order_relaxed) : 0;
  if (v == 0) {
    int d = device;
    if (d < 0 && cudaGetDevice(&d) != cudaSuccess) d = 0;
    if (cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, d) != cudaSuccess || v <= 0) {
      (void)cudaGetLastError();  // not a launch error: fall back to the smallest sm_8x limit
      v = 101376;
    }
    if (device >= 0) cache[device].store(v, std::memory_order_relaxed);
  }
  return static_cast<size_t>(v);
}

// Call under a CUDAGuard for t's device.
G::Env env(const at::Tensor& t) {
  const auto index = t.device().index();
  return {c10::DeviceType::CUDA, static_cast<void*>(c10::cuda::getCurrentCUDAStream(index).stream()),
          num_sms(index), max_smem(index)};
}

std::tuple<at::Tensor, at::Tensor> topk_encode_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                    const std::optional<at::Tensor>& bias, int64_t k) {
  const c10::cuda::CUDAGuard guard(x.device());
  return G::topk_encode(x, weight, bias, k, env(x));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_encode_backward_cuda(const at::Tensor& grad_values,
                                                                         const at::Tensor& x, const at::Tensor& weight,
                                                                         const at::Tensor& indices) {
  const c10::cuda::CUDAGuard guard(x.device());
  return G::topk_encode_backward(grad_values, x, weight, indices, env(x));
}

at::Tensor sparse_decode_cuda(const at::Tensor& values, const at::Tensor& indices, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias) {
  const c10::cuda::CUDAGuard guard(values.device());
  return G::sparse_decode(values, indices, weight, bias, env(values));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_decode_backward_cuda(const at::Tensor& grad_out,
                                                                           const at::Tensor& values,
                                                                           const at::Tensor& indices,
                                                                           const at::Tensor& weight) {
  const c10::cuda::CUDAGuard guard(values.device());
  return G::sparse_decode_backward(grad_out, values, indices, weight, env(values));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> binary_encode_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                                  const std::optional<at::Tensor>& bias,
                                                                  bool return_code, int64_t ste) {
  const c10::cuda::CUDAGuard guard(x.device());
  return G::binary_encode(x, weight, bias, return_code, ste, env(x));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> binary_encode_backward_cuda(const at::Tensor& grad_code,
                                                                           const at::Tensor& x,
                                                                           const at::Tensor& weight,
                                                                           const std::optional<at::Tensor>& bias,
                                                                           int64_t ste) {
  const c10::cuda::CUDAGuard guard(x.device());
  return G::binary_encode_backward(grad_code, x, weight, bias, ste, env(x));
}

std::tuple<at::Tensor, at::Tensor> binary_covariance_penalty_cuda(const at::Tensor& h, bool compute_grad) {
  const c10::cuda::CUDAGuard guard(h.device());
  return G::binary_covariance_penalty(h, compute_grad, env(h));
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  m.impl("topk_encode", &topk_encode_cuda);
  m.impl("topk_encode_backward", &topk_encode_backward_cuda);
  m.impl("sparse_decode", &sparse_decode_cuda);
  m.impl("sparse_decode_backward", &sparse_decode_backward_cuda);
  m.impl("binary_encode", &binary_encode_cuda);
  m.impl("binary_encode_backward", &binary_encode_backward_cuda);
  m.impl("binary_covariance_penalty", &binary_covariance_penalty_cuda);
}

}  // namespace fastattn::cuda
