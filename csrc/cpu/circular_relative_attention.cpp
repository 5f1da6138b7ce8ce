// Circular relative attention on the CPU: flash-style row blocks with online softmax.
//
// Per (batch, head, block of BQ queries): RS = Q_blk · Tᵀ gives q·E for every table row the
// block can need ([BQ, N], one GEMM); then per tile of BK keys: S = Q_blk · K_blkᵀ (GEMM),
// plus alpha · RS gathered by each term's index rule, online softmax, acc += P · V_blk (GEMM).
// The backward pass recomputes S from the saved log-sum-exp, scatters dS into a [BQ, N]
// accumulator dRS, and turns it into dQ += dRS · T and dT += dRSᵀ · Q_blk with two GEMMs.
// Memory per thread: O(BQ · (N + BK + D)); nothing is L×L or L×L×D.
// Determinism: every output element is produced by one task in a fixed order; table gradients
// are summed over per-thread partials in thread order (fixed for a fixed thread count).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "cra_common.h"
#include "cra_problem.h"
#include "cra_profile.h"
#include "gemm.h"

namespace fastattn::cpu {
namespace {

constexpr int BQ = 64;
constexpr int BK = 128;

// Rows of one coordinate term (not INDEX, see index_runs) for query position a against keys
// j0 .. j0+mk-1 (-1 where missing). Branch-free per key so the compiler can vectorise it.
inline void term_rows(const CraTerm& t, const int32_t* cb, int Lk, int a, int j0, int mk, int* rows) {
  const int32_t* hk = cb + (int64_t)t.ch_hi * Lk + j0;
  const int32_t* lk = (t.ch_lo >= 0 ? cb + (int64_t)t.ch_lo * Lk : cb + (int64_t)t.ch_hi * Lk) + j0;
  const int hq = hk[a - j0], lq = lk[a - j0];
  if (hq < 0 || (t.kind == CRA_KIND_FIELDS && lq < 0)) {
    std::fill(rows, rows + mk, -1);
    return;
  }
  // The same rule as cra_term_row, specialised per kind and with the part folded into two
  // multipliers so the loops have no branches.
  const int off = t.row_offset, hmin = t.hi_min, hlast = t.n_hi - 1, llast = t.n_lo - 1;
  if (t.kind == CRA_KIND_DIRECT) {
#pragma omp simd
    for (int j = 0; j < mk; ++j)
      rows[j] = hk[j] < 0 ? -1 : off + cra_clamp(hq - hk[j] - hmin, 0, hlast);
    return;
  }
  const int mul_hi = t.part == CRA_PART_COMBINED ? t.n_lo : (t.part == CRA_PART_HI ? 1 : 0);
  const int mul_lo = t.part == CRA_PART_HI ? 0 : 1;
  if (t.kind == CRA_KIND_QUOTIENT) {
    const int R = t.param;
#pragma omp simd
    for (int j = 0; j < mk; ++j) {
      int dl = lq - lk[j];
      const int borrow = dl < 0 ? 1 : 0;
      dl += borrow * R;
      const int hi = cra_clamp(hq - hk[j] - borrow - hmin, 0, hlast);
      rows[j] = hk[j] < 0 ? -1 : off + hi * mul_hi + cra_clamp(dl, 0, llast) * mul_lo;
    }
    return;
  }
#pragma omp simd
  for (int j = 0; j < mk; ++j) {  // FIELDS
    const int hi = cra_clamp(hq - hk[j] - hmin, 0, hlast);
    const int lo = cra_clamp(lq - lk[j] + t.param, 0, llast);
    rows[j] = (hk[j] < 0 || lk[j] < 0) ? -1 : off + hi * mul_hi + lo * mul_lo;
  }
}

// S[j] += alpha * RS[rows[j]] where the term is present.
template <typename T>
inline void gather_add(const int* rows, const T* RS, T alpha, int mk, T* S) {
#pragma omp simd
  for (int j = 0; j < mk; ++j) {
    const int r = rows[j];
    const T g = RS[r < 0 ? 0 : r];
    S[j] += r < 0 ? T(0) : alpha * g;
  }
}

// The index term reads row clamp(base - j) for key j: a reversed contiguous run of rows
// between the two clamped ends, so it needs neither a gather nor a conflicting scatter.
// Visits keys 0 .. nv-1 as f_run(j_lo, j_hi) over the unclamped keys and f_edge(j, row) for the rest.
template <typename Run, typename Edge>
inline void index_runs(const CraTerm& t, int base, int nv, Run&& f_run, Edge&& f_edge) {
  const int last = t.n_hi - 1;
  const int jl = std::max(0, base - last), jh = std::min(nv - 1, base);
  for (int j = 0; j < std::min(nv, jl); ++j) f_edge(j, t.row_offset + last);
  if (jl <= jh) f_run(jl, jh);
  for (int j = std::max(jh + 1, jl); j < nv; ++j) f_edge(j, t.row_offset);
}

// exp(x) for softmax arguments (x <= ~0): a Cephes-style exp2 polynomial (rel. error ~2e-7)
// written so loops over it vectorise; std::exp is a scalar libm call. -inf gives exactly 0.
inline float softmax_exp(float x) {
  const float t = std::max(x, -87.0f) * 1.44269504088896341f;
  const float n = std::floor(t + 0.5f);
  const float f = t - n;
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  const int32_t bits = ((int32_t)n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.0f ? 0.0f : p * scale;
}
inline double softmax_exp(double x) { return std::exp(x); }

// Table rows [lo, hi) that a query block can read; only the index term can be narrowed
// analytically (rows are a function of a_i - j), the others are small and taken whole.
inline void term_row_range(const CraProblem& p, const CraTerm& t, int a0, int a1, int* lo, int* hi) {
  *lo = t.row_offset;
  *hi = t.row_offset + cra_term_rows(t);
  if (t.kind != CRA_KIND_INDEX) return;
  const int dn_lo = p.causal ? 0 : a0 - (p.Lk - 1);
  *lo = t.row_offset + cra_clamp(dn_lo - t.hi_min, 0, t.n_hi - 1);
  *hi = t.row_offset + cra_clamp(a1 - 1 - t.hi_min, 0, t.n_hi - 1) + 1;
}

// RS[:, rows] = Q_blk · T[rows]ᵀ for the rows each term may read.
template <typename T>
void relative_products(const CraProblem& p, const T* Q, int mq, const T* Tb, T* RS, int a0) {
  for (int t = 0; t < p.terms.n; ++t) {
    int lo, hi;
    term_row_range(p, p.terms.t[t], a0, a0 + mq, &lo, &hi);
    gemm<T>(false, true, mq, hi - lo, p.D, T(1), Q, p.D, Tb + (int64_t)lo * p.D, p.D, T(0), RS + lo, p.N);
  }
}

// dQ_blk += dRS · T[rows]  and  dT[rows] += dRS[:, rows]ᵀ · Q_blk, over the same rows.
template <typename T>
void relative_grads(const CraProblem& p, const T* Q, int mq, const T* Tb, const T* dRS, T* dQ,
                    T* dTb, int a0) {
  for (int t = 0; t < p.terms.n; ++t) {
    int lo, hi;
    term_row_range(p, p.terms.t[t], a0, a0 + mq, &lo, &hi);
    gemm<T>(false, false, mq, p.D, hi - lo, T(1), dRS + lo, p.N, Tb + (int64_t)lo * p.D, p.D, T(1), dQ, p.D);
    gemm<T>(true, false, hi - lo, p.D, mq, T(1), dRS + lo, p.N, Q, p.D, T(1), dTb + (int64_t)lo * p.D, p.D);
  }
}

// Keys j0 .. j0+nv-1 of a tile are at or before query position a (all mk when not causal).
inline int visible_keys(const CraProblem& p, int a, int j0, int mk) {
  return p.causal ? std::max(0, std::min(mk, a - j0 + 1)) : mk;
}

// Scaled logits of one tile: S = scale · (Q Kᵀ + alpha · relative), -inf where masked.
// Leaves each term's rows in rows[t][i][j] (BQ x BK ints per term) for the backward scatter.
template <typename T>
void tile_logits(const CraProblem& p, const T* Q, const T* K, const T* RS, const int32_t* cb,
                 const bool* kpm_b, int a0, int mq, int j0, int mk, T* S, int* rows, prof::Timer& tm) {
  gemm<T>(false, true, mq, mk, p.D, T(1), Q, p.D, K + (int64_t)j0 * p.D, p.D, T(0), S, BK);
  tm.mark(prof::QK);
  const T alpha = T(p.alpha), scale = T(p.scale), ninf = -std::numeric_limits<T>::infinity();
  for (int i = 0; i < mq; ++i) {
    T* s = S + i * BK;
    const T* rs = RS + (int64_t)i * p.N;
    const int nv = visible_keys(p, a0 + i, j0, mk);
    for (int t = 0; t < p.terms.n; ++t) {
      const CraTerm& term = p.terms.t[t];
      if (term.kind == CRA_KIND_INDEX) {
        const int base = a0 + i - j0 - term.hi_min;
        index_runs(term, base, nv, [&](int jl, int jh) {
          const T* src = rs + term.row_offset + base;
#pragma omp simd
          for (int j = jl; j <= jh; ++j) s[j] += alpha * src[-j];
        }, [&](int j, int row) { s[j] += alpha * rs[row]; });
        continue;
      }
      int* r = rows + (t * BQ + i) * BK;
      term_rows(term, cb, p.Lk, a0 + i, j0, nv, r);
      gather_add(r, rs, alpha, nv, s);
    }
#pragma omp simd
    for (int j = 0; j < mk; ++j) {
      const bool masked = j >= nv || (kpm_b != nullptr && kpm_b[j0 + j]);
      s[j] = masked ? ninf : s[j] * scale;
    }
  }
  tm.mark(prof::GATHER);
}

// d RS[i, row(i, j)] += alpha * dlogit[i, j] for every visible pair of the tile.
template <typename T>
void tile_scatter(const CraProblem& p, const T* dP, const int* rows, int a0, int mq, int j0, int mk,
                  T* dRS) {
  const T alpha = T(p.alpha);
  for (int i = 0; i < mq; ++i) {
    const T* dp = dP + i * BK;
    T* drs = dRS + (int64_t)i * p.N;
    const int nv = visible_keys(p, a0 + i, j0, mk);
    for (int t = 0; t < p.terms.n; ++t) {
      const CraTerm& term = p.terms.t[t];
      if (term.kind == CRA_KIND_INDEX) {
        const int base = a0 + i - j0 - term.hi_min;
        index_runs(term, base, nv, [&](int jl, int jh) {
          T* dst = drs + term.row_offset + base;
#pragma omp simd
          for (int j = jl; j <= jh; ++j) dst[-j] += alpha * dp[j];
        }, [&](int j, int row) { drs[row] += alpha * dp[j]; });
        continue;
      }
      const int* r = rows + (t * BQ + i) * BK;
      for (int j = 0; j < nv; ++j)
        if (r[j] >= 0) drs[r[j]] += alpha * dp[j];
    }
  }
}

template <typename T>
struct Inputs {
  const T *q, *k, *v, *table;
  const int32_t* coords;
  const bool* kpm;
  // k and v may be strided over batch and head (a KV-cache slice); rows are dense.
  int64_t k_sb, k_sh, v_sb, v_sh;
  const T* keys(int b, int h) const { return k + b * k_sb + h * k_sh; }
  const T* values(int b, int h) const { return v + b * v_sb + h * v_sh; }
};

inline int key_end(const CraProblem& p, int a_last) { return p.causal ? a_last + 1 : p.Lk; }

template <typename T>
void forward_block(const CraProblem& p, const Inputs<T>& in, int b, int h, int qb, T* out,
                   T* lse, std::vector<T>& buf, std::vector<int>& rows_buf, prof::Timer& tm) {
  const int i0 = qb * BQ, mq = std::min(BQ, p.Lq - i0), a0 = i0 + p.Lk - p.Lq;
  const int64_t bh = (int64_t)b * p.H + h;
  const T* Q = in.q + (bh * p.Lq + i0) * p.D;
  const T* K = in.keys(b, h);
  const T* V = in.values(b, h);
  const T* Tb = in.table + (p.Ht == 1 ? 0 : (int64_t)h * p.N * p.D);
  const int32_t* cb = in.coords + (int64_t)b * p.C * p.Lk;
  const bool* kpm_b = in.kpm ? in.kpm + (int64_t)b * p.Lk : nullptr;
  // RS is not cleared: entries outside the computed rows are only read for masked pairs,
  // whose logits are overwritten with -inf.
  buf.resize((size_t)BQ * (p.N + BK + p.D + 2));
  T *RS = buf.data(), *S = RS + (size_t)BQ * p.N, *acc = S + BQ * BK, *m = acc + BQ * p.D, *l = m + BQ;
  std::fill(acc, acc + BQ * p.D, T(0));
  std::fill(l, l + BQ, T(0));
  rows_buf.resize((size_t)std::max(p.terms.n, 1) * BQ * BK);
  int* rows = rows_buf.data();
  const T ninf = -std::numeric_limits<T>::infinity();
  std::fill(m, m + mq, ninf);
  tm.mark(prof::SETUP);
  relative_products(p, Q, mq, Tb, RS, a0);
  tm.mark(prof::QE);
  const T keep_scale = T(1.0 / (1.0 - p.dropout_p));
  for (int j0 = 0; j0 < key_end(p, a0 + mq - 1); j0 += BK) {
    const int mk = std::min(BK, p.Lk - j0);
    tile_logits(p, Q, K, RS, cb, kpm_b, a0, mq, j0, mk, S, rows, tm);
    for (int i = 0; i < mq; ++i) {
      T* s = S + i * BK;
      T mx = m[i];
#pragma omp simd reduction(max : mx)
      for (int j = 0; j < mk; ++j) mx = std::max(mx, s[j]);
      if (mx == ninf) {  // nothing visible yet: keep the row empty
        std::fill(s, s + mk, T(0));
        continue;
      }
      const T corr = softmax_exp(m[i] - mx);
      T sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int j = 0; j < mk; ++j) {
        s[j] = softmax_exp(s[j] - mx);
        sum += s[j];
      }
      l[i] = l[i] * corr + sum;
      m[i] = mx;
      for (int d = 0; d < p.D; ++d) acc[i * p.D + d] *= corr;
      if (p.dropout_p > 0.0) {  // the normaliser l uses undropped probabilities
        const uint32_t rh = cra_dropout_row(p.seed, (uint32_t)bh, (uint32_t)(i0 + i));
        for (int j = 0; j < mk; ++j)
          s[j] = cra_dropout_keep(rh, (uint32_t)(j0 + j), p.threshold) ? s[j] * keep_scale : T(0);
      }
    }
    tm.mark(prof::SOFTMAX);
    gemm<T>(false, false, mq, p.D, mk, T(1), S, BK, V + (int64_t)j0 * p.D, p.D, T(1), acc, p.D);
    tm.mark(prof::PV);
  }
  for (int i = 0; i < mq; ++i) {
    T* o = out + (bh * p.Lq + i0 + i) * p.D;
    const bool empty = l[i] == T(0);
    for (int d = 0; d < p.D; ++d) o[d] = empty ? T(0) : acc[i * p.D + d] / l[i];
    lse[bh * p.Lq + i0 + i] = empty ? ninf : m[i] + std::log(l[i]);
  }
  tm.mark(prof::SOFTMAX);
}

// Backward of query blocks [qb0, qb1) of one (batch, head), in order, accumulating into
// dK/dV ([Lk, D], zeroed here) and the table gradient dT.
template <typename T>
void backward_chunk(const CraProblem& p, const Inputs<T>& in, const T* dout, const T* out,
                    const T* lse, int b, int h, int qb0, int qb1, T* dq, T* dK, T* dV, T* dT,
                    std::vector<T>& buf, std::vector<int>& rows_buf, prof::Timer& tm) {
  const int64_t bh = (int64_t)b * p.H + h;
  const T* K = in.keys(b, h);
  const T* V = in.values(b, h);
  const T* Tb = in.table + (p.Ht == 1 ? 0 : (int64_t)h * p.N * p.D);
  T* dTb = dT + (p.Ht == 1 ? 0 : (int64_t)h * p.N * p.D);
  const int32_t* cb = in.coords + (int64_t)b * p.C * p.Lk;
  const bool* kpm_b = in.kpm ? in.kpm + (int64_t)b * p.Lk : nullptr;
  std::fill(dK, dK + (int64_t)p.Lk * p.D, T(0));
  std::fill(dV, dV + (int64_t)p.Lk * p.D, T(0));
  buf.resize((size_t)BQ * (2 * p.N + 2 * BK + 1));
  T *RS = buf.data(), *dRS = RS + (size_t)BQ * p.N, *S = dRS + (size_t)BQ * p.N, *dP = S + BQ * BK,
    *delta = dP + BQ * BK;
  rows_buf.resize((size_t)std::max(p.terms.n, 1) * BQ * BK);
  int* rows = rows_buf.data();
  const T scale = T(p.scale), keep_scale = T(1.0 / (1.0 - p.dropout_p));
  const T ninf = -std::numeric_limits<T>::infinity();
  for (int i0 = qb0 * BQ; i0 < std::min(p.Lq, qb1 * BQ); i0 += BQ) {
    const int mq = std::min(BQ, p.Lq - i0), a0 = i0 + p.Lk - p.Lq;
    const T* Q = in.q + (bh * p.Lq + i0) * p.D;
    const T* dO = dout + (bh * p.Lq + i0) * p.D;
    const T* O = out + (bh * p.Lq + i0) * p.D;
    const T* L = lse + bh * p.Lq + i0;
    T* dQ = dq + (bh * p.Lq + i0) * p.D;
    for (int t = 0; t < p.terms.n; ++t) {  // only the rows relative_grads reads back
      int lo, hi;
      term_row_range(p, p.terms.t[t], a0, a0 + mq, &lo, &hi);
      for (int i = 0; i < mq; ++i) std::fill(dRS + (int64_t)i * p.N + lo, dRS + (int64_t)i * p.N + hi, T(0));
    }
    std::fill(dQ, dQ + (int64_t)mq * p.D, T(0));
    for (int i = 0; i < mq; ++i) {
      T s = 0;
      for (int d = 0; d < p.D; ++d) s += dO[i * p.D + d] * O[i * p.D + d];
      delta[i] = s;
    }
    tm.mark(prof::SETUP);
    relative_products(p, Q, mq, Tb, RS, a0);
    tm.mark(prof::QE);
    for (int j0 = 0; j0 < key_end(p, a0 + mq - 1); j0 += BK) {
      const int mk = std::min(BK, p.Lk - j0);
      tile_logits(p, Q, K, RS, cb, kpm_b, a0, mq, j0, mk, S, rows, tm);
      gemm<T>(false, true, mq, mk, p.D, T(1), dO, p.D, V + (int64_t)j0 * p.D, p.D, T(0), dP, BK);
      tm.mark(prof::DP);
      for (int i = 0; i < mq; ++i) {
        T *s = S + i * BK, *dp = dP + i * BK;
        const T li = L[i], di = delta[i];
        if (li == ninf) {  // a row with no visible key passes no gradient
          std::fill(s, s + mk, T(0));
          std::fill(dp, dp + mk, T(0));
          continue;
        }
        if (p.dropout_p > 0.0) {  // dp: gradient w.r.t. the undropped probability
          const uint32_t rh = cra_dropout_row(p.seed, (uint32_t)bh, (uint32_t)(i0 + i));
          for (int j = 0; j < mk; ++j) {
            const bool keep = cra_dropout_keep(rh, (uint32_t)(j0 + j), p.threshold);
            const T prob = softmax_exp(s[j] - li);
            dp[j] = keep ? dp[j] * keep_scale : T(0);
            s[j] = keep ? prob * keep_scale : T(0);  // what multiplied V
            dp[j] = scale * prob * (dp[j] - di);   // d loss / d (q·k + alpha·rel)
          }
          continue;
        }
#pragma omp simd
        for (int j = 0; j < mk; ++j) {
          const T prob = softmax_exp(s[j] - li);
          s[j] = prob;
          dp[j] = scale * prob * (dp[j] - di);
        }
      }
      tm.mark(prof::DSOFTMAX);
      gemm<T>(true, false, mk, p.D, mq, T(1), S, BK, dO, p.D, T(1), dV + (int64_t)j0 * p.D, p.D);
      tm.mark(prof::DV);
      gemm<T>(false, false, mq, p.D, mk, T(1), dP, BK, K + (int64_t)j0 * p.D, p.D, T(1), dQ, p.D);
      tm.mark(prof::DQ);
      gemm<T>(true, false, mk, p.D, mq, T(1), dP, BK, Q, p.D, T(1), dK + (int64_t)j0 * p.D, p.D);
      tm.mark(prof::DK);
      tile_scatter(p, dP, rows, a0, mq, j0, mk, dRS);
      tm.mark(prof::SCATTER);
    }
    relative_grads(p, Q, mq, Tb, dRS, dQ, dTb, a0);
    tm.mark(prof::QE_GRAD);
  }
}

template <typename T>
Inputs<T> inputs_of(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& table, const at::Tensor& coords,
                    const std::optional<at::Tensor>& kpm) {
  return {q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(), table.data_ptr<T>(),
          coords.data_ptr<int32_t>(), kpm.has_value() ? kpm->data_ptr<bool>() : nullptr,
          k.stride(0), k.stride(1), v.stride(0), v.stride(1)};
}

std::tuple<at::Tensor, at::Tensor> cra_forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& table,
    const at::Tensor& coords, at::IntArrayRef terms, double alpha, double scale, bool causal,
    const std::optional<at::Tensor>& kpm, double dropout_p, int64_t seed) {
  const CraProblem p = cra_make_problem(q, k, v, table, coords, terms, alpha, scale, causal, kpm, dropout_p, seed);
  TORCH_CHECK(q.device().is_cpu(), "cpp backend: tensors must be on the CPU");
  auto out = at::empty_like(q);
  auto lse = at::empty({p.B, p.H, p.Lq}, q.options());
  const int nqb = (p.Lq + BQ - 1) / BQ;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "circular_relative_attention_cpu", [&] {
    const auto in = inputs_of<scalar_t>(q, k, v, table, coords, kpm);
    scalar_t *o = out.data_ptr<scalar_t>(), *l = lse.data_ptr<scalar_t>();
    at::parallel_for(0, (int64_t)p.B * p.H * nqb, 1, [&](int64_t begin, int64_t end) {
      prof::Timer tm(at::get_thread_num());
      std::vector<scalar_t> buf;
      std::vector<int> rows;
      for (int64_t task = begin; task < end; ++task) {
        const int qb = task % nqb, bh = task / nqb;
        forward_block<scalar_t>(p, in, bh / p.H, bh % p.H, qb, o, l, buf, rows, tm);
      }
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cra_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& table, const at::Tensor& coords,
    at::IntArrayRef terms, double alpha, double scale, bool causal,
    const std::optional<at::Tensor>& kpm, double dropout_p, int64_t seed) {
  const CraProblem p = cra_make_problem(q, k, v, table, coords, terms, alpha, scale, causal, kpm, dropout_p, seed);
  TORCH_CHECK(q.device().is_cpu(), "cpp backend: tensors must be on the CPU");
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes() &&
              lse.sizes() == at::IntArrayRef({p.B, p.H, p.Lq}), "grad_out/out/lse shapes do not match q");
  const auto dout_c = grad_out.contiguous().to(q.scalar_type());
  const auto out_c = out.contiguous(), lse_c = lse.contiguous();
  auto dq = at::empty_like(q), dk = at::empty(k.sizes(), k.options()), dv = at::empty(v.sizes(), v.options());
  const int nthreads = at::get_num_threads();
  const int64_t BH = (int64_t)p.B * p.H;
  // With fewer (batch, head) pairs than threads, split each pair's query blocks into chunks;
  // chunks after the first accumulate dK/dV into partial buffers summed in chunk order.
  const int nqb = (p.Lq + BQ - 1) / BQ;
  const int nchunk = (int)std::max<int64_t>(1, std::min<int64_t>(nqb, (nthreads + BH - 1) / BH));
  auto kv_partial = at::zeros({2, nchunk - 1, BH, p.Lk, p.D}, q.options());
  // One table-gradient partial per thread, summed in thread order afterwards.
  auto partial = at::zeros({nthreads, p.Ht, p.N, p.D}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "circular_relative_attention_backward_cpu", [&] {
    const auto in = inputs_of<scalar_t>(q, k, v, table, coords, kpm);
    const scalar_t *dO = dout_c.data_ptr<scalar_t>(), *O = out_c.data_ptr<scalar_t>(),
                   *L = lse_c.data_ptr<scalar_t>();
    scalar_t *part = partial.data_ptr<scalar_t>(), *kvp = kv_partial.data_ptr<scalar_t>();
    const int64_t kv_size = (int64_t)p.Lk * p.D, kvp_stride = (nchunk - 1) * BH * kv_size;
    at::parallel_for(0, BH * nchunk, 1, [&](int64_t begin, int64_t end) {
      prof::Timer tm(at::get_thread_num());
      std::vector<scalar_t> buf;
      std::vector<int> rows;
      const int tid = at::get_thread_num();
      TORCH_CHECK(tid < nthreads, "thread id beyond the partial buffers");
      scalar_t* dT = part + (int64_t)tid * p.Ht * p.N * p.D;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t bh = task / nchunk;
        const int c = task % nchunk;
        scalar_t *dK = dk.data_ptr<scalar_t>() + bh * kv_size, *dV = dv.data_ptr<scalar_t>() + bh * kv_size;
        if (c > 0) {
          dK = kvp + ((c - 1) * BH + bh) * kv_size;
          dV = dK + kvp_stride;
        }
        backward_chunk<scalar_t>(p, in, dO, O, L, bh / p.H, bh % p.H, c * nqb / nchunk,
                                 (c + 1) * nqb / nchunk, dq.data_ptr<scalar_t>(), dK, dV, dT, buf, rows, tm);
      }
    });
  });
  if (nchunk > 1) {
    dk += kv_partial[0].sum(0).view_as(dk);
    dv += kv_partial[1].sum(0).view_as(dv);
  }
  return {dq, dk, dv, partial.sum(0)};
}

}  // namespace

std::tuple<std::vector<double>, std::vector<std::string>> cra_cpu_profile(bool enable) {
  std::vector<std::string> names;
  for (int ph = 0; ph < prof::N_PHASES; ++ph) names.push_back(prof::phase_name(ph));
  return {prof::read_and_reset(enable), names};
}

TORCH_LIBRARY_FRAGMENT(fastattn, m) {
  // Per-phase CPU seconds of the cpp attention kernels (summed over threads) since the last
  // call, and the phase names; then profiling is switched on or off.
  m.def("cra_cpu_profile(bool enable) -> (float[], str[])", &cra_cpu_profile);
}

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("circular_relative_attention", &cra_forward_cpu);
  m.impl("circular_relative_attention_backward", &cra_backward_cpu);
}

}  // namespace fastattn::cpu
