// Circular relative attention on CUDA: the raw-pointer interface between the kernels
// (csrc/cuda/circular_relative_attention.cu, compiled by nvcc without torch) and the torch side
// (csrc/include/cra_cuda_torch.h, used by the real glue and by the CPU emulator's wrapper).
//
// Everything here is plain C++ (no torch, no CUDA headers): the argument struct the kernels
// read, the host-side classification of relative terms, and the tile/shared-memory/workspace
// plan. The plan is a pure function of the shapes, the dtype and the device's shared-memory
// limit, so the same inputs always run the same blocks in the same order (determinism).
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "cra_common.h"

namespace fastattn {
namespace cra_cuda {

enum Dtype { F32 = 0, F16 = 1, BF16 = 2 };

constexpr int kThreads = 128;  // 4 warps per block, every kernel
// __launch_bounds__(kThreads, kMinBlocks) on the attention kernels: without a minimum, ptxas
// aims at fewer registers (56-96) and spills a few values (8-44 bytes); with it, up to 255
// registers, no spills (bench/gpu_resources.py). Shared memory limits these kernels to one or
// two blocks per SM anyway.
constexpr int kMinBlocks = 2;
constexpr int kMaxD = 256;     // head dims: multiples of 16 up to this (tested: 16, 32, 64, 128)

// A term gathered from the per-query-tile products RS = Q · E_smallᵀ (every term except the
// band-handled index term). Its table rows [t.row_offset, +rows) are RS columns [rs_off, +rows).
struct SmallTerm {
  CraTerm t;
  int rs_off;
};

// What every kernel reads (passed by value). Element strides; pointers are device pointers.
struct Args {
  int B, H, Lq, Lk, D, N, Ht, C;
  int64_t k_sb, k_sh, v_sb, v_sh;  // k/v strides over batch and head (rows are dense)
  float alpha, scale, keep_scale;
  int causal, dropout;
  int vec;  // every row the kernels copy (q, k, v, table, dout) starts 16-byte aligned
  uint32_t seed, threshold;
  // The first INDEX term: its rows for a (query tile, key tile) pair are a band of consecutive Δn.
  int has_band;
  CraTerm band;
  int n_small;
  SmallTerm small[CRA_MAX_TERMS];
  int small_rows;  // sum of the small terms' rows (RS columns in use)
  const void *q, *k, *v, *table;
  const int32_t* coords;       // [B, C, Lk]
  const unsigned char* kpm;    // [B, Lk] (bool) or null
};

inline int round16(int x) { return (x + 15) / 16 * 16; }
inline size_t align128(size_t x) { return (x + 127) / 128 * 128; }
inline int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Fills the term part of Args from the problem's terms. Returns an error message or nullptr.
// Term row blocks must be disjoint (fastattn/ops/_cra_terms.py concatenates them): the backward
// scatter gives each (query row, term) to one thread.
inline const char* classify_terms(const CraTerms& terms, Args& a) {
  a.has_band = 0;
  a.n_small = 0;
  a.small_rows = 0;
  for (int i = 0; i < terms.n; ++i) {
    const CraTerm& t = terms.t[i];
    const int lo = t.row_offset, hi = t.row_offset + cra_term_rows(t);
    for (int j = 0; j < i; ++j) {
      const int lo2 = terms.t[j].row_offset, hi2 = lo2 + cra_term_rows(terms.t[j]);
      if (lo < hi2 && lo2 < hi) return "terms: row blocks overlap (the CUDA kernels need disjoint term rows)";
    }
    if (t.kind == CRA_KIND_INDEX && !a.has_band) {
      a.has_band = 1;
      a.band = t;
      continue;
    }
    a.small[a.n_small].t = t;
    a.small[a.n_small].rs_off = a.small_rows;
    a.small_rows += cra_term_rows(t);
    ++a.n_small;
  }
  return nullptr;
}

// Leading dimensions (elements) of shared tiles: padded to spread rows over banks; still
// multiples of 16 bytes and, times 16 rows, of 32 bytes, as WMMA loads need.
inline int ld_elem(int cols, int elem_size) { return cols + (elem_size == 2 ? 8 : 4); }
inline int ld_f32(int cols) { return cols + 4; }

// Tiles and shared-memory layout of the forward or backward kernel (byte offsets).
struct Plan {
  int BQ, BK, BANDP, SP, CH;  // query rows, keys per tile, band rows, small columns, staging chunk
  int ldT, ldS, ldB, ldR, ldD;  // T tiles [*, D]; fp32 [BQ, BK]; band [BQ, BANDP]; RS [BQ, SP]; fp32 [*, D]
  int ldPT, ldBT, ldCT;         // T copies of [BQ, BK], [BQ, BANDP] and [BQ, CH]
  int ESTG;                     // rows of the table staging buffer
  size_t q, dout, k, v, e, s, dp, pt, dst, qe, o, rs, drs, qc, kc, km, stats, terms, smem;
  int nqt, nkt;                 // query tiles, key tiles
  int splits, tiles_per_split;  // forward: split-K over key tiles (decoding)
  int G;                        // backward: groups of query tiles (blocks per (b, h))
  int NDN, DN0;                 // backward: Δn rows of the index-band gradient scratch, first Δn
  size_t ws_floats;             // workspace the caller allocates (fp32 elements)
  size_t ws_dk, ws_dv, ws_ddn, ws_dsmall;  // backward workspace offsets (floats)
  size_t ws_o, ws_m, ws_l;                 // forward split workspace offsets (floats)
};

inline void layout(const Args& a, int elem, bool backward, int BQ, int BK, Plan& p) {
  p.BQ = BQ;
  p.BK = BK;
  p.BANDP = a.has_band ? round16(BQ + BK - 1) : 0;
  p.SP = round16(a.small_rows);
  // Staging rows for table rows: the band, or chunks of CH small-term rows (a [BQ, CH] T copy
  // of dRS must fit in the fp32 [BQ, BK] score buffer, hence CH <= BK). All multiples of 16.
  const int small_chunk = p.SP < 64 ? p.SP : 64;
  p.ESTG = p.BANDP > small_chunk ? p.BANDP : small_chunk;
  p.CH = p.SP > 0 ? (small_chunk < BK ? small_chunk : BK) : 0;
  const int D = a.D;
  p.ldT = ld_elem(D, elem);
  p.ldS = ld_f32(BK);
  p.ldB = ld_f32(p.BANDP);
  p.ldR = ld_f32(p.SP);
  p.ldD = ld_f32(D);
  p.ldPT = ld_elem(BK, elem);
  p.ldBT = ld_elem(p.BANDP, elem);
  p.ldCT = ld_elem(p.CH, elem);
  size_t off = 0;
  auto take = [&](size_t bytes) { const size_t at = off; off = align128(off + bytes); return at; };
  p.q = take((size_t)BQ * p.ldT * elem);
  p.dout = backward ? take((size_t)BQ * p.ldT * elem) : 0;
  p.k = take((size_t)BK * p.ldT * elem);
  p.v = take((size_t)BK * p.ldT * elem);
  p.e = take((size_t)p.ESTG * p.ldT * elem);
  p.s = take((size_t)BQ * p.ldS * 4);  // also the T staging of a [BQ, CH] chunk of dRS
  p.dp = backward ? take((size_t)BQ * p.ldS * 4) : 0;
  p.pt = take((size_t)BQ * p.ldPT * elem);
  p.dst = backward ? take((size_t)BQ * p.ldPT * elem) : 0;
  p.qe = take((size_t)BQ * p.ldB * 4);  // backward: then the T copy of dQE
  p.o = take((size_t)BQ * p.ldD * 4);   // forward: O accumulator; backward: dQ accumulator
  p.rs = take((size_t)BQ * p.ldR * 4);
  p.drs = backward ? take((size_t)BQ * p.ldR * 4) : 0;
  p.qc = take((size_t)a.C * BQ * 4);
  p.kc = take((size_t)a.C * BK * 4);
  p.km = take((size_t)BK * 4);
  p.stats = take((size_t)2 * BQ * 4);
  p.terms = take(sizeof(SmallTerm) * CRA_MAX_TERMS);  // the small terms, cached per block
  p.smem = off;
}

// Picks the largest tiles that fit max_smem (the device's opt-in limit per block) and the
// split/group counts, aiming at target_blocks blocks (a constant, not the device's SM count,
// so that results do not depend on the device). Returns an error message or nullptr.
constexpr int kTargetBlocks = 256;
constexpr size_t kStaticSmem = 1024;  // margin below the opt-in limit (the kernels use no static smem)
inline const char* make_plan(const Args& a, int elem, bool backward, size_t max_smem, Plan& p,
                             int target_blocks = kTargetBlocks) {
  static const int cand[][2] = {{64, 64}, {64, 32}, {32, 64}, {32, 32}, {16, 64}, {16, 32}, {16, 16}};
  bool ok = false;
  const int bq_cap = a.Lq <= 16 ? 16 : (a.Lq <= 32 ? 32 : 64);  // decoding: no idle query rows
  for (const auto& c : cand) {
    if (c[0] > bq_cap) continue;
    layout(a, elem, backward, c[0], c[1], p);
    if (p.smem + kStaticSmem <= max_smem) { ok = true; break; }
  }
  if (!ok)
    return "circular_relative_attention (cuda): the relative tables need too much shared memory "
           "(too many time/pitch table rows for one block); use backend='cpp' or 'triton'";
  const int BH = a.B * a.H;
  p.nqt = ceil_div(a.Lq, p.BQ);
  p.nkt = ceil_div(a.Lk, p.BK);
  p.splits = 1;
  p.tiles_per_split = p.nkt;
  p.G = 1;
  p.NDN = 0;
  p.DN0 = 0;
  p.ws_floats = 0;
  p.ws_dk = p.ws_dv = p.ws_ddn = p.ws_dsmall = p.ws_o = p.ws_m = p.ws_l = 0;
  if (!backward) {
    const int blocks = p.nqt * BH;
    if (blocks < target_blocks / 2 && p.nkt >= 4) {  // split-K: decoding and few (b, h)
      int want = ceil_div(target_blocks, blocks);
      if (want > p.nkt / 2) want = p.nkt / 2;  // at least two key tiles per split
      p.tiles_per_split = ceil_div(p.nkt, want);
      p.splits = ceil_div(p.nkt, p.tiles_per_split);
    }
    if (p.splits > 1) {
      const size_t rows = (size_t)p.splits * BH * a.Lq;
      p.ws_o = 0;
      p.ws_m = rows * a.D;
      p.ws_l = p.ws_m + rows;
      p.ws_floats = p.ws_l + rows;
    }
    return nullptr;
  }
  p.G = ceil_div(target_blocks, BH);
  if (p.G > p.nqt) p.G = p.nqt;
  if (p.G < 1) p.G = 1;
  const size_t regions = (size_t)p.G * BH;
  const size_t kv = (size_t)p.nkt * p.BK * a.D;  // key rows padded to whole tiles
  if (a.has_band) {
    // Δn of band row c for query tile at a0 and key tile at j0: a0 - j0 - (BK - 1) + c.
    const int shift = a.Lk - a.Lq;
    p.DN0 = shift - (p.nkt - 1) * p.BK - (p.BK - 1);
    const int top = (p.nqt - 1) * p.BQ + shift - (p.BK - 1) + p.BANDP;  // one past the last Δn
    p.NDN = top - p.DN0;
  }
  p.ws_dk = 0;
  p.ws_dv = regions * kv;
  p.ws_ddn = p.ws_dv + regions * kv;
  p.ws_dsmall = p.ws_ddn + regions * (size_t)p.NDN * a.D;
  p.ws_floats = p.ws_dsmall + regions * (size_t)p.SP * a.D;
  return nullptr;
}

// Launchers (csrc/cuda/circular_relative_attention.cu). Buffers come from the caller; the
// workspace holds plan.ws_floats floats (fp32). `stream` is a cudaStream_t. Return nullptr or
// the CUDA error string.
//   forward:  out [B, H, Lq, D] (q's dtype), lse [B, H, Lq] fp32
//   backward: dout, out like q; lse fp32; dq like q; dk, dv [B, H, Lk, D] contiguous; dtable
//             [Ht, N, D]; all in q's dtype. The workspace is zeroed by the launcher.
const char* forward(const Args& a, const Plan& p, Dtype dt, void* out, float* lse, float* ws, void* stream);
const char* backward(const Args& a, const Plan& p, Dtype dt, const void* dout, const void* out,
                     const float* lse, void* dq, void* dk, void* dv, void* dtable, float* ws, void* stream);

}  // namespace cra_cuda
}  // namespace fastattn
