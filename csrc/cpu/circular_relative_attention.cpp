// Circular relative attention on the CPU: flash-style row blocks with online softmax.
//
// Per (batch, head, block of BQ queries): RS = Q_blk · E_smallᵀ gives q·E for every row of the
// time/pitch tables ([BQ, NS], one GEMM); then per tile of BK keys: S = Q_blk · K_tileᵀ, the
// index term's band (the BQ + BK − 1 consecutive index rows the tile can read, one more GEMM
// whose result is read along diagonals), the time/pitch scores gathered from RS by index rules
// computed from O(L) per-token coordinates, online softmax, acc += P · V_tile. The backward pass
// recomputes the tile from the saved log-sum-exp, scatters dS into the band and into a [BQ, NS]
// accumulator, and turns them into dQ and table gradients with GEMMs.
// All GEMMs are the register-blocked loops of microgemm.h; K (and V in the backward) are packed
// transposed once per (batch, head) and thread, the tables once per call.
// Memory per thread: O(BQ · (NS + BK + D) + L · D); nothing is L×L or L×L×D.
// Determinism: every output element is produced by one task in a fixed order; dK/dV and table
// gradients of work split into chunks are summed in chunk order, and chunks depend only on the
// problem and the thread count.
// Non-finite values propagate as in the reference: a NaN logit, or a row whose visible logits are
// all -inf (overflow), gives NaN output and NaN gradients; only rows with no visible key give
// zeros.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cra_cpu.h"
#include "cra_problem.h"
#include "cra_profile.h"
#include "microgemm.h"
#include "parallel_chunks.h"

namespace fastattn::cpu {
namespace {

constexpr int BQ = 64;
constexpr int BK = 128;
constexpr int BANDP = 192;  // BQ + BK - 1 index rows per (block, tile), padded to 16
static_assert(BANDP >= BQ + BK - 1 && BANDP % 16 == 0, "band width");

// An index term's rows packed for band products: column/row m holds alpha · E[clamp(top − m)],
// so the band of a (block, tile) is M-contiguous whatever the clamping.
template <typename T>
struct IndexPack {
  CraTerm t;
  int top, M;
  std::vector<T> tr;  // [Ht, D, M]
  std::vector<T> rr;  // [Ht, M, D] (backward only)
};

// Everything a call reads besides q, k, v.
template <typename T>
struct Plan {
  const CraProblem& p;
  TermSplit split;
  std::vector<T> small_t, small_r;  // [Ht, D, nsp], [Ht, nsp, D]
  std::vector<IndexPack<T>> index;
  T c2;  // scale · log2(e): logits in base 2
  const int32_t* coords;
  const bool* kpm;

