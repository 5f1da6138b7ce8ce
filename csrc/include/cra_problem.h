// Checks of the raw op arguments and their unpacking into a CraProblem, shared by the CPU
// kernels and the CUDA glue (host code with torch headers). The Python layer validates the
// user-facing arguments; these checks keep direct torch.ops calls from reading out of bounds.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdlib>
#include <optional>
#include <vector>

#include "check_bounds.h"
#include "cra_common.h"

namespace fastattn {

struct CraProblem {
  int B, H, Lq, Lk, D;
  int N;   // rows of the concatenated table
  int Ht;  // 1 (shared table) or H (per-head)
  int C;   // coordinate channels
  CraTerms terms;
  double alpha, scale, dropout_p;
  bool causal;
  uint32_t seed, threshold;
};

// Limits of the raw op's integers, chosen so that every difference the kernels form in int32
// (query minus key coordinate, minus hi_min, plus the fields offset or the period) stays in
// int32: coordinate values in [-CRA_SHIFT_MAX, CRA_COORD_MAX] (negative = missing), |hi_min|
// and the fields offset at most CRA_SHIFT_MAX, quotient periods in [1, CRA_COORD_MAX]. The
// Python layer (fastattn/ops/_cra_terms.py) enforces these limits (and -1 as the only missing
// value) on the user-facing arguments.
constexpr int64_t CRA_COORD_MAX = int64_t(1) << 30;
constexpr int64_t CRA_SHIFT_MAX = (int64_t(1) << 30) - 1;

// One term's CRA_TERM_INTS integers, checked in int64 against the problem (C channels,
// N table rows, Lk keys) before narrowing to the kernels' int32 CraTerm. Integers a kind does
// not use must hold their neutral values (channel -1, param 0, n_lo 1, part COMBINED), so no
// kernel can read an unchecked channel.
inline CraTerm cra_check_term(const int64_t* s, int t, int C, int N, int Lk) {
  CraTerm x;
  x.kind = checked_int32(s[0], CRA_KIND_INDEX, CRA_KIND_FIELDS, "terms: bad kind", t);
  const bool decomposed = x.kind == CRA_KIND_QUOTIENT || x.kind == CRA_KIND_FIELDS;
  x.part = checked_int32(s[1], CRA_PART_COMBINED, decomposed ? CRA_PART_LO : CRA_PART_COMBINED,
                         "terms: bad part", t);
  x.ch_hi = x.kind == CRA_KIND_INDEX ? checked_int32(s[2], -1, -1, "terms: bad hi channel (unused by an index term)", t)
                                     : checked_int32(s[2], 0, int64_t(C) - 1, "terms: bad hi channel", t);
  x.ch_lo = decomposed ? checked_int32(s[3], 0, int64_t(C) - 1, "terms: bad lo channel", t)
                       : checked_int32(s[3], -1, -1, "terms: bad lo channel (unused by index and direct terms)", t);
  if (x.kind == CRA_KIND_QUOTIENT)
    x.param = checked_int32(s[4], 1, CRA_COORD_MAX, "terms: quotient period", t);
  else if (x.kind == CRA_KIND_FIELDS)
    x.param = checked_int32(s[4], -CRA_SHIFT_MAX, CRA_SHIFT_MAX, "terms: fields lo offset", t);
  else
    x.param = checked_int32(s[4], 0, 0, "terms: param (unused by index and direct terms)", t);
  x.hi_min = checked_int32(s[5], -CRA_SHIFT_MAX, CRA_SHIFT_MAX, "terms: hi_min", t);
  x.n_hi = checked_int32(s[6], 1, kInt32Max, "terms: n_hi (a factor has no rows if < 1)", t);
  x.n_lo = checked_int32(s[7], 1, decomposed ? kInt32Max : 1, "terms: n_lo (a factor has no rows if < 1)", t);
  int64_t rows = x.n_hi;  // int64: n_hi * n_lo of two int32 values cannot overflow
  if (decomposed)
    rows = x.part == CRA_PART_HI ? x.n_hi : (x.part == CRA_PART_LO ? x.n_lo : int64_t(x.n_hi) * x.n_lo);
  TORCH_CHECK(rows <= N, "terms: term rows exceed the table (term ", t, " has ", rows, " rows, the table ", N, ")");
  x.row_offset = checked_int32(s[8], 0, N - rows, "terms: term rows exceed the table: row_offset", t);
  if (x.kind == CRA_KIND_INDEX)  // the index runs form (a - j) - hi_min -/+ (n_hi - 1) in int32
    TORCH_CHECK(int64_t(Lk) + std::abs(int64_t(x.hi_min)) + x.n_hi <= kInt32Max,
                "terms: index term (term ", t, "): Lk + |hi_min| + n_hi must fit in int32");
  return x;
}

// Coordinate values of CPU tensors are checked here (one min/max pass over the [B, C, Lk]
// ints, which may be strided over B and C with dense rows (a KV cache's channels): no
// allocation, small next to attention). CUDA coordinates are not read back (that would cost a
// device sync per call): there an out-of-range value cannot index out of bounds (every row is
// clamped) but its differences may wrap; the Python layer checks them.
inline void cra_check_coord_values(const at::Tensor& coords) {
  if (!coords.device().is_cpu() || coords.numel() == 0) return;
  TORCH_INTERNAL_ASSERT(coords.dim() == 3 && (coords.stride(2) == 1 || coords.size(2) == 1));
  const int32_t* base = coords.data_ptr<int32_t>();
  int32_t lo = base[0], hi = base[0];
  for (int64_t b = 0; b < coords.size(0); ++b)
    for (int64_t c = 0; c < coords.size(1); ++c) {
      const int32_t* row = base + b * coords.stride(0) + c * coords.stride(1);
      const int64_t n = coords.size(2);
      int32_t rlo = row[0], rhi = row[0];  // one reduction per loop: vectorises (a decoding step reads B·C·Lk)
#pragma omp simd reduction(min : rlo)
      for (int64_t j = 0; j < n; ++j) rlo = std::min(rlo, row[j]);
#pragma omp simd reduction(max : rhi)
      for (int64_t j = 0; j < n; ++j) rhi = std::max(rhi, row[j]);
      lo = std::min(lo, rlo);
      hi = std::max(hi, rhi);
    }
  TORCH_CHECK(lo >= -CRA_SHIFT_MAX && hi <= CRA_COORD_MAX, "coords values must be in [", -CRA_SHIFT_MAX, ", ",
              CRA_COORD_MAX, "] (negative = missing), got values in [", lo, ", ", hi, "]");
}

// ``coord_values``: the tensor whose values are checked when ``coords`` is a contiguous-shaped
// view of strided memory (the decoding op); by default ``coords`` itself.
inline CraProblem cra_make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& table, const at::Tensor& coords,
                                   at::IntArrayRef terms, double alpha, double scale, bool causal,
                                   const std::optional<at::Tensor>& kpm, double dropout_p,
                                   int64_t seed, const at::Tensor* coord_values = nullptr) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be 4-D [B, H, L, D]");
  CraProblem p;
  p.B = checked_size(q.size(0), "q: B");
  p.H = checked_size(q.size(1), "q: H");
  p.Lq = checked_size(q.size(2), "q: Lq");
  p.D = checked_size(q.size(3), "q: D");
  p.Lk = checked_size(k.size(2), "k: Lk");
  TORCH_CHECK(k.size(0) == p.B && k.size(1) == p.H && k.size(3) == p.D, "k: B, H, D must match q");
  TORCH_CHECK(v.sizes() == k.sizes(), "v must have the shape of k");
  TORCH_CHECK(p.Lq <= p.Lk, "q: Lq must be <= Lk");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type() &&
              table.scalar_type() == q.scalar_type(), "q, k, v, table must share a dtype");
  TORCH_CHECK(q.is_contiguous() && table.is_contiguous(), "q and table must be contiguous");
  for (const auto* t : {&k, &v})  // KV-cache slices: strided over batch/head, dense rows
    TORCH_CHECK((t->stride(3) == 1 || p.D == 1) && (t->stride(2) == p.D || p.Lk == 1),
                "k and v must have dense [Lk, D] rows (stride(2) == D, stride(3) == 1)");
  TORCH_CHECK(table.dim() == 3 && table.size(2) == p.D && (table.size(0) == 1 || table.size(0) == p.H),
              "table must be [1 or H, N, D]");
  p.Ht = table.size(0);
  p.N = checked_size(table.size(1), "table: N");
  TORCH_CHECK(coords.dim() == 3 && coords.size(0) == p.B && coords.size(2) == p.Lk &&
              coords.scalar_type() == at::kInt && coords.is_contiguous(),
              "coords must be contiguous int32 [B, C, Lk]");
  p.C = checked_size(coords.size(1), "coords: C");
  TORCH_CHECK(terms.size() % CRA_TERM_INTS == 0 && terms.size() / CRA_TERM_INTS <= CRA_MAX_TERMS,
              "terms must hold ", CRA_TERM_INTS, " ints per term and at most ", CRA_MAX_TERMS, " terms");
  p.terms.n = terms.size() / CRA_TERM_INTS;
  int64_t all_rows = 0;  // kernels sum the rows of all terms in int32
  for (int t = 0; t < p.terms.n; ++t) {
    const CraTerm& x = p.terms.t[t] = cra_check_term(terms.data() + t * CRA_TERM_INTS, t, p.C, p.N, p.Lk);
    all_rows += cra_term_rows(x);
    // Disjoint row blocks (as assembled): the kernels accumulate each term's table gradient
    // over its own block, so a shared row would be counted twice.
    for (int u = 0; u < t; ++u) {
      const CraTerm& y = p.terms.t[u];
      TORCH_CHECK(x.row_offset >= y.row_offset + cra_term_rows(y) || y.row_offset >= x.row_offset + cra_term_rows(x),
                  "terms: row blocks overlap (terms ", u, " and ", t, " share table rows)");
    }
  }
  TORCH_CHECK(all_rows <= kInt32Max, "terms: the rows of all terms together must fit in int32");
  cra_check_coord_values(coord_values != nullptr ? *coord_values : coords);
  if (kpm.has_value()) {
    TORCH_CHECK(kpm->scalar_type() == at::kBool && kpm->dim() == 2 && kpm->size(0) == p.B &&
                kpm->size(1) == p.Lk && kpm->is_contiguous(), "key_padding_mask must be contiguous bool [B, Lk]");
  }
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p must be in [0, 1)");
  p.alpha = alpha; p.scale = scale; p.causal = causal; p.dropout_p = dropout_p;
  p.seed = (uint32_t)(seed & 0xFFFFFFFF);
  p.threshold = cra_dropout_threshold(dropout_p);
  for (const auto* t : {&k, &v, &table, &coords})
    TORCH_CHECK(t->device() == q.device(), "all tensors must be on q's device");
  return p;
}

}  // namespace fastattn
