// CUDA kernels of the sparse-autoencoder ops (SPEC §5): fused TopK encoder, sparse decoder,
// binarising encoder with its straight-through gradient, and the tiled covariance penalty.
// Launchers: csrc/include/sae_cuda_launch.h; torch glue: csrc/include/sae_cuda_glue.h.
// Written against csrc/include/fa_cuda.h, so the same code runs on the CPU emulator (tests).
//
// One block GEMM serves every dense product: a 128 x 128 CTA tile, 256 threads, K steps of 32
// staged through double-buffered shared memory with a register prefetch of the next step.
// fp16/bf16 use WMMA (16x16x16, fp32 accumulation; 8 warps as 2 x 4, 64 x 32 per warp); fp32
// runs on SIMT cores (8 x 8 outputs per thread, fmaf in k order) so that fp32 results match
// fp32 references. The fp32 result tile is stored to shared memory and read by a fused epilogue.
//
// - topk_encode: block (row block, column split) sweeps its split's column tiles; thread r keeps
//   row r's running top-k (value desc, ties by lower index) in shared memory (k <= 64) or in the
//   workspace (larger k). After the first tiles nearly every element costs one compare. Each
//   split writes its sorted candidate list; a merge kernel takes the k best of the splits. The
//   [N, n] pre-activations exist only as one 128 x 128 fp32 tile per block.
// - gathers / scatters: one warp per row (or latent), 8 columns per lane; the scatter (dW) runs
//   over a by-latent inverse index (a stable sort, built by the glue): fixed summation order,
//   no float atomics: deterministic.
// - binary_encode: GEMM tile -> z > 0 -> code, packed bytes and per-column counts (integer
//   atomics: exact, order-independent) in one epilogue.
// - covariance penalty: one block per upper-triangular pair of 128-column tiles computes
//   G = h_Iᵀ h_J, the numerators B·G − c_i c_j in fp64 (exact for binary codes), the |·| partial
//   (summed in a fixed order later), the row sums r_i = Σ_j c_j sign(C_ij), and writes sign(C)
//   as int8 (the only n x n buffer, only with the gradient). Then d/dh = 2/(B−1)·(h·S − 1 rᵀ/B)
//   is one more GEMM. Binary h (checked on the device) runs on bf16 tensor cores even for fp32
//   inputs: 0/1 and ±1 are exact in bf16 and integer sums below 2^24 are exact in fp32.
// Everything is deterministic: no float atomics anywhere.
#include "fa_cuda.h"
#include "sae_cuda_launch.h"

#include <climits>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace fastattn::sae_cuda {
namespace {

using bf16 = __nv_bfloat16;
using fp16 = __half;

constexpr int kThreads = 256;
constexpr int BM = kTileM, BN = kTileN, BK = 32;
constexpr int C_LD = 132;          // leading dimension of the fp32 result tile (either layout)
constexpr int kMaxSplits = 64;
constexpr int kColsumRows = 256;  // rows per partial column sum
// gridDim.y is at most 65535: kernels with row tiles (or row chunks) on y loop over them with
// stride gridDim.y (N > 8.4M rows for 128-row tiles). The emulator caps y at 1 so that every
// multi-tile test runs that loop, a small-shape proxy for the large-N launches.
#ifdef FASTATTN_CUDA_EMULATE
constexpr int kMaxGridY = 1;
#else
constexpr int kMaxGridY = 65535;
#endif
static_assert(BM == 128 && BN == 128, "the warp layout below assumes 128 x 128 tiles");

// ----------------------------------------------------------------------------- element helpers

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(fp16 v) { return __half2float(v); }
__device__ __forceinline__ float to_f(bf16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f(int8_t v) { return static_cast<float>(v); }

template <typename TS, typename TG>
__device__ __forceinline__ TS cvt(TG v) {
  if constexpr (std::is_same<TS, TG>::value) {
    return v;
  } else {
    return fa_from_float<TS>(to_f(v));
  }
}

template <typename T>
__device__ __forceinline__ T zero_of() {
  return fa_from_float<T>(0.f);
}

// Copies 8 elements (8, 16 or 32 bytes) between suitably aligned addresses.
template <typename TG>
__device__ __forceinline__ void copy8(TG* dst, const TG* src) {
#ifdef FASTATTN_CUDA_EMULATE
  // A GPU faults (misaligned address) on a vector access that is not aligned to its width:
  // reject it here too, so a wrong `vec` decision (e.g. a view with a storage offset) fails the tests.
  constexpr uintptr_t align = 8 * sizeof(TG) < 16 ? 8 * sizeof(TG) : 16;
  if (reinterpret_cast<uintptr_t>(dst) % align != 0 || reinterpret_cast<uintptr_t>(src) % align != 0)
    throw fa_emu::Fault("fa_emu: misaligned vector access (copy8)");
  std::memcpy(dst, src, 8 * sizeof(TG));
#else
  constexpr int bytes = 8 * sizeof(TG);
  if constexpr (bytes == 8) {
    *reinterpret_cast<uint2*>(dst) = *reinterpret_cast<const uint2*>(src);
  } else if constexpr (bytes == 16) {
    *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
  } else {
    reinterpret_cast<uint4*>(dst)[0] = reinterpret_cast<const uint4*>(src)[0];
    reinterpret_cast<uint4*>(dst)[1] = reinterpret_cast<const uint4*>(src)[1];
  }
#endif
}

// 8 elements p[0..8) as floats; vec: p is 8-element aligned; avail: elements left in the row.
template <typename T>
__device__ __forceinline__ void load8f(float* out, const T* p, int avail, bool vec) {
  if (vec && avail >= 8) {
    __align__(16) T t[8];
    copy8(t, p);
#pragma unroll
    for (int e = 0; e < 8; ++e) out[e] = to_f(t[e]);
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e) out[e] = e < avail ? to_f(p[e]) : 0.f;
  }
}

template <typename T>
__device__ __forceinline__ void store8(T* p, const float* v, int avail, bool vec) {
  if (vec && avail >= 8) {
    __align__(16) T t[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) t[e] = fa_from_float<T>(v[e]);
    copy8(p, t);
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e)
      if (e < avail) p[e] = fa_from_float<T>(v[e]);
  }
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }
// Rows of `cols` elements starting at p can be read 8 elements at a time.
template <typename T>
inline bool vec_ok(const void* p, int64_t cols) {
  return aligned16(p) && (cols * static_cast<int64_t>(sizeof(T))) % 16 == 0;
}

// ----------------------------------------------------------------------------- block GEMM