  Plan(const CraProblem& prob, const T* table, const int32_t* coords_, const bool* kpm_, bool backward)
      : p(prob), split(split_terms(prob.terms)), c2(T(prob.scale * LOG2E)), coords(coords_), kpm(kpm_) {
    const T alpha = T(p.alpha);
    pack_small(split, table, p.Ht, p.N, p.D, alpha, small_t, small_r);
    if (!backward) small_r.clear();
    for (const CraTerm& t : split.index) {
      IndexPack<T> x{t, p.Lk + BQ - 2 - t.hi_min, p.Lk + p.Lq + BANDP - 2, {}, {}};
      x.tr.resize((size_t)p.Ht * p.D * x.M);
      if (backward) x.rr.resize((size_t)p.Ht * x.M * p.D);
      for (int h = 0; h < p.Ht; ++h) {
        const T* src = table + ((int64_t)h * p.N + t.row_offset) * p.D;
        for (int m = 0; m < x.M; ++m) {
          const T* row = src + (int64_t)cra_clamp(x.top - m, 0, t.n_hi - 1) * p.D;
          for (int d = 0; d < p.D; ++d) {
            x.tr[((size_t)h * p.D + d) * x.M + m] = alpha * row[d];
            if (backward) x.rr[((size_t)h * x.M + m) * p.D + d] = alpha * row[d];
          }
        }
      }
      index.push_back(std::move(x));
    }
  }
  // First packed index row of the band for block start a0 and tile start j0.
  int band_m0(const IndexPack<T>& x, int a0, int j0) const {
    return x.top - (a0 - j0 - x.t.hi_min + BQ - 1);
  }
};

// K (or V) of one (batch, head) packed transposed, [D, ld], filled up to the keys in use.
template <typename T>
struct PackedKeys {
  std::vector<T> data;
  int64_t bh = -1;
  int len = 0, ld = 0;
  const T* get(const T* src, int64_t bh_, int upto, int Lk, int D) {
    if (bh_ != bh) {
      ld = round_up(Lk, 16);
      data.resize((size_t)D * ld);
      bh = bh_;
      len = 0;
    }
    if (upto > len) {
      pack_transposed(upto - len, D, src + (int64_t)len * D, D, data.data() + len, ld);
      len = upto;
    }
    return data.data();
  }
};

template <typename T>
struct Scratch {
  std::vector<T> Qs, RS, S, Pb, acc, m, l, dRS, dP, dQ, delta, lse2;
  std::vector<int> cols;
  std::vector<uint8_t> seen;
  PackedKeys<T> Kt, Vt;
};

template <typename T>
struct Inputs {
  const T *q, *k, *v;
  // k and v may be strided over batch and head (a KV-cache slice); rows are dense.
  int64_t k_sb, k_sh, v_sb, v_sh;
  const T* keys(int b, int h) const { return k + b * k_sb + h * k_sh; }
  const T* values(int b, int h) const { return v + b * v_sb + h * v_sh; }
};

inline int key_end(const CraProblem& p, int a_last) { return p.causal ? std::min(p.Lk, a_last + 1) : p.Lk; }
inline int visible_keys(const CraProblem& p, int a, int j0, int mk) {
  return p.causal ? std::max(0, std::min(mk, a - j0 + 1)) : mk;
}

// Base-2 logits of one tile, -inf where masked: S = Qs Kᵀ + band + gathered small terms
// (Qs = c2 · Q, tables pre-multiplied by alpha). Leaves each small term's columns in
// cols[(t · BQ + i) · BK + j] for the backward scatter; vis[i] = visible keys of row i.
template <typename T>
void tile_logits(const Plan<T>& P, int b, int h, int a0, int mq, const T* Qs, const T* RS,
                 const T* Kt, int ldkt, int j0, int mk, T* S, T* Pb, int* cols, int* vis,
                 prof::Timer& tm) {
  const CraProblem& p = P.p;
  const int D = p.D, ht = p.Ht == 1 ? 0 : h;
  mm<T>(mq, mk, D, Qs, D, 1, Kt + j0, ldkt, S, BK, false);
  tm.mark(prof::QK);
  for (const IndexPack<T>& x : P.index) {
    const int m0 = P.band_m0(x, a0, j0);
    mm<T>(mq, BANDP, D, Qs, D, 1, x.tr.data() + (size_t)ht * D * x.M + m0, x.M, Pb, BANDP, false);
    tm.mark(prof::QE);
    for (int i = 0; i < mq; ++i) {
      T* s = S + i * BK;
      const T* band = Pb + i * BANDP + (BQ - 1 - i);  // key jj reads band[jj]
#pragma omp simd
      for (int jj = 0; jj < mk; ++jj) s[jj] += band[jj];
    }
  }
  const int32_t* cb = P.coords + (int64_t)b * p.C * p.Lk;
  const bool* kpm_b = P.kpm ? P.kpm + (int64_t)b * p.Lk : nullptr;
  const int zero = P.split.ns, nsp = P.split.nsp;
  const T ninf = -std::numeric_limits<T>::infinity();
  for (int i = 0; i < mq; ++i) {
    T* s = S + i * BK;
    const int a = a0 + i, nv = visible_keys(p, a, j0, mk);
    for (size_t t = 0; t < P.split.small.size(); ++t) {
      const SmallTerm& st = P.split.small[t];
      const int32_t* hi = cb + (int64_t)st.t.ch_hi * p.Lk;
      const int32_t* lo = st.t.ch_lo >= 0 ? cb + (int64_t)st.t.ch_lo * p.Lk : hi;
      int* c = cols + (t * BQ + i) * BK;
      if (small_cols(st, hi[a], lo[a], hi + j0, lo + j0, nv, zero, c)) gather_add(c, RS + (int64_t)i * nsp, nv, s);
      else std::fill(c, c + nv, zero);
    }
    int n = nv;
    if (kpm_b != nullptr) {
      n = 0;
#pragma omp simd reduction(+ : n)
      for (int j = 0; j < nv; ++j) n += kpm_b[j0 + j] ? 0 : 1;
#pragma omp simd
      for (int j = 0; j < nv; ++j) s[j] = kpm_b[j0 + j] ? ninf : s[j];
    }
    std::fill(s + nv, s + mk, ninf);
    vis[i] = n;
  }
  tm.mark(prof::GATHER);
}

// Online-softmax update of one tile for row i; S row becomes the (dropped-out) probabilities.
template <typename T>
void softmax_row(const CraProblem& p, T* s, int mk, int nvis, int64_t bh, int qi, int j0, T& m, T& l,
                 uint8_t& seen, T* acc) {
  if (nvis == 0) {  // no visible key in this tile
    std::fill(s, s + mk, T(0));
    return;
  }
  seen = 1;
  // A NaN logit needs no test here: the max may skip it, but its exp2 is NaN, and so are l
  // and acc from then on. Only a tile whose other visible logits are all -inf must look.
  T mx = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : mx)
  for (int j = 0; j < mk; ++j) mx = std::max(mx, s[j]);
  const T m_new = m != m ? m : std::max(m, mx);
  if (m_new == -std::numeric_limits<T>::infinity()) {  // visible logits all -inf (or NaN) so far
    for (int j = 0; j < mk; ++j)
      if (s[j] != s[j]) m = s[j];
    std::fill(s, s + mk, T(0));
    return;
  }
  const T corr = exp2_approx(m - m_new);
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int j = 0; j < mk; ++j) {
    s[j] = exp2_approx(s[j] - m_new);
    sum += s[j];
  }
  l = l * corr + sum;
  m = m_new;
#pragma omp simd
  for (int d = 0; d < p.D; ++d) acc[d] *= corr;
  if (p.dropout_p > 0.0) {  // the normaliser l uses undropped probabilities
    const T keep_scale = T(1.0 / (1.0 - p.dropout_p));
    const uint32_t rh = cra_dropout_row(p.seed, (uint32_t)bh, (uint32_t)qi);
    for (int j = 0; j < mk; ++j)
      s[j] = cra_dropout_keep(rh, (uint32_t)(j0 + j), p.threshold) ? s[j] * keep_scale : T(0);
  }
}

