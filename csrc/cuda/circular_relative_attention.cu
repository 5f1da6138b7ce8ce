// Circular relative attention on CUDA: forward (with split-K decoding), backward, reductions.
// Semantics: SPEC §2, exactly as csrc/cpu/circular_relative_attention.cpp. CUDA headers only
// (through fa_cuda.h) and raw pointers: plain nvcc compiles this file, and so does the host
// compiler under -DFASTATTN_CUDA_EMULATE, which is how the tests run it on CPU tensors.
//
// Layout (one block = 128 threads = 4 warps, everything staged in shared memory):
//   forward, per (query tile of BQ rows, batch·head, key split):
//     RS = Q · E_smallᵀ  [BQ, SP] fp32, for every row of the non-index ("small") terms, once;
//     per key tile of BK keys:  S = Q·Kᵀ [BQ, BK] and, for the index term, QE = Q·E_bandᵀ
//     [BQ, BANDP] where band row c is Δn = a0 - j0 - (BK-1) + c (a skewed band, the Music
//     Transformer trick); logits gather QE[i, i-j+BK-1] and RS[i, rs_off + row(i, j)] per
//     term; online softmax in fp32; O += P·V.  Out and log-sum-exp (fp32).
//     Decoding (few query tiles): key tiles are split over blocks; a second kernel combines
//     the partial (O, max, sum) in split order.
//   backward, per (group g of query tiles, batch·head): the block owns its query rows (dQ)
//     and accumulates dK, dV, the index-band gradient (by Δn) and the small-table gradient
//     into fp32 workspace regions only it touches (no atomics); per query tile the small
//     terms' dS is scattered into a shared [BQ, SP] accumulator dRS (one thread per
//     (query row, term), keys in order) and converted with two products at the end.
//     Reduction kernels then sum the regions in a fixed order and cast.
// Matrix products: WMMA 16x16x16 (bf16/fp16 in, fp32 accumulate) on tensor cores; fp32 inputs
// use a SIMT fp32 FMA path (no TF32) so fp32 meets 1e-5 tolerances. Both paths give one warp
// one 16x16 output tile, so a tile's accumulation order is fixed and the global-memory
// read-modify-write of workspace tiles is owned by one warp at a time.
// Determinism: every float sum is in a fixed order for fixed shapes (no float atomics).
#include "fa_cuda.h"

#include <type_traits>

#include "cra_cuda_launch.h"

#if defined(FASTATTN_CUDA_EMULATE)
#include <cstring>
#endif

