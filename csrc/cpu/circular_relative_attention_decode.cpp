// Circular relative attention for decoding on the CPU: a few queries (the new tokens) against a
// KV cache, forward only.
//
// The training kernel's layout suits many queries; here each query meets every key once, so:
//  - the table arrives transposed ([Ht, D, N], cached by the caller while the tables are
//    unchanged), and q·E for the rows this step can read is one GEMM over all B·H·Lq queries
//    that share a table (the index term needs a contiguous run of rows, the time/pitch terms
//    their whole small tables);
//  - per (batch, head) the keys are split into chunks when B·H alone cannot occupy the threads;
//    each chunk computes q·k (dot products), adds the gathered relative scores, and keeps an
//    unnormalised partial softmax, merged in chunk order afterwards;
//  - coordinates and the key padding mask may be strided views (the cache's buffers with their
//    capacity), so nothing is copied per step.
// Semantics (masking, -inf/NaN, empty rows) are those of the training kernel.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "cra_cpu.h"
#include "cra_problem.h"
#include "cra_profile.h"
#include "microgemm.h"
#include "parallel_chunks.h"

namespace fastattn::cpu {
namespace {

// s[j] = c · q·k_j for n keys (rows of K, D apart).
template <typename T>
void dots(const T* q, const T* K, int n, int D, T c, T* s) {
  for (int j = 0; j < n; ++j) {
    T acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int d = 0; d < D; ++d) acc += q[d] * K[(int64_t)j * D + d];
    s[j] = c * acc;
  }
}

#if defined(__AVX512F__)
// 16 keys at a time: one vector of partial sums per key, reduced by a transpose-and-add tree
// (about 3 instructions per key instead of a horizontal sum per key). K is prefetched PF bytes
// ahead: the hardware prefetcher alone left this loop waiting on loads (a cache-cold decoding
// step spent ~10% longer here).
template <>
void dots<float>(const float* q, const float* K, int n, int D, float c, float* s) {
  if (D % 16 != 0) {
    for (int j = 0; j < n; ++j) {
      float acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int d = 0; d < D; ++d) acc += q[d] * K[(int64_t)j * D + d];
      s[j] = c * acc;
    }
    return;
  }
  const __m512i order = _mm512_setr_epi32(0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15);
  const __m512 cv = _mm512_set1_ps(c);
  int j = 0;
  constexpr int PF = 1024;
  for (; j + 16 <= n; j += 16) {
    const char* pf = reinterpret_cast<const char*>(K + (int64_t)j * D) + PF;
    for (int o = 0; o < 16 * D * (int)sizeof(float); o += 64) _mm_prefetch(pf + o, _MM_HINT_T0);
    __m512 v[16];
    for (int k = 0; k < 16; ++k) {
      const float* kr = K + (int64_t)(j + k) * D;
      __m512 a = _mm512_mul_ps(_mm512_loadu_ps(q), _mm512_loadu_ps(kr));
      for (int d = 16; d < D; d += 16) a = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), _mm512_loadu_ps(kr + d), a);
      v[k] = a;
    }
    __m512 x[8], y[4], z[2];
    for (int i = 0; i < 8; ++i)  // quarters (q0+q2, q1+q3) of keys i and i+8
      x[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[i], v[i + 8], 0x44), _mm512_shuffle_f32x4(v[i], v[i + 8], 0xEE));
    for (int i = 0; i < 4; ++i)  // one quarter per key: keys i, i+8, i+4, i+12
      y[i] = _mm512_add_ps(_mm512_shuffle_f32x4(x[i], x[i + 4], 0x88), _mm512_shuffle_f32x4(x[i], x[i + 4], 0xDD));
    for (int i = 0; i < 2; ++i)
      z[i] = _mm512_add_ps(_mm512_shuffle_ps(y[i], y[i + 2], 0x44), _mm512_shuffle_ps(y[i], y[i + 2], 0xEE));
    const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(z[0], z[1], 0x88), _mm512_shuffle_ps(z[0], z[1], 0xDD));
    _mm512_storeu_ps(s + j, _mm512_mul_ps(cv, _mm512_permutexvar_ps(order, r)));
  }
  for (; j < n; ++j) {
    float acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int d = 0; d < D; ++d) acc += q[d] * K[(int64_t)j * D + d];
    s[j] = c * acc;
  }
}
#endif