// A matrix in memory: rows x cols, row stride ld, cols contiguous; vec: 8-element chunks aligned.
template <typename TG>
struct Mat {
  const TG* p;
  int64_t ld;
  int rows, cols;
  bool vec;
};

template <typename TS>
struct Pad {
  static constexpr int value = sizeof(TS) == 2 ? 8 : 4;
};

// Loads an R x C tile (C contiguous) from global memory into registers (8 elements per chunk,
// converted to the staging type TS), then commits it to shared memory [R][C + pad].
template <typename TG, typename TS, int R, int C>
struct TileFetch {
  static constexpr int CPR = C / 8;
  static constexpr int NCH = R * C / (8 * kThreads);
  static constexpr int LD = C + Pad<TS>::value;
  static_assert(C % 8 == 0 && (R * C) % (8 * kThreads) == 0, "tile does not split into chunks");
  __align__(16) TS v[NCH][8];

  __device__ __forceinline__ void fetch(const Mat<TG>& m, int r0, int c0) {
#pragma unroll
    for (int q = 0; q < NCH; ++q) {
      const int idx = static_cast<int>(threadIdx.x) + q * kThreads;
      const int gr = r0 + idx / CPR, gc = c0 + (idx % CPR) * 8;
      if (m.vec && gr < m.rows && gc + 8 <= m.cols) {
        const TG* src = m.p + gr * m.ld + gc;
        if constexpr (std::is_same<TG, TS>::value) {
          copy8(v[q], src);
        } else {
          __align__(16) TG t[8];
          copy8(t, src);
#pragma unroll
          for (int e = 0; e < 8; ++e) v[q][e] = cvt<TS>(t[e]);
        }
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e)
          v[q][e] = (gr < m.rows && gc + e < m.cols) ? cvt<TS>(m.p[gr * m.ld + gc + e]) : zero_of<TS>();
      }
    }
  }

  __device__ __forceinline__ void commit(TS* s) const {
#pragma unroll
    for (int q = 0; q < NCH; ++q) {
      const int idx = static_cast<int>(threadIdx.x) + q * kThreads;
      copy8(s + (idx / CPR) * LD + (idx % CPR) * 8, v[q]);
    }
  }
};

// Shared-memory plan of a block GEMM. A is K-contiguous ([m][k] in memory) when A_KC, else
// M-contiguous ([k][m]); B is K-contiguous ([n][k]) when B_KC, else N-contiguous ([k][n]).
template <typename TS, bool A_KC, bool B_KC>
struct GemmCfg {
  static constexpr int A_R = A_KC ? BM : BK, A_C = A_KC ? BK : BM;
  static constexpr int B_R = B_KC ? BN : BK, B_C = B_KC ? BK : BN;
  static constexpr int A_LD = A_C + Pad<TS>::value, B_LD = B_C + Pad<TS>::value;
  static constexpr int A_ELEMS = A_R * A_LD, B_ELEMS = B_R * B_LD;
  static constexpr size_t STAGE_BYTES = 2 * static_cast<size_t>(A_ELEMS + B_ELEMS) * sizeof(TS);
  static constexpr size_t C_BYTES = static_cast<size_t>(BM) * C_LD * sizeof(float);
  // The result tile reuses the staging buffers once the K loop is done.
  static constexpr size_t BYTES = STAGE_BYTES > C_BYTES ? STAGE_BYTES : C_BYTES;
};

// Tensor-core accumulators: warp w owns rows 64·(w / 4) + [0, 64), columns 32·(w % 4) + [0, 32).
template <typename TS>
struct AccTC {
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> c[4][2];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) nvcuda::wmma::fill_fragment(c[i][j], 0.f);
  }

  template <bool A_KC, bool B_KC>
  __device__ __forceinline__ void mma(const TS* As, int lda, const TS* Bs, int ldb) {
    namespace wmma = nvcuda::wmma;
    using LA = std::conditional_t<A_KC, wmma::row_major, wmma::col_major>;
    using LB = std::conditional_t<B_KC, wmma::col_major, wmma::row_major>;
    const int warp = static_cast<int>(threadIdx.x) / 32, wm = warp / 4, wn = warp % 4;
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, TS, LA> a[4];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, TS, LB> b[2];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int m = wm * 64 + 16 * i;
        wmma::load_matrix_sync(a[i], A_KC ? As + m * lda + kk : As + kk * lda + m, lda);
      }
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int n = wn * 32 + 16 * j;
        wmma::load_matrix_sync(b[j], B_KC ? Bs + n * ldb + kk : Bs + kk * ldb + n, ldb);
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(c[i][j], a[i], b[j], c[i][j]);
    }
  }

  // COLMAJOR: element (r, c) at C[c * C_LD + r]; else at C[r * C_LD + c].
  template <bool COLMAJOR>
  __device__ __forceinline__ void store(float* C) const {
    namespace wmma = nvcuda::wmma;
    const int warp = static_cast<int>(threadIdx.x) / 32, wm = warp / 4, wn = warp % 4;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int r = wm * 64 + 16 * i, cc = wn * 32 + 16 * j;
        if constexpr (COLMAJOR)
          wmma::store_matrix_sync(C + cc * C_LD + r, c[i][j], C_LD, wmma::mem_col_major);
        else
          wmma::store_matrix_sync(C + r * C_LD + cc, c[i][j], C_LD, wmma::mem_row_major);
      }
  }
};

// fp32 on SIMT cores: thread (ty, tx) of a 16 x 16 grid owns rows ty + 16i, columns tx + 16j.
struct AccSimt {
  float c[8][8];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) c[i][j] = 0.f;
  }

  template <bool A_KC, bool B_KC>
  __device__ __forceinline__ void mma(const float* As, int lda, const float* Bs, int ldb) {
    const int ty = static_cast<int>(threadIdx.x) / 16, tx = static_cast<int>(threadIdx.x) % 16;
#pragma unroll 4
    for (int kk = 0; kk < BK; ++kk) {
      float a[8], b[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) a[i] = A_KC ? As[(ty + 16 * i) * lda + kk] : As[kk * lda + ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 8; ++j) b[j] = B_KC ? Bs[(tx + 16 * j) * ldb + kk] : Bs[kk * ldb + tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) c[i][j] = fmaf(a[i], b[j], c[i][j]);
    }
  }

  template <bool COLMAJOR>
  __device__ __forceinline__ void store(float* C) const {
    const int ty = static_cast<int>(threadIdx.x) / 16, tx = static_cast<int>(threadIdx.x) % 16;
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int r = ty + 16 * i, cc = tx + 16 * j;
        C[COLMAJOR ? cc * C_LD + r : r * C_LD + cc] = c[i][j];
      }
  }
};