namespace fastattn {
namespace cra_cuda {
namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr float kLog2e = 1.4426950408889634f;

// exp(x) for softmax arguments (x <= 0 or -inf -> 0) through the fast exp2 unit.
__device__ __forceinline__ float exp_nat(float x) { return exp2f(x * kLog2e); }

// ------------------------------------------------------------------ block-level matrix products

// One warp: C[r0:r0+16, c0:c0+16] (fp32, ldc; shared or global) = (acc ? C : 0) + A·B over K
// (multiple of 16). A is [M, K] row-major (lda) or, when TA, stored transposed as [K, M];
// B is [K, N] row-major (ldb) or, when TB, stored transposed as [N, K].
template <typename T, bool TA, bool TB>
__device__ __forceinline__ void warp_tile_mm(int K, const T* A, int lda, const T* B, int ldb, float* C,
                                             int ldc, bool acc, int r0, int c0) {
  if constexpr (sizeof(T) == 4) {
    // SIMT fp32: lane -> row r0 + lane/2, 8 columns; products summed in k order (fmaf).
    const int lane = threadIdx.x & 31;
    const int r = r0 + (lane >> 1), cb = c0 + (lane & 1) * 8;
    float c[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) c[u] = acc ? C[(size_t)r * ldc + cb + u] : 0.f;
    for (int k = 0; k < K; ++k) {
      const float av = TA ? A[(size_t)k * lda + r] : A[(size_t)r * lda + k];
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        const float bv = TB ? B[(size_t)(cb + u) * ldb + k] : B[(size_t)k * ldb + cb + u];
        c[u] = fmaf(av, bv, c[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < 8; ++u) C[(size_t)r * ldc + cb + u] = c[u];
  } else {
    using namespace nvcuda;
    using LA = typename std::conditional<TA, wmma::col_major, wmma::row_major>::type;
    using LB = typename std::conditional<TB, wmma::col_major, wmma::row_major>::type;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> fc;
    if (acc)
      wmma::load_matrix_sync(fc, C + (size_t)r0 * ldc + c0, ldc, wmma::mem_row_major);
    else
      wmma::fill_fragment(fc, 0.f);
    for (int k0 = 0; k0 < K; k0 += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, LA> fa;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LB> fb;
      wmma::load_matrix_sync(fa, TA ? A + (size_t)k0 * lda + r0 : A + (size_t)r0 * lda + k0, lda);
      wmma::load_matrix_sync(fb, TB ? B + (size_t)c0 * ldb + k0 : B + (size_t)k0 * ldb + c0, ldb);
      wmma::mma_sync(fc, fa, fb, fc);
    }
    // Every lane has read C before any lane overwrites it (the *_sync calls are warp-wide on a
    // GPU; the emulator gives each lane the whole tile, so the barrier is explicit).
    if (acc) __syncwarp();
    wmma::store_matrix_sync(C + (size_t)r0 * ldc + c0, fc, ldc, wmma::mem_row_major);
  }
}

// C [M, N] (+)= op(A) · op(B) by the whole block; M, N, K multiples of 16. Output tile t goes to
// warp t % 4 (a fixed owner). No barrier inside: callers synchronise around it.
template <typename T, bool TA, bool TB>
__device__ void block_mm(int M, int N, int K, const T* A, int lda, const T* B, int ldb, float* C, int ldc,
                         bool acc) {
  const int warp = threadIdx.x >> 5;
  const int tn = N >> 4, tiles = (M >> 4) * tn;
  for (int t = warp; t < tiles; t += kThreads / 32)
    warp_tile_mm<T, TA, TB>(K, A, lda, B, ldb, C, ldc, acc, (t / tn) * 16, (t % tn) * 16);
}

// ------------------------------------------------------------------ global -> shared copies

struct __align__(16) Vec16 {
  unsigned int w[4];
};

__device__ __forceinline__ void copy16(void* dst, const void* src) {
#if defined(FASTATTN_CUDA_EMULATE)
  // A GPU faults on a 16-byte access that is not 16-byte aligned: so does the emulator, so a
  // wrong `vec` decision (e.g. a view with a storage offset) fails the tests.
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0 || reinterpret_cast<uintptr_t>(src) % 16 != 0)
    throw fa_emu::Fault("fa_emu: misaligned 16-byte vector access (copy16)");
  std::memcpy(dst, src, 16);
#else
  *reinterpret_cast<Vec16*>(dst) = *reinterpret_cast<const Vec16*>(src);
#endif
}

__device__ __forceinline__ void zero16(void* dst) {
#if defined(FASTATTN_CUDA_EMULATE)
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0) throw fa_emu::Fault("fa_emu: misaligned 16-byte vector store");
  std::memset(dst, 0, 16);
#else
  *reinterpret_cast<Vec16*>(dst) = Vec16{{0u, 0u, 0u, 0u}};
#endif
}

// dst[r, 0:D] (ld) = row(r) of src (row r at src + rowptr(r)), or zeros where rowptr(r) < 0,
// for r < nrows. 16-byte vectors when `vec` (D is a multiple of 16, so rows hold whole vectors).
template <typename T, typename RowOf>
__device__ __forceinline__ void copy_rows(T* dst, int ld, const T* src, int nrows, int D, bool vec, RowOf row_of) {
  if (vec) {
    constexpr int V = 16 / sizeof(T);
    const int per_row = D / V;
    for (int idx = threadIdx.x; idx < nrows * per_row; idx += kThreads) {
      const int r = idx / per_row, c = (idx - r * per_row) * V;
      const int64_t off = row_of(r);
      if (off >= 0)
        copy16(dst + (size_t)r * ld + c, src + off + c);
      else
        zero16(dst + (size_t)r * ld + c);
    }
  } else {
    for (int idx = threadIdx.x; idx < nrows * D; idx += kThreads) {
      const int r = idx / D, c = idx - r * D;
      const int64_t off = row_of(r);
      dst[(size_t)r * ld + c] = off >= 0 ? src[off + c] : fa_from_float<T>(0.f);
    }
  }
}

// ------------------------------------------------------------------ shared pieces of fwd / bwd

// Pointers into the dynamic shared memory (see Plan / layout()).
template <typename T>
struct Smem {
  T *q, *dout, *k, *v, *e, *pt, *dst;
  float *s, *dp, *qe, *o, *rs, *drs;
  int *qc, *kc, *km;
  __device__ Smem(unsigned char* base, const Plan& p) {
    q = reinterpret_cast<T*>(base + p.q);
    dout = reinterpret_cast<T*>(base + p.dout);
    k = reinterpret_cast<T*>(base + p.k);
    v = reinterpret_cast<T*>(base + p.v);
    e = reinterpret_cast<T*>(base + p.e);
    pt = reinterpret_cast<T*>(base + p.pt);
    dst = reinterpret_cast<T*>(base + p.dst);
    s = reinterpret_cast<float*>(base + p.s);
    dp = reinterpret_cast<float*>(base + p.dp);
    qe = reinterpret_cast<float*>(base + p.qe);
    o = reinterpret_cast<float*>(base + p.o);
    rs = reinterpret_cast<float*>(base + p.rs);
    drs = reinterpret_cast<float*>(base + p.drs);
    qc = reinterpret_cast<int*>(base + p.qc);
    kc = reinterpret_cast<int*>(base + p.kc);
    km = reinterpret_cast<int*>(base + p.km);
  }
};

// The small terms in (dynamic) shared memory: read per pair with a runtime index, which on a
// kernel parameter would copy the struct to local memory. No static shared memory anywhere, so
// the dynamic buffer starts at the block's aligned shared-memory base (WMMA needs 32 bytes).
struct TermCache {
  SmallTerm t[CRA_MAX_TERMS];
};

__device__ __forceinline__ void cache_terms(TermCache& tc, const Args& a) {
  for (int i = threadIdx.x; i < a.n_small; i += kThreads) tc.t[i] = a.small[i];
}

// Table row (element offset into the head's table) of RS column c, or -1 past the small rows.
__device__ __forceinline__ int64_t small_row_offset(const TermCache& tc, int n_small, int c, int D) {
  for (int t = 0; t < n_small; ++t) {
    const int x = c - tc.t[t].rs_off;
    if (x >= 0 && x < cra_term_rows(tc.t[t].t)) return (int64_t)(tc.t[t].t.row_offset + x) * D;
  }
  return -1;
}

// RS [BQ, SP] = Q · E_smallᵀ, in chunks of CH table rows staged in sm.e. Ends with a barrier.
template <typename T>
__device__ void small_products(const Args& a, const Plan& p, const TermCache& tc, const T* Tb, Smem<T>& sm) {
  for (int c0 = 0; c0 < p.SP; c0 += p.CH) {
    const int w = min(p.CH, p.SP - c0);
    copy_rows(sm.e, p.ldT, Tb, w, a.D, a.vec, [&](int r) { return small_row_offset(tc, a.n_small, c0 + r, a.D); });
    __syncthreads();
    block_mm<T, false, true>(p.BQ, w, a.D, sm.q, p.ldT, sm.e, p.ldT, sm.rs + c0, p.ldR, false);
    __syncthreads();
  }
}

// Stages key tile [j0, j0 + mk): K, V rows, key coordinates, key exclusion flags (1 = padded or
// beyond Lk), and the index band's table rows. No barrier.
template <typename T>
__device__ void load_key_tile(const Args& a, const Plan& p, const T* K, const T* V, const T* Tb,
                              const int32_t* cb, const unsigned char* kpm, int a0, int j0, int mk, Smem<T>& sm,
                              bool load_v) {
  const int D = a.D;
  copy_rows(sm.k, p.ldT, K, p.BK, D, a.vec, [&](int r) { return r < mk ? (int64_t)(j0 + r) * D : (int64_t)-1; });
  if (load_v)
    copy_rows(sm.v, p.ldT, V, p.BK, D, a.vec, [&](int r) { return r < mk ? (int64_t)(j0 + r) * D : (int64_t)-1; });
  for (int idx = threadIdx.x; idx < a.C * p.BK; idx += kThreads) {
    const int ch = idx / p.BK, j = idx - ch * p.BK;
    sm.kc[idx] = j < mk ? cb[(int64_t)ch * a.Lk + j0 + j] : -1;
  }
  for (int j = threadIdx.x; j < p.BK; j += kThreads)
    sm.km[j] = (j >= mk || (kpm != nullptr && kpm[j0 + j])) ? 1 : 0;
  if (a.has_band) {
    const int dn_lo = a0 - j0 - (p.BK - 1);
    const CraTerm bt = a.band;
    copy_rows(sm.e, p.ldT, Tb, p.BANDP, D, a.vec, [&](int c) {
      return (int64_t)(bt.row_offset + cra_clamp(dn_lo + c - bt.hi_min, 0, bt.n_hi - 1)) * D;
    });
  }
}

// Whether key j of the tile is visible to query row i (not padding, not past Lk, causal).
template <typename T>
__device__ __forceinline__ bool pair_visible(const Args& a, const Smem<T>& sm, int i, int j, int a0, int j0,
                                             int mq) {
  return i < mq && !sm.km[j] && !(a.causal && j0 + j > a0 + i);
}

// Scaled logit of pair (i, j) of the tile, -inf where the key is excluded (SPEC §2):
// scale · (q·k + alpha · (index band + every small term present for the pair)).
template <typename T>
__device__ __forceinline__ float tile_logit(const Args& a, const Plan& p, const TermCache& tc, const Smem<T>& sm,
                                            int i, int j, int a0, int j0, int mq) {
  const int ai = a0 + i, jj = j0 + j;
  if (!pair_visible(a, sm, i, j, a0, j0, mq)) return -INFINITY;
  float rel = 0.f;
  if (a.has_band) rel += sm.qe[(size_t)i * p.ldB + (i - j + p.BK - 1)];
  for (int t = 0; t < a.n_small; ++t) {
    const CraTerm& term = tc.t[t].t;
    const int hq = term.ch_hi >= 0 ? sm.qc[term.ch_hi * p.BQ + i] : 0;
    const int hk = term.ch_hi >= 0 ? sm.kc[term.ch_hi * p.BK + j] : 0;
    const int lq = term.ch_lo >= 0 ? sm.qc[term.ch_lo * p.BQ + i] : 0;
    const int lk = term.ch_lo >= 0 ? sm.kc[term.ch_lo * p.BK + j] : 0;
    const int r = cra_term_row(term, ai - jj, hq, lq, hk, lk);
    if (r >= 0) rel += sm.rs[(size_t)i * p.ldR + tc.t[t].rs_off + (r - term.row_offset)];
  }
  return a.scale * (sm.s[(size_t)i * p.ldS + j] + a.alpha * rel);
}

// Reductions over the TPR consecutive lanes that share a query row.
__device__ __forceinline__ float group_max(float x, int tpr) {
  for (int o = tpr >> 1; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(kFull, x, o));
  return x;
}
__device__ __forceinline__ float group_sum(float x, int tpr) {
  for (int o = tpr >> 1; o > 0; o >>= 1) x += __shfl_xor_sync(kFull, x, o);
  return x;
}

// Key tiles a query tile reads: [0, kt_end).
__device__ __forceinline__ int key_tiles(const Args& a, const Plan& p, int a0, int mq) {
  return a.causal ? min(p.nkt, (a0 + mq - 1) / p.BK + 1) : p.nkt;
}

// ------------------------------------------------------------------ forward

// grid (nqt, B·H, splits). out [B, H, Lq, D]; lse [B, H, Lq]; with splits > 1 the partial
// (O unnormalised, max, sum) go to the workspace instead and combine_kernel finishes.
template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks) fwd_kernel(const Args a, const Plan p, T* __restrict__ out,
                                                       float* __restrict__ lse, float* __restrict__ ws) {
  FA_DYNAMIC_SMEM(unsigned char, smem_raw);
  Smem<T> sm(smem_raw, p);
  TermCache& tc = *reinterpret_cast<TermCache*>(smem_raw + p.terms);
  const int qt = blockIdx.x, bh = blockIdx.y, split = blockIdx.z;
  const int b = bh / a.H, h = bh - b * a.H, D = a.D, tid = threadIdx.x;
  const int i0 = qt * p.BQ, mq = min(p.BQ, a.Lq - i0), a0 = i0 + a.Lk - a.Lq;
  const T* Q = static_cast<const T*>(a.q) + ((int64_t)bh * a.Lq + i0) * D;
  const T* K = static_cast<const T*>(a.k) + b * a.k_sb + h * a.k_sh;
  const T* V = static_cast<const T*>(a.v) + b * a.v_sb + h * a.v_sh;
  const T* Tb = static_cast<const T*>(a.table) + (a.Ht == 1 ? 0 : (int64_t)h * a.N * D);
  const int32_t* cb = a.coords + (int64_t)b * a.C * a.Lk;
  const unsigned char* kpm = a.kpm ? a.kpm + (int64_t)b * a.Lk : nullptr;
  const int tpr = kThreads / p.BQ, row = tid / tpr, sub = tid - row * tpr;

  cache_terms(tc, a);
  copy_rows(sm.q, p.ldT, Q, p.BQ, D, a.vec, [&](int r) { return r < mq ? (int64_t)r * D : (int64_t)-1; });
  for (int idx = tid; idx < a.C * p.BQ; idx += kThreads) {
    const int ch = idx / p.BQ, i = idx - ch * p.BQ;
    sm.qc[idx] = i < mq ? cb[(int64_t)ch * a.Lk + a0 + i] : -1;
  }
  for (int d = sub; d < D; d += tpr) sm.o[(size_t)row * p.ldD + d] = 0.f;
  __syncthreads();
  if (a.n_small > 0) small_products(a, p, tc, Tb, sm);

  const int kt_end = key_tiles(a, p, a0, mq);
  const int kt0 = split * p.tiles_per_split, kt1 = min(kt0 + p.tiles_per_split, kt_end);
  float m_i = -INFINITY, l_i = 0.f;  // identical in the tpr lanes of a row
  bool seen = false;                 // this lane saw a visible key (whatever its logit)
  const uint32_t rh = a.dropout ? cra_dropout_row(a.seed, (uint32_t)bh, (uint32_t)(i0 + row)) : 0u;
  for (int kt = kt0; kt < kt1; ++kt) {
    const int j0 = kt * p.BK, mk = min(p.BK, a.Lk - j0);
    load_key_tile(a, p, K, V, Tb, cb, kpm, a0, j0, mk, sm, true);
    __syncthreads();
    block_mm<T, false, true>(p.BQ, p.BK, D, sm.q, p.ldT, sm.k, p.ldT, sm.s, p.ldS, false);
    if (a.has_band) block_mm<T, false, true>(p.BQ, p.BANDP, D, sm.q, p.ldT, sm.e, p.ldT, sm.qe, p.ldB, false);
    __syncthreads();
    // Online softmax over this tile for row `row` (columns sub, sub + tpr, ...).
    float* srow = sm.s + (size_t)row * p.ldS;
    float mx = -INFINITY;
    for (int j = sub; j < p.BK; j += tpr) {
      const float s = tile_logit(a, p, tc, sm, row, j, a0, j0, mq);
      srow[j] = s;
      mx = fmaxf(mx, s);
      seen = seen || pair_visible(a, sm, row, j, a0, j0, mq);
    }
    mx = group_max(mx, tpr);
    const float m_new = fmaxf(m_i, mx);
    const float m_safe = m_new == -INFINITY ? 0.f : m_new;
    const float corr = exp_nat(m_i - m_safe);
    float sum = 0.f;
    T* prow = sm.pt + (size_t)row * p.ldPT;
    for (int j = sub; j < p.BK; j += tpr) {
      float e = exp_nat(srow[j] - m_safe);
      sum += e;  // the normaliser uses undropped probabilities
      if (a.dropout) e = cra_dropout_keep(rh, (uint32_t)(j0 + j), a.threshold) ? e * a.keep_scale : 0.f;
      prow[j] = fa_from_float<T>(e);
    }
    sum = group_sum(sum, tpr);
    l_i = l_i * corr + sum;
    m_i = m_new;
    for (int d = sub; d < D; d += tpr) sm.o[(size_t)row * p.ldD + d] *= corr;
    __syncthreads();
    block_mm<T, false, false>(p.BQ, D, p.BK, sm.pt, p.ldPT, sm.v, p.ldT, sm.o, p.ldD, true);
    __syncthreads();
  }
  // A row without visible keys gives zeros and lse -inf. A row with visible keys gives O / l even
  // when l is 0 (every visible logit -inf) or NaN: NaN, as the reference's softmax gives, never
  // zeros that would hide a divergence (lse NaN then too, so the backward gives NaN).
  const bool empty = group_max(seen ? 1.f : 0.f, tpr) == 0.f;
  if (row >= mq) return;
  const int64_t r_out = (int64_t)bh * a.Lq + i0 + row;
  if (p.splits > 1) {
    const int64_t r_ws = (int64_t)split * a.B * a.H * a.Lq + r_out;
    for (int d = sub; d < D; d += tpr) ws[p.ws_o + r_ws * D + d] = sm.o[(size_t)row * p.ldD + d];
    if (sub == 0) {
      ws[p.ws_m + r_ws] = m_i;
      ws[p.ws_l + r_ws] = !empty && l_i == 0.f ? NAN : l_i;  // NaN: combine_kernel's sign of a bad split
    }
    return;
  }
  for (int d = sub; d < D; d += tpr)
    out[r_out * D + d] = fa_from_float<T>(empty ? 0.f : sm.o[(size_t)row * p.ldD + d] / l_i);
  if (sub == 0) lse[r_out] = empty ? -INFINITY : (l_i == 0.f ? NAN : m_i + logf(l_i));
}

// Split-K combine: per output element, rescale each split's partial by exp(m_s - m) in split
// order. Elementwise over [B·H·Lq, D] (grid-stride).
template <typename T>
__global__ void __launch_bounds__(kThreads) combine_kernel(const Args a, const Plan p, const float* __restrict__ ws,
                                                           T* __restrict__ out, float* __restrict__ lse) {
  const int64_t rows = (int64_t)a.B * a.H * a.Lq, total = rows * a.D;
  for (int64_t idx = (int64_t)blockIdx.x * kThreads + threadIdx.x; idx < total; idx += (int64_t)gridDim.x * kThreads) {
    const int64_t r = idx / a.D;
    const int d = (int)(idx - r * a.D);
    float m = -INFINITY;
    bool bad = false;  // a NaN partial (NaN logits, or visible keys whose logits are all -inf)
    for (int s = 0; s < p.splits; ++s) {
      m = fmaxf(m, ws[p.ws_m + s * rows + r]);
      bad = bad || isnan(ws[p.ws_l + s * rows + r]);
    }
    if (bad) {
      out[idx] = fa_from_float<T>(NAN);
      if (d == 0) lse[r] = NAN;
      continue;
    }
    if (m == -INFINITY) {
      out[idx] = fa_from_float<T>(0.f);
      if (d == 0) lse[r] = -INFINITY;
      continue;
    }
    float l = 0.f, o = 0.f;
    for (int s = 0; s < p.splits; ++s) {
      const float w = exp_nat(ws[p.ws_m + s * rows + r] - m);
      l += ws[p.ws_l + s * rows + r] * w;
      o += ws[p.ws_o + (s * rows + r) * a.D + d] * w;
    }
    out[idx] = fa_from_float<T>(o / l);
    if (d == 0) lse[r] = m + logf(l);
  }
}

// ------------------------------------------------------------------ backward

// grid (G, B·H). Block (g, bh) handles query tiles g, g + G, ... of (b, h): writes dq rows and
// accumulates into its workspace regions: dK, dV [nkt·BK, D], index-band gradient by Δn
// [NDN, D] (row Δn - DN0) and small-table gradient [SP, D]. Workspace zeroed beforehand.
template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks) bwd_kernel(const Args a, const Plan p, const T* __restrict__ dout,
                                                       const T* __restrict__ out, const float* __restrict__ lse,
                                                       T* __restrict__ dq, float* __restrict__ ws) {
  FA_DYNAMIC_SMEM(unsigned char, smem_raw);
  Smem<T> sm(smem_raw, p);
  TermCache& tc = *reinterpret_cast<TermCache*>(smem_raw + p.terms);
  const int g = blockIdx.x, bh = blockIdx.y, BH = a.B * a.H;
  const int b = bh / a.H, h = bh - b * a.H, D = a.D, tid = threadIdx.x;
  const T* K = static_cast<const T*>(a.k) + b * a.k_sb + h * a.k_sh;
  const T* V = static_cast<const T*>(a.v) + b * a.v_sb + h * a.v_sh;
  const T* Tb = static_cast<const T*>(a.table) + (a.Ht == 1 ? 0 : (int64_t)h * a.N * D);
  const int32_t* cb = a.coords + (int64_t)b * a.C * a.Lk;
  const unsigned char* kpm = a.kpm ? a.kpm + (int64_t)b * a.Lk : nullptr;
  const int64_t region = (int64_t)g * BH + bh;
  float* wdk = ws + p.ws_dk + region * p.nkt * p.BK * D;
  float* wdv = ws + p.ws_dv + region * p.nkt * p.BK * D;
  float* wddn = ws + p.ws_ddn + region * p.NDN * D;
  float* wds = ws + p.ws_dsmall + region * p.SP * D;
  const int tpr = kThreads / p.BQ, row = tid / tpr, sub = tid - row * tpr;
  T* dqe_t = reinterpret_cast<T*>(sm.qe);  // T copy of dQE, written once QE has been read
  cache_terms(tc, a);

  for (int qt = g; qt < p.nqt; qt += p.G) {
    const int i0 = qt * p.BQ, mq = min(p.BQ, a.Lq - i0), a0 = i0 + a.Lk - a.Lq;
    const int64_t r0 = (int64_t)bh * a.Lq + i0;
    copy_rows(sm.q, p.ldT, static_cast<const T*>(a.q) + r0 * D, p.BQ, D, a.vec,
              [&](int r) { return r < mq ? (int64_t)r * D : (int64_t)-1; });
    copy_rows(sm.dout, p.ldT, dout + r0 * D, p.BQ, D, a.vec,
              [&](int r) { return r < mq ? (int64_t)r * D : (int64_t)-1; });
    for (int idx = tid; idx < a.C * p.BQ; idx += kThreads) {
      const int ch = idx / p.BQ, i = idx - ch * p.BQ;
      sm.qc[idx] = i < mq ? cb[(int64_t)ch * a.Lk + a0 + i] : -1;
    }
    // Row state: lse and delta = rowsum(dO ⊙ O) (fp32), identical in the tpr lanes of a row.
    float delta = 0.f;
    for (int d = sub; d < D; d += tpr) {
      if (row < mq) delta += fa_to_float(dout[(r0 + row) * D + d]) * fa_to_float(out[(r0 + row) * D + d]);
      sm.o[(size_t)row * p.ldD + d] = 0.f;  // dQ accumulator
    }
    delta = group_sum(delta, tpr);
    const float lse_i = row < mq ? lse[r0 + row] : -INFINITY;
    for (int c = sub; c < p.SP; c += tpr) sm.drs[(size_t)row * p.ldR + c] = 0.f;
    const uint32_t rh = a.dropout ? cra_dropout_row(a.seed, (uint32_t)bh, (uint32_t)(i0 + row)) : 0u;
    __syncthreads();
    if (a.n_small > 0) small_products(a, p, tc, Tb, sm);

    const int kt_end = key_tiles(a, p, a0, mq);
    for (int kt = 0; kt < kt_end; ++kt) {
      const int j0 = kt * p.BK, mk = min(p.BK, a.Lk - j0);
      load_key_tile(a, p, K, V, Tb, cb, kpm, a0, j0, mk, sm, true);
      __syncthreads();
      block_mm<T, false, true>(p.BQ, p.BK, D, sm.q, p.ldT, sm.k, p.ldT, sm.s, p.ldS, false);      // S = Q Kᵀ
      block_mm<T, false, true>(p.BQ, p.BK, D, sm.dout, p.ldT, sm.v, p.ldT, sm.dp, p.ldS, false);  // dP = dO Vᵀ
      if (a.has_band) block_mm<T, false, true>(p.BQ, p.BANDP, D, sm.q, p.ldT, sm.e, p.ldT, sm.qe, p.ldB, false);
      __syncthreads();
      for (int j = sub; j < p.BK; j += tpr) {
        const float s = tile_logit(a, p, tc, sm, row, j, a0, j0, mq);
        const float prob = (s == -INFINITY || lse_i == -INFINITY) ? 0.f : exp_nat(s - lse_i);
        float dpv = sm.dp[(size_t)row * p.ldS + j], used = prob;
        if (a.dropout) {  // dP is w.r.t. the dropped probabilities; P·V used the dropped ones
          const bool keep = cra_dropout_keep(rh, (uint32_t)(j0 + j), a.threshold);
          dpv = keep ? dpv * a.keep_scale : 0.f;
          used = keep ? prob * a.keep_scale : 0.f;
        }
        const float ds = a.scale * prob * (dpv - delta);  // d loss / d (q·k + alpha·relative)
        sm.pt[(size_t)row * p.ldPT + j] = fa_from_float<T>(used);
        sm.dst[(size_t)row * p.ldPT + j] = fa_from_float<T>(ds);
        sm.dp[(size_t)row * p.ldS + j] = ds;
      }
      __syncthreads();
      block_mm<T, true, false>(p.BK, D, p.BQ, sm.pt, p.ldPT, sm.dout, p.ldT, wdv + (int64_t)j0 * D, D, true);
      block_mm<T, true, false>(p.BK, D, p.BQ, sm.dst, p.ldPT, sm.q, p.ldT, wdk + (int64_t)j0 * D, D, true);
      block_mm<T, false, false>(p.BQ, D, p.BK, sm.dst, p.ldPT, sm.k, p.ldT, sm.o, p.ldD, true);
      if (a.has_band) {  // dQE[i, c] = alpha · dS[i, j] with c = i - j + BK - 1 (one j per c)
        for (int idx = tid; idx < p.BQ * p.BANDP; idx += kThreads) {
          const int i = idx / p.BANDP, c = idx - i * p.BANDP, j = i - c + p.BK - 1;
          const float x = (j >= 0 && j < p.BK) ? a.alpha * sm.dp[(size_t)i * p.ldS + j] : 0.f;
          dqe_t[(size_t)i * p.ldBT + c] = fa_from_float<T>(x);
        }
      }
      // dRS[i, col(i, j)] += alpha · dS[i, j]: one thread per (row, term), keys in order.
      for (int w = tid; w < p.BQ * a.n_small; w += kThreads) {
        const int t = w / p.BQ, i = w - t * p.BQ;
        if (i >= mq) continue;
        const CraTerm& term = tc.t[t].t;
        const int nv = a.causal ? min(mk, a0 + i - j0 + 1) : mk;
        const int hq = term.ch_hi >= 0 ? sm.qc[term.ch_hi * p.BQ + i] : 0;
        const int lq = term.ch_lo >= 0 ? sm.qc[term.ch_lo * p.BQ + i] : 0;
        float* drow = sm.drs + (size_t)i * p.ldR + tc.t[t].rs_off - term.row_offset;
        const float* dsrow = sm.dp + (size_t)i * p.ldS;
        for (int j = 0; j < nv; ++j) {
          const int hk = term.ch_hi >= 0 ? sm.kc[term.ch_hi * p.BK + j] : 0;
          const int lk = term.ch_lo >= 0 ? sm.kc[term.ch_lo * p.BK + j] : 0;
          const int r = cra_term_row(term, a0 + i - j0 - j, hq, lq, hk, lk);
          if (r >= 0) drow[r] += a.alpha * dsrow[j];
        }
      }
      __syncthreads();
      if (a.has_band) {
        const int dn_lo = a0 - j0 - (p.BK - 1);
        block_mm<T, false, false>(p.BQ, D, p.BANDP, dqe_t, p.ldBT, sm.e, p.ldT, sm.o, p.ldD, true);
        block_mm<T, true, false>(p.BANDP, D, p.BQ, dqe_t, p.ldBT, sm.q, p.ldT, wddn + (int64_t)(dn_lo - p.DN0) * D,
                                 D, true);
        __syncthreads();
      }
    }
    // Small terms: dQ += dRS · E_small and dE_small += dRSᵀ · Q, in chunks of CH columns
    // (a T copy of the chunk in the score buffer, the table rows in the staging buffer).
    T* ct = reinterpret_cast<T*>(sm.s);
    for (int c0 = 0; c0 < p.SP && a.n_small > 0; c0 += p.CH) {
      const int w = min(p.CH, p.SP - c0);
      for (int idx = tid; idx < p.BQ * w; idx += kThreads) {
        const int i = idx / w, c = idx - i * w;
        ct[(size_t)i * p.ldCT + c] = fa_from_float<T>(sm.drs[(size_t)i * p.ldR + c0 + c]);
      }
      copy_rows(sm.e, p.ldT, Tb, w, D, a.vec, [&](int r) { return small_row_offset(tc, a.n_small, c0 + r, D); });
      __syncthreads();
      block_mm<T, false, false>(p.BQ, D, w, ct, p.ldCT, sm.e, p.ldT, sm.o, p.ldD, true);
      block_mm<T, true, false>(w, D, p.BQ, ct, p.ldCT, sm.q, p.ldT, wds + (int64_t)c0 * D, D, true);
      __syncthreads();
    }
    if (row < mq)
      for (int d = sub; d < D; d += tpr) dq[(r0 + row) * D + d] = fa_from_float<T>(sm.o[(size_t)row * p.ldD + d]);
    __syncthreads();
  }
}