// acc[d] += Σ_j p[j] · V[j][d] for n keys: four independent partial sums over the keys, since
// one accumulator would serialise the keys on the FMA latency.
template <typename T, int W>
void weighted_sum_w(const T* p, const T* V, int n, int D, T* acc) {
  for (int d0 = 0; d0 < D; d0 += W) {
    const int w = std::min(W, D - d0);
    T a[4][W] = {};
    int j = 0;
    if (w == W) {
      for (; j + 4 <= n; j += 4)
        for (int u = 0; u < 4; ++u) {
          const T pj = p[j + u];
          const T* v = V + (int64_t)(j + u) * D + d0;
#pragma omp simd
          for (int d = 0; d < W; ++d) a[u][d] += pj * v[d];
        }
    }
    for (; j < n; ++j) {
      const T* v = V + (int64_t)j * D + d0;
      for (int d = 0; d < w; ++d) a[0][d] += p[j] * v[d];
    }
    for (int d = 0; d < w; ++d) acc[d0 + d] += (a[0][d] + a[1][d]) + (a[2][d] + a[3][d]);
  }
}

template <typename T>
void weighted_sum(const T* p, const T* V, int n, int D, T* acc) {
  constexpr int W = 64 / sizeof(T);  // one 64-byte vector
  if (D % (2 * W) == 0) weighted_sum_w<T, 2 * W>(p, V, n, D, acc);
  else weighted_sum_w<T, W>(p, V, n, D, acc);
}

// Where each term's q·E products sit in a query's row of RS: small terms as in TermSplit
// (columns [0, ns), zero column ns), then each index term's rows [lo, hi] from column `col`.
struct IndexCols {
  CraTerm t;
  int lo, hi, col;
};

struct Layout {
  TermSplit split;
  std::vector<IndexCols> index;
  int width;  // RS row length
};

Layout layout_of(const CraProblem& p) {
  Layout L{split_terms(p.terms), {}, 0};
  int col = L.split.nsp;
  const int a_lo = p.Lk - p.Lq, a_hi = p.Lk - 1;
  for (int i = 0; i < p.terms.n; ++i) {
    const CraTerm& t = p.terms.t[i];
    if (t.kind != CRA_KIND_INDEX) continue;
    const int dn_lo = p.causal ? 0 : a_lo - (p.Lk - 1);
    const int lo = cra_clamp(dn_lo - t.hi_min, 0, t.n_hi - 1), hi = cra_clamp(a_hi - t.hi_min, 0, t.n_hi - 1);
    L.index.push_back({t, lo, hi, col});
    col += hi - lo + 1;
  }
  L.width = round_up(col, 16);
  return L;
}

// Partial softmax of one (query, key chunk): unnormalised acc[D], max m (base 2), sum l.
template <typename T>
struct Part {
  T m, l;
  bool seen;
};

struct Coords {
  const int32_t* base;
  int64_t sb, sc;  // strides over batch and channel
  const bool* kpm;
  int64_t kpm_sb;
};

template <typename T>
void decode_chunk(const CraProblem& p, const Layout& L, const Coords& co, const T* q, const T* K, const T* V,
                  const T* rs, int b, int i, int k0, int k1, T c2, std::vector<T>& s, std::vector<int>& cols,
                  Part<T>& part, T* acc, prof::Timer& tm) {
  const int D = p.D, a = p.Lk - p.Lq + i;
  const int kend = p.causal ? std::min(k1, a + 1) : k1;
  const int n = kend - k0;
  part = {-std::numeric_limits<T>::infinity(), T(0), false};
  std::fill(acc, acc + D, T(0));
  if (n <= 0) return;
  s.resize(n);
  cols.resize(n);
  T* sv = s.data();
  dots<T>(q, K + (int64_t)k0 * D, n, D, c2, sv);
  tm.mark(prof::QK);
  for (const IndexCols& x : L.index) {  // key j reads row clamp(a - hmin - j): a reversed run
    const int base = a - x.t.hi_min - k0, last = x.t.n_hi - 1;  // local key jj: row base - jj
    const T* r = rs + x.col - x.lo;                               // r[row] (rows lo..hi computed)
    const int jl = std::clamp(base - last, 0, n), jh = std::clamp(base + 1, 0, n);
    for (int j = 0; j < jl; ++j) sv[j] += r[last];
    const T* src = r + base;
#pragma omp simd
    for (int j = jl; j < jh; ++j) sv[j] += src[-j];
    for (int j = jh; j < n; ++j) sv[j] += r[0];
  }
  tm.mark(prof::QE);
  const int32_t* cb = co.base + (int64_t)b * co.sb;
  for (const SmallTerm& st : L.split.small) {
    const int32_t* hi = cb + (int64_t)st.t.ch_hi * co.sc;
    const int32_t* lo = st.t.ch_lo >= 0 ? cb + (int64_t)st.t.ch_lo * co.sc : hi;
    if (small_cols(st, hi[a], lo[a], hi + k0, lo + k0, n, L.split.ns, cols.data())) gather_add(cols.data(), rs, n, sv);
  }
  tm.mark(prof::GATHER);
  int nvis = n;
  if (co.kpm != nullptr) {
    const bool* m = co.kpm + (int64_t)b * co.kpm_sb + k0;
    nvis = 0;
    for (int j = 0; j < n; ++j) {
      nvis += m[j] ? 0 : 1;
      if (m[j]) sv[j] = -std::numeric_limits<T>::infinity();
    }
  }
  if (nvis == 0) return;
  part.seen = true;
  T mx = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : mx)
  for (int j = 0; j < n; ++j) mx = std::max(mx, sv[j]);
  if (mx == -std::numeric_limits<T>::infinity()) {  // all -inf, or NaN skipped by the max
    for (int j = 0; j < n; ++j)
      if (sv[j] != sv[j]) part.m = sv[j];
    return;
  }
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int j = 0; j < n; ++j) {
    sv[j] = exp2_approx(sv[j] - mx);
    sum += sv[j];
  }
  part.m = mx;
  part.l = sum;
  tm.mark(prof::SOFTMAX);
  weighted_sum<T>(sv, V + (int64_t)k0 * D, n, D, acc);
  tm.mark(prof::PV);
}

