// Tensor -> raw-pointer glue of the CUDA sparse-autoencoder kernels: argument checks, output and
// workspace allocation, launcher calls. Shared by the real CUDA glue (csrc/cuda/sae_glue.cpp,
// which adds the device guard, the current stream and the SM count) and by the CPU emulator
// wrapper (csrc/emu/sae.cpp, which runs the same code on CPU tensors), so the tests exercise it.
// Needs only ATen (no CUDA headers): the launchers take the stream as void*.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "sae_cuda_launch.h"
#include "sae_problem.h"

namespace fastattn::sae_cuda_glue {

namespace L = fastattn::sae_cuda;

// Where the kernels run: the device type the tensors must be on (CUDA, or CPU in emulation),
// the stream (cudaStream_t as void*), the SM count (for the TopK encoder's column splits) and the
// device's opt-in dynamic shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin:
// 163 KB on sm_80, 99 KB on sm_86/89, 227 KB on sm_90; the emulator plays an A100 by default).
struct Env {
  c10::DeviceType device;
  void* stream;
  int num_sms;
  size_t max_smem = 166912;
};

inline L::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return L::kF32;
    case at::kHalf: return L::kF16;
    case at::kBFloat16: return L::kBF16;
    default: TORCH_CHECK(false, "cuda backend: supports dtypes float32, float16, bfloat16, got ", t.scalar_type());
  }
}

inline void check_device(const at::Tensor& t, const char* name, const Env& env) {
  TORCH_CHECK(t.device().type() == env.device, "cuda backend: ", name, " must be a ",
              c10::DeviceTypeName(env.device), " tensor, got ", t.device());
}

inline void check_launch(const char* err, const char* op) {
  TORCH_CHECK(err == nullptr, op, ": CUDA launch failed: ", err ? err : "");
}

inline const void* ptr_or_null(const std::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr() : nullptr; }

inline at::Tensor bytes_workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes > 0 ? bytes : 1)}, like.options().dtype(at::kByte));
}