// dk, dv [B, H, Lk, D] = sum over groups of the workspace regions (group order), cast.
template <typename T>
__global__ void __launch_bounds__(kThreads) kv_reduce_kernel(const Args a, const Plan p, const float* __restrict__ ws,
                                                             T* __restrict__ dk, T* __restrict__ dv) {
  const int64_t BH = (int64_t)a.B * a.H, kv = (int64_t)p.nkt * p.BK * a.D;
  const int64_t per = (int64_t)a.Lk * a.D, total = BH * per;
  for (int64_t idx = (int64_t)blockIdx.x * kThreads + threadIdx.x; idx < total; idx += (int64_t)gridDim.x * kThreads) {
    const int64_t bh = idx / per, e = idx - bh * per;
    float sk = 0.f, sv = 0.f;
    for (int g = 0; g < p.G; ++g) {
      sk += ws[p.ws_dk + (g * BH + bh) * kv + e];
      sv += ws[p.ws_dv + (g * BH + bh) * kv + e];
    }
    dk[idx] = fa_from_float<T>(sk);
    dv[idx] = fa_from_float<T>(sv);
  }
}

// Index-band gradient: region (g=0, bh=ht) [NDN, D] := sum over groups, batches and the heads
// of table head ht (all heads when the table is shared), in that order. In place: each thread
// reads and writes only its own (Δn, d) column of every region.
__global__ void __launch_bounds__(kThreads) ddn_reduce_kernel(const Args a, const Plan p, float* __restrict__ ws) {
  const int64_t BH = (int64_t)a.B * a.H, per = (int64_t)p.NDN * a.D, total = a.Ht * per;
  for (int64_t idx = (int64_t)blockIdx.x * kThreads + threadIdx.x; idx < total; idx += (int64_t)gridDim.x * kThreads) {
    const int ht = (int)(idx / per);
    const int64_t e = idx - ht * per;
    float s = 0.f;
    for (int g = 0; g < p.G; ++g)
      for (int b = 0; b < a.B; ++b)
        for (int h = (a.Ht == 1 ? 0 : ht); h < (a.Ht == 1 ? a.H : ht + 1); ++h)
          s += ws[p.ws_ddn + ((int64_t)g * BH + b * a.H + h) * per + e];
    ws[p.ws_ddn + (int64_t)ht * per + e] = s;  // region (0, ht): read above only by this thread
  }
}

