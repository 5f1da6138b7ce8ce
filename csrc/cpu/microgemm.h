// Small GEMMs for the attention kernels: register-blocked loops the compiler vectorises.
//
// One shape serves every product the kernels need: C[m][n] (+)= Σ_k A(m, k) · B[k][n], with
// B and C row-major and A read through two strides (A(m, k) = A[m·sam + k·sak]), so A may be
// used transposed at no cost (its elements are broadcast one at a time). The n dimension is the
// vector one: B's rows must be contiguous, so a product with a transposed right operand
// (Q Kᵀ, q·E) takes B pre-packed as [K, N].
//
// Why not BLAS: these products are small (k = head dim or a 64/128 tile) and called thousands
// of times per attention call; MKL's sgemm reaches 13-17 GFLOP/s on them on the AMD EPYC we
// develop on (its generic code path, plus packing per call), these loops 140-250 (one thread).
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace fastattn::cpu {

#if defined(__GNUC__) && !defined(__clang__)
#define FA_UNROLL _Pragma("GCC unroll 16")
#else
#define FA_UNROLL
#endif

// R rows × W columns of C from K steps (W a compile-time multiple of the vector width).
template <typename T, int R, int W>
inline void micro_tile(int K, const T* __restrict A, int64_t sam, int64_t sak, const T* __restrict B,
                       int64_t ldb, T* __restrict C, int64_t ldc, bool accumulate) {
  T acc[R][W];
  FA_UNROLL
  for (int r = 0; r < R; ++r) {
#pragma omp simd
    for (int n = 0; n < W; ++n) acc[r][n] = accumulate ? C[r * ldc + n] : T(0);
  }
  for (int k = 0; k < K; ++k) {
    const T* b = B + (int64_t)k * ldb;
    FA_UNROLL
    for (int r = 0; r < R; ++r) {
      const T a = A[r * sam + k * sak];
#pragma omp simd
      for (int n = 0; n < W; ++n) acc[r][n] += a * b[n];
    }
  }
  FA_UNROLL
  for (int r = 0; r < R; ++r) {
#pragma omp simd
    for (int n = 0; n < W; ++n) C[r * ldc + n] = acc[r][n];
  }
}

// The same for a runtime number of columns nw <= W (the right edge).
template <typename T, int R, int W>
inline void micro_edge(int K, int nw, const T* __restrict A, int64_t sam, int64_t sak,
                       const T* __restrict B, int64_t ldb, T* __restrict C, int64_t ldc,
                       bool accumulate) {
  T acc[R][W];
  for (int r = 0; r < R; ++r)
    for (int n = 0; n < W; ++n) acc[r][n] = (accumulate && n < nw) ? C[r * ldc + n] : T(0);
  for (int k = 0; k < K; ++k) {
    const T* b = B + (int64_t)k * ldb;
    for (int r = 0; r < R; ++r) {
      const T a = A[r * sam + k * sak];
#pragma omp simd
      for (int n = 0; n < W; ++n) acc[r][n] += a * (n < nw ? b[n] : T(0));
    }
  }
  for (int r = 0; r < R; ++r)
    for (int n = 0; n < nw; ++n) C[r * ldc + n] = acc[r][n];
}

// Rows in blocks of R (then 4, then 1), columns in blocks of W (then one narrower edge block).
template <typename T, int R, int W>
inline void mm_rows(int M, int N, int K, const T* A, int64_t sam, int64_t sak, const T* B,
                    int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  auto row_block = [&](auto rows, int m) {
    constexpr int RR = decltype(rows)::value;
    const T* a = A + m * sam;
    T* c = C + (int64_t)m * ldc;
    int n = 0;
    for (; n + W <= N; n += W) micro_tile<T, RR, W>(K, a, sam, sak, B + n, ldb, c + n, ldc, accumulate);
    if (n < N) micro_edge<T, RR, W>(K, N - n, a, sam, sak, B + n, ldb, c + n, ldc, accumulate);
  };
  int m = 0;
  for (; m + R <= M; m += R) row_block(std::integral_constant<int, R>(), m);
  for (; m + 4 <= M; m += 4) row_block(std::integral_constant<int, 4>(), m);
  for (; m < M; ++m) row_block(std::integral_constant<int, 1>(), m);
}

// C[M, N] (+)= A · B as above, in blocks of 8 rows × 2 vectors (16 accumulators with AVX-512;
// measured 140-250 GFLOP/s on the shapes above where 4 × 64 gave 40-100).
template <typename T>
inline void mm(int M, int N, int K, const T* A, int64_t sam, int64_t sak, const T* B, int64_t ldb,
               T* C, int64_t ldc, bool accumulate) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    if (!accumulate)
      for (int m = 0; m < M; ++m) std::fill(C + (int64_t)m * ldc, C + (int64_t)m * ldc + N, T(0));
    return;
  }
  constexpr int W = 128 / sizeof(T);  // two 64-byte vectors
  if (N <= W / 2) mm_rows<T, 8, W / 2>(M, N, K, A, sam, sak, B, ldb, C, ldc, accumulate);
  else mm_rows<T, 8, W>(M, N, K, A, sam, sak, B, ldb, C, ldc, accumulate);
}

// dst[k][n] = src[n][k] for n < N, k < K (src rows ld_src apart, dst rows ld_dst apart).
template <typename T>
inline void pack_transposed(int N, int K, const T* src, int64_t ld_src, T* dst, int64_t ld_dst) {
  constexpr int BLK = 16;
  for (int n0 = 0; n0 < N; n0 += BLK)
    for (int k0 = 0; k0 < K; k0 += BLK) {
      const int n1 = std::min(N, n0 + BLK), k1 = std::min(K, k0 + BLK);
      for (int n = n0; n < n1; ++n)
        for (int k = k0; k < k1; ++k) dst[(int64_t)k * ld_dst + n] = src[(int64_t)n * ld_src + k];
    }
}

}  // namespace fastattn::cpu