// C[BM x BN] = A(m0.., k) · B(k, n0..) over k in [0, K), stored as fp32 at smem (layout COLMAJOR).
// Rows/columns outside the matrices read as zeros. Ends with a barrier: the tile is readable.
template <typename TS, bool A_KC, bool B_KC, bool COLMAJOR, typename TGA, typename TGB>
__device__ __forceinline__ void block_gemm(const Mat<TGA>& A, const Mat<TGB>& B, int m0, int n0, int K,
                                           unsigned char* smem) {
  using Cfg = GemmCfg<TS, A_KC, B_KC>;
  using Acc = std::conditional_t<std::is_same<TS, float>::value, AccSimt, AccTC<TS>>;
  TS* As = reinterpret_cast<TS*>(smem);
  TS* Bs = As + 2 * Cfg::A_ELEMS;
  TileFetch<TGA, TS, Cfg::A_R, Cfg::A_C> fa;
  TileFetch<TGB, TS, Cfg::B_R, Cfg::B_C> fb;
  auto fetch = [&](int k0) {
    if constexpr (A_KC) fa.fetch(A, m0, k0); else fa.fetch(A, k0, m0);
    if constexpr (B_KC) fb.fetch(B, n0, k0); else fb.fetch(B, k0, n0);
  };
  Acc acc;
  acc.zero();
  const int KT = (K + BK - 1) / BK;
  if (KT > 0) {
    fetch(0);
    fa.commit(As);
    fb.commit(Bs);
  }
  __syncthreads();
  for (int kt = 0; kt < KT; ++kt) {
    const int cur = kt & 1;
    const bool more = kt + 1 < KT;
    if (more) fetch((kt + 1) * BK);  // global loads in flight during the MMAs below
    acc.template mma<A_KC, B_KC>(As + cur * Cfg::A_ELEMS, Cfg::A_LD, Bs + cur * Cfg::B_ELEMS, Cfg::B_LD);
    if (more) {
      fa.commit(As + (cur ^ 1) * Cfg::A_ELEMS);
      fb.commit(Bs + (cur ^ 1) * Cfg::B_ELEMS);
    }
    __syncthreads();  // one barrier per step: the other buffer was last read before the previous one
  }
  acc.template store<COLMAJOR>(reinterpret_cast<float*>(smem));
  __syncthreads();
}

// ----------------------------------------------------------------------------- TopK encoder

// Rank order of torch.sort(descending, stable): NaN above every number, ties (NaN with NaN
// included) to the lower latent index.
__device__ __forceinline__ bool better(float v, int i, float w, int j) {
  const bool vn = v != v, wn = w != w;
  if (vn || wn) return vn && (!wn || i < j);
  return v > w || (v == w && i < j);
}

// Block (row block, split) -> per-row top-k candidate lists of its split, sorted, in the
// workspace at [row block][split][slot][row in block] (sentinels -inf / INT_MAX where the split
// has fewer than k columns).
template <typename T, typename TS>
__global__ void __launch_bounds__(kThreads)
    topk_tiles_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
                      float* __restrict__ cand_v, int* __restrict__ cand_i, int N, int d, int n, int k,
                      int splits, bool vec_x, bool vec_w, bool lists_in_smem) {
  using Cfg = GemmCfg<TS, true, true>;
  FA_DYNAMIC_SMEM(unsigned char, smem);
  const float* Ct = reinterpret_cast<const float*>(smem);  // z(r, c) at Ct[c * C_LD + r]
  const int rb = blockIdx.x, s = blockIdx.y, m0 = rb * BM;
  const int tiles = (n + BN - 1) / BN;
  const int t0 = static_cast<int>(static_cast<int64_t>(tiles) * s / splits);
  const int t1 = static_cast<int>(static_cast<int64_t>(tiles) * (s + 1) / splits);
  const size_t list_off = (static_cast<size_t>(rb) * splits + s) * static_cast<size_t>(k) * BM;
  // Slot p of row r at L[p * BM + r]: consecutive threads, consecutive words.
  float* Lv = lists_in_smem ? reinterpret_cast<float*>(smem + Cfg::BYTES) : cand_v + list_off;
  int* Li = lists_in_smem ? reinterpret_cast<int*>(smem + Cfg::BYTES) + static_cast<size_t>(k) * BM
                          : cand_i + list_off;
  const int r = threadIdx.x;
  const bool owner = r < BM && m0 + r < N;
  if (owner)
    for (int p = 0; p < k; ++p) {
      Lv[p * BM + r] = -INFINITY;
      Li[p * BM + r] = INT_MAX;
    }
  const Mat<T> A{x, d, N, d, vec_x}, B{w, d, n, d, vec_w};
  for (int t = t0; t < t1; ++t) {
    const int n0 = t * BN;
    block_gemm<TS, true, true, true>(A, B, m0, n0, d, smem);
    if (owner) {
      float tv = Lv[(k - 1) * BM + r];
      int ti = Li[(k - 1) * BM + r];
      const int nc = n - n0 < BN ? n - n0 : BN;
      for (int c = 0; c < nc; ++c) {
        const int col = n0 + c;
        float v = Ct[c * C_LD + r];
        if (bias) v += to_f(bias[col]);
        if (!better(v, col, tv, ti)) continue;  // the common case once the list is full
        int p = k - 1;
        while (p > 0) {
          const float pv = Lv[(p - 1) * BM + r];
          const int pi = Li[(p - 1) * BM + r];
          if (!better(v, col, pv, pi)) break;
          Lv[p * BM + r] = pv;
          Li[p * BM + r] = pi;
          --p;
        }
        Lv[p * BM + r] = v;
        Li[p * BM + r] = col;
        tv = Lv[(k - 1) * BM + r];
        ti = Li[(k - 1) * BM + r];
      }
    }
    __syncthreads();  // the result tile aliases the next tile's staging buffers
  }
  if (lists_in_smem && owner)
    for (int p = 0; p < k; ++p) {
      cand_v[list_off + p * BM + r] = Lv[p * BM + r];
      cand_i[list_off + p * BM + r] = Li[p * BM + r];
    }
}