// dtable [Ht, N, D]: index rows fold the reduced Δn gradient (clamped ends take every Δn beyond
// them, ascending); small-term rows sum their regions over (group, batch, head); other rows 0.
template <typename T>
__global__ void __launch_bounds__(kThreads) table_reduce_kernel(const Args a, const Plan p, const float* __restrict__ ws,
                                                                T* __restrict__ dtable) {
  const int64_t BH = (int64_t)a.B * a.H, per = (int64_t)a.N * a.D, total = a.Ht * per;
  for (int64_t idx = (int64_t)blockIdx.x * kThreads + threadIdx.x; idx < total; idx += (int64_t)gridDim.x * kThreads) {
    const int ht = (int)(idx / per);
    const int64_t e = idx - ht * per;
    const int r = (int)(e / a.D), d = (int)(e - (int64_t)r * a.D);
    float s = 0.f;
    if (a.has_band && r >= a.band.row_offset && r < a.band.row_offset + a.band.n_hi) {
      const int x = r - a.band.row_offset, n = a.band.n_hi;
      // Δn with clamp(Δn - hi_min, 0, n - 1) == x, intersected with the scratch range.
      int lo = x + a.band.hi_min, hi = x + a.band.hi_min;
      if (x == 0) lo = p.DN0;
      if (x == n - 1) hi = p.DN0 + p.NDN - 1;
      lo = max(lo, p.DN0);
      hi = min(hi, p.DN0 + p.NDN - 1);
      const float* src = ws + p.ws_ddn + (int64_t)ht * p.NDN * a.D;
      for (int dn = lo; dn <= hi; ++dn) s += src[(int64_t)(dn - p.DN0) * a.D + d];
    } else {
      for (int t = 0; t < a.n_small; ++t) {
        const SmallTerm& st = a.small[t];
        const int x = r - st.t.row_offset;
        if (x < 0 || x >= cra_term_rows(st.t)) continue;
        for (int g = 0; g < p.G; ++g)
          for (int b = 0; b < a.B; ++b)
            for (int h = (a.Ht == 1 ? 0 : ht); h < (a.Ht == 1 ? a.H : ht + 1); ++h)
              s += ws[p.ws_dsmall + (((int64_t)g * BH + b * a.H + h) * p.SP + st.rs_off + x) * a.D + d];
      }
    }
    dtable[idx] = fa_from_float<T>(s);
  }
}