at::Tensor cra_decode_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& table_t,
                          const at::Tensor& coords, at::IntArrayRef terms, double alpha, double scale, bool causal,
                          const std::optional<at::Tensor>& kpm) {
  TORCH_CHECK(q.device().is_cpu(), "cpp backend: tensors must be on the CPU");
  TORCH_CHECK(table_t.dim() == 3 && table_t.is_contiguous(), "table_t must be a contiguous [Ht, D, N] tensor");
  TORCH_CHECK(coords.dim() == 3 && coords.scalar_type() == at::kInt && (coords.stride(2) == 1 || coords.size(2) <= 1) &&
                  coords.size(0) == q.size(0) && coords.size(2) == k.size(2) && coords.stride(0) >= 0 &&
                  coords.stride(1) >= coords.size(2) && coords.stride(0) >= coords.size(1) * coords.stride(1),
              "coords must be int32 [B, C, Lk] with dense, non-overlapping rows");
  if (kpm.has_value())
    TORCH_CHECK(kpm->dim() == 2 && kpm->scalar_type() == at::kBool && kpm->size(0) == q.size(0) &&
                    kpm->size(1) == k.size(2) && (kpm->stride(1) == 1 || kpm->size(1) <= 1) && kpm->stride(0) >= kpm->size(1),
                "key_padding_mask must be bool [B, Lk] with dense rows");
  // The other checks are the training op's: it is given contiguous-shaped views of the same
  // memory (never read through) for the arguments whose layout differs here.
  const auto table_view = at::from_blob(table_t.data_ptr(), {table_t.size(0), table_t.size(2), table_t.size(1)},
                                        table_t.options());
  const auto coords_view = at::from_blob(coords.data_ptr(), coords.sizes(), coords.options());
  std::optional<at::Tensor> kpm_view;
  if (kpm.has_value()) kpm_view = at::from_blob(kpm->data_ptr(), kpm->sizes(), kpm->options());
  const CraProblem p = cra_make_problem(q, k, v, table_view, coords_view, terms, alpha, scale, causal, kpm_view, 0.0, 0,
                                        &coords);
  const Layout L = layout_of(p);
  auto out = at::empty_like(q);
  const int64_t BH = (int64_t)p.B * p.H, nq = BH * p.Lq;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "circular_relative_attention_decode_cpu", [&] {
    using T = scalar_t;
    prof::Timer tm0(0);
    const int D = p.D, N = p.N, groups = p.Ht, per_group = (int)(nq / groups);
    const T c2 = T(p.scale * LOG2E);
    // A = c2 · alpha · q, grouped by the table each query uses: rows (b, h, i) in order for a
    // shared table, else per head h the rows (b, i).
    std::vector<T> A((size_t)nq * D);
    const T* qp = q.data_ptr<T>();
    auto rs_row = [&](int64_t b, int64_t h, int64_t i) -> int64_t {
      return groups == 1 ? (b * p.H + h) * p.Lq + i : (h * p.B + b) * p.Lq + i;
    };
    for (int64_t b = 0; b < p.B; ++b)
      for (int64_t h = 0; h < p.H; ++h)
        for (int64_t i = 0; i < p.Lq; ++i) {
          const T* src = qp + ((b * p.H + h) * p.Lq + i) * D;
          T* dst = A.data() + rs_row(b, h, i) * D;
          for (int d = 0; d < D; ++d) dst[d] = c2 * T(p.alpha) * src[d];
        }
    // RS is written by the q·E GEMM except the zero column, padding and unread gaps: those are
    // zeroed here, not the whole buffer, which is kept between calls (up to 8 MiB per calling
    // thread): a fresh 270 KB buffer per step (B=2, Lk=4096) cost page faults and a memset,
    // about a tenth of a cache-cold step.
    const size_t rs_size = (size_t)nq * L.width;
    static thread_local std::vector<T> rs_keep;
    std::vector<T> rs_own;
    std::vector<T>& rs_buf = rs_size * sizeof(T) <= (8u << 20) ? rs_keep : rs_own;
    if (rs_buf.size() < rs_size) rs_buf.resize(rs_size);
    T* const RS = rs_buf.data();
    {
      // Columns [0, ns) hold the small terms' rows, all written; [ns, nsp) the zero column.
      std::vector<std::pair<int, int>> gaps{{L.split.ns, L.split.nsp}};
      int written_end = L.split.nsp;
      for (const IndexCols& x : L.index) {
        if (x.col > written_end) gaps.push_back({written_end, x.col});
        written_end = std::max(written_end, x.col + x.hi - x.lo + 1);
      }
      gaps.push_back({written_end, L.width});
      for (int64_t r = 0; r < nq; ++r)
        for (const auto& g : gaps) std::fill(RS + r * L.width + g.first, RS + r * L.width + g.second, T(0));
    }
    // Phase 1 units: (group, column block) of RS; phase 2: (query, key chunk).
    struct Cols {
      int dst, src, n;
    };
    std::vector<Cols> blocks;
    constexpr int CB = 256;
    for (const SmallTerm& st : L.split.small)
      for (int r = 0; r < cra_term_rows(st.t); r += CB)
        blocks.push_back({st.col + r, st.t.row_offset + r, std::min(CB, cra_term_rows(st.t) - r)});
    for (const IndexCols& x : L.index)
      for (int r = x.lo; r <= x.hi; r += CB)
        blocks.push_back({x.col + r - x.lo, x.t.row_offset + r, std::min(CB, x.hi - r + 1)});
    const int64_t n1 = (int64_t)groups * blocks.size();
    const double work = (double)nq * p.Lk * (D * 0.35 + 3.0) + (double)nq * (L.width) * D * 0.02;
    const int nt = threads_for(work);
    const int nsplit = (nt == 1 || BH * p.Lq >= 2 * nt)
                           ? 1
                           : (int)std::max<int64_t>(1, std::min<int64_t>((p.Lk + 511) / 512, (2 * nt + nq - 1) / nq));
    std::vector<Part<T>> parts((size_t)nq * nsplit);
    std::vector<T> accs((size_t)nq * nsplit * D);
    const Coords co{coords.data_ptr<int32_t>(), coords.stride(0), coords.stride(1),
                    kpm.has_value() ? kpm->data_ptr<bool>() : nullptr, kpm.has_value() ? kpm->stride(0) : 0};
    const T* tt = table_t.data_ptr<T>();
    const T *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>();
    tm0.mark(prof::SETUP);
    std::vector<std::vector<T>> s_buf(std::max(nt, 1));
    std::vector<std::vector<int>> c_buf(std::max(nt, 1));
    run_two_phases(
        n1,
        [&](int64_t u, int slot) {
          prof::Timer tm(slot);
          const int g = (int)(u / blocks.size());
          const Cols& cb = blocks[u % blocks.size()];
          mm<T>(per_group, cb.n, D, A.data() + (int64_t)g * per_group * D, D, 1, tt + (int64_t)g * D * N + cb.src, N,
                RS + (int64_t)g * per_group * L.width + cb.dst, L.width, false);
          tm.mark(prof::QE);
        },
        nq * nsplit,
        [&](int64_t u, int slot) {
          prof::Timer tm(slot);
          const int64_t qi = u / nsplit;
          const int sp = u % nsplit;
          const int64_t bh = qi / p.Lq;
          const int b = bh / p.H, h = bh % p.H, i = qi % p.Lq;
          const T* K = kp + b * k.stride(0) + h * k.stride(1);
          const T* V = vp + b * v.stride(0) + h * v.stride(1);
          decode_chunk<T>(p, L, co, qp + qi * D, K, V, RS + rs_row(b, h, i) * L.width, b, i,
                          (int)((int64_t)sp * p.Lk / nsplit), (int)((int64_t)(sp + 1) * p.Lk / nsplit), c2, s_buf[slot],
                          c_buf[slot], parts[u], accs.data() + u * D, tm);
        },
        nt);
    prof::Timer tm1(0);
    // Merge each query's chunks in order (the same rules as the training kernel's end of row).
    T* o = out.data_ptr<T>();
    const T ninf = -std::numeric_limits<T>::infinity(), nan = std::numeric_limits<T>::quiet_NaN();
    for (int64_t qi = 0; qi < nq; ++qi) {
      const Part<T>* pt = parts.data() + qi * nsplit;
      const T* ac = accs.data() + qi * nsplit * D;
      T m = ninf;
      bool seen = false, poisoned = false;
      for (int sp = 0; sp < nsplit; ++sp) {
        seen |= pt[sp].seen;
        if (pt[sp].m != pt[sp].m) poisoned = true;
        else m = std::max(m, pt[sp].m);
      }
      T* od = o + qi * D;
      if (!seen) {
        std::fill(od, od + D, T(0));
        continue;
      }
      if (poisoned || m == ninf) {
        std::fill(od, od + D, nan);
        continue;
      }
      T l = 0;
      std::fill(od, od + D, T(0));
      for (int sp = 0; sp < nsplit; ++sp) {
        if (pt[sp].m == ninf) continue;
        const T w = exp2_approx(pt[sp].m - m);
        l += w * pt[sp].l;
        for (int d = 0; d < D; ++d) od[d] += w * ac[sp * D + d];
      }
      const T inv = T(1) / l;
      for (int d = 0; d < D; ++d) od[d] *= inv;
    }
    tm1.mark(prof::MERGE);
  });
  return out;
}

