"""Triton kernels for circular relative attention: forward (also decoding) and backward.

Same interface as the C++ op: the concatenated table [Ht, N, D], int32 coordinates [B, C, Lk] and
the term integers built by ``fastattn.ops._cra_terms.assemble``. Two kinds of terms:

- the index term (at most one, first in the table): per (query tile, key tile) its rows form a
  band of BM + BN - 1 consecutive Δn values;
- the other terms ("small": decomposed/direct time and pitch, at most 4, all rows after the index
  block), whose row per (query, key) follows the index rules of ``csrc/include/cra_common.h``
  from O(L) coordinates.

Relative scores come per key tile in CH-row slices of the table: q·E for one slice is a [BM, CH]
tensor-core dot, read per (query, key) with ``tl.gather`` (_logits). The index term takes the
slices of its band; a small term the slices between the lowest and highest row the tile's
visible pairs use, which for music (onsets and pitches change slowly along a sequence) is a
few slices, not the whole block: the paper's Hadamard tables have 1,032 small rows, and holding
q·E for all of them ([BM, 2048] in registers, the first design) spilled hundreds of kilobytes
per thread and took half an hour to compile.

Forward: flash-style online softmax; saves out and log-sum-exp only. Decoding with few programs
splits the keys and merges the partial softmaxes (_cra_combine_kernel).
Backward (deterministic, no float atomics): programs over (group of query tiles, batch·head).
Each program owns its query rows (dq) and accumulates dK/dV, the index-table gradient (indexed by
Δn) and the small-table gradient into scratch regions that only it touches; torch sums the groups
afterwards in a fixed order. Triton has no register scatter-add, so dS reaches the small tables
through a per-program scratch row block [BM, rows]: per key tile, each query's (row, key) pairs
are sorted (a bitonic network of gathers), runs of equal rows summed by a segmented scan, and
only each run's end adds into the scratch, so every address is written once (deterministic, no
atomics, no [BM, BN, rows] one-hot); after the key loop the touched scratch columns go through
two dots in CH-column slices. On a GPU the backward is two passes (small-term gradient, then dq,
dK, dV and the index gradient): one kernel doing both spills.

Tiles per dtype and head dim (_Plan; bench/gpu_resources.py checks registers, spills and shared
memory for sm_80 and sm_90 ahead of time). NaN inputs, NaN table rows and overflowing logits give
NaN outputs, as the reference does; rows without a visible key give zeros.

Dtypes: fp32, fp16, bf16 (fp32 accumulation). Under TRITON_INTERPRET=1 the kernels run on CPU
tensors (tests) with tiles sized for the interpreter and one backward pass.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastattn.ops._cra_autograd import backward_with, setup_context
from fastattn.reference.raw_terms import check_raw_args
from fastattn.triton._common import capability, precision
from fastattn.triton._common import dot as _dot

# Term encoding, as in fastattn/ops/_cra_terms.py.
_KIND_INDEX, _KIND_DIRECT, _KIND_QUOTIENT, _KIND_FIELDS = 0, 1, 2, 3
_PART_COMBINED, _PART_HI, _PART_LO = 0, 1, 2
_TERM_INTS = 9
_SMALL_INTS = 12
MAX_SMALL_TERMS = 4


@triton.jit
def _mix32(x):
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x2C1B3C6D
    return x ^ (x >> 16)


@triton.jit
def _dropout_keep(seed, bh, offs_m, offs_n, threshold):
    """[BM, BN] keep mask; the recipe of cra_common.h / fastattn/ops/_dropout.py."""
    golden = tl.full((), 0x9E3779B9, tl.uint32)  # > int32: a plain literal would not fit
    h0 = _mix32(seed.to(tl.uint32) ^ _mix32(bh.to(tl.uint32) + golden))
    row = _mix32(h0 + offs_m.to(tl.uint32))
    x = _mix32(row[:, None] + offs_n.to(tl.uint32)[None, :])
    return (x >> 8) >= threshold.to(tl.uint32)


@triton.jit
def _term_rows(tp_ptr, t, coords_b, Lk, a_i, offs_n, m_ok, n_ok, visible, zero):
    """Rows (relative to the small block) of small term t for the tile's pairs [BM, BN]; -1
    where the term is absent (missing coordinate) or the pair is not ``visible``.
    ``zero``: 0, but opaque to the compiler and different per key tile, so that the query
    coordinates are re-read (L1 hits) per tile: hoisted out of the key loop, their 64-bit
    address vectors (replicated across the lanes that share a query row) would take about a
    hundred registers and spill."""
    base = tp_ptr + t * 12 + zero
    ch_hi = tl.load(base + 0)
    ch_lo = tl.load(base + 1)
    R = tl.load(base + 2)
    lo_off = tl.load(base + 3)
    hmin = tl.load(base + 4)
    n_hi = tl.load(base + 5)
    n_lo = tl.load(base + 6)
    mul_hi = tl.load(base + 7)
    mul_lo = tl.load(base + 8)
    check_lo = tl.load(base + 9)
    row_off = tl.load(base + 10)
    hq = tl.load(coords_b + ch_hi * Lk + (a_i + zero), mask=m_ok, other=-1)
    lq = tl.load(coords_b + ch_lo * Lk + (a_i + zero), mask=m_ok, other=-1)
    hk = tl.load(coords_b + ch_hi * Lk + offs_n, mask=n_ok, other=-1)
    lk = tl.load(coords_b + ch_lo * Lk + offs_n, mask=n_ok, other=-1)
    dl = lq[:, None] - lk[None, :] + lo_off
    borrow = ((R > 0) & (dl < 0)).to(tl.int32)
    dl = dl + borrow * R
    dh = hq[:, None] - hk[None, :] - borrow
    hi = tl.minimum(tl.maximum(dh - hmin, 0), n_hi - 1)
    lo = tl.minimum(tl.maximum(dl, 0), n_lo - 1)
    row = row_off + hi * mul_hi + lo * mul_lo
    ok = visible & (hq >= 0)[:, None] & (hk >= 0)[None, :]
    ok = ok & ((check_lo == 0) | ((lq >= 0)[:, None] & (lk >= 0)[None, :]))
    return tl.where(ok, row, -1)


@triton.jit
def _band(table_h, dn_lo, idx_off, idx_n, idx_min, D, offs_d, BAND: tl.constexpr):
    """Rows of the index table for Δn = dn_lo .. dn_lo + BAND - 1: [BAND, BD]."""
    dn = dn_lo + tl.arange(0, BAND)
    rows = idx_off + tl.minimum(tl.maximum(dn - idx_min, 0), idx_n - 1)
    return tl.load(table_h + rows[:, None] * D + offs_d[None, :], mask=(offs_d < D)[None, :], other=0.0)


@triton.jit
def _table_rows(table_h, rows, N, D, offs_d):
    """Table rows ``rows`` [R] as [R, BD] (rows beyond N and columns beyond D read as zero)."""
    return tl.load(table_h + rows[:, None] * D + offs_d[None, :],
                   mask=(rows < N)[:, None] & (offs_d < D)[None, :], other=0.0)


@triton.jit
def _pick(qe, c, CH: tl.constexpr):
    """qe[m, c[m, n]] where 0 <= c < CH, else 0: [BM, BN] from [BM, CH]."""
    inside = (c >= 0) & (c < CH)
    return tl.where(inside, tl.gather(qe, tl.minimum(tl.maximum(c, 0), CH - 1), axis=1), 0.0)


@triton.jit
def _visible(a_i, offs_m, offs_n, kpm_b, Lq, Lk, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr):
    """[BM, BN]: key n exists, is not padding and (causal) is not after query position a_i."""
    n_ok = offs_n < Lk
    visible = (offs_m < Lq)[:, None] & n_ok[None, :]
    if CAUSAL:
        visible = visible & (offs_n[None, :] <= a_i[:, None])
    if HAS_KPM:
        pad = tl.load(kpm_b + offs_n, mask=n_ok, other=1)
        visible = visible & (pad == 0)[None, :]
    return visible


@triton.jit
def _logits(q, k, table_h, coords_b, tp_ptr, kpm_b, a_i, a0, j0, zero, offs_m, offs_n, offs_d,
            Lq, Lk, D, N, small_off, idx_off, idx_n, idx_min, alpha, scale,
            CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_IDX: tl.constexpr, NS: tl.constexpr,
            BN: tl.constexpr, CH: tl.constexpr, NIDX: tl.constexpr, PREC: tl.constexpr):
    """Scaled logits of one tile [BM, BN] (-inf where not visible), the visibility mask, and the
    lowest and highest small-block row the visible pairs use (1 << 30 and -1 when none).

    The relative scores come in CH-row slices of the table: q·E for one slice is a [BM, CH]
    tile (one tensor-core dot), read per (query, key) with a gather. The index term needs the
    NIDX slices of its band (Δn = dn_lo ...); a small term needs the slices between the lowest
    and highest row its visible pairs use, which for music (onsets and pitches change slowly
    along the sequence) is a few slices, never the whole block. Only the relative-score tile,
    one row tile and one slice are live at a time (the q·k dot comes last)."""
    m_ok = offs_m < Lq
    n_ok = offs_n < Lk
    rel = tl.zeros([q.shape[0], BN], tl.float32)
    if HAS_IDX:
        dn_lo = a0 - (j0 + BN - 1)
        c = (a_i[:, None] - offs_n[None, :]) - (dn_lo + zero)  # band column of each pair, 0 .. BM + BN - 2
        for i in tl.static_range(NIDX):
            e = _band(table_h, dn_lo + i * CH, idx_off, idx_n, idx_min, D, offs_d, CH)
            rel += _pick(_dot(q, tl.trans(e.to(q.dtype)), PREC), c - i * CH, CH)
    lo_all = tl.full([], 1 << 30, tl.int32)
    hi_all = tl.full([], -1, tl.int32)
    for t in tl.static_range(NS):
        row = _term_rows(tp_ptr, t, coords_b, Lk, a_i, offs_n, m_ok, n_ok,
                         _visible(a_i, offs_m, offs_n, kpm_b, Lq, Lk, CAUSAL, HAS_KPM), zero)
        lo = tl.min(tl.where(row >= 0, row, 1 << 30))
        hi = tl.max(row)
        for c0 in range(lo, hi + 1, CH):
            e = _table_rows(table_h, small_off + c0 + tl.arange(0, CH), N, D, offs_d)
            rel += _pick(_dot(q, tl.trans(e.to(q.dtype)), PREC), tl.where(row >= 0, row - c0, -1), CH)
        lo_all = tl.minimum(lo_all, lo)
        hi_all = tl.maximum(hi_all, hi)
    s = _dot(q, tl.trans(k), PREC)
    if HAS_IDX or NS > 0:
        s += alpha * rel
    visible = _visible(a_i, offs_m, offs_n, kpm_b, Lq, Lk, CAUSAL, HAS_KPM)
    return tl.where(visible, s * scale, float("-inf")), visible, lo_all, hi_all


@triton.jit
def _cra_fwd_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, coords_ptr, tp_ptr, kpm_ptr, kcnt_ptr, out_ptr, lse_ptr,
    H, Lq, Lk, D, N, C, table_hs, small_off, idx_off, idx_n, idx_min,
    sk_b, sk_h, sv_b, sv_h,
    alpha, scale, seed, threshold, keep_scale, keys_per_split,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_IDX: tl.constexpr, NS: tl.constexpr,
    DROPOUT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
    CH: tl.constexpr, NIDX: tl.constexpr, PREC: tl.constexpr, SPLIT: tl.constexpr,
):
    # q [B, H, Lq, D]; k, v [B, H, Lk, D] (dense rows, strided b/h); out like q; lse [B, H, Lq] fp32.
    # SPLIT (decoding): program (m, bh, s) covers keys [s·keys_per_split, (s+1)·keys_per_split)
    # and writes its normalised partial output and lse (fp32, [S, B·H, Lq, D] and [S, B·H, Lq])
    # to out_ptr / lse_ptr; _cra_combine_kernel merges the splits. kcnt [B, Lk + 1] int32 (with a
    # key padding mask): non-padded keys before each position.
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    a_i = offs_m + (Lk - Lq)
    a0 = pid_m * BM + (Lk - Lq)
    m_ok = offs_m < Lq
    q = tl.load(q_ptr + (bh * Lq + offs_m)[:, None] * D + offs_d[None, :],
                mask=m_ok[:, None] & (offs_d < D)[None, :], other=0.0)
    table_h = table_ptr + h * table_hs
    coords_b = coords_ptr + b * C * Lk
    kpm_b = kpm_ptr + b * Lk
    k_base = k_ptr + b * sk_b + h * sk_h
    v_base = v_ptr + b * sv_b + h * sv_h
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BD], tl.float32)
    start_n = 0
    end_n = Lk
    if CAUSAL:
        end_n = tl.minimum(Lk, a0 + BM)
    if SPLIT:
        start_n = tl.program_id(2) * keys_per_split
        end_n = tl.minimum(end_n, start_n + keys_per_split)
    for j0 in range(start_n, end_n, BN):
        zero = tl.minimum(j0, 0)  # see _term_rows
        offs_n = j0 + tl.arange(0, BN)
        kv_mask = (offs_n < Lk)[:, None] & (offs_d < D)[None, :]
        k = tl.load(k_base + offs_n[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
        s, _vis, _lo, _hi = _logits(q, k, table_h, coords_b, tp_ptr, kpm_b, a_i, a0, j0, zero, offs_m, offs_n,
                                       offs_d, Lq, Lk, D, N, small_off, idx_off, idx_n, idx_min, alpha,
                                       scale, CAUSAL, HAS_KPM, HAS_IDX, NS, BN, CH, NIDX, PREC)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        corr = tl.exp(m_i - m_safe)
        l_i = l_i * corr + tl.sum(p, axis=1)
        if DROPOUT:  # the normaliser uses undropped probabilities
            keep = _dropout_keep(seed, bh, offs_m, offs_n, threshold)
            p = tl.where(keep, p * keep_scale, 0.0)
        acc = acc * corr[:, None] + _dot(p.to(v.dtype), v, PREC)
        m_i = m_new
    # A row without visible keys gives zeros and lse -inf. A row with visible keys gives
    # acc / l even when l is 0 (every visible logit -inf) or NaN: NaN, as the reference's
    # softmax gives, never zeros that would hide a divergence.
    row_end = tl.zeros([BM], tl.int32) + end_n
    if CAUSAL:
        row_end = tl.minimum(a_i + 1, end_n)
    row_end = tl.maximum(row_end, start_n)
    if HAS_KPM:  # visible keys of each row, from prefix counts (no per-tile bookkeeping)
        kcnt_b = kcnt_ptr + b * (Lk + 1)
        n_vis = tl.load(kcnt_b + row_end, mask=m_ok, other=0) - tl.load(kcnt_b + start_n)
    else:
        n_vis = row_end - start_n
    has = m_ok & (n_vis > 0)
    l_div = tl.where(has, l_i, 1.0)
    out = tl.where(has[:, None], acc / l_div[:, None], 0.0)
    lse = tl.where(has, tl.where(l_i == 0.0, float("nan"), m_i + tl.log(tl.where(l_i == 0.0, 1.0, l_div))),
                   float("-inf"))
    row = bh * Lq + offs_m
    if SPLIT:
        row += tl.program_id(2) * tl.num_programs(1) * Lq
    tl.store(out_ptr + row[:, None] * D + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & (offs_d < D)[None, :])
    tl.store(lse_ptr + row, lse, mask=m_ok)


@triton.jit
def _cra_combine_kernel(part_ptr, part_lse_ptr, out_ptr, lse_ptr, S, R, D,
                        BR: tl.constexpr, BD: tl.constexpr):
    """Merges split partials ([S, R, D] outputs, [S, R] lse; R = B·H·Lq rows) into out [R, D]
    (out's dtype) and lse [R]: weights exp(lse_s - max lse), in split order. A NaN partial
    (lse NaN) makes the row NaN; splits without visible keys (lse -inf) weigh nothing."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    offs_d = tl.arange(0, BD)
    r_ok = rows < R
    mask = r_ok[:, None] & (offs_d < D)[None, :]
    m = tl.full([BR], float("-inf"), tl.float32)
    bad = tl.zeros([BR], tl.int32)
    for s in range(S):
        ls = tl.load(part_lse_ptr + s * R + rows, mask=r_ok, other=float("-inf"))
        m = tl.maximum(m, ls)
        bad = tl.maximum(bad, (ls != ls).to(tl.int32))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    den = tl.zeros([BR], tl.float32)
    acc = tl.zeros([BR, BD], tl.float32)
    for s in range(S):
        w = tl.exp(tl.load(part_lse_ptr + s * R + rows, mask=r_ok, other=float("-inf")) - m_safe)
        den += w
        acc += w[:, None] * tl.load(part_ptr + (s * R + rows)[:, None] * D + offs_d[None, :], mask=mask, other=0.0)
    has = den > 0
    out = tl.where(has[:, None], acc / tl.where(has, den, 1.0)[:, None], 0.0)
    lse = tl.where(has, m_safe + tl.log(tl.where(has, den, 1.0)), float("-inf"))
    out = tl.where((bad > 0)[:, None], float("nan"), out)
    tl.store(out_ptr + rows[:, None] * D + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(lse_ptr + rows, tl.where(bad > 0, float("nan"), lse), mask=r_ok)


@triton.jit
def _rmw(ptr, offs_r, offs_d, D, x, mask):
    """ptr[r, d] += x for a region only this program touches (so no atomics are needed)."""
    p = ptr + offs_r[:, None] * D + offs_d[None, :]
    tl.store(p, tl.load(p, mask=mask, other=0.0) + x, mask=mask)


@triton.jit
def _seg_add(v1, f1, v2, f2):
    """Segmented sum: a segment restarts where the flag is set."""
    return tl.where(f2, v2, v1 + v2), f1 | f2


@triton.jit
def _sort_rows(x, zero, LOG_BN: tl.constexpr):
    """Ascending sort of each row of x [BM, 2^LOG_BN]: a bitonic network of gathers (one per
    compare-exchange step), cheap on a GPU and in the interpreter alike (tl.sort is not).
    ``zero`` (see _term_rows) keeps the network's index patterns from being hoisted."""
    idx = tl.broadcast_to((tl.arange(0, x.shape[1]) + zero)[None, :], x.shape)
    for kk in tl.static_range(1, LOG_BN + 1):
        for jj in tl.static_range(kk):
            partner = idx ^ (1 << (kk - 1 - jj))
            y = tl.gather(x, partner, axis=1)
            keep_min = (idx < partner) == ((idx & (1 << kk)) == 0)
            x = tl.where(keep_min, tl.minimum(x, y), tl.maximum(x, y))
    return x


@triton.jit
def _scatter_rows(dqe_base, ds, row, NSMALL, zero, BN: tl.constexpr, LOG_BN: tl.constexpr):
    """dqe[m, row[m, n]] += ds[m, n] over the tile's pairs with row >= 0, deterministically and without
    atomics or a [BM, BN, NSMALL] one-hot: sort each query's (row, key) pairs, sum runs of equal
    rows with a segmented scan, and let only each run's last element add into the scratch row,
    so every address is written once per call."""
    n = tl.arange(0, BN) + zero
    key = tl.where(row >= 0, row * BN + n[None, :], NSMALL * BN)  # absent pairs sort last, out of range
    key = _sort_rows(key, zero, LOG_BN)
    r = key // BN
    v = tl.gather(ds, key % BN, axis=1)
    j = tl.broadcast_to(n[None, :], r.shape)
    start = (j == 0) | (r != tl.gather(r, tl.maximum(j - 1, 0), axis=1))
    end = (j == BN - 1) | (r != tl.gather(r, tl.minimum(j + 1, BN - 1), axis=1))
    total, _ = tl.associative_scan((v, start), 1, _seg_add)
    mask = end & (r < NSMALL)
    ptr = dqe_base + (tl.arange(0, r.shape[0]) + zero)[:, None] * NSMALL + r
    tl.store(ptr, tl.load(ptr, mask=mask, other=0.0) + total, mask=mask)


@triton.jit
def _cra_bwd_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, coords_ptr, tp_ptr, kpm_ptr, do_ptr, lse_ptr, delta_ptr,
    dq_ptr, dqs_ptr, dk_ptr, dv_ptr, ddn_ptr, dsmall_ptr, dqe_ptr,
    H, Lq, Lk, D, N, C, table_hs, small_off, idx_off, idx_n, idx_min, DN0, NDN, G, NSMALL,
    sk_b, sk_h, sv_b, sv_h,
    alpha, scale, seed, threshold, keep_scale,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_IDX: tl.constexpr, NS: tl.constexpr,
    DROPOUT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
    CH: tl.constexpr, NIDX: tl.constexpr, PREC: tl.constexpr, LOG_BN: tl.constexpr,
    PASS: tl.constexpr,
):
    # On a GPU, two passes over the same (query tile, key tile) schedule, each recomputing dS
    # (one kernel doing both needs more registers than a program has: it spills):
    #   PASS 1: the small terms' gradient: dS scattered into dqe, then dq_small = dqe·E (written
    #     to dqs, fp32 [B·H, Lq, D]) and dE_small += dqeᵀ·q;
    #   PASS 2: dq (q·k and index terms, plus dqs when NS > 0), dK, dV, the index gradient.
    # PASS 0 does both in one pass (the interpreter, where registers do not matter and a second
    # pass only costs time).
    # Scratch (fp32, one region per (group, batch·head)): dk/dv [G, B·H, Lk, D],
    # ddn [G, B·H, NDN, D] (index-table gradient by Δn - DN0), dsmall [G, B·H, NSMALL, D],
    # dqe [G, B·H, BM, NSMALL]: d loss / d (q·E) of the current query tile, zero between tiles.
    g = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, BD)
    d_ok = offs_d < D
    table_h = table_ptr + h * table_hs
    coords_b = coords_ptr + b * C * Lk
    kpm_b = kpm_ptr + b * Lk
    k_base = k_ptr + b * sk_b + h * sk_h
    v_base = v_ptr + b * sv_b + h * sv_h
    region = g * tl.num_programs(1) + bh
    dk_base = dk_ptr + region * Lk * D
    dv_base = dv_ptr + region * Lk * D
    ddn_base = ddn_ptr + region * NDN * D
    dsmall_base = dsmall_ptr + region * NSMALL * D
    dqe_base = dqe_ptr + region * BM * NSMALL
    n_mtiles = tl.cdiv(Lq, BM)
    for mt in range(g, n_mtiles, G):
        offs_m = mt * BM + tl.arange(0, BM)
        m_ok = offs_m < Lq
        a_i = offs_m + (Lk - Lq)
        a0 = mt * BM + (Lk - Lq)
        qmask = m_ok[:, None] & d_ok[None, :]
        q = tl.load(q_ptr + (bh * Lq + offs_m)[:, None] * D + offs_d[None, :], mask=qmask, other=0.0)
        do = tl.load(do_ptr + (bh * Lq + offs_m)[:, None] * D + offs_d[None, :], mask=qmask, other=0.0)
        lse = tl.load(lse_ptr + bh * Lq + offs_m, mask=m_ok, other=float("-inf"))
        delta = tl.load(delta_ptr + bh * Lq + offs_m, mask=m_ok, other=0.0)
        lse_safe = tl.where(lse == float("-inf"), 0.0, lse)
        dq = tl.zeros([BM, BD], tl.float32)
        lo_all = tl.full([], 1 << 30, tl.int32)  # small-block rows this query tile touched
        hi_all = tl.full([], -1, tl.int32)
        end_n = Lk
        if CAUSAL:
            end_n = tl.minimum(Lk, a0 + BM)
        for j0 in range(0, end_n, BN):
            zero = tl.minimum(j0, 0)  # see _term_rows
            offs_n = j0 + tl.arange(0, BN)
            n_ok = offs_n < Lk
            kv_mask = n_ok[:, None] & d_ok[None, :]
            k = tl.load(k_base + offs_n[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_base + offs_n[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
            # a0 recomputed per tile (+ zero): one register fewer through the loop, and no spill
            s, visible, lo, hi = _logits(q, k, table_h, coords_b, tp_ptr, kpm_b, a_i, mt * BM + (Lk - Lq) + zero, j0, zero, offs_m, offs_n,
                                         offs_d, Lq, Lk, D, N, small_off, idx_off, idx_n, idx_min, alpha,
                                         scale, CAUSAL, HAS_KPM, HAS_IDX, NS, BN, CH, NIDX, PREC)
            lo_all = tl.minimum(lo_all, lo)
            hi_all = tl.maximum(hi_all, hi)
            p = tl.where((s == float("-inf")) | (lse == float("-inf"))[:, None], 0.0,
                         tl.exp(s - lse_safe[:, None]))
            dp = _dot(do, tl.trans(v), PREC).to(tl.float32)
            p_used = p
            if DROPOUT:
                keep = _dropout_keep(seed, bh, offs_m, offs_n, threshold)
                p_used = tl.where(keep, p * keep_scale, 0.0)
                dp = tl.where(keep, dp * keep_scale, 0.0)
            ds = p * (dp - delta[:, None]) * scale  # d loss / d (q·k + alpha·relative)
            if PASS != 1:
                dq += _dot(ds.to(k.dtype), k, PREC)
                _rmw(dv_base, offs_n, offs_d, D, _dot(tl.trans(p_used.to(do.dtype)), do, PREC), kv_mask)
                _rmw(dk_base, offs_n, offs_d, D, _dot(tl.trans(ds.to(q.dtype)), q, PREC), kv_mask)
            if HAS_IDX and PASS != 1:
                # band column c holds Δn = dn_lo + c, i.e. key j = a_i - dn_lo - c of this tile
                dn_lo = a0 - (j0 + BN - 1)
                for i in tl.static_range(NIDX):
                    d0 = dn_lo + i * CH
                    jl = (a_i[:, None] - d0 - (tl.arange(0, CH) + zero)[None, :]) - j0
                    inside = (jl >= 0) & (jl < BN)
                    dqe = alpha * tl.where(inside, tl.gather(ds, tl.minimum(tl.maximum(jl, 0), BN - 1), axis=1), 0.0)
                    e = _band(table_h, d0, idx_off, idx_n, idx_min, D, offs_d, CH)
                    dq += _dot(dqe.to(q.dtype), e.to(q.dtype), PREC)
                    _rmw(ddn_base, d0 - DN0 + tl.arange(0, CH), offs_d, D,
                         _dot(tl.trans(dqe.to(q.dtype)), q, PREC), d_ok[None, :])
                    # the next slice's rows sit in other threads: order the read-modify-writes
                    tl.debug_barrier()
            if PASS != 2:
                for t in tl.static_range(NS):
                    row = _term_rows(tp_ptr, t, coords_b, Lk, a_i, offs_n, m_ok, n_ok, visible, zero)
                    _scatter_rows(dqe_base, ds * alpha, row, NSMALL, zero, BN, LOG_BN)
                    # the next scatter's threads may own other (m, row) pairs: make the adds visible
                    tl.debug_barrier()
        if PASS != 2:
            # dq += dqe·E and dE += dqeᵀ·q over the rows the tile touched, zeroing the scratch
            # for the next tile.
            for c0 in range(lo_all, hi_all + 1, CH):
                cols = c0 + tl.arange(0, CH)
                c_ok = cols < NSMALL
                ptr = dqe_base + (tl.arange(0, BM) + tl.minimum(c0, 0))[:, None] * NSMALL + cols[None, :]
                dqe = tl.load(ptr, mask=c_ok[None, :], other=0.0)
                tl.store(ptr, tl.zeros([BM, CH], tl.float32), mask=c_ok[None, :])
                e = _table_rows(table_h, small_off + cols, N, D, offs_d)
                dq += _dot(dqe.to(q.dtype), e.to(q.dtype), PREC)
                _rmw(dsmall_base, cols, offs_d, D, _dot(tl.trans(dqe.to(q.dtype)), q, PREC),
                     c_ok[:, None] & d_ok[None, :])
                tl.debug_barrier()
        elif NS > 0:  # PASS 2 after PASS 1
            dq += tl.load(dqs_ptr + (bh * Lq + offs_m)[:, None] * D + offs_d[None, :], mask=qmask, other=0.0)
        if PASS == 1:
            tl.store(dqs_ptr + (bh * Lq + offs_m)[:, None] * D + offs_d[None, :], dq, mask=qmask)
        else:
            tl.store(dq_ptr + (bh * Lq + offs_m)[:, None] * D + offs_d[None, :], dq.to(dq_ptr.dtype.element_ty),
                     mask=qmask)


# ----------------------------------------------------------------------------- host side

class _Plan:
    """Kernel parameters derived from the term list: index term, small terms, block sizes."""

    def __init__(self, table: Tensor, terms: List[int], Lq: int, Lk: int, D: int, backward: bool = False):
        specs = [terms[i:i + _TERM_INTS] for i in range(0, len(terms), _TERM_INTS)]
        self.N = table.shape[1]
        self.has_idx = bool(specs) and specs[0][0] == _KIND_INDEX
        idx = specs[0] if self.has_idx else [0] * _TERM_INTS
        if any(s[0] == _KIND_INDEX for s in specs[1:]):
            raise RuntimeError("triton backend: at most one index term, first in the table")
        self.idx_off, self.idx_n, self.idx_min = idx[8], max(idx[6], 1), idx[5]
        self.small_off = idx[6] if self.has_idx else 0
        small = specs[1:] if self.has_idx else specs
        if len(small) > MAX_SMALL_TERMS:
            raise RuntimeError(f"triton backend: at most {MAX_SMALL_TERMS} time/pitch terms")
        rows = []
        for kind, part, ch_hi, ch_lo, param, hi_min, n_hi, n_lo, off in small:
            mul_hi = n_lo if part == _PART_COMBINED else (1 if part == _PART_HI else 0)
            mul_lo = 0 if part == _PART_HI else 1
            if kind == _KIND_DIRECT:
                ch_lo, n_lo, mul_hi, mul_lo = ch_hi, 1, 1, 0
            rows.append([ch_hi, ch_lo, param if kind == _KIND_QUOTIENT else 0,
                         param if kind == _KIND_FIELDS else 0, hi_min, n_hi, n_lo, mul_hi, mul_lo,
                         int(kind == _KIND_FIELDS), off - self.small_off, 0])
        self.ns = len(rows)
        self.tp = torch.tensor(rows or [[0] * _SMALL_INTS], dtype=torch.int32, device=table.device)
        self.BD = max(16, triton.next_power_of_2(D))
        self.nsmall = max(self.N - self.small_off, 1)
        # Tiles (query rows x keys; CH-row slices of the tables) for a GPU, checked for sm_80 and
        # sm_90 by bench/gpu_resources.py: no spills at the paper's configuration (bf16, D = 64),
        # two 4-warp programs per SM there. The backward, fp32 and sm_80's D = 128 forward (whose
        # mma.sync operands live in registers) take 32 query rows, fp32 and D = 128 take 8 warps
        # (fewer registers per thread), decoding 16 query rows (8 warps only at D = 128: fp32
        # decoding with D <= 64 spills with 8). fp32 at D = 128 takes 16 x 16 tiles: its FMA dots
        # hold D-long operand slices in registers, and 32-row tiles spilled 0.5-3 KB per thread.
        # Still spilling (the CSV lists them): fp32's backward at D = 64 and 128 (12-44 B).
        half = table.dtype in (torch.float16, torch.bfloat16)
        cap = capability(table.device)
        if cap is None:  # the interpreter: one backward pass, tiles sized to
            # the problem (its cost is per step, and per key for the segmented scan)
            self.BM = min(64, max(16, triton.next_power_of_2(Lq)))
            self.BN = min(64, max(16, triton.next_power_of_2(Lk)))
            self.CH, self.passes, self.num_warps = 128, (0,), 4
        else:
            wide = half and not backward and (D <= 64 or cap >= 90)
            self.BM = 16 if Lq <= 16 or (not half and D > 64) else (64 if wide else 32)
            self.BN = self.CH = 16 if not half and D > 64 else 32
            self.passes = (1, 2) if self.ns else (2,)
            self.num_warps = 4 if D <= 64 and (half or Lq <= 16) else 8
        self.NIDX = triton.cdiv(self.BM + self.BN - 1, self.CH)  # slices of an index band
        n_mtiles = triton.cdiv(Lq, self.BM)
        # Δn of every band slice any tile pair can touch: [DN0, DN0 + NDN)
        self.DN0 = (Lk - Lq) - (triton.cdiv(Lk, self.BN) * self.BN - 1)
        self.NDN = (n_mtiles * self.BM + Lk - Lq) - self.DN0 + self.NIDX * self.CH


def _common_args(p: _Plan, q, k, v, table, coords, kpm, alpha, scale, dropout_p, seed):
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    kpm_t = kpm.to(torch.int8) if kpm is not None else torch.zeros(1, dtype=torch.int8, device=q.device)
    threshold = min(int(dropout_p * (1 << 24)), 1 << 24)
    return dict(
        H=H, Lq=Lq, Lk=Lk, D=D, N=p.N, C=coords.shape[1],
        table_hs=p.N * D if table.shape[0] > 1 else 0,  # per-head tables: next head's block
        small_off=p.small_off, idx_off=p.idx_off, idx_n=p.idx_n, idx_min=p.idx_min,
        sk_b=k.stride(0), sk_h=k.stride(1), sv_b=v.stride(0), sv_h=v.stride(1),
        alpha=float(alpha), scale=float(scale), seed=seed & 0xFFFFFFFF, threshold=threshold,
        keep_scale=1.0 / (1.0 - dropout_p),
    ), kpm_t


def _constexprs(p: _Plan, causal: bool, kpm, dropout_p: float, q: Tensor) -> dict:
    prec = precision(q.dtype, q.device)
    return dict(CAUSAL=bool(causal), HAS_KPM=kpm is not None, HAS_IDX=p.has_idx, NS=p.ns,
                DROPOUT=dropout_p > 0.0, BM=p.BM, BN=p.BN, BD=p.BD, CH=p.CH, NIDX=p.NIDX,
                PREC=prec, num_warps=p.num_warps)


def forward(q: Tensor, k: Tensor, v: Tensor, table: Tensor, coords: Tensor, terms: List[int],
            alpha: float, scale: float, causal: bool, kpm: Optional[Tensor], dropout_p: float,
            seed: int, splits: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """out [B, H, Lq, D] (q's dtype) and lse [B, H, Lq] (fp32). ``splits``: key splits (None =
    :func:`decode_splits`)."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    p = _Plan(table, terms, Lq, Lk, D)
    args, kpm_t = _common_args(p, q, k, v, table, coords, kpm, alpha, scale, dropout_p, seed)
    out = torch.empty_like(q)
    lse = torch.empty(B, H, Lq, dtype=torch.float32, device=q.device)
    kcnt = kpm_t
    if kpm is not None:
        kcnt = torch.zeros(B, Lk + 1, dtype=torch.int32, device=q.device)
        kcnt[:, 1:] = (~kpm).cumsum(1)
    n_mtiles = triton.cdiv(Lq, p.BM)
    splits = decode_splits(n_mtiles * B * H, Lk, p.BN) if splits is None else max(1, int(splits))
    keys_per_split = triton.cdiv(triton.cdiv(Lk, splits), p.BN) * p.BN
    splits = triton.cdiv(Lk, keys_per_split)
    cx = _constexprs(p, causal, kpm, dropout_p, q) | dict(SPLIT=splits > 1)
    if splits == 1:
        _cra_fwd_kernel[(n_mtiles, B * H)](q, k, v, table, coords, p.tp, kpm_t, kcnt, out, lse, **args,
                                           keys_per_split=Lk, **cx)
        return out, lse
    part = torch.empty(splits, B * H * Lq, D, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(splits, B * H * Lq, dtype=torch.float32, device=q.device)
    _cra_fwd_kernel[(n_mtiles, B * H, splits)](q, k, v, table, coords, p.tp, kpm_t, kcnt,
                                               part, part_lse,
                                               **args, keys_per_split=keys_per_split, **cx)
    R = B * H * Lq
    _cra_combine_kernel[(triton.cdiv(R, 16),)](part, part_lse, out, lse, splits, R, D, BR=16, BD=p.BD)
    return out, lse


def decode_splits(programs: int, Lk: int, BN: int) -> int:
    """Key splits for the forward pass: 1 unless few (batch·head·query-tile) programs face many
    keys (decoding with a KV cache), where each split is one more program sharing the keys.
    A function of the shapes only, so results do not depend on the device."""
    target = 256  # about two waves of programs on a 132-SM GPU
    if programs >= target // 2 or Lk < 4 * BN:
        return 1
    return max(1, min(triton.cdiv(Lk, 2 * BN), target // programs))


def _fold_index_grad(ddn: Tensor, p: _Plan) -> Tensor:
    """[Ht, NDN, D] gradient by Δn -> [Ht, idx_n, D] table rows (clamped ends summed, in a fixed
    order). Slot i holds Δn = DN0 + i, row clamp(i + off, 0, idx_n - 1): slices, no indexing."""
    Ht, NDN, D = ddn.shape
    n, off = p.idx_n, p.DN0 - p.idx_min
    if n == 1:
        return ddn.sum(1, keepdim=True)
    lo = min(max(1 - off, 0), NDN)       # slots [0, lo) clamp to row 0
    hi = max(min(n - 1 - off, NDN), lo)  # slots [hi, NDN) clamp to row n - 1
    out = ddn.new_zeros(Ht, n, D)
    out[:, lo + off:hi + off] = ddn[:, lo:hi]
    out[:, 0] += ddn[:, :lo].sum(1)
    out[:, n - 1] += ddn[:, hi:].sum(1)
    return out


def backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
             table: Tensor, coords: Tensor, terms: List[int], alpha: float, scale: float,
             causal: bool, kpm: Optional[Tensor], dropout_p: float, seed: int):
    """(dq, dk, dv, dtable) like q, k, v, table."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    p = _Plan(table, terms, Lq, Lk, D, backward=True)
    args, kpm_t = _common_args(p, q, k, v, table, coords, kpm, alpha, scale, dropout_p, seed)
    grad_out = grad_out.contiguous()
    delta = (grad_out.float() * out.float()).sum(-1).contiguous()
    n_mtiles = triton.cdiv(Lq, p.BM)
    # Enough programs to fill a GPU without multiplying scratch needlessly (fixed, so results
    # do not depend on the device).
    G = max(1, min(n_mtiles, triton.cdiv(256, B * H)))
    f32 = dict(dtype=torch.float32, device=q.device)
    dq = torch.empty_like(q)
    dk = torch.zeros(G, B * H, Lk, D, **f32)
    dv = torch.zeros(G, B * H, Lk, D, **f32)
    ddn = torch.zeros(G, B * H, p.NDN if p.has_idx else 1, D, **f32)
    dsmall = torch.zeros(G, B * H, p.nsmall if p.ns else 1, D, **f32)
    dqe = torch.zeros(G, B * H, p.BM if p.ns else 1, p.nsmall if p.ns else 1, **f32)
    dqs = torch.empty(B * H, Lq, D, **f32) if 1 in p.passes else dq  # dq of the small terms (pass 1)
    launch = dict(**args, DN0=p.DN0, NDN=p.NDN, G=G, NSMALL=p.nsmall,
                  **_constexprs(p, causal, kpm, dropout_p, q), LOG_BN=p.BN.bit_length() - 1)
    for pass_ in p.passes:
        _cra_bwd_kernel[(G, B * H)](q, k, v, table, coords, p.tp, kpm_t, grad_out, lse, delta,
                                    dq, dqs, dk, dv, ddn, dsmall, dqe, **launch, PASS=pass_)
    Ht = table.shape[0]

    def per_table(x: Tensor) -> Tensor:  # [G, B·H, R, D] -> [Ht, R, D], summed in a fixed order
        x = x.sum(0).view(B, H, *x.shape[2:]).sum(0)
        return x.sum(0, keepdim=True) if Ht == 1 else x

    parts = []
    if p.has_idx:
        parts.append(_fold_index_grad(per_table(ddn), p))
    if p.ns:
        parts.append(per_table(dsmall)[:, :p.N - p.small_off])
    dtable = torch.cat(parts, 1) if parts else table.new_zeros(table.shape, dtype=torch.float32)
    return (dq, dk.sum(0).view(k.shape).to(k.dtype), dv.sum(0).view(v.shape).to(v.dtype),
            dtable.to(table.dtype))


# ----------------------------------------------------------------------------- torch op

@torch.library.custom_op("fastattn_triton::circular_relative_attention", mutates_args=())
def circular_relative_attention_op(q: Tensor, k: Tensor, v: Tensor, table: Tensor, coords: Tensor,
                                   terms: List[int], alpha: float, scale: float, causal: bool,
                                   key_padding_mask: Optional[Tensor], dropout_p: float,
                                   seed: int) -> Tuple[Tensor, Tensor]:
    """The Triton twin of torch.ops.fastattn.circular_relative_attention: (out, lse fp32). Raw
    arguments are checked as the C++ op checks them (coordinate values on CPU only: on a GPU that
    would be a device sync, and the kernels clamp every row)."""
    check_raw_args(q, k, v, table, coords, terms, alpha, scale, causal, key_padding_mask, dropout_p, seed,
                   check_values=coords.device.type == "cpu")
    return forward(q, k, v, table, coords, terms, alpha, scale, causal, key_padding_mask, dropout_p, seed)


@circular_relative_attention_op.register_fake
def _(q, k, v, table, coords, terms, alpha, scale, causal, key_padding_mask, dropout_p, seed):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


# The same autograd glue as the C++ op, with this module's backward kernel.
circular_relative_attention_op.register_autograd(backward_with(backward), setup_context=setup_context)
