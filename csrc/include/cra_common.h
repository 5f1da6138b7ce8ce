// Circular relative attention: the term encoding and per-pair index rules shared by the
// CPU, CUDA and (mirrored in Python) Triton kernels. Plain C++ usable from nvcc without
// torch headers. Must match fastattn/ops/_cra_terms.py and fastattn/ops/_dropout.py.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define CRA_HD __host__ __device__ __forceinline__
#else
#define CRA_HD inline
#endif

enum CraKind { CRA_KIND_INDEX = 0, CRA_KIND_DIRECT = 1, CRA_KIND_QUOTIENT = 2, CRA_KIND_FIELDS = 3 };
enum CraPart { CRA_PART_COMBINED = 0, CRA_PART_HI = 1, CRA_PART_LO = 2 };

#define CRA_TERM_INTS 9
#define CRA_MAX_TERMS 8

// One relative term: how a (query, key) pair selects a row of the concatenated table.
struct CraTerm {
  int kind, part;
  int ch_hi, ch_lo;  // coordinate channels (coords[b, ch, position]); -1 = unused
  int param;         // QUOTIENT: period R (borrow on negative remainder); FIELDS: lo offset
  int hi_min;        // subtracted before clamping the hi (or only) index
  int n_hi, n_lo;    // rows of the hi / lo factor (n_lo = 1 for INDEX and DIRECT)
  int row_offset;    // first row of this term's block in the concatenated table
};

struct CraTerms {
  int n;
  CraTerm t[CRA_MAX_TERMS];
};

CRA_HD int cra_clamp(int x, int lo, int hi) { return x < lo ? lo : (x > hi ? hi : x); }

// Rows this term occupies in the concatenated table.
CRA_HD int cra_term_rows(const CraTerm& t) {
  if (t.kind == CRA_KIND_INDEX || t.kind == CRA_KIND_DIRECT) return t.n_hi;
  if (t.part == CRA_PART_HI) return t.n_hi;
  if (t.part == CRA_PART_LO) return t.n_lo;
  return t.n_hi * t.n_lo;
}

// Row of the concatenated table for one pair, or -1 when a coordinate is missing.
// dn = a_i - j; hq/lq and hk/lk are the query's and the key's hi/lo channel values.
// Every index is clamped, so no coordinate value can make a kernel read out of bounds.
CRA_HD int cra_term_row(const CraTerm& t, int dn, int hq, int lq, int hk, int lk) {
  if (t.kind == CRA_KIND_INDEX) return t.row_offset + cra_clamp(dn - t.hi_min, 0, t.n_hi - 1);
  if (hq < 0 || hk < 0) return -1;
  if (t.kind == CRA_KIND_DIRECT) return t.row_offset + cra_clamp(hq - hk - t.hi_min, 0, t.n_hi - 1);
  int dh = hq - hk, dl;
  if (t.kind == CRA_KIND_QUOTIENT) {
    // (hi, lo) = (c // R, c % R) per token, so floor((cq - ck) / R) = dh - borrow.
    dl = lq - lk;
    if (dl < 0) { dl += t.param; dh -= 1; }
  } else {  // FIELDS: per-token bar and position; lo offset shifts Δposition to >= 0
    if (lq < 0 || lk < 0) return -1;
    dl = lq - lk + t.param;
  }
  const int hi = cra_clamp(dh - t.hi_min, 0, t.n_hi - 1);
  const int lo = cra_clamp(dl, 0, t.n_lo - 1);
  if (t.part == CRA_PART_HI) return t.row_offset + hi;
  if (t.part == CRA_PART_LO) return t.row_offset + lo;
  return t.row_offset + hi * t.n_lo + lo;
}

// Counter-based dropout: keep/drop of (seed, b*H + h, i, j) without stored state.
CRA_HD uint32_t cra_mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x2C1B3C6Du;
  x ^= x >> 16;
  return x;
}

CRA_HD uint32_t cra_dropout_row(uint32_t seed, uint32_t bh, uint32_t i) {
  return cra_mix32(cra_mix32(seed ^ cra_mix32(bh + 0x9E3779B9u)) + i);
}

CRA_HD bool cra_dropout_keep(uint32_t row_hash, uint32_t j, uint32_t threshold) {
  return (cra_mix32(row_hash + j) >> 8) >= threshold;
}

// floor(p * 2^24), as in fastattn/ops/_dropout.py (exact: scaling by a power of two).
CRA_HD uint32_t cra_dropout_threshold(double p) {
  const double t = p * 16777216.0;
  return t >= 16777216.0 ? 16777216u : (uint32_t)t;
}
