// Sparse-autoencoder op schemas (SPEC §5), declared as a fragment of the fastattn library so
// that they live apart from the attention schemas in csrc/fastattn.cpp. Each device registers
// its kernels in the file that holds them (CPU: csrc/cpu/sae_kernels.cpp). This file sits in
// csrc/cpu/ only because setup.py compiles csrc/fastattn.cpp and csrc/cpu/*.cpp; it holds no
// CPU code and is compiled in CUDA builds too.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fastattn, m) {
  // x [N, d], weight [n, d], bias [n] -> (values [N, k], indices [N, k] int64): the k largest
  // pre-activations x·Wᵀ + b of each row, sorted descending, ties by lower index. The [N, n]
  // pre-activation matrix is never written.
  m.def("topk_encode(Tensor x, Tensor weight, Tensor? bias, int k) -> (Tensor, Tensor)");
  // -> (dx [N, d], dweight [n, d], dbias [n]); touches only the selected latents.
  m.def("topk_encode_backward(Tensor grad_values, Tensor x, Tensor weight, Tensor indices) "
        "-> (Tensor, Tensor, Tensor)");
  // values [N, k], indices [N, k] int64, weight [n, d], bias [d] -> out [N, d] =
  // Σ_k values[:, k] · weight[indices[:, k]] + bias (an embedding bag with per-sample weights).
  m.def("sparse_decode(Tensor values, Tensor indices, Tensor weight, Tensor? bias) -> Tensor");
  // -> (dvalues [N, k], dweight [n, d], dbias [d]).
  m.def("sparse_decode_backward(Tensor grad_out, Tensor values, Tensor indices, Tensor weight) "
        "-> (Tensor, Tensor, Tensor)");
  // x [N, d], weight [n, d], bias [n] -> (code [N, n] (or [N, 0] when not return_code) with
  // code = 1[x·Wᵀ + b > 0] in x's dtype, packed [N, ceil(n / 8)] uint8 (bit b of byte w is
  // column 8w + b, numpy's bitorder="little"), counts [n] int64: ones per column).
  // ``ste`` (see binary_encode_backward) is not used by the forward pass; it is an argument so
  // that the autograd registration can read it from the op's inputs.
  m.def("binary_encode(Tensor x, Tensor weight, Tensor? bias, bool return_code, int ste) "
        "-> (Tensor, Tensor, Tensor)");
  // Straight-through backward. ste: 0 = "reference" (g·(1 - g)), 1 = "identity" (g),
  // 2 = "sigmoid" (g·σ(z)(1 - σ(z)) on the recomputed pre-activation z).
  // -> (dx [N, d], dweight [n, d], dbias [n]).
  m.def("binary_encode_backward(Tensor grad_code, Tensor x, Tensor weight, Tensor? bias, int ste) "
        "-> (Tensor, Tensor, Tensor)");
  // h [B, n] -> (Σ_{i≠j} |C_ij| as a 0-dim tensor, d/dh [B, n] (or [0, n] when not
  // compute_grad)); C is the unbiased covariance of h's columns. Tiled: no [n, n] buffer.
  m.def("binary_covariance_penalty(Tensor h, bool compute_grad) -> (Tensor, Tensor)");
}
