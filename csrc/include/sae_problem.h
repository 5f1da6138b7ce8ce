// Checks of the raw sparse-autoencoder op arguments, shared by the CPU kernels and (later) the
// CUDA glue. The Python layer (fastattn/ops/sae.py) validates user-facing arguments with
// friendlier messages; these checks keep direct torch.ops calls from reading out of bounds.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "check_bounds.h"

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
  checked_size(x.size(0), "x: N");
  checked_size(x.size(1), "x: d");
  return checked_size(weight.size(0), "weight: n");
}

// values [N, k] (float) and indices [N, k] int64 with every index in [0, n) (values read back
// on CPU only: the CUDA kernels skip indices outside [0, n) themselves, without a device sync).
inline void sae_check_sparse(const at::Tensor& values, const at::Tensor& indices, int64_t n) {
  TORCH_CHECK(values.dim() == 2, "values must be 2-D [N, k], got ", values.dim(), "-D");
  TORCH_CHECK(values.is_floating_point() && values.is_contiguous(), "values must be contiguous floating-point");
  TORCH_CHECK(indices.sizes() == values.sizes(), "indices must have the shape of values ", values.sizes(),
              ", got ", indices.sizes());
  TORCH_CHECK(indices.scalar_type() == at::kLong && indices.is_contiguous(),
              "indices must be contiguous int64");
  TORCH_CHECK(indices.device() == values.device(), "indices must be on the device of values");
  checked_size(values.size(0), "values: N");
  checked_size(values.size(1), "values: k");
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

// The sparse decoder's values [N, k], indices [N, k] into weight [n, d], and bias [d] if given.
inline void sae_check_decode(const at::Tensor& values, const at::Tensor& indices, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight.dim() == 2, "weight must be 2-D [n, d], got ", weight.dim(), "-D");
  checked_size(weight.size(0), "weight: n");
  checked_size(weight.size(1), "weight: d");
  sae_check_sparse(values, indices, weight.size(0));
  sae_check_float(weight, "weight", values);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(1), "bias must be [d] with d = ", weight.size(1),
                ", got ", bias->sizes());
    sae_check_float(*bias, "bias", values);
  }
}

// The covariance penalty's h [B, n], B >= 2.
inline void sae_check_covariance(const at::Tensor& h) {
  TORCH_CHECK(h.dim() == 2, "h must be 2-D [B, n], got ", h.dim(), "-D");
  TORCH_CHECK(h.is_floating_point() && h.is_contiguous(), "h must be contiguous floating-point");
  TORCH_CHECK(h.size(0) >= 2, "h needs at least 2 rows (the unbiased covariance divides by B - 1)");
  checked_size(h.size(0), "h: B");
  checked_size(h.size(1), "h: n");
}

}  // namespace fastattn