inline unsigned grid_for(int64_t total) {
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  return (unsigned)(blocks < 1 ? 1 : (blocks > 4096 ? 4096 : blocks));
}

template <typename T>
const char* forward_t(const Args& a, const Plan& p, T* out, float* lse, float* ws, fa_stream_t stream) {
  if (p.smem > 48 * 1024) FA_SET_MAX_DYNAMIC_SMEM((fwd_kernel<T>), p.smem);
  const dim3 grid(p.nqt, a.B * a.H, p.splits);
  FA_LAUNCH((fwd_kernel<T>), grid, dim3(kThreads), p.smem, stream, a, p, out, lse, ws);
  if (p.splits > 1) {
    const int64_t total = (int64_t)a.B * a.H * a.Lq * a.D;
    FA_LAUNCH((combine_kernel<T>), dim3(grid_for(total)), dim3(kThreads), 0, stream, a, p, (const float*)ws, out, lse);
  }
  return fa_last_error();
}

template <typename T>
const char* backward_t(const Args& a, const Plan& p, const T* dout, const T* out, const float* lse, T* dq, T* dk,
                       T* dv, T* dtable, float* ws, fa_stream_t stream) {
  cudaMemsetAsync(ws, 0, p.ws_floats * sizeof(float), stream);
  if (p.smem > 48 * 1024) FA_SET_MAX_DYNAMIC_SMEM((bwd_kernel<T>), p.smem);
  FA_LAUNCH((bwd_kernel<T>), dim3(p.G, a.B * a.H), dim3(kThreads), p.smem, stream, a, p, dout, out, lse, dq, ws);
  const int64_t kv_total = (int64_t)a.B * a.H * a.Lk * a.D;
  FA_LAUNCH((kv_reduce_kernel<T>), dim3(grid_for(kv_total)), dim3(kThreads), 0, stream, a, p, (const float*)ws, dk, dv);
  if (a.has_band)
    FA_LAUNCH(ddn_reduce_kernel, dim3(grid_for((int64_t)a.Ht * p.NDN * a.D)), dim3(kThreads), 0, stream, a, p, ws);
  FA_LAUNCH((table_reduce_kernel<T>), dim3(grid_for((int64_t)a.Ht * a.N * a.D)), dim3(kThreads), 0, stream, a, p,
            (const float*)ws, dtable);
  return fa_last_error();
}

}  // namespace

