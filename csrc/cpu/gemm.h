// Row-major GEMM for the CPU kernels, called from inside at::parallel_for tasks.
//
// torch's CPU wheels export the BLAS symbols they link (MKL on x86-64); calling them directly
// avoids the dispatcher and tensor allocation per tile (a few microseconds each, thousands of
// tiles per call). The symbols are weak: where the torch build has none, plain loops run
// instead. Inside a parallel region BLAS runs single-threaded, so the outer task loop owns
// all threads.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

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

// Plain loops for degenerate shapes (decoding has M = 1): BLAS turns them into gemv/ger calls
// whose generic code paths are several times slower than these vectorised loops. Also the
// fallback when the torch build exports no BLAS.
template <typename T>
void small_gemm(bool trans_a, bool trans_b, int M, int N, int K, T alpha, const T* A, int lda,
                const T* B, int ldb, T beta, T* C, int ldc) {
  std::vector<T> arow(trans_a ? K : 0);  // row i of op(A), made contiguous
  for (int i = 0; i < M; ++i) {
    T* c = C + (int64_t)i * ldc;
    if (beta == T(0)) std::fill(c, c + N, T(0));
    else if (beta != T(1)) for (int n = 0; n < N; ++n) c[n] *= beta;
    const T* a = A + (int64_t)i * lda;
    if (trans_a) {
      for (int k = 0; k < K; ++k) arow[k] = A[(int64_t)k * lda + i];
      a = arow.data();
    }
    if (trans_b) {  // B stored [N, K]: dot products along contiguous K
      for (int n = 0; n < N; ++n) {
        const T* b = B + (int64_t)n * ldb;
        T s = 0;
#pragma omp simd reduction(+ : s)
        for (int k = 0; k < K; ++k) s += a[k] * b[k];
        c[n] += alpha * s;
      }
    } else {  // B stored [K, N]: axpy along contiguous N
      for (int k = 0; k < K; ++k) {
        const T ak = alpha * a[k];
        const T* b = B + (int64_t)k * ldb;
#pragma omp simd
        for (int n = 0; n < N; ++n) c[n] += ak * b[n];
      }
    }
  }
}

// C[M, N] = alpha * op(A) op(B) + beta * C, all row-major; op(A) is [M, K] (A stored [K, M]
// when trans_a), op(B) is [K, N] (B stored [N, K] when trans_b).
template <typename T>
void gemm(bool trans_a, bool trans_b, int M, int N, int K, T alpha, const T* A, int lda,
          const T* B, int ldb, T beta, T* C, int ldc) {
  if (M <= 0 || N <= 0) return;
  if (K <= 4 || !have_blas()) {
    small_gemm(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    return;
  }
  // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap operands.
  const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
  blas_gemm<T>(&tb, &ta, &N, &M, &K, &alpha, B, &ldb, A, &lda, &beta, C, &ldc);
}

}  // namespace fastattn::cpu