// By-latent inverse index of indices [N, k]: order = stable argsort of the flattened indices,
// start [n + 1] = first position of each latent (searchsorted, so out-of-range indices land
// outside every segment instead of failing). Deterministic.
inline std::tuple<at::Tensor, at::Tensor> by_latent(const at::Tensor& indices, int64_t n) {
  auto flat = indices.reshape({-1});
  auto sorted = at::sort(flat, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  auto keys = std::get<0>(sorted).contiguous();
  auto order = std::get<1>(sorted).contiguous();
  auto start = at::searchsorted(keys, at::arange(n + 1, indices.options())).contiguous();
  return {order, start};
}

inline at::Tensor colsum(const at::Tensor& X, const Env& env) {
  const int64_t N = X.size(0), d = X.size(1);
  auto out = at::empty({d}, X.options());
  auto ws = bytes_workspace(L::colsum_workspace_bytes(N, d), X);
  check_launch(L::colsum(dtype_of(X), X.data_ptr(), out.data_ptr(), ws.data_ptr(), N, (int)d, env.stream), "colsum");
  return out;
}

inline std::tuple<at::Tensor, at::Tensor> topk_encode(const at::Tensor& x, const at::Tensor& weight,
                                                      const std::optional<at::Tensor>& bias, int64_t k,
                                                      const Env& env) {
  const int64_t n = sae_check_linear(x, weight, bias);
  check_device(x, "x", env);
  const auto dt = dtype_of(x);
  TORCH_CHECK(k >= 1 && k <= n, "k must be in [1, n = ", n, "], got ", k);
  const int64_t N = x.size(0), d = x.size(1);
  auto values = at::empty({N, k}, x.options());
  auto indices = at::empty({N, k}, x.options().dtype(at::kLong));
  auto ws = bytes_workspace(L::topk_workspace_bytes(N, n, k, env.num_sms), x);
  check_launch(L::topk_encode(dt, x.data_ptr(), weight.data_ptr(), ptr_or_null(bias), values.data_ptr(),
                              indices.data_ptr<int64_t>(), ws.data_ptr(), (int)N, (int)d, (int)n, (int)k, env.num_sms,
                              env.max_smem, env.stream),
               "topk_encode");
  return {values, indices};
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_encode_backward(const at::Tensor& grad_values,
                                                                           const at::Tensor& x,
                                                                           const at::Tensor& weight,
                                                                           const at::Tensor& indices,
                                                                           const Env& env) {
  const int64_t n = sae_check_linear(x, weight, std::nullopt);
  check_device(x, "x", env);
  const auto dt = dtype_of(x);
  TORCH_CHECK(grad_values.device() == x.device(), "grad_values must be on ", x.device());  // raw pointers below
  const auto g = grad_values.contiguous().to(x.scalar_type());
  sae_check_sparse(g, indices, n);
  TORCH_CHECK(g.size(0) == x.size(0), "grad_values must have N = ", x.size(0), " rows");
  const int64_t N = x.size(0), d = x.size(1), k = g.size(1);
  checked_int32(N * k, 0, kSizeMax, "N·k");  // both int32, so the product cannot overflow int64
  auto dx = at::empty_like(x);
  auto dW = at::empty_like(weight);
  auto db = at::empty({n}, x.options());
  check_launch(L::gather_combine(dt, g.data_ptr(), indices.data_ptr<int64_t>(), weight.data_ptr(), nullptr,
                                 dx.data_ptr(), N, (int)k, (int)d, (int)n, env.stream),
               "topk_encode_backward (dx)");
  auto [order, start] = by_latent(indices, n);
  check_launch(L::segment_scatter(dt, order.data_ptr<int64_t>(), start.data_ptr<int64_t>(), g.data_ptr(),
                                  x.data_ptr(), dW.data_ptr(), db.data_ptr(), N * k, (int)k, (int)d, (int)n,
                                  env.stream),
               "topk_encode_backward (dW)");
  return {dx, dW, db};
}

inline at::Tensor sparse_decode(const at::Tensor& values, const at::Tensor& indices, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, const Env& env) {
  check_device(values, "values", env);
  sae_check_decode(values, indices, weight, bias);
  const auto dt = dtype_of(values);
  const int64_t N = values.size(0), n = weight.size(0), d = weight.size(1), k = values.size(1);
  auto out = at::empty({N, d}, values.options());
  check_launch(L::gather_combine(dt, values.data_ptr(), indices.data_ptr<int64_t>(), weight.data_ptr(),
                                 ptr_or_null(bias), out.data_ptr(), N, (int)k, (int)d, (int)n, env.stream),
               "sparse_decode");
  return out;
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_decode_backward(const at::Tensor& grad_out,
                                                                             const at::Tensor& values,
                                                                             const at::Tensor& indices,
                                                                             const at::Tensor& weight,
                                                                             const Env& env) {
  check_device(values, "values", env);
  sae_check_decode(values, indices, weight, std::nullopt);
  const auto dt = dtype_of(values);
  const int64_t N = values.size(0), n = weight.size(0), d = weight.size(1), k = values.size(1);
  checked_int32(N * k, 0, kSizeMax, "N·k");
  TORCH_CHECK(grad_out.device() == values.device(), "grad_out must be on ", values.device());
  const auto g = grad_out.contiguous().to(values.scalar_type());
  TORCH_CHECK(g.dim() == 2 && g.size(0) == N && g.size(1) == d, "grad_out must be [N, d] = [", N, ", ", d, "]");
  auto dvalues = at::empty_like(values);
  auto dW = at::empty_like(weight);
  check_launch(L::gather_dot(dt, g.data_ptr(), indices.data_ptr<int64_t>(), weight.data_ptr(), dvalues.data_ptr(),
                             N, (int)k, (int)d, (int)n, env.stream),
               "sparse_decode_backward (dvalues)");
  auto [order, start] = by_latent(indices, n);
  check_launch(L::segment_scatter(dt, order.data_ptr<int64_t>(), start.data_ptr<int64_t>(), values.data_ptr(),
                                  g.data_ptr(), dW.data_ptr(), nullptr, N * k, (int)k, (int)d, (int)n, env.stream),
               "sparse_decode_backward (dW)");
  return {dvalues, dW, colsum(g, env)};
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> binary_encode(const at::Tensor& x, const at::Tensor& weight,
                                                                    const std::optional<at::Tensor>& bias,
                                                                    bool return_code, int64_t ste, const Env& env) {
  const int64_t n = sae_check_linear(x, weight, bias);
  TORCH_CHECK(ste >= 0 && ste <= 2, "ste must be 0 (reference), 1 (identity) or 2 (sigmoid), got ", ste);
  check_device(x, "x", env);
  const auto dt = dtype_of(x);
  const int64_t N = x.size(0), d = x.size(1);
  auto code = at::empty({N, return_code ? n : 0}, x.options());
  auto packed = at::empty({N, (n + 7) / 8}, x.options().dtype(at::kByte));
  auto counts = at::empty({n}, x.options().dtype(at::kLong));
  check_launch(L::binary_encode(dt, x.data_ptr(), weight.data_ptr(), ptr_or_null(bias),
                                return_code ? code.data_ptr() : nullptr, packed.data_ptr<uint8_t>(),
                                counts.data_ptr<int64_t>(), (int)N, (int)d, (int)n, env.stream),
               "binary_encode");
  return {code, packed, counts};
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> binary_encode_backward(const at::Tensor& grad_code,
                                                                             const at::Tensor& x,
                                                                             const at::Tensor& weight,
                                                                             const std::optional<at::Tensor>& bias,
                                                                             int64_t ste, const Env& env) {
  const int64_t n = sae_check_linear(x, weight, bias);
  TORCH_CHECK(ste >= 0 && ste <= 2, "ste must be 0 (reference), 1 (identity) or 2 (sigmoid), got ", ste);
  check_device(x, "x", env);
  const auto dt = dtype_of(x);
  TORCH_CHECK(grad_code.dim() == 2 && grad_code.size(0) == x.size(0) && grad_code.size(1) == n,
              "grad_code must be [N, n] = [", x.size(0), ", ", n, "]");
  const int64_t N = x.size(0), d = x.size(1);
  TORCH_CHECK(grad_code.device() == x.device(), "grad_code must be on ", x.device());
  const auto g = grad_code.to(x.scalar_type()).contiguous();
  auto gz = at::empty_like(g);  // the gradient with respect to the pre-activation
  check_launch(L::ste_grad(dt, (int)ste, g.data_ptr(), x.data_ptr(), weight.data_ptr(), ptr_or_null(bias),
                           gz.data_ptr(), (int)N, (int)d, (int)n, env.stream),
               "binary_encode_backward (straight-through gradient)");
  // Dense GEMMs through ATen (cuBLAS): the code is about half ones, so nothing here is sparse;
  // the fusion is in the forward pass (and the sigmoid STE's recomputed pre-activation).
  return {at::mm(gz, weight), at::mm(gz.t(), x), colsum(gz, env)};
}

inline std::tuple<at::Tensor, at::Tensor> binary_covariance_penalty(const at::Tensor& h, bool compute_grad,
                                                                    const Env& env) {
  sae_check_covariance(h);
  check_device(h, "h", env);
  const auto dt = dtype_of(h);
  const int64_t B = h.size(0), n = h.size(1);
  auto value = at::empty({}, h.options());
  auto grad = at::empty({compute_grad ? B : 0, n}, h.options());
  auto ws = bytes_workspace(L::covariance_workspace_bytes(B, n, compute_grad), h);
  check_launch(L::covariance_penalty(dt, h.data_ptr(), value.data_ptr(), compute_grad ? grad.data_ptr() : nullptr,
                                     ws.data_ptr(), (int)B, (int)n, env.stream),
               "binary_covariance_penalty");
  return {value, grad};
}

}  // namespace fastattn::sae_cuda_glue