// One thread per row: k steps of a splits-way merge of sorted lists.
template <typename T>
__global__ void topk_merge_kernel(const float* __restrict__ cand_v, const int* __restrict__ cand_i,
                                  T* __restrict__ values, int64_t* __restrict__ indices, int N, int k,
                                  int splits) {
  const int r = blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= N) return;
  const size_t base = static_cast<size_t>(r / BM) * splits * k * BM + r % BM;
  int pos[kMaxSplits];
  for (int s = 0; s < splits; ++s) pos[s] = 0;
  for (int p = 0; p < k; ++p) {
    int best = 0;
    float bv = -INFINITY;
    int bi = INT_MAX;
    bool found = false;
    for (int s = 0; s < splits; ++s) {
      if (pos[s] >= k) continue;
      const size_t e = base + (static_cast<size_t>(s) * k + pos[s]) * BM;
      const float v = cand_v[e];
      const int i = cand_i[e];
      if (!found || better(v, i, bv, bi)) {
        found = true;
        best = s;
        bv = v;
        bi = i;
      }
    }
    ++pos[best];
    values[static_cast<size_t>(r) * k + p] = fa_from_float<T>(bv);
    indices[static_cast<size_t>(r) * k + p] = bi;
  }
}

// ----------------------------------------------------------------------------- gathers, scatters

// One warp per row, 8 columns per lane: out[r] = Σ_k coef[r, k] · rows[idx[r, k]] (+ bias).
template <typename T>
__global__ void gather_combine_kernel(const T* __restrict__ coef, const int64_t* __restrict__ idx,
                                      const T* __restrict__ rows, const T* __restrict__ bias, T* __restrict__ out,
                                      int64_t N, int k, int d, int n, bool vec) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * 4 + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= N) return;
  for (int c = lane * 8; c < d; c += 256) {
    float acc[8];
    if (bias) {
      load8f(acc, bias + c, d - c, false);
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[e] = 0.f;
    }
    for (int kk = 0; kk < k; ++kk) {
      const int64_t j = idx[r * k + kk];
      if (j < 0 || j >= n) continue;
      const float cf = to_f(coef[r * k + kk]);
      float wv[8];
      load8f(wv, rows + j * d + c, d - c, vec);
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[e] = fmaf(cf, wv[e], acc[e]);
    }
    store8(out + r * d + c, acc, d - c, vec);
  }
}

// One warp per entry e = (r, k): out[e] = g[r] · rows[idx[e]], lanes' partials summed in order.
template <typename T>
__global__ void gather_dot_kernel(const T* __restrict__ g, const int64_t* __restrict__ idx,
                                  const T* __restrict__ rows, T* __restrict__ out, int64_t E, int k, int d, int n,
                                  bool vec) {
  FA_SHARED float red[4][32];
  const int wi = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * 4 + wi;
  if (e >= E) return;  // whole warps only; no block barrier below
  const int64_t r = e / k, j = idx[e];
  float acc = 0.f;
  if (j >= 0 && j < n)
    for (int c = lane * 8; c < d; c += 256) {
      float gv[8], wv[8];
      load8f(gv, g + r * d + c, d - c, vec);
      load8f(wv, rows + j * d + c, d - c, vec);
#pragma unroll
      for (int q = 0; q < 8; ++q) acc = fmaf(gv[q], wv[q], acc);
    }
  red[wi][lane] = acc;
  __syncwarp();
  if (lane == 0) {
    float s = 0.f;
    for (int l = 0; l < 32; ++l) s += red[wi][l];
    out[e] = fa_from_float<T>(s);
  }
}

// One warp per latent j: dW[j] = Σ coef[e] · X[e / k] over its entries in index order.
template <typename T>
__global__ void segment_scatter_kernel(const int64_t* __restrict__ order, const int64_t* __restrict__ start,
                                       const T* __restrict__ coef, const T* __restrict__ X, T* __restrict__ dW,
                                       T* __restrict__ dsum, int64_t E, int k, int d, int n, bool vec) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * 4 + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (j >= n) return;
  const int64_t p0 = start[j], p1 = start[j + 1];
  for (int c = lane * 8; c < d; c += 256) {
    float acc[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[e] = 0.f;
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t e = order[p];
      if (e < 0 || e >= E) continue;
      const float cf = to_f(coef[e]);
      float xv[8];
      load8f(xv, X + (e / k) * d + c, d - c, vec);
#pragma unroll
      for (int q = 0; q < 8; ++q) acc[q] = fmaf(cf, xv[q], acc[q]);
    }
    store8(dW + j * d + c, acc, d - c, vec);
  }
  if (dsum && lane == 0) {
    float s = 0.f;
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t e = order[p];
      if (e >= 0 && e < E) s += to_f(coef[e]);
    }
    dsum[j] = fa_from_float<T>(s);
  }
}

// partial[chunk, c] = Σ over the chunk's rows of X[r, c] (fp64); *nonbinary |= any X ∉ {0, 1}.
template <typename T>
__global__ void colsum_partial_kernel(const T* __restrict__ X, double* __restrict__ partial,
                                      unsigned* __restrict__ nonbinary, int64_t N, int d) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= d) return;
  const int64_t chunks = (N + kColsumRows - 1) / kColsumRows;
  bool other = false;
  for (int64_t q = blockIdx.y; q < chunks; q += gridDim.y) {
    const int64_t r0 = q * kColsumRows;
    const int64_t r1 = N < r0 + kColsumRows ? N : r0 + kColsumRows;
    double s = 0.0;
    for (int64_t r = r0; r < r1; ++r) {
      const float v = to_f(X[r * d + c]);
      s += v;
      other |= v != 0.f && v != 1.f;
    }
    partial[q * d + c] = s;
  }
  if (nonbinary && other) atomicOr(nonbinary, 1u);
}

template <typename TO>
__global__ void colsum_finish_kernel(const double* __restrict__ partial, TO* __restrict__ out, int chunks, int d) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= d) return;
  double s = 0.0;
  for (int q = 0; q < chunks; ++q) s += partial[static_cast<int64_t>(q) * d + c];
  if constexpr (std::is_same<TO, double>::value)
    out[c] = s;
  else
    out[c] = fa_from_float<TO>(static_cast<float>(s));
}

// ----------------------------------------------------------------------------- binary encoder

