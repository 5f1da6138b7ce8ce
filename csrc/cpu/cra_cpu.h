// Building blocks shared by the CPU attention kernels (training forward/backward and decoding):
// how a relative term turns a (query, key) pair into a column of the per-query q·E products,
// the softmax exponential, and the packed layouts of the relative tables.
//
// Conventions. Logits are kept in base 2: S = c · (q·k + alpha · relative) with
// c = scale · log2(e), so the softmax uses exp2 and the saved log-sum-exp is converted back to
// natural units. The table rows of the non-index terms ("small" terms: time and pitch) are
// packed once per call as columns of a [D, NS] matrix (pre-multiplied by alpha), followed by one
// zero column that pairs with a missing coordinate read, so gathers need no branch. A pair's
// column is computed from O(1) per-token coordinates, never stored for the whole L × L.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "cra_common.h"

namespace fastattn::cpu {

constexpr double LOG2E = 1.4426950408889634;
constexpr double LN2 = 0.6931471805599453;

inline int round_up(int x, int m) { return (x + m - 1) / m * m; }

// 2^x for softmax arguments (x <= 0 in practice): a Cephes-style polynomial (rel. error ~2e-7)
// written so that loops over it vectorise. -inf gives exactly 0 and NaN stays NaN.
inline float exp2_approx(float x) {
  float t = std::min(std::max(x, -127.0f), 127.0f);
  t = x == x ? t : 0.0f;  // NaN: any finite t, so that the integer conversion below is defined
  // Round to nearest by the 1.5 · 2^23 trick: std::floor does not vectorise without
  // -fno-trapping-math (GCC 12), and an unvectorised exp made the softmax 5x slower.
  const float n = (t + 12582912.0f) - 12582912.0f;
  const float f = t - n;  // in [-0.5, 0.5]; p(f) ~ 2^f (coefficients ~ ln(2)^k / k!)
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  // 2^n from its exponent bits (a bit cast, not memcpy, which stops GCC vectorising the loop)
  const float r = p * __builtin_bit_cast(float, ((int32_t)n + 127) << 23);
  return x < -127.0f ? 0.0f : (x == x ? r : x);
}
inline double exp2_approx(double x) { return std::exp2(x); }

// A non-index term with its rows located in the packed small-table columns.
struct SmallTerm {
  CraTerm t;  // kind, part, channels, param, hi_min, n_hi, n_lo (row_offset unused)
  int col;    // first packed column of this term's rows
};

// Packed columns of the small terms' rows for query position a against keys j0 .. j0+n-1:
// cols[j] = column, or `zero` (a column of zeros) where the key's coordinate is missing.
// Returns false when the query's own coordinate is missing (the term adds nothing to the row).
// hi_k/lo_k point at the keys' channel values for j0; hq/lq are the query's.
inline bool small_cols(const SmallTerm& st, int hq, int lq, const int32_t* hi_k, const int32_t* lo_k,
                       int n, int zero, int* cols) {
  const CraTerm& t = st.t;
  if (hq < 0 || (t.kind == CRA_KIND_FIELDS && lq < 0)) return false;
  // cra_term_row, specialised per kind, with the part folded into two multipliers so that the
  // loops have no branches.
  const int off = st.col, hmin = t.hi_min, hlast = t.n_hi - 1, llast = t.n_lo - 1;
  if (t.kind == CRA_KIND_DIRECT) {
#pragma omp simd
    for (int j = 0; j < n; ++j) cols[j] = hi_k[j] < 0 ? zero : off + cra_clamp(hq - hi_k[j] - hmin, 0, hlast);
    return true;
  }
  const int mul_hi = t.part == CRA_PART_COMBINED ? t.n_lo : (t.part == CRA_PART_HI ? 1 : 0);
  const int mul_lo = t.part == CRA_PART_HI ? 0 : 1;
  if (t.kind == CRA_KIND_QUOTIENT) {
    const int R = t.param;
#pragma omp simd
    for (int j = 0; j < n; ++j) {
      const int borrow = lq < lo_k[j] ? 1 : 0;
      const int hi = cra_clamp(hq - hi_k[j] - borrow - hmin, 0, hlast);
      const int lo = cra_clamp(lq - lo_k[j] + borrow * R, 0, llast);
      cols[j] = hi_k[j] < 0 ? zero : off + hi * mul_hi + lo * mul_lo;
    }
    return true;
  }
#pragma omp simd
  for (int j = 0; j < n; ++j) {  // FIELDS
    const int hi = cra_clamp(hq - hi_k[j] - hmin, 0, hlast);
    const int lo = cra_clamp(lq - lo_k[j] + t.param, 0, llast);
    cols[j] = (hi_k[j] < 0 || lo_k[j] < 0) ? zero : off + hi * mul_hi + lo * mul_lo;
  }
  return true;
}

// s[j] += rs[cols[j]] (a gather; missing pairs read the zero column).
template <typename T>
inline void gather_add(const int* cols, const T* rs, int n, T* s) {
#pragma omp simd
  for (int j = 0; j < n; ++j) s[j] += rs[cols[j]];
}

// The terms of a problem split into index terms and small terms, with the small terms' rows
// given packed columns [0, ns) and the zero column ns; nsp = ns + 1 rounded up to 16.
struct TermSplit {
  std::vector<CraTerm> index;
  std::vector<SmallTerm> small;
  int ns = 0, nsp = 16;
};

inline TermSplit split_terms(const CraTerms& terms) {
  TermSplit s;
  for (int i = 0; i < terms.n; ++i) {
    const CraTerm& t = terms.t[i];
    if (t.kind == CRA_KIND_INDEX) {
      s.index.push_back(t);
    } else {
      s.small.push_back({t, s.ns});
      s.ns += cra_term_rows(t);
    }
  }
  s.nsp = round_up(s.ns + 1, 16);
  return s;
}

// small_t[h] = mul · (small terms' rows)ᵀ as [D, nsp] (zero columns from ns on);
// small_r[h] = the same rows [nsp, D] (zero rows from ns on). table is [Ht, N, D].
template <typename T>
void pack_small(const TermSplit& s, const T* table, int Ht, int N, int D, T mul, std::vector<T>& small_t,
                std::vector<T>& small_r) {
  small_t.assign((size_t)Ht * D * s.nsp, T(0));
  small_r.assign((size_t)Ht * s.nsp * D, T(0));
  for (int h = 0; h < Ht; ++h) {
    T* pt = small_t.data() + (size_t)h * D * s.nsp;
    T* pr = small_r.data() + (size_t)h * s.nsp * D;
    for (const SmallTerm& st : s.small) {
      const T* src = table + ((int64_t)h * N + st.t.row_offset) * D;
      const int rows = cra_term_rows(st.t);
      for (int r = 0; r < rows; ++r)
        for (int d = 0; d < D; ++d) {
          const T x = mul * src[(int64_t)r * D + d];
          pt[(int64_t)d * s.nsp + st.col + r] = x;
          pr[(int64_t)(st.col + r) * D + d] = x;
        }
    }
  }
}

}  // namespace fastattn::cpu
