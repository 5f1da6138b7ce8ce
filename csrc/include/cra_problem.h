// Checks of the raw op arguments and their unpacking into a CraProblem, shared by the CPU
// kernels and the CUDA glue (host code with torch headers). The Python layer validates the
// user-facing arguments; these checks keep direct torch.ops calls from reading out of bounds.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

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

inline CraProblem cra_make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& table, const at::Tensor& coords,
                                   at::IntArrayRef terms, double alpha, double scale, bool causal,
                                   const std::optional<at::Tensor>& kpm, double dropout_p,
                                   int64_t seed) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be 4-D [B, H, L, D]");
  CraProblem p;
  p.B = q.size(0); p.H = q.size(1); p.Lq = q.size(2); p.D = q.size(3); p.Lk = k.size(2);
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
  p.Ht = table.size(0); p.N = table.size(1);
  TORCH_CHECK(coords.dim() == 3 && coords.size(0) == p.B && coords.size(2) == p.Lk &&
              coords.scalar_type() == at::kInt && coords.is_contiguous(),
              "coords must be contiguous int32 [B, C, Lk]");
  p.C = coords.size(1);
  TORCH_CHECK(terms.size() % CRA_TERM_INTS == 0 && terms.size() / CRA_TERM_INTS <= CRA_MAX_TERMS,
              "terms must hold ", CRA_TERM_INTS, " ints per term and at most ", CRA_MAX_TERMS, " terms");
  p.terms.n = terms.size() / CRA_TERM_INTS;
  for (int t = 0; t < p.terms.n; ++t) {
    const int64_t* s = terms.data() + t * CRA_TERM_INTS;
    CraTerm& x = p.terms.t[t];
    x = CraTerm{(int)s[0], (int)s[1], (int)s[2], (int)s[3], (int)s[4], (int)s[5], (int)s[6], (int)s[7], (int)s[8]};
    TORCH_CHECK(x.kind >= CRA_KIND_INDEX && x.kind <= CRA_KIND_FIELDS, "terms: bad kind ", x.kind);
    TORCH_CHECK(x.part >= CRA_PART_COMBINED && x.part <= CRA_PART_LO, "terms: bad part ", x.part);
    TORCH_CHECK(x.n_hi >= 1 && x.n_lo >= 1, "terms: a factor has no rows");
    const bool uses_lo = x.kind == CRA_KIND_QUOTIENT || x.kind == CRA_KIND_FIELDS;
    TORCH_CHECK(x.kind == CRA_KIND_INDEX || (x.ch_hi >= 0 && x.ch_hi < p.C), "terms: bad hi channel");
    TORCH_CHECK(!uses_lo || (x.ch_lo >= 0 && x.ch_lo < p.C), "terms: bad lo channel");
    TORCH_CHECK(x.kind != CRA_KIND_QUOTIENT || x.param >= 1, "terms: quotient period must be >= 1");
    TORCH_CHECK(x.row_offset >= 0 && (int64_t)x.row_offset + cra_term_rows(x) <= p.N,
                "terms: term rows exceed the table");
  }
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