// MODE 0: code / packed / counts from z = x·Wᵀ + b. MODE 1: gz = g·σ(z)(1 − σ(z)) (sigmoid STE).
template <typename T, typename TS, int MODE>
__global__ void __launch_bounds__(kThreads)
    encode_tile_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias, int N, int d,
                       int n, bool vec_x, bool vec_w, T* __restrict__ code, uint8_t* __restrict__ packed,
                       unsigned long long* __restrict__ counts, const T* __restrict__ g, T* __restrict__ gz) {
  using Cfg = GemmCfg<TS, true, true>;
  FA_DYNAMIC_SMEM(unsigned char, smem);
  const int n0 = blockIdx.x * BN, mtiles = (N + BM - 1) / BM;
  for (int mt = blockIdx.y; mt < mtiles; mt += gridDim.y) {  // see kMaxGridY
    const int m0 = mt * BM;
    block_gemm<TS, true, true, false>(Mat<T>{x, d, N, d, vec_x}, Mat<T>{w, d, n, d, vec_w}, m0, n0, d, smem);
    const float* Cr = reinterpret_cast<const float*>(smem);  // z(r, c) at Cr[r * C_LD + c]
    const int tid = threadIdx.x;
    if constexpr (MODE == 0) {
      constexpr int WB = BN / 8;  // bytes per tile row
      uint8_t* pk = smem + Cfg::BYTES;  // [BM][WB]
      const int64_t nbytes = (static_cast<int64_t>(n) + 7) / 8;
      const T one = fa_from_float<T>(1.f), zero = zero_of<T>();
      for (int q = 0; q < BM * WB / kThreads; ++q) {
        const int idx = tid + q * kThreads, r = idx / WB, wb = idx % WB;
        const int64_t row = m0 + r;
        const int c0 = wb * 8;
        unsigned byte = 0;
        if (row < N && n0 + c0 < n) {
          for (int e = 0; e < 8; ++e) {
            const int col = n0 + c0 + e;
            if (col >= n) break;
            const float z = Cr[r * C_LD + c0 + e] + (bias ? to_f(bias[col]) : 0.f);
            const unsigned bit = z > 0.f ? 1u : 0u;
            byte |= bit << e;
            if (code) code[row * n + col] = bit ? one : zero;
          }
          packed[row * nbytes + (n0 + c0) / 8] = static_cast<uint8_t>(byte);
        }
        pk[r * WB + wb] = static_cast<uint8_t>(byte);
      }
      __syncthreads();
      if (tid < BN && n0 + tid < n) {
        unsigned cnt = 0;
        for (int r = 0; r < BM; ++r) cnt += (pk[r * WB + tid / 8] >> (tid % 8)) & 1u;
        if (cnt) atomicAdd(counts + n0 + tid, static_cast<unsigned long long>(cnt));
      }
    } else {
      for (int q = 0; q < BM * BN / kThreads; ++q) {
        const int idx = tid + q * kThreads, r = idx / BN, c = idx % BN;
        const int64_t row = m0 + r;
        const int col = n0 + c;
        if (row >= N || col >= n) continue;
        const float z = Cr[r * C_LD + c] + (bias ? to_f(bias[col]) : 0.f);
        const float s = 1.f / (1.f + expf(-z));
        gz[row * n + col] = fa_from_float<T>(to_f(g[row * n + col]) * s * (1.f - s));
      }
    }
    __syncthreads();  // every read of this tile (and of pk) before the next tile's staging writes
  }
}

// gz = g·(1 − g) (the BAE authors' straight-through estimator).
template <typename T>
__global__ void ste_reference_kernel(const T* __restrict__ g, T* __restrict__ gz, int64_t total) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float v = to_f(g[i]);
    gz[i] = fa_from_float<T>(v * (1.f - v));
  }
}

// ----------------------------------------------------------------------------- covariance penalty

// WANT: 1 = run only for binary h, 0 = only for non-binary h, -1 = always (the caller launches
// both variants; the flag was computed on the device, so no host synchronisation is needed).
template <int WANT>
__device__ __forceinline__ bool skip_for(const unsigned* nonbinary) {
  if constexpr (WANT < 0) {
    return false;
  } else {
    const bool binary = *nonbinary == 0u;
    return binary != (WANT == 1);
  }
}

// Block = pair (I <= J) of column tiles. part[pair] = weight · Σ_{i in I, j in J, i≠j} |B·G_ij − c_i c_j|;
// with S: S[i, j] = S[j, i] = sign(C_ij) (0 on the diagonal), rpart[J, i] = Σ_{j in J} c_j S_ij and
// rpart[I, j] = Σ_{i in I} c_i S_ij.
template <typename T, typename TS, int WANT>
__global__ void __launch_bounds__(kThreads)
    cov_pair_kernel(const T* __restrict__ h, const double* __restrict__ csum, const unsigned* __restrict__ nonbinary,
                    double* __restrict__ part, double* __restrict__ rpart, int8_t* __restrict__ S, int B, int n,
                    int nt, bool vec_h) {
  if (skip_for<WANT>(nonbinary)) return;
  using Cfg = GemmCfg<TS, false, false>;
  FA_DYNAMIC_SMEM(unsigned char, smem);
  int64_t p = blockIdx.x;
  int I = 0;
  while (p >= nt - I) {
    p -= nt - I;
    ++I;
  }
  const int J = I + static_cast<int>(p);
  const int i0 = I * BM, j0 = J * BN;
  const Mat<T> H{h, n, B, n, vec_h};
  block_gemm<TS, false, false, true>(H, H, i0, j0, B, smem);
  const float* Ct = reinterpret_cast<const float*>(smem);  // G(i, j) at Ct[j * C_LD + i]
  double* red = reinterpret_cast<double*>(smem + Cfg::BYTES);  // [kThreads]
  double* rrow = red + kThreads;                              // [2][BM]
  double* rcol = rrow + 2 * BM;                               // [2][BN]
  const double Bd = B;
  const int t = threadIdx.x, half = t / BM, l = t % BM;
  const bool grad = rpart != nullptr;
  // Rows i of the I tile, half of the J tile's columns each.
  double a = 0.0, rs = 0.0;
  const int gi = i0 + l;
  if (gi < n) {
    const double ci = csum[gi];
    for (int jj = 0; jj < BN / 2; ++jj) {
      const int j = half * (BN / 2) + jj, gj = j0 + j;
      if (gj >= n) break;
      if (gi == gj) {
        if (grad) S[static_cast<int64_t>(gi) * n + gj] = 0;
        continue;
      }
      const double num = Bd * static_cast<double>(Ct[j * C_LD + l]) - ci * csum[gj];
      a += fabs(num);
      if (grad) {
        const int s = (num > 0.0) - (num < 0.0);
        rs += s * csum[gj];
        S[static_cast<int64_t>(gi) * n + gj] = static_cast<int8_t>(s);
      }
    }
  }
  red[t] = a;
  rrow[half * BM + l] = rs;
  // Columns j of the J tile: the transposed half of the sign matrix (off-diagonal pairs only).
  double rc = 0.0;
  const int gj = j0 + l;
  if (grad && I != J && gj < n) {
    const double cj = csum[gj];
    for (int ii = 0; ii < BM / 2; ++ii) {
      const int i = half * (BM / 2) + ii, gi2 = i0 + i;
      if (gi2 >= n) break;
      const double num = Bd * static_cast<double>(Ct[l * C_LD + i]) - csum[gi2] * cj;
      const int s = (num > 0.0) - (num < 0.0);
      rc += s * csum[gi2];
      S[static_cast<int64_t>(gj) * n + gi2] = static_cast<int8_t>(s);
    }
  }
  rcol[half * BN + l] = rc;
  __syncthreads();
  if (t == 0) {
    double tot = 0.0;
    for (int u = 0; u < kThreads; ++u) tot += red[u];  // fixed order: deterministic
    part[blockIdx.x] = (I == J ? 1.0 : 2.0) * tot;
  }
  if (grad && t < BM) {
    if (i0 + t < n) rpart[static_cast<int64_t>(J) * n + i0 + t] = rrow[t] + rrow[BM + t];
    if (I != J && j0 + t < n) rpart[static_cast<int64_t>(I) * n + j0 + t] = rcol[t] + rcol[BN + t];
  }
}