// int32 [B, C, L] coordinate channels of L tokens (one kernel for what would be a dozen small
// torch ops per decoding step): channel c reads coords[spec[4c]] ([B, L], any integer dtype,
// strided) and applies spec[4c + 1] = 0: v // step, 1: v // period, 2: (v mod period) // step,
// with period = spec[4c + 2], step = spec[4c + 3]; a negative (missing) value stays -1.
// Each coordinate's values must lie in [lo[i], hi[i]] (ValueError naming names[i] otherwise,
// worded as the op's argument check), so tokens checked here need no other value check.
at::Tensor coordinate_channels(const std::vector<at::Tensor>& coords, at::IntArrayRef spec, int64_t B, int64_t L,
                               at::IntArrayRef lo, at::IntArrayRef hi, const std::vector<std::string>& names) {
  TORCH_CHECK(spec.size() % 4 == 0, "coordinate_channels: spec must hold 4 ints per channel");
  TORCH_CHECK(lo.size() == coords.size() && hi.size() == coords.size() && names.size() == coords.size(),
              "coordinate_channels: one limit pair and name per coordinate");
  const int64_t C = spec.size() / 4;
  std::vector<at::Tensor> xs;
  for (size_t i = 0; i < coords.size(); ++i) {
    const at::Tensor& t = coords[i];
    TORCH_CHECK(t.dim() == 2 && t.size(0) == B && t.size(1) == L && t.device().is_cpu() &&
                    at::isIntegralType(t.scalar_type(), false), "coordinate_channels: coordinates must be integer CPU [B, L]");
    xs.push_back(t.to(at::kLong));
    const int64_t* v = xs.back().data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t l = 0; l < L; ++l) {
        const int64_t val = v[b * xs.back().stride(0) + l * xs.back().stride(1)];
        TORCH_CHECK_VALUE(val >= lo[i], names[i], " has values below ", lo[i], " (-1 marks a missing value)");
        TORCH_CHECK_VALUE(val <= hi[i], names[i], " has values above ", hi[i]);
      }
  }
  auto out = at::empty({B, C, L}, at::TensorOptions().dtype(at::kInt));
  int32_t* o = out.data_ptr<int32_t>();
  for (int64_t c = 0; c < C; ++c) {
    const int64_t src = spec[4 * c], op = spec[4 * c + 1], period = spec[4 * c + 2], step = spec[4 * c + 3];
    TORCH_CHECK(src >= 0 && src < (int64_t)coords.size() && op >= 0 && op <= 2 && period >= 1 && step >= 1,
                "coordinate_channels: bad spec for channel ", c);
    const at::Tensor& x = xs[src];
    const int64_t* v = x.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t l = 0; l < L; ++l) {
        const int64_t val = v[b * x.stride(0) + l * x.stride(1)];
        const int64_t r = op == 0 ? val / step : (op == 1 ? val / period : (val % period) / step);
        o[(b * C + c) * L + l] = val < 0 ? -1 : (int32_t)r;
      }
  }
  return out;
}

