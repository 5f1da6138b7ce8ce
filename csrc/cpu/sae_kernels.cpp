// Sparse-autoencoder kernels on the CPU (SPEC §5): fused TopK encoder, sparse decoder,
// binarising encoder and the tiled covariance penalty. Schemas: csrc/cpu/sae_ops.cpp.
//
// TopK encoder: per block of BM rows, per tile of BN latents, S = X_blk · W_tileᵀ + b (one GEMM
// into a BM×BN buffer), then each row's running top-k is updated from S. Only values above the
// row's current k-th value are inserted, so after the first tiles almost every element costs a
// single compare; the [N, n] pre-activations exist only one BM×BN tile at a time.
// Sparse backward: gathers and scatters over the K selected latents. Scatters (dW) go through
// a by-latent inverse index (CSR), so every output row is summed by one task in a fixed order:
// deterministic, no atomics.
// Binary encoder: the same tiling, with binarise + bit-pack + per-column counts in the epilogue.
// Covariance penalty: Gram tiles G_IJ = h_Iᵀ h_J; the numerator B·G_ij − c_i·c_j is formed in
// double, which is exact for binary fp32 codes (G and the column sums c are integers), so the
// penalty is exact up to its final division; the gradient 2/(B−1)·(h − 1pᵀ)·sign(C) is
// accumulated per column tile in the same pass.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "gemm.h"
#include "sae_problem.h"

namespace fastattn::cpu {
namespace {

constexpr int BM = 64;    // rows per task
constexpr int BN = 256;   // latents per GEMM tile (a multiple of 8 for the bit-pack)
constexpr int TC = 128;   // column tile of the covariance penalty

// ----------------------------------------------------------------------------- TopK encoder

// The order of torch.sort(descending=True) (the reference): NaN ranks above every number, so
// a NaN pre-activation is selected and shows in the values instead of stalling the top list.
template <typename T>
inline bool ranks_above(T a, T b) {
  return a > b || (a != a && b == b);
}

// Inserts (v, j) into a row's top list (vals/idx sorted by ranks_above, ties by lower index).
// Callers visit j in increasing order, so an equal value goes after existing ones.
template <typename T>
inline void topk_insert(T* vals, int64_t* idx, int& count, int k, T v, int64_t j) {
  int p = count < k ? count++ : k - 1;
  while (p > 0 && ranks_above(v, vals[p - 1])) {
    vals[p] = vals[p - 1];
    idx[p] = idx[p - 1];
    --p;
  }
  vals[p] = v;
  idx[p] = j;
}

template <typename T>
void topk_block(const T* X, const T* W, const T* bias, int d, int n, int k, int r0, int mr, T* vals,
                int64_t* idx, std::vector<T>& S) {
  S.resize((size_t)BM * BN);
  int count[BM] = {0};
  for (int64_t j0 = 0; j0 < n; j0 += BN) {
    const int nj = (int)std::min<int64_t>(BN, n - j0);
    gemm<T>(false, true, mr, nj, d, T(1), X + (int64_t)r0 * d, d, W + j0 * d, d, T(0), S.data(), BN);
    for (int i = 0; i < mr; ++i) {
      T* v = vals + (int64_t)(r0 + i) * k;
      int64_t* ix = idx + (int64_t)(r0 + i) * k;
      const T* s = S.data() + (int64_t)i * BN;
      int& c = count[i];
      for (int j = 0; j < nj; ++j) {
        const T z = bias ? s[j] + bias[j0 + j] : s[j];
        if (c == k && !ranks_above(z, v[k - 1])) continue;  // the common case after the first tiles
        topk_insert(v, ix, c, k, z, j0 + j);
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor> topk_encode_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                   const std::optional<at::Tensor>& bias, int64_t k) {
  const int64_t n = sae_check_linear(x, weight, bias);
  TORCH_CHECK(x.device().is_cpu(), "cpp backend: tensors must be on the CPU");
  TORCH_CHECK(k >= 1 && k <= n, "k must be in [1, n = ", n, "], got ", k);
  const int N = x.size(0), d = x.size(1);
  auto values = at::empty({N, k}, x.options());
  auto indices = at::empty({N, k}, x.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "topk_encode_cpu", [&] {
    const scalar_t *X = x.data_ptr<scalar_t>(), *W = weight.data_ptr<scalar_t>();
    const scalar_t* b = bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr;
    scalar_t* V = values.data_ptr<scalar_t>();
    int64_t* I = indices.data_ptr<int64_t>();
    const int64_t nblocks = ((int64_t)N + BM - 1) / BM;
    at::parallel_for(0, nblocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> S;
      for (int64_t blk = begin; blk < end; ++blk) {
        const int r0 = blk * BM;
        topk_block<scalar_t>(X, W, b, d, (int)n, (int)k, r0, std::min(BM, N - r0), V, I, S);
      }
    });
  });
  return {values, indices};
}

// ----------------------------------------------------------------------------- sparse gathers

// out[r] (+)= Σ_k coef[r, k] · rows[idx[r, k]] for every r; out [N, d].
template <typename T>
void gather_combine(const T* coef, const int64_t* idx, const T* rows, int64_t N, int k, int d,
                    T* out) {
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* o = out + r * d;
      for (int kk = 0; kk < k; ++kk) {
        const T c = coef[r * k + kk];
        const T* w = rows + idx[r * k + kk] * d;
#pragma omp simd
        for (int e = 0; e < d; ++e) o[e] += c * w[e];
      }
    }
  });
}

// out[r, k] = G[r] · rows[idx[r, k]]; out [N, k].
template <typename T>
void gather_dot(const T* G, const int64_t* idx, const T* rows, int64_t N, int k, int d, T* out) {
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* g = G + r * d;
      for (int kk = 0; kk < k; ++kk) {
        const T* w = rows + idx[r * k + kk] * d;
        T s = 0;
#pragma omp simd reduction(+ : s)
        for (int e = 0; e < d; ++e) s += g[e] * w[e];
        out[r * k + kk] = s;
      }
    }
  });
}