template <typename T>
void scale_rows(int mq, int D, T c, const T* src, T* dst) {
  for (int64_t x = 0; x < (int64_t)mq * D; ++x) dst[x] = c * src[x];
}

template <typename T>
void forward_block(const Plan<T>& P, const Inputs<T>& in, int64_t bh, int qb, T* out, T* lse,
                   Scratch<T>& w, prof::Timer& tm) {
  const CraProblem& p = P.p;
  const int b = bh / p.H, h = bh % p.H, D = p.D, nsp = P.split.nsp;
  const int i0 = qb * BQ, mq = std::min(BQ, p.Lq - i0), a0 = i0 + p.Lk - p.Lq;
  const int kend = key_end(p, a0 + mq - 1);
  w.Qs.resize((size_t)BQ * D);
  w.RS.resize((size_t)BQ * nsp);
  w.S.resize((size_t)BQ * BK);
  w.Pb.resize((size_t)BQ * BANDP);
  w.acc.assign((size_t)BQ * D, T(0));
  w.m.assign(BQ, -std::numeric_limits<T>::infinity());
  w.l.assign(BQ, T(0));
  w.seen.assign(BQ, 0);
  w.cols.resize(std::max<size_t>(P.split.small.size(), 1) * BQ * BK);
  std::vector<int> vis(BQ);
  const T* Q = in.q + (bh * p.Lq + i0) * D;
  scale_rows(mq, D, P.c2, Q, w.Qs.data());
  const T* Kt = w.Kt.get(in.keys(b, h), bh, kend, p.Lk, D);
  const T* V = in.values(b, h);
  tm.mark(prof::SETUP);
  const int ht = p.Ht == 1 ? 0 : h;
  if (!P.split.small.empty())
    mm<T>(mq, nsp, D, w.Qs.data(), D, 1, P.small_t.data() + (size_t)ht * D * nsp, nsp, w.RS.data(), nsp, false);
  tm.mark(prof::QE);
  for (int j0 = 0; j0 < kend; j0 += BK) {
    const int mk = std::min(BK, p.Lk - j0);
    tile_logits(P, b, h, a0, mq, w.Qs.data(), w.RS.data(), Kt, w.Kt.ld, j0, mk, w.S.data(), w.Pb.data(),
                w.cols.data(), vis.data(), tm);
    for (int i = 0; i < mq; ++i)
      softmax_row(p, w.S.data() + i * BK, mk, vis[i], bh, i0 + i, j0, w.m[i], w.l[i], w.seen[i],
                  w.acc.data() + i * D);
    tm.mark(prof::SOFTMAX);
    mm<T>(mq, D, mk, w.S.data(), BK, 1, V + (int64_t)j0 * D, D, w.acc.data(), D, true);
    tm.mark(prof::PV);
  }
  const T ninf = -std::numeric_limits<T>::infinity(), nan = std::numeric_limits<T>::quiet_NaN();
  for (int i = 0; i < mq; ++i) {
    T* o = out + (bh * p.Lq + i0 + i) * D;
    const T* a = w.acc.data() + i * D;
    if (!w.seen[i]) {  // no visible key: zeros (and zero gradient)
      std::fill(o, o + D, T(0));
      lse[bh * p.Lq + i0 + i] = ninf;
    } else if (w.m[i] == ninf) {  // every visible logit was -inf: the reference's softmax is NaN
      std::fill(o, o + D, nan);
      lse[bh * p.Lq + i0 + i] = nan;
    } else {
      const T inv = T(1) / w.l[i];
      for (int d = 0; d < D; ++d) o[d] = a[d] * inv;
      lse[bh * p.Lq + i0 + i] = w.m[i] * T(LN2) + std::log(w.l[i]);
    }
  }
  tm.mark(prof::SOFTMAX);
}