// True when every pair of tensors has the same bytes (CPU, contiguous, same size); the check
// behind the assembled-table caches, which must notice writes through .data that leave the
// version counter alone.
bool same_bytes(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b) {
  TORCH_CHECK(a.size() == b.size(), "same_bytes: lists of different lengths");
  for (size_t i = 0; i < a.size(); ++i) {
    const at::Tensor &x = a[i], &y = b[i];
    TORCH_CHECK(x.device().is_cpu() && y.device().is_cpu(), "same_bytes: CPU tensors only");
    if (x.sizes() != y.sizes() || x.scalar_type() != y.scalar_type()) return false;
    if (!x.is_contiguous() || !y.is_contiguous()) {
      if (!at::equal(x, y)) return false;
      continue;
    }
    if (std::memcmp(x.data_ptr(), y.data_ptr(), x.nbytes()) != 0) return false;
  }
  return true;
}

// Zero-filled CPU storage for a KV cache: buffers of 2 MiB or more are 2 MiB aligned and asked
// for transparent huge pages (madvise, before the first touch). A decoding step streams the whole
// cache once; with 4 KiB pages a cache-cold step of 16 MiB took ~4,000 page walks, about 20% of
// its read time on the AMD EPYC we measure on. Where THP is off the hint is ignored.
at::Tensor kv_storage(at::IntArrayRef size, at::ScalarType dtype) {
  TORCH_CHECK(at::isFloatingType(dtype), "kv_storage: dtype must be floating point, got ", dtype);
  int64_t numel = 1;
  for (const int64_t s : size) {
    TORCH_CHECK(s >= 0, "kv_storage: sizes must be >= 0, got ", size);
    TORCH_CHECK(s == 0 || numel <= std::numeric_limits<int64_t>::max() / 16 / s, "kv_storage: size too large: ", size);
    numel *= s;
  }
  const auto options = at::TensorOptions().dtype(dtype).device(at::kCPU);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr int64_t HUGE_PAGE = 2 << 20;
  const int64_t bytes = numel * (int64_t)c10::elementSize(dtype);
  if (bytes < HUGE_PAGE) return at::zeros(size, options);
  const int64_t alloc = (bytes + HUGE_PAGE - 1) / HUGE_PAGE * HUGE_PAGE;
  void* ptr = nullptr;
  TORCH_CHECK(posix_memalign(&ptr, HUGE_PAGE, alloc) == 0 && ptr != nullptr, "kv_storage: cannot allocate ", alloc,
              " bytes");
  madvise(ptr, alloc, MADV_HUGEPAGE);  // a hint: failure (THP off) only means 4 KiB pages
  std::memset(ptr, 0, bytes);
  return at::from_blob(ptr, size, [](void* p) { std::free(p); }, options);
#else
  return at::zeros(size, options);  // no transparent huge pages to ask for
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastattn, m) {
  // Decoding (forward only): q [B, H, Lq, D] with few queries, k/v [B, H, Lk, D] (strided over
  // batch and head allowed), table_t [Ht, D, N] (the assembled table transposed), coords
  // [B, C, Lk] int32 and key_padding_mask [B, Lk] with dense rows (strided views allowed).
  m.def("circular_relative_attention_decode(Tensor q, Tensor k, Tensor v, Tensor table_t, Tensor coords, "
        "int[] terms, float alpha, float scale, bool causal, Tensor? key_padding_mask) -> Tensor");
  m.def("same_bytes(Tensor[] a, Tensor[] b) -> bool", &same_bytes);
  m.def("kv_storage(int[] size, ScalarType dtype) -> Tensor", &kv_storage);
  m.def("coordinate_channels(Tensor[] coords, int[] spec, int B, int L, int[] lo, int[] hi, str[] names) -> Tensor",
        &coordinate_channels);
}

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("circular_relative_attention_decode", &cra_decode_cpu);
}

}  // namespace fastattn::cpu
