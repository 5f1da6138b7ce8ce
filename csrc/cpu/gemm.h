// Row-major GEMM for the CPU kernels, called from inside at::parallel_for tasks.
//
// torch's CPU wheels export the BLAS symbols they link (MKL on x86-64); calling them directly
// avoids the dispatcher and tensor allocation per tile (a few microseconds each, thousands of
// tiles per call). The symbols are weak: where the torch build has none, we fall back to
// at::addmm_out on views, which is slower but equally exact. Inside a parallel region both
// run single-threaded, so the outer task loop owns all threads.
#pragma once

#include <ATen/ATen.h>

extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*,
            const float*, const int*, const float*, const int*, const float*, float*,
            const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*,
            const double*, const int*, const double*, const int*, const double*, double*,
            const int*) __attribute__((weak));
}

namespace fastattn::cpu {

inline bool have_blas() { return sgemm_ != nullptr && dgemm_ != nullptr; }

template <typename T>
void blas_gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k,
               const T* alpha, const T* a, const int* lda, const T* b, const int* ldb,
               const T* beta, T* c, const int* ldc);
template <>
inline void blas_gemm<float>(const char* ta, const char* tb, const int* m, const int* n,
                             const int* k, const float* alpha, const float* a, const int* lda,
                             const float* b, const int* ldb, const float* beta, float* c,
                             const int* ldc) {
  sgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
template <>
inline void blas_gemm<double>(const char* ta, const char* tb, const int* m, const int* n,
                              const int* k, const double* alpha, const double* a,
                              const int* lda, const double* b, const int* ldb,
                              const double* beta, double* c, const int* ldc) {
  dgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// C[M, N] = alpha * op(A) op(B) + beta * C, all row-major; op(A) is [M, K] (A stored [K, M]
// when trans_a), op(B) is [K, N] (B stored [N, K] when trans_b).
template <typename T>
void gemm(bool trans_a, bool trans_b, int M, int N, int K, T alpha, const T* A, int lda,
          const T* B, int ldb, T beta, T* C, int ldc) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    for (int i = 0; i < M; ++i)
      for (int j = 0; j < N; ++j) C[(int64_t)i * ldc + j] = beta == T(0) ? T(0) : beta * C[(int64_t)i * ldc + j];
    return;
  }
  if (have_blas()) {
    // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap operands.
    const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
    blas_gemm<T>(&tb, &ta, &N, &M, &K, &alpha, B, &ldb, A, &lda, &beta, C, &ldc);
    return;
  }
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto a = at::from_blob(const_cast<T*>(A), {trans_a ? K : M, trans_a ? M : K}, {lda, 1}, opts);
  auto b = at::from_blob(const_cast<T*>(B), {trans_b ? N : K, trans_b ? K : N}, {ldb, 1}, opts);
  auto c = at::from_blob(C, {M, N}, {ldc, 1}, opts);
  at::addmm_out(c, c, trans_a ? a.t() : a, trans_b ? b.t() : b, beta, alpha);
}

}  // namespace fastattn::cpu