// Table-gradient partial of one chunk: [Ht, nsp, D] for the small terms, then per index term
// [Ht, M, D] (rows as packed, before clamping), all without alpha.
template <typename T>
struct GradPartial {
  std::vector<T> small;
  std::vector<std::vector<T>> index;
  void init(const Plan<T>& P) {
    small.assign((size_t)P.p.Ht * P.split.nsp * P.p.D, T(0));
    index.resize(P.index.size());
    for (size_t x = 0; x < P.index.size(); ++x) index[x].assign((size_t)P.p.Ht * P.index[x].M * P.p.D, T(0));
  }
};

// Backward of query blocks [qb0, qb1) of one (batch, head), in order, accumulating into dK/dV
// ([Lk, D], zeroed here) and the chunk's table-gradient partial.
template <typename T>
void backward_blocks(const Plan<T>& P, const Inputs<T>& in, const T* dout, const T* out, const T* lse,
                     int64_t bh, int qb0, int qb1, T* dq, T* dK, T* dV, GradPartial<T>& g,
                     Scratch<T>& w, prof::Timer& tm) {
  const CraProblem& p = P.p;
  const int b = bh / p.H, h = bh % p.H, D = p.D, nsp = P.split.nsp, ht = p.Ht == 1 ? 0 : h;
  const T* K = in.keys(b, h);
  const T* V = in.values(b, h);
  std::fill(dK, dK + (int64_t)p.Lk * D, T(0));
  std::fill(dV, dV + (int64_t)p.Lk * D, T(0));
  w.Qs.resize((size_t)BQ * D);
  w.RS.resize((size_t)BQ * nsp);
  w.dRS.resize((size_t)BQ * nsp);
  w.S.resize((size_t)BQ * BK);
  w.dP.resize((size_t)BQ * BK);
  w.Pb.resize((size_t)BQ * BANDP);
  w.dQ.resize((size_t)BQ * D);
  w.delta.resize(BQ);
  w.lse2.resize(BQ);
  w.cols.resize(std::max<size_t>(P.split.small.size(), 1) * BQ * BK);
  std::vector<int> vis(BQ);
  const T scale = T(p.scale), keep_scale = T(1.0 / (1.0 - p.dropout_p));
  const T ninf = -std::numeric_limits<T>::infinity();
  for (int i0 = qb0 * BQ; i0 < std::min(p.Lq, qb1 * BQ); i0 += BQ) {
    const int mq = std::min(BQ, p.Lq - i0), a0 = i0 + p.Lk - p.Lq, kend = key_end(p, a0 + mq - 1);
    const T* Q = in.q + (bh * p.Lq + i0) * D;
    const T* dO = dout + (bh * p.Lq + i0) * D;
    const T* O = out + (bh * p.Lq + i0) * D;
    scale_rows(mq, D, P.c2, Q, w.Qs.data());
    for (int i = 0; i < mq; ++i) {
      T s = 0;
      for (int d = 0; d < D; ++d) s += dO[i * D + d] * O[i * D + d];
      w.delta[i] = s;
      w.lse2[i] = lse[bh * p.Lq + i0 + i] * T(LOG2E);
    }
    std::fill(w.dQ.begin(), w.dQ.end(), T(0));
    std::fill(w.dRS.begin(), w.dRS.end(), T(0));
    const T* Kt = w.Kt.get(K, bh, kend, p.Lk, D);
    const T* Vt = w.Vt.get(V, bh, kend, p.Lk, D);
    tm.mark(prof::SETUP);
    if (!P.split.small.empty())
      mm<T>(mq, nsp, D, w.Qs.data(), D, 1, P.small_t.data() + (size_t)ht * D * nsp, nsp, w.RS.data(), nsp, false);
    tm.mark(prof::QE);
    for (int j0 = 0; j0 < kend; j0 += BK) {
      const int mk = std::min(BK, p.Lk - j0);
      T *S = w.S.data(), *dP = w.dP.data();
      tile_logits(P, b, h, a0, mq, w.Qs.data(), w.RS.data(), Kt, w.Kt.ld, j0, mk, S, w.Pb.data(),
                  w.cols.data(), vis.data(), tm);
      mm<T>(mq, mk, D, dO, D, 1, Vt + j0, w.Vt.ld, dP, BK, false);
      tm.mark(prof::DP);
      for (int i = 0; i < mq; ++i) {
        T *s = S + i * BK, *dp = dP + i * BK;
        const T l2 = w.lse2[i], di = w.delta[i];
        if (l2 == ninf) {  // no visible key: no gradient
          std::fill(s, s + mk, T(0));
          std::fill(dp, dp + mk, T(0));
          continue;
        }
        if (p.dropout_p > 0.0) {  // dp: gradient w.r.t. the undropped probability
          const uint32_t rh = cra_dropout_row(p.seed, (uint32_t)bh, (uint32_t)(i0 + i));
          for (int j = 0; j < mk; ++j) {
            const bool keep = cra_dropout_keep(rh, (uint32_t)(j0 + j), p.threshold);
            const T prob = exp2_approx(std::min(s[j] - l2, T(0)));
            const bool masked = s[j] == ninf;
            const T g = keep ? dp[j] * keep_scale : T(0);
            s[j] = keep ? prob * keep_scale : T(0);  // what multiplied V
            dp[j] = masked ? T(0) : scale * prob * (g - di);
          }
          continue;
        }
#pragma omp simd
        for (int j = 0; j < mk; ++j) {
          // min(., 0): a probability is at most 1, and with logits near 1e20 the saved
          // log-sum-exp is a few ulps off; 2^(a few ulps of 1e20) would overflow.
          const T prob = exp2_approx(std::min(s[j] - l2, T(0)));
          const bool masked = s[j] == ninf;
          s[j] = prob;
          dp[j] = masked ? T(0) : scale * prob * (dp[j] - di);
        }
      }
      tm.mark(prof::DSOFTMAX);
      mm<T>(mk, D, mq, S, 1, BK, dO, D, dV + (int64_t)j0 * D, D, true);
      tm.mark(prof::DV);
      mm<T>(mq, D, mk, dP, BK, 1, K + (int64_t)j0 * D, D, w.dQ.data(), D, true);
      tm.mark(prof::DQ);
      mm<T>(mk, D, mq, dP, 1, BK, Q, D, dK + (int64_t)j0 * D, D, true);
      tm.mark(prof::DK);
      if (!P.index.empty()) {  // dS along the band's diagonals, then its two GEMMs per term
        T* dPb = w.Pb.data();
        std::fill(dPb, dPb + (size_t)BQ * BANDP, T(0));
        for (int i = 0; i < mq; ++i) {
          T* band = dPb + i * BANDP + (BQ - 1 - i);
          const T* dp = dP + i * BK;
#pragma omp simd
          for (int jj = 0; jj < mk; ++jj) band[jj] = dp[jj];
        }
        tm.mark(prof::SCATTER);
        for (size_t x = 0; x < P.index.size(); ++x) {
          const IndexPack<T>& ix = P.index[x];
          const int m0 = P.band_m0(ix, a0, j0);
          mm<T>(mq, D, BANDP, dPb, BANDP, 1, ix.rr.data() + ((size_t)ht * ix.M + m0) * D, D, w.dQ.data(), D, true);
          mm<T>(BANDP, D, mq, dPb, 1, BANDP, Q, D, g.index[x].data() + ((size_t)ht * ix.M + m0) * D, D, true);
        }
        tm.mark(prof::QE_GRAD);
      }
      for (int i = 0; i < mq; ++i) {  // dRS[i, col] += dS[i, j]
        const T* dp = dP + i * BK;
        T* drs = w.dRS.data() + (int64_t)i * nsp;
        const int nv = visible_keys(p, a0 + i, j0, mk);
        for (size_t t = 0; t < P.split.small.size(); ++t) {
          const int* c = w.cols.data() + (t * BQ + i) * BK;
          for (int j = 0; j < nv; ++j) drs[c[j]] += dp[j];
        }
      }
      tm.mark(prof::SCATTER);
    }
    if (!P.split.small.empty()) {
      mm<T>(mq, D, nsp, w.dRS.data(), nsp, 1, P.small_r.data() + (size_t)ht * nsp * D, D, w.dQ.data(), D, true);
      mm<T>(nsp, D, mq, w.dRS.data(), 1, nsp, Q, D, g.small.data() + (size_t)ht * nsp * D, D, true);
    }
    T* dQ = dq + (bh * p.Lq + i0) * D;
    std::copy(w.dQ.begin(), w.dQ.begin() + (size_t)mq * D, dQ);
    tm.mark(prof::QE_GRAD);
  }
}