__global__ void cov_r_kernel(const double* __restrict__ rpart, double* __restrict__ r, int nt, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  double s = 0.0;
  for (int t = 0; t < nt; ++t) s += rpart[static_cast<int64_t>(t) * n + i];
  r[i] = s;
}

template <typename T>
__global__ void cov_value_kernel(const double* __restrict__ part, int64_t pairs, int B, T* __restrict__ value) {
  if (threadIdx.x != 0) return;
  double tot = 0.0;
  for (int64_t p = 0; p < pairs; ++p) tot += part[p];
  const double Bd = B;
  *value = fa_from_float<T>(static_cast<float>(tot / (Bd * (Bd - 1.0))));
}

// grad[b, i] = 2/(B−1) · (Σ_j h[b, j] S[j, i] − r_i / B): a GEMM with the sign matrix.
template <typename T, typename TS, int WANT>
__global__ void __launch_bounds__(kThreads)
    cov_grad_kernel(const T* __restrict__ h, const int8_t* __restrict__ S, const double* __restrict__ r,
                    const unsigned* __restrict__ nonbinary, T* __restrict__ grad, int B, int n, bool vec_h,
                    bool vec_s) {
  if (skip_for<WANT>(nonbinary)) return;
  FA_DYNAMIC_SMEM(unsigned char, smem);
  const int n0 = blockIdx.x * BN, mtiles = (B + BM - 1) / BM;
  for (int mt = blockIdx.y; mt < mtiles; mt += gridDim.y) {  // see kMaxGridY
    const int m0 = mt * BM;
    block_gemm<TS, true, false, false>(Mat<T>{h, n, B, n, vec_h}, Mat<int8_t>{S, n, n, n, vec_s}, m0, n0, n, smem);
    const float* Cr = reinterpret_cast<const float*>(smem);
    const double Bd = B, gscale = 2.0 / (Bd - 1.0);
    for (int q = 0; q < BM * BN / kThreads; ++q) {
      const int idx = threadIdx.x + q * kThreads, rr = idx / BN, c = idx % BN;
      const int64_t row = m0 + rr;
      const int col = n0 + c;
      if (row >= B || col >= n) continue;
      const double v = gscale * (static_cast<double>(Cr[rr * C_LD + c]) - r[col] / Bd);
      grad[row * n + col] = fa_from_float<T>(static_cast<float>(v));
    }
    __syncthreads();  // the tile is read before the next tile's staging writes
  }
}

// ----------------------------------------------------------------------------- launch helpers

template <typename F>
const char* by_dtype(DType dt, F&& f) {
  switch (dt) {
    case kF32: return f(float{}, float{});
    case kF16: return f(fp16{}, fp16{});
    case kBF16: return f(bf16{}, bf16{});
  }
  return "unsupported dtype";
}

inline int cdiv(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }
inline unsigned grid_y(int tiles) { return static_cast<unsigned>(tiles < kMaxGridY ? tiles : kMaxGridY); }
inline size_t align256(size_t x) { return (x + 255) & ~static_cast<size_t>(255); }
inline fa_stream_t as_stream(void* s) { return reinterpret_cast<fa_stream_t>(s); }

struct CovLayout {
  size_t flag = 0, partial = 0, csum = 0, part = 0, rpart = 0, r = 0, S = 0, total = 0;
  int chunks = 0, nt = 0;
  int64_t pairs = 0;
};

CovLayout cov_layout(int64_t B, int64_t n, bool grad) {
  CovLayout L;
  L.chunks = cdiv(B, kColsumRows);
  L.nt = cdiv(n, BN);
  L.pairs = static_cast<int64_t>(L.nt) * (L.nt + 1) / 2;
  size_t off = 0;
  L.flag = off;
  off += align256(16);
  L.partial = off;
  off += align256(static_cast<size_t>(L.chunks) * n * sizeof(double));
  L.csum = off;
  off += align256(n * sizeof(double));
  L.part = off;
  off += align256(L.pairs * sizeof(double));
  if (grad) {
    L.rpart = off;
    off += align256(static_cast<size_t>(L.nt) * n * sizeof(double));
    L.r = off;
    off += align256(n * sizeof(double));
    L.S = off;
    off += align256(static_cast<size_t>(n) * n);
  }
  L.total = off;
  return L;
}

template <typename T, typename TS, int WANT>
void launch_cov_pair(const T* h, const double* csum, const unsigned* flag, double* part, double* rpart, int8_t* S,
                     int B, int n, const CovLayout& L, fa_stream_t st) {
  const size_t smem = GemmCfg<TS, false, false>::BYTES + (kThreads + 2 * BM + 2 * BN) * sizeof(double);
  FA_SET_MAX_DYNAMIC_SMEM((cov_pair_kernel<T, TS, WANT>), smem);
  FA_LAUNCH((cov_pair_kernel<T, TS, WANT>), static_cast<unsigned>(L.pairs), kThreads, smem, st, h, csum, flag, part,
            rpart, S, B, n, L.nt, vec_ok<T>(h, n));
}