// dW[j] = Σ_{(r, k): idx[r, k] = j} coef[r, k] · X[r]  and  dsum[j] = Σ coef[r, k] (if dsum).
// Through a by-latent inverse index so each dW row is owned by one task: no atomics, and the
// summation order (increasing r) is fixed, so the result is deterministic.
template <typename T>
void scatter_outer(const T* coef, const int64_t* idx, const T* X, int64_t N, int k, int d, int64_t n,
                   T* dW, T* dsum) {
  const int64_t E = N * k;
  std::vector<int64_t> start(n + 1, 0);
  for (int64_t e = 0; e < E; ++e) ++start[idx[e] + 1];
  for (int64_t j = 0; j < n; ++j) start[j + 1] += start[j];
  std::vector<int64_t> fill(start.begin(), start.end() - 1), order(E);
  for (int64_t e = 0; e < E; ++e) order[fill[idx[e]]++] = e;
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      T* w = dW + j * d;
      std::fill(w, w + d, T(0));
      T s = 0;
      for (int64_t p = start[j]; p < start[j + 1]; ++p) {
        const int64_t e = order[p];
        const T c = coef[e];
        const T* xr = X + (e / k) * d;
        s += c;
#pragma omp simd
        for (int q = 0; q < d; ++q) w[q] += c * xr[q];
      }
      if (dsum) dsum[j] = s;
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_encode_backward_cpu(
    const at::Tensor& grad_values, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& indices) {
  const int64_t n = sae_check_linear(x, weight, std::nullopt);
  TORCH_CHECK(x.device().is_cpu(), "cpp backend: tensors must be on the CPU");
  const auto g = grad_values.contiguous().to(x.scalar_type());
  sae_check_sparse(g, indices, n);
  TORCH_CHECK(g.size(0) == x.size(0), "grad_values must have N = ", x.size(0), " rows");
  const int64_t N = x.size(0);
  const int k = g.size(1), d = x.size(1);
  auto dx = at::zeros_like(x);
  auto dW = at::empty_like(weight);
  auto db = at::empty({n}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "topk_encode_backward_cpu", [&] {
    const scalar_t* G = g.data_ptr<scalar_t>();
    const int64_t* I = indices.data_ptr<int64_t>();
    gather_combine<scalar_t>(G, I, weight.data_ptr<scalar_t>(), N, k, d, dx.data_ptr<scalar_t>());
    scatter_outer<scalar_t>(G, I, x.data_ptr<scalar_t>(), N, k, d, n, dW.data_ptr<scalar_t>(),
                            db.data_ptr<scalar_t>());
  });
  return {dx, dW, db};
}

// ----------------------------------------------------------------------------- sparse decoder

at::Tensor sparse_decode_cpu(const at::Tensor& values, const at::Tensor& indices, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(values.device().is_cpu(), "cpp backend: tensors must be on the CPU");
  sae_check_decode(values, indices, weight, bias);
  const int64_t N = values.size(0), d = weight.size(1);
  const int k = values.size(1);
  at::Tensor out;
  if (bias.has_value()) {
    out = bias->unsqueeze(0).expand({N, d}).contiguous();
  } else {
    out = at::zeros({N, d}, values.options());
  }
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "sparse_decode_cpu", [&] {
    gather_combine<scalar_t>(values.data_ptr<scalar_t>(), indices.data_ptr<int64_t>(),
                             weight.data_ptr<scalar_t>(), N, k, (int)d, out.data_ptr<scalar_t>());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_decode_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& values, const at::Tensor& indices,
    const at::Tensor& weight) {
  TORCH_CHECK(values.device().is_cpu(), "cpp backend: tensors must be on the CPU");
  sae_check_decode(values, indices, weight, std::nullopt);
  const int64_t N = values.size(0), n = weight.size(0), d = weight.size(1);
  const int k = values.size(1);
  const auto g = grad_out.contiguous().to(values.scalar_type());
  TORCH_CHECK(g.dim() == 2 && g.size(0) == N && g.size(1) == d, "grad_out must be [N, d] = [", N, ", ", d, "]");
  auto dvalues = at::empty_like(values);
  auto dW = at::empty_like(weight);
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "sparse_decode_backward_cpu", [&] {
    const scalar_t* G = g.data_ptr<scalar_t>();
    const int64_t* I = indices.data_ptr<int64_t>();
    gather_dot<scalar_t>(G, I, weight.data_ptr<scalar_t>(), N, k, (int)d, dvalues.data_ptr<scalar_t>());
    scatter_outer<scalar_t>(values.data_ptr<scalar_t>(), I, G, N, k, (int)d, n, dW.data_ptr<scalar_t>(),
                            nullptr);
  });
  return {dvalues, dW, g.sum(0)};
}

// ----------------------------------------------------------------------------- binary encoder

// One block of rows: GEMM tile, then binarise, store the code, pack bits, count per column.
template <typename T>
void binary_block(const T* X, const T* W, const T* b, int N, int d, int64_t n, int r0, T* C,
                  uint8_t* P, int64_t* cnt, std::vector<T>& S) {
  const int mr = std::min(BM, N - r0);
  const int64_t nbytes = (n + 7) / 8;
  uint8_t bits[BN];
  for (int64_t j0 = 0; j0 < n; j0 += BN) {
    const int nj = (int)std::min<int64_t>(BN, n - j0);
    gemm<T>(false, true, mr, nj, d, T(1), X + (int64_t)r0 * d, d, W + j0 * d, d, T(0), S.data(), BN);
    for (int i = 0; i < mr; ++i) {
      const T* s = S.data() + (int64_t)i * BN;
#pragma omp simd
      for (int j = 0; j < nj; ++j) bits[j] = (b ? s[j] + b[j0 + j] : s[j]) > T(0);
      std::fill(bits + nj, bits + ((nj + 7) & ~7), uint8_t(0));
      if (C) {
        T* c = C + (int64_t)(r0 + i) * n + j0;
        for (int j = 0; j < nj; ++j) c[j] = T(bits[j]);
      }
      for (int j = 0; j < nj; ++j) cnt[j0 + j] += bits[j];
      uint8_t* p = P + (int64_t)(r0 + i) * nbytes + j0 / 8;
      for (int w = 0; w < (nj + 7) / 8; ++w) {
        const uint8_t* q = bits + 8 * w;
        p[w] = q[0] | q[1] << 1 | q[2] << 2 | q[3] << 3 | q[4] << 4 | q[5] << 5 | q[6] << 6 | q[7] << 7;
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> binary_encode_cpu(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    bool return_code, int64_t ste) {
  const int64_t n = sae_check_linear(x, weight, bias);
  TORCH_CHECK(ste >= 0 && ste <= 2, "ste must be 0 (reference), 1 (identity) or 2 (sigmoid), got ", ste);
  TORCH_CHECK(x.device().is_cpu(), "cpp backend: tensors must be on the CPU");
  const int N = x.size(0), d = x.size(1);
  const int64_t nbytes = (n + 7) / 8;
  auto code = at::empty({N, return_code ? n : 0}, x.options());
  auto packed = at::empty({N, nbytes}, x.options().dtype(at::kByte));
  const int nthreads = at::get_num_threads();
  // Per-thread integer partial counts: integer sums do not depend on the order, so the total is
  // deterministic whatever the thread schedule.
  std::vector<int64_t> partial((size_t)nthreads * n, 0);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "binary_encode_cpu", [&] {
    const scalar_t *X = x.data_ptr<scalar_t>(), *W = weight.data_ptr<scalar_t>();
    const scalar_t* b = bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr;
    scalar_t* C = return_code ? code.data_ptr<scalar_t>() : nullptr;
    uint8_t* P = packed.data_ptr<uint8_t>();
    const int64_t nblocks = ((int64_t)N + BM - 1) / BM;
    at::parallel_for(0, nblocks, 1, [&](int64_t begin, int64_t end) {
      const int tid = at::get_thread_num();
      TORCH_CHECK(tid < nthreads, "thread id beyond the partial buffers");
      std::vector<scalar_t> S((size_t)BM * BN);
      for (int64_t blk = begin; blk < end; ++blk)
        binary_block<scalar_t>(X, W, b, N, d, n, blk * BM, C, P, partial.data() + (size_t)tid * n, S);
    });
  });
  auto counts = at::zeros({n}, x.options().dtype(at::kLong));
  int64_t* out = counts.data_ptr<int64_t>();
  for (int t = 0; t < nthreads; ++t)
    for (int64_t j = 0; j < n; ++j) out[j] += partial[(size_t)t * n + j];
  return {code, packed, counts};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> binary_encode_backward_cpu(
    const at::Tensor& grad_code, const at::Tensor& x, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, int64_t ste) {
  const int64_t n = sae_check_linear(x, weight, bias);
  TORCH_CHECK(x.device().is_cpu(), "cpp backend: tensors must be on the CPU");
  TORCH_CHECK(ste >= 0 && ste <= 2, "ste must be 0 (reference), 1 (identity) or 2 (sigmoid), got ", ste);
  TORCH_CHECK(grad_code.dim() == 2 && grad_code.size(0) == x.size(0) && grad_code.size(1) == n,
              "grad_code must be [N, n] = [", x.size(0), ", ", n, "]");
  auto g = grad_code.to(x.scalar_type()).contiguous();
  at::Tensor gz;  // gradient with respect to the pre-activation
  if (ste == 1) {
    gz = g;
  } else if (ste == 0) {
    gz = g * (1 - g);
  } else {
    // Recomputed rather than saved: one GEMM instead of keeping [N, n] alive between passes.
    auto s = bias.has_value() ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
    s.sigmoid_();
    gz = g * s * (1 - s);
  }
  // Dense GEMMs: the binary code is not sparse (about half its bits are set), so ATen's BLAS
  // is the right tool here; the fusion is in the forward pass.
  return {at::mm(gz, weight), at::mm(gz.t(), x), gz.sum(0)};
}

// ----------------------------------------------------------------------------- covariance penalty

std::tuple<at::Tensor, at::Tensor> binary_covariance_penalty_cpu(const at::Tensor& h, bool compute_grad) {
  sae_check_covariance(h);
  TORCH_CHECK(h.device().is_cpu(), "cpp backend: tensors must be on the CPU");
  const int B = h.size(0), n = h.size(1);
  const int ntiles = (int)(((int64_t)n + TC - 1) / TC);
  auto grad = at::empty({compute_grad ? B : 0, n}, h.options());
  std::vector<double> partial(ntiles, 0.0), colsum(n, 0.0);
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "binary_covariance_penalty_cpu", [&] {
    const scalar_t* H = h.data_ptr<scalar_t>();
    for (int b = 0; b < B; ++b)  // exact for binary codes: integer sums below 2^53
      for (int j = 0; j < n; ++j) colsum[j] += (double)H[(int64_t)b * n + j];
    scalar_t* dH = compute_grad ? grad.data_ptr<scalar_t>() : nullptr;
    const double Bd = B, gscale = 2.0 / (Bd - 1.0);
    at::parallel_for(0, ntiles, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> G((size_t)TC * TC), S(compute_grad ? (size_t)TC * TC : 0);
      std::vector<double> r(TC);
      for (int64_t ti = begin; ti < end; ++ti) {
        const int i0 = ti * TC, mi = std::min(TC, n - i0);
        double acc = 0.0;
        if (compute_grad) {
          for (int b = 0; b < B; ++b) std::fill(dH + (int64_t)b * n + i0, dH + (int64_t)b * n + i0 + mi, scalar_t(0));
          std::fill(r.begin(), r.end(), 0.0);
        }
        // Without the gradient the matrix's symmetry halves the work: tiles J >= I, the
        // off-diagonal ones counted twice.
        for (int tj = compute_grad ? 0 : ti; tj < ntiles; ++tj) {
          const int j0 = tj * TC, mj = std::min(TC, n - j0);
          gemm<scalar_t>(true, false, mi, mj, B, scalar_t(1), H + i0, n, H + j0, n, scalar_t(0), G.data(), TC);
          const double weight = (!compute_grad && tj != ti) ? 2.0 : 1.0;
          double tile = 0.0;
          for (int i = 0; i < mi; ++i) {
            const double ci = colsum[i0 + i];
            for (int j = 0; j < mj; ++j) {
              const double num = Bd * (double)G[i * TC + j] - ci * colsum[j0 + j];
              const bool diag = (i0 + i) == (j0 + j);
              tile += diag ? 0.0 : std::fabs(num);
              if (compute_grad) {
                const scalar_t sg = diag ? 0 : (num > 0 ? 1 : (num < 0 ? -1 : 0));
                S[i * TC + j] = sg;
                r[i] += (double)sg * colsum[j0 + j];
              }
            }
          }
          acc += weight * tile;
          // dH[:, I] += H[:, J] · S_IJᵀ  (S is symmetric, so this is H[:, J] · S_JI).
          if (compute_grad)
            gemm<scalar_t>(false, true, B, mi, mj, scalar_t(1), H + j0, n, S.data(), TC, scalar_t(1), dH + i0, n);
        }
        partial[ti] = acc;
        if (compute_grad) {  // d/dh = 2/(B-1) · (h - 1pᵀ) · S, with pᵀS = r / B
          for (int b = 0; b < B; ++b) {
            scalar_t* row = dH + (int64_t)b * n + i0;
            for (int i = 0; i < mi; ++i) row[i] = scalar_t(gscale * ((double)row[i] - r[i] / Bd));
          }
        }
      }
    });
  });
  double total = 0.0;
  for (double p : partial) total += p;  // fixed order: deterministic
  auto value = at::scalar_tensor(total / ((double)B * ((double)B - 1.0)), h.options());
  return {value, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("topk_encode", &topk_encode_cpu);
  m.impl("topk_encode_backward", &topk_encode_backward_cpu);
  m.impl("sparse_decode", &sparse_decode_cpu);
  m.impl("sparse_decode_backward", &sparse_decode_backward_cpu);
  m.impl("binary_encode", &binary_encode_cpu);
  m.impl("binary_encode_backward", &binary_encode_backward_cpu);
  m.impl("binary_covariance_penalty", &binary_covariance_penalty_cpu);
}

}  // namespace fastattn::cpu