// Sum of the chunks' partials (in chunk order) into dtable [Ht, N, D], times alpha.
template <typename T>
void fold_table_grad(const Plan<T>& P, const std::vector<GradPartial<T>>& parts, T* dtable) {
  const CraProblem& p = P.p;
  const T alpha = T(p.alpha);
  for (const GradPartial<T>& g : parts)
    for (int h = 0; h < p.Ht; ++h) {
      T* dt = dtable + (int64_t)h * p.N * p.D;
      for (const SmallTerm& st : P.split.small) {
        const int rows = cra_term_rows(st.t);
        const T* src = g.small.data() + ((size_t)h * P.split.nsp + st.col) * p.D;
        T* dst = dt + (int64_t)st.t.row_offset * p.D;
        for (int64_t x = 0; x < (int64_t)rows * p.D; ++x) dst[x] += alpha * src[x];
      }
      for (size_t x = 0; x < P.index.size(); ++x) {
        const IndexPack<T>& ix = P.index[x];
        const T* src = g.index[x].data() + (size_t)h * ix.M * p.D;
        for (int m = 0; m < ix.M; ++m) {
          T* dst = dt + (int64_t)(ix.t.row_offset + cra_clamp(ix.top - m, 0, ix.t.n_hi - 1)) * p.D;
          for (int d = 0; d < p.D; ++d) dst[d] += alpha * src[(int64_t)m * p.D + d];
        }
      }
    }
}