template <typename T, typename TS, int WANT>
void launch_cov_grad(const T* h, const int8_t* S, const double* r, const unsigned* flag, T* grad, int B, int n,
                     fa_stream_t st) {
  const size_t smem = GemmCfg<TS, true, false>::BYTES;
  FA_SET_MAX_DYNAMIC_SMEM((cov_grad_kernel<T, TS, WANT>), smem);
  FA_LAUNCH((cov_grad_kernel<T, TS, WANT>), dim3(cdiv(n, BN), grid_y(cdiv(B, BM))), kThreads, smem, st, h, S, r, flag, grad,
            B, n, vec_ok<T>(h, n), vec_ok<int8_t>(S, n));
}

}  // namespace

// ----------------------------------------------------------------------------- launchers

int topk_splits(int64_t N, int64_t n, int64_t k, int num_sms) {
  (void)k;
  const int64_t row_blocks = (N + BM - 1) / BM, tiles = (n + BN - 1) / BN;
  // About two resident blocks per SM in one wave; never more splits than column tiles.
  int64_t s = 2 * static_cast<int64_t>(num_sms > 0 ? num_sms : 1) / (row_blocks > 0 ? row_blocks : 1);
  if (s > tiles) s = tiles;
  if (s > kMaxSplits) s = kMaxSplits;
  return static_cast<int>(s < 1 ? 1 : s);
}

size_t topk_workspace_bytes(int64_t N, int64_t n, int64_t k, int num_sms) {
  const int64_t row_blocks = (N + BM - 1) / BM;
  return static_cast<size_t>(row_blocks) * topk_splits(N, n, k, num_sms) * k * BM * (sizeof(float) + sizeof(int));
}

bool topk_smem_lists(DType dt, int64_t k, size_t max_smem) {
  if (k > kTopkSmemMaxK) return false;
  const size_t gemm = dt == kF32 ? GemmCfg<float, true, true>::BYTES : GemmCfg<fp16, true, true>::BYTES;
  return gemm + static_cast<size_t>(k) * BM * 8 <= max_smem;
}

const char* topk_encode(DType dt, const void* x, const void* weight, const void* bias, void* values,
                        int64_t* indices, void* workspace, int N, int d, int n, int k, int num_sms,
                        size_t max_smem, void* stream) {
  if (N == 0) return nullptr;
  const int splits = topk_splits(N, n, k, num_sms), row_blocks = cdiv(N, BM);
  float* cand_v = static_cast<float*>(workspace);
  int* cand_i = reinterpret_cast<int*>(cand_v + static_cast<size_t>(row_blocks) * splits * k * BM);
  // Lists in shared memory only where the device allows it: a fixed k <= 64 test would ask an
  // sm_86/89 GPU (99 KB opt-in) for up to 136 KB and every launch would fail there.
  const bool smem_lists = topk_smem_lists(dt, k, max_smem);
  const fa_stream_t st = as_stream(stream);
  return by_dtype(dt, [&](auto t, auto) -> const char* {
    using T = decltype(t);
    const size_t smem = GemmCfg<T, true, true>::BYTES + (smem_lists ? static_cast<size_t>(k) * BM * 8 : 0);
    if (smem > max_smem) return "topk_encode: the device's shared memory per block is too small (the GEMM tile needs 66-72 KB)";
    FA_SET_MAX_DYNAMIC_SMEM((topk_tiles_kernel<T, T>), smem);
    FA_LAUNCH((topk_tiles_kernel<T, T>), dim3(row_blocks, splits), kThreads, smem, st, static_cast<const T*>(x),
              static_cast<const T*>(weight), static_cast<const T*>(bias), cand_v, cand_i, N, d, n, k, splits,
              vec_ok<T>(x, d), vec_ok<T>(weight, d), smem_lists);
    FA_LAUNCH((topk_merge_kernel<T>), cdiv(N, 128), 128, 0, st, cand_v, cand_i, static_cast<T*>(values), indices, N,
              k, splits);
    return fa_last_error();
  });
}

const char* gather_combine(DType dt, const void* coef, const int64_t* idx, const void* rows, const void* bias,
                           void* out, int64_t N, int k, int d, int n, void* stream) {
  if (N == 0 || d == 0) return nullptr;
  return by_dtype(dt, [&](auto t, auto) -> const char* {
    using T = decltype(t);
    FA_LAUNCH((gather_combine_kernel<T>), cdiv(N, 4), 128, 0, as_stream(stream), static_cast<const T*>(coef), idx,
              static_cast<const T*>(rows), static_cast<const T*>(bias), static_cast<T*>(out), N, k, d, n,
              vec_ok<T>(rows, d) && vec_ok<T>(out, d));
    return fa_last_error();
  });
}

const char* gather_dot(DType dt, const void* g, const int64_t* idx, const void* rows, void* out, int64_t N, int k,
                       int d, int n, void* stream) {
  const int64_t E = N * k;
  if (E == 0) return nullptr;
  return by_dtype(dt, [&](auto t, auto) -> const char* {
    using T = decltype(t);
    FA_LAUNCH((gather_dot_kernel<T>), cdiv(E, 4), 128, 0, as_stream(stream), static_cast<const T*>(g), idx,
              static_cast<const T*>(rows), static_cast<T*>(out), E, k, d, n, vec_ok<T>(rows, d) && vec_ok<T>(g, d));
    return fa_last_error();
  });
}

const char* segment_scatter(DType dt, const int64_t* order, const int64_t* start, const void* coef, const void* X,
                            void* dW, void* dsum, int64_t entries, int k, int d, int n, void* stream) {
  if (n == 0) return nullptr;
  return by_dtype(dt, [&](auto t, auto) -> const char* {
    using T = decltype(t);
    FA_LAUNCH((segment_scatter_kernel<T>), cdiv(n, 4), 128, 0, as_stream(stream), order, start,
              static_cast<const T*>(coef), static_cast<const T*>(X), static_cast<T*>(dW), static_cast<T*>(dsum),
              entries, k, d, n, vec_ok<T>(X, d) && vec_ok<T>(dW, d));
    return fa_last_error();
  });
}

size_t colsum_workspace_bytes(int64_t N, int64_t d) {
  return static_cast<size_t>(cdiv(N, kColsumRows)) * d * sizeof(double);
}

const char* colsum(DType dt, const void* X, void* out, void* workspace, int64_t N, int d, void* stream) {
  if (d == 0) return nullptr;
  const fa_stream_t st = as_stream(stream);
  if (N == 0) return cudaMemsetAsync(out, 0, d * (dt == kF32 ? 4 : 2), st) == cudaSuccess ? nullptr : "memset failed";
  const int chunks = cdiv(N, kColsumRows);
  double* partial = static_cast<double*>(workspace);
  return by_dtype(dt, [&](auto t, auto) -> const char* {
    using T = decltype(t);
    FA_LAUNCH((colsum_partial_kernel<T>), dim3(cdiv(d, 128), grid_y(chunks)), 128, 0, st, static_cast<const T*>(X), partial,
              static_cast<unsigned*>(nullptr), N, d);
    FA_LAUNCH((colsum_finish_kernel<T>), cdiv(d, 128), 128, 0, st, static_cast<const double*>(partial),
              static_cast<T*>(out), chunks, d);
    return fa_last_error();
  });
}