const char* forward(const Args& a, const Plan& p, Dtype dt, void* out, float* lse, float* ws, void* stream) {
  const fa_stream_t s = static_cast<fa_stream_t>(stream);
  switch (dt) {
    case F32: return forward_t<float>(a, p, static_cast<float*>(out), lse, ws, s);
    case F16: return forward_t<__half>(a, p, static_cast<__half*>(out), lse, ws, s);
    case BF16: return forward_t<__nv_bfloat16>(a, p, static_cast<__nv_bfloat16*>(out), lse, ws, s);
  }
  return "circular_relative_attention (cuda): unsupported dtype";
}

const char* backward(const Args& a, const Plan& p, Dtype dt, const void* dout, const void* out, const float* lse,
                     void* dq, void* dk, void* dv, void* dtable, float* ws, void* stream) {
  const fa_stream_t s = static_cast<fa_stream_t>(stream);
  switch (dt) {
    case F32:
      return backward_t<float>(a, p, static_cast<const float*>(dout), static_cast<const float*>(out), lse,
                               static_cast<float*>(dq), static_cast<float*>(dk), static_cast<float*>(dv),
                               static_cast<float*>(dtable), ws, s);
    case F16:
      return backward_t<__half>(a, p, static_cast<const __half*>(dout), static_cast<const __half*>(out), lse,
                                static_cast<__half*>(dq), static_cast<__half*>(dk), static_cast<__half*>(dv),
                                static_cast<__half*>(dtable), ws, s);
    case BF16:
      return backward_t<__nv_bfloat16>(
          a, p, static_cast<const __nv_bfloat16*>(dout), static_cast<const __nv_bfloat16*>(out), lse,
          static_cast<__nv_bfloat16*>(dq), static_cast<__nv_bfloat16*>(dk), static_cast<__nv_bfloat16*>(dv),
          static_cast<__nv_bfloat16*>(dtable), ws, s);
  }
  return "circular_relative_attention (cuda): unsupported dtype";
}

}  // namespace cra_cuda
}  // namespace fastattn