// Key tiles a query block visits (its cost, up to a constant).
inline int block_tiles(const CraProblem& p, int qb) {
  const int i0 = qb * BQ, mq = std::min(BQ, p.Lq - i0), a0 = i0 + p.Lk - p.Lq;
  return (key_end(p, a0 + mq - 1) + BK - 1) / BK;
}

// Estimated single-thread nanoseconds of a call (for the thread policy): per query-key pair of
// the visited tiles, plus the small-term products per query.
inline double call_work(const CraProblem& p, int nsp, double per_pair) {
  const int nqb = (p.Lq + BQ - 1) / BQ;
  double tiles = 0;
  for (int qb = 0; qb < nqb; ++qb) tiles += block_tiles(p, qb);
  const double pairs = tiles * BQ * BK * (double)p.B * p.H;
  return pairs * per_pair * (1.0 + p.D / 64.0) + (double)p.B * p.H * p.Lq * nsp * p.D * 0.02;
}

template <typename T>
Inputs<T> inputs_of(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  return {q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(), k.stride(0), k.stride(1), v.stride(0), v.stride(1)};
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
  const int64_t ntasks = (int64_t)p.B * p.H * nqb;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "circular_relative_attention_cpu", [&] {
    using T = scalar_t;
    prof::Timer tm0(0);
    const Plan<T> P(p, table.data_ptr<T>(), coords.data_ptr<int32_t>(),
                    kpm.has_value() ? kpm->data_ptr<bool>() : nullptr, false);
    tm0.mark(prof::SETUP);
    const auto in = inputs_of<T>(q, k, v);
    T *o = out.data_ptr<T>(), *l = lse.data_ptr<T>();
    const int nt = threads_for(call_work(p, P.split.nsp, 1.0));
    // Chunks: contiguous task ranges (blocks of one (batch, head) stay together, so a thread
    // packs each K once), several per thread for dynamic balance.
    const int64_t nchunks = nt == 1 ? 1 : std::min<int64_t>(ntasks, 4 * nt);
    run_chunks(nchunks, nt, [&](int64_t c, int slot) {
      prof::Timer tm(slot);
      Scratch<T> w;
      for (int64_t task = c * ntasks / nchunks; task < (c + 1) * ntasks / nchunks; ++task)
        forward_block<T>(P, in, task / nqb, task % nqb, o, l, w, tm);
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
  auto dtable = at::zeros(table.sizes(), table.options());
  const int64_t BH = (int64_t)p.B * p.H;
  const int nqb = (p.Lq + BQ - 1) / BQ;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "circular_relative_attention_backward_cpu", [&] {
    using T = scalar_t;
    prof::Timer tm0(0);
    const Plan<T> P(p, table.data_ptr<T>(), coords.data_ptr<int32_t>(),
                    kpm.has_value() ? kpm->data_ptr<bool>() : nullptr, true);
    const int nt = threads_for(call_work(p, P.split.nsp, 3.0));
    // Work units: whole (batch, head) pairs when there are enough of them, else each pair's
    // query blocks split into G groups of about equal cost; groups after the first accumulate
    // dK/dV into partial buffers, summed in group order.
    const int G = (nt == 1 || BH >= 2 * nt) ? 1 : (int)std::min<int64_t>(nqb, (2 * nt + BH - 1) / BH);
    std::vector<int> bounds(G + 1, 0);  // group g of a pair: blocks [bounds[g], bounds[g + 1])
    {
      std::vector<double> cum(nqb + 1, 0.0);
      for (int qb = 0; qb < nqb; ++qb) cum[qb + 1] = cum[qb] + block_tiles(p, qb);
      for (int g = 1; g < G; ++g) {
        int qb = bounds[g - 1];
        while (qb < nqb && cum[qb] < cum[nqb] * g / G) ++qb;
        bounds[g] = qb;
      }
      bounds[G] = nqb;
    }
    const int64_t nunits = BH * G;
    const int64_t nchunks = nt == 1 ? 1 : std::min<int64_t>(nunits, 2 * nt);
    auto kv_partial = at::zeros({2, G - 1, BH, p.Lk, p.D}, q.options());
    std::vector<GradPartial<T>> parts(nchunks);
    tm0.mark(prof::SETUP);
    const auto in = inputs_of<T>(q, k, v);
    const T *dO = dout_c.data_ptr<T>(), *O = out_c.data_ptr<T>(), *L = lse_c.data_ptr<T>();
    T *kvp = kv_partial.data_ptr<T>(), *dqp = dq.data_ptr<T>();
    const int64_t kv_size = (int64_t)p.Lk * p.D, kvp_stride = (int64_t)(G - 1) * BH * kv_size;
    run_chunks(nchunks, nt, [&](int64_t c, int slot) {
      prof::Timer tm(slot);
      Scratch<T> w;
      parts[c].init(P);
      for (int64_t u = c * nunits / nchunks; u < (c + 1) * nunits / nchunks; ++u) {
        const int64_t bh = u / G;
        const int g = u % G;
        T *dK = dk.data_ptr<T>() + bh * kv_size, *dV = dv.data_ptr<T>() + bh * kv_size;
        if (g > 0) {
          dK = kvp + ((int64_t)(g - 1) * BH + bh) * kv_size;
          dV = dK + kvp_stride;
        }
        backward_blocks<T>(P, in, dO, O, L, bh, bounds[g], bounds[g + 1], dqp, dK, dV, parts[c], w, tm);
      }
    });
    prof::Timer tm1(0);
    fold_table_grad(P, parts, dtable.data_ptr<T>());
    if (G > 1) {
      dk += kv_partial[0].sum(0).view_as(dk);
      dv += kv_partial[1].sum(0).view_as(dv);
    }
    tm1.mark(prof::MERGE);
  });
  return {dq, dk, dv, dtable};
}

std::tuple<std::vector<double>, std::vector<std::string>> cra_cpu_profile(bool enable) {
  std::vector<std::string> names;
  for (int ph = 0; ph < prof::N_PHASES; ++ph) names.push_back(prof::phase_name(ph));
  return {prof::read_and_reset(enable), names};
}

}  // namespace

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