const char* binary_encode(DType dt, const void* x, const void* weight, const void* bias, void* code,
                          uint8_t* packed, int64_t* counts, int N, int d, int n, void* stream) {
  const fa_stream_t st = as_stream(stream);
  if (n > 0 && cudaMemsetAsync(counts, 0, static_cast<size_t>(n) * sizeof(int64_t), st) != cudaSuccess)
    return "memset of counts failed";
  if (N == 0 || n == 0) return fa_last_error();
  return by_dtype(dt, [&](auto t, auto) -> const char* {
    using T = decltype(t);
    const size_t smem = GemmCfg<T, true, true>::BYTES + BM * BN / 8;
    FA_SET_MAX_DYNAMIC_SMEM((encode_tile_kernel<T, T, 0>), smem);
    FA_LAUNCH((encode_tile_kernel<T, T, 0>), dim3(cdiv(n, BN), grid_y(cdiv(N, BM))), kThreads, smem, st,
              static_cast<const T*>(x), static_cast<const T*>(weight), static_cast<const T*>(bias), N, d, n,
              vec_ok<T>(x, d), vec_ok<T>(weight, d), static_cast<T*>(code), packed,
              reinterpret_cast<unsigned long long*>(counts), static_cast<const T*>(nullptr), static_cast<T*>(nullptr));
    return fa_last_error();
  });
}

const char* ste_grad(DType dt, int ste, const void* g, const void* x, const void* weight, const void* bias, void* gz,
                     int N, int d, int n, void* stream) {
  const fa_stream_t st = as_stream(stream);
  const int64_t total = static_cast<int64_t>(N) * n;
  if (total == 0) return nullptr;
  return by_dtype(dt, [&](auto t, auto) -> const char* {
    using T = decltype(t);
    if (ste == 1) {
      if (cudaMemcpyAsync(gz, g, total * sizeof(T), cudaMemcpyDeviceToDevice, st) != cudaSuccess)
        return "copy failed";
    } else if (ste == 0) {
      const int64_t blocks = (total + 255) / 256;
      FA_LAUNCH((ste_reference_kernel<T>), static_cast<unsigned>(blocks < 65536 ? blocks : 65536), 256, 0, st,
                static_cast<const T*>(g), static_cast<T*>(gz), total);
    } else {
      const size_t smem = GemmCfg<T, true, true>::BYTES;
      FA_SET_MAX_DYNAMIC_SMEM((encode_tile_kernel<T, T, 1>), smem);
      FA_LAUNCH((encode_tile_kernel<T, T, 1>), dim3(cdiv(n, BN), grid_y(cdiv(N, BM))), kThreads, smem, st,
                static_cast<const T*>(x), static_cast<const T*>(weight), static_cast<const T*>(bias), N, d, n,
                vec_ok<T>(x, d), vec_ok<T>(weight, d), static_cast<T*>(nullptr), static_cast<uint8_t*>(nullptr),
                static_cast<unsigned long long*>(nullptr), static_cast<const T*>(g), static_cast<T*>(gz));
    }
    return fa_last_error();
  });
}

size_t covariance_workspace_bytes(int64_t B, int64_t n, bool grad) { return cov_layout(B, n, grad).total; }

const char* covariance_penalty(DType dt, const void* h, void* value, void* grad, void* workspace, int B, int n,
                               void* stream) {
  const fa_stream_t st = as_stream(stream);
  const CovLayout L = cov_layout(B, n, grad != nullptr);
  unsigned char* ws = static_cast<unsigned char*>(workspace);
  unsigned* flag = reinterpret_cast<unsigned*>(ws + L.flag);
  double* partial = reinterpret_cast<double*>(ws + L.partial);
  double* csum = reinterpret_cast<double*>(ws + L.csum);
  double* part = reinterpret_cast<double*>(ws + L.part);
  double* rpart = grad ? reinterpret_cast<double*>(ws + L.rpart) : nullptr;
  double* r = grad ? reinterpret_cast<double*>(ws + L.r) : nullptr;
  int8_t* S = grad ? reinterpret_cast<int8_t*>(ws + L.S) : nullptr;
  if (cudaMemsetAsync(flag, 0, sizeof(unsigned), st) != cudaSuccess) return "memset failed";
  return by_dtype(dt, [&](auto t, auto) -> const char* {
    using T = decltype(t);
    const T* H = static_cast<const T*>(h);
    if (n > 0) {
      FA_LAUNCH((colsum_partial_kernel<T>), dim3(cdiv(n, 128), grid_y(L.chunks)), 128, 0, st, H, partial, flag,
                static_cast<int64_t>(B), n);
      FA_LAUNCH((colsum_finish_kernel<double>), cdiv(n, 128), 128, 0, st, static_cast<const double*>(partial), csum,
                L.chunks, n);
      if constexpr (std::is_same<T, float>::value) {
        // Binary codes on bf16 tensor cores (exact); anything else in fp32 on SIMT cores.
        launch_cov_pair<float, bf16, 1>(H, csum, flag, part, rpart, S, B, n, L, st);
        launch_cov_pair<float, float, 0>(H, csum, flag, part, rpart, S, B, n, L, st);
      } else {
        launch_cov_pair<T, T, -1>(H, csum, flag, part, rpart, S, B, n, L, st);
      }
    }
    FA_LAUNCH((cov_value_kernel<T>), 1, 32, 0, st, static_cast<const double*>(part), L.pairs, B,
              static_cast<T*>(value));
    if (grad && n > 0) {
      FA_LAUNCH(cov_r_kernel, cdiv(n, 128), 128, 0, st, static_cast<const double*>(rpart), r, L.nt, n);
      if constexpr (std::is_same<T, float>::value) {
        launch_cov_grad<float, bf16, 1>(H, S, r, flag, static_cast<T*>(grad), B, n, st);
        launch_cov_grad<float, float, 0>(H, S, r, flag, static_cast<T*>(grad), B, n, st);
      } else {
        launch_cov_grad<T, T, -1>(H, S, r, flag, static_cast<T*>(grad), B, n, st);
      }
    }
    return fa_last_error();
  });
}

}  // namespace fastattn::sae_cuda
