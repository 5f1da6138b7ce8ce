// Checks of the raw sparse-autoencoder op arguments, shared by the CPU kernels and (later) the
// CUDA glue. The Python layer (fastattn/ops/sae.py) validates user-facing arguments with
// friendlier messages; these checks keep direct torch.ops calls from reading out of bounds.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace fastattn {

inline void sae_check_float(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " must have dtype ", like.scalar_type(),
              ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), name, " must be on ", like.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// x [N, d] against a weight [n, d] and an optional bias [n]; returns n.
inline int64_t sae_check_linear(const at::Tensor& x, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2, "x must be 2-D [N, d], got ", x.dim(), "-D");
  TORCH_CHECK(x.is_floating_point(), "x must be a floating-point tensor");
  TORCH_CHECK(x.is_contiguous(), "x must be contiguous");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1), "weight must be [n, d] with d = ",
              x.size(1), ", got ", weight.sizes());
  sae_check_float(weight, "weight", x);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "bias must be [n] with n = ",
                weight.size(0), ", got ", bias->sizes());
    sae_check_float(*bias, "bias", x);
  }
  TORCH_CHECK(x.size(0) <= INT32_MAX && x.size(1) <= INT32_MAX && weight.size(0) <= INT32_MAX,
              "sizes must fit in int32");
  return weight.size(0);
}

// values [N, k] (float) and indices [N, k] int64 with every index in [0, n).
inline void sae_check_sparse(const at::Tensor& values, const at::Tensor& indices, int64_t n) {
  TORCH_CHECK(values.dim() == 2, "values must be 2-D [N, k], got ", values.dim(), "-D");
  TORCH_CHECK(values.is_floating_point() && values.is_contiguous(), "values must be contiguous floating-point");
  TORCH_CHECK(indices.sizes() == values.sizes(), "indices must have the shape of values ", values.sizes(),
              ", got ", indices.sizes());
  TORCH_CHECK(indices.scalar_type() == at::kLong && indices.is_contiguous(),
              "indices must be contiguous int64");
  TORCH_CHECK(indices.device() == values.device(), "indices must be on the device of values");
  if (indices.numel() > 0 && indices.device().is_cpu()) {
    const int64_t* p = indices.data_ptr<int64_t>();
    int64_t lo = p[0], hi = p[0];
    for (int64_t i = 1; i < indices.numel(); ++i) {
      lo = std::min(lo, p[i]);
      hi = std::max(hi, p[i]);
    }
    TORCH_CHECK(lo >= 0 && hi < n, "indices must be in [0, ", n, "), got values in [", lo, ", ", hi, "]");
  }
}

}  // namespace fastattn
