"""Triton kernels for circular relative attention: forward (also decoding) and backward.

Same interface as the C++ op: the concatenated table [Ht, N, D], int32 coordinates [B, C, Lk] and
the term integers built by ``fastattn.ops._cra_terms.assemble``. Two kinds of terms:

- the index term (at most one, first in the table): per (query tile, key tile) its rows form a
  band of BM + BN - 1 consecutive Δn values, so one ``tl.dot`` of the query tile with that band of
  the table gives every score the tile needs, picked per (query, key) with ``tl.gather``;
- the other terms ("small": decomposed/direct time and pitch, at most 4, all rows after the index
  block, SPAD ≥ their row count): q·E for all their rows is one ``tl.dot`` per query tile, kept in
  registers for the whole key loop and gathered per (query, key) by the index rules of
  ``csrc/include/cra_common.h`` computed from O(L) coordinates.

Forward: flash-style online softmax; saves out and log-sum-exp only.
Backward (deterministic, no float atomics): one kernel over (group of query tiles, batch·head).
Each program owns its query rows (dq) and accumulates dK/dV, the index-table gradient (indexed by
Δn) and the small-table gradient into scratch regions that only it touches; torch sums the groups
afterwards in a fixed order. Triton has no register scatter-add, so dS reaches the small tables
through a per-program scratch row block [BM, SPAD]: per key tile, each query's (row, key) pairs are
sorted (a bitonic network of gathers), runs of equal rows summed by a segmented scan, and only each
run's end adds into the scratch, so every address is written once (deterministic, no atomics, no
[BM, BN, SPAD] one-hot); after the key loop the scratch goes through two dots in column chunks.
Decoding with few programs splits the keys and merges the partial softmaxes (_cra_combine_kernel).
Open on a GPU: q·E for the small rows is still held in registers ([BM, SPAD]); with the paper's
Hadamard tables (SPAD = 2048) that is too much for one program and needs measuring.

Dtypes: fp32, fp16, bf16 (fp32 accumulation). Under TRITON_INTERPRET=1 the kernels run on CPU
tensors (tests).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastattn.ops.circular_relative_attention import backward_with, setup_context

# Term encoding, as in fastattn/ops/_cra_terms.py.
_KIND_INDEX, _KIND_DIRECT, _KIND_QUOTIENT, _KIND_FIELDS = 0, 1, 2, 3
_PART_COMBINED, _PART_HI, _PART_LO = 0, 1, 2
_TERM_INTS = 9
_SMALL_INTS = 12
MAX_SMALL_TERMS = 4


@triton.jit
def _dot(a, b, PREC: tl.constexpr):
    """a·b with fp32 accumulation. PREC "upcast" (interpreter, 16-bit inputs) multiplies the
    exactly widened operands: what tensor cores compute, and what the interpreter's own 16-bit
    dot (bf16 read as integers in Triton 3.x) gets wrong."""
    if PREC == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PREC)


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
def _term_rows(tp_ptr, t, coords_b, Lk, a_i, offs_n, m_ok, n_ok):
    """Rows (relative to the small block) and presence [BM, BN] of small term t."""
    base = tp_ptr + t * 12
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
    hq = tl.load(coords_b + ch_hi * Lk + a_i, mask=m_ok, other=-1)
    lq = tl.load(coords_b + ch_lo * Lk + a_i, mask=m_ok, other=-1)
    hk = tl.load(coords_b + ch_hi * Lk + offs_n, mask=n_ok, other=-1)
    lk = tl.load(coords_b + ch_lo * Lk + offs_n, mask=n_ok, other=-1)
    dl = lq[:, None] - lk[None, :] + lo_off
    borrow = ((R > 0) & (dl < 0)).to(tl.int32)
    dl = dl + borrow * R
    dh = hq[:, None] - hk[None, :] - borrow
    hi = tl.minimum(tl.maximum(dh - hmin, 0), n_hi - 1)
    lo = tl.minimum(tl.maximum(dl, 0), n_lo - 1)
    row = row_off + hi * mul_hi + lo * mul_lo
    ok = (hq >= 0)[:, None] & (hk >= 0)[None, :]
    ok = ok & ((check_lo == 0) | ((lq >= 0)[:, None] & (lk >= 0)[None, :]))
    return row, ok


@triton.jit
def _band(table_h, dn_lo, idx_off, idx_n, idx_min, D, offs_d, BAND: tl.constexpr):
    """Rows of the index table for Δn = dn_lo .. dn_lo + BAND - 1: [BAND, BD]."""
    dn = dn_lo + tl.arange(0, BAND)
    rows = idx_off + tl.minimum(tl.maximum(dn - idx_min, 0), idx_n - 1)
    return tl.load(table_h + rows[:, None] * D + offs_d[None, :], mask=(offs_d < D)[None, :], other=0.0)


@triton.jit
def _logits(q, k, qe_small, table_h, coords_b, tp_ptr, kpm_b, a_i, a0, j0, offs_m, offs_n, offs_d,
            Lq, Lk, D, idx_off, idx_n, idx_min, alpha, scale,
            CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_IDX: tl.constexpr, NS: tl.constexpr,
            BN: tl.constexpr, BAND: tl.constexpr, PREC: tl.constexpr):
    """Scaled logits of one tile [BM, BN] with -inf where masked."""
    m_ok = offs_m < Lq
    n_ok = offs_n < Lk
    s = _dot(q, tl.trans(k), PREC)
    if HAS_IDX:
        dn_lo = a0 - (j0 + BN - 1)
        e = _band(table_h, dn_lo, idx_off, idx_n, idx_min, D, offs_d, BAND)
        qe = _dot(q, tl.trans(e.to(q.dtype)), PREC)
        s += alpha * tl.gather(qe, (a_i[:, None] - offs_n[None, :]) - dn_lo, axis=1)
    for t in tl.static_range(NS):
        row, ok = _term_rows(tp_ptr, t, coords_b, Lk, a_i, offs_n, m_ok, n_ok)
        s += alpha * tl.where(ok, tl.gather(qe_small, row, axis=1), 0.0)
    s = s * scale
    visible = m_ok[:, None] & n_ok[None, :]
    if CAUSAL:
        visible = visible & (offs_n[None, :] <= a_i[:, None])
    if HAS_KPM:
        pad = tl.load(kpm_b + offs_n, mask=n_ok, other=1)
        visible = visible & (pad == 0)[None, :]
    return tl.where(visible, s, float("-inf"))


@triton.jit
def _table_rows(table_h, rows, N, D, offs_d):
    """Table rows ``rows`` [R] as [R, BD] (rows beyond N and columns beyond D read as zero)."""
    return tl.load(table_h + rows[:, None] * D + offs_d[None, :],
                   mask=(rows < N)[:, None] & (offs_d < D)[None, :], other=0.0)


@triton.jit
def _small_products(q, table_h, small_off, N, D, offs_d, SPAD: tl.constexpr, PREC: tl.constexpr):
    """q·E for every small-term row: [BM, SPAD]."""
    e = _table_rows(table_h, small_off + tl.arange(0, SPAD), N, D, offs_d)
    return _dot(q, tl.trans(e.to(q.dtype)), PREC)


@triton.jit
def _cra_fwd_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, coords_ptr, tp_ptr, kpm_ptr, out_ptr, lse_ptr,
    H, Lq, Lk, D, N, C, table_hs, small_off, idx_off, idx_n, idx_min,
    sk_b, sk_h, sv_b, sv_h,
    alpha, scale, seed, threshold, keep_scale, keys_per_split,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_IDX: tl.constexpr, NS: tl.constexpr,
    DROPOUT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
    BAND: tl.constexpr, SPAD: tl.constexpr, PREC: tl.constexpr, SPLIT: tl.constexpr,
):
    # q [B, H, Lq, D]; k, v [B, H, Lk, D] (dense rows, strided b/h); out like q; lse [B, H, Lq] fp32.
    # SPLIT (decoding): program (m, bh, s) covers keys [s·keys_per_split, (s+1)·keys_per_split)
    # and writes its normalised partial output and lse (fp32, [S, B·H, Lq, D] and [S, B·H, Lq])
    # to out_ptr / lse_ptr; _cra_combine_kernel merges the splits.
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
    if NS > 0:
        qe_small = _small_products(q, table_h, small_off, N, D, offs_d, SPAD, PREC)
    else:
        qe_small = tl.zeros([BM, SPAD], dtype=tl.float32)
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
        offs_n = j0 + tl.arange(0, BN)
        kv_mask = (offs_n < Lk)[:, None] & (offs_d < D)[None, :]
        k = tl.load(k_base + offs_n[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
        s = _logits(q, k, qe_small, table_h, coords_b, tp_ptr, kpm_b, a_i, a0, j0, offs_m, offs_n,
                    offs_d, Lq, Lk, D, idx_off, idx_n, idx_min, alpha, scale,
                    CAUSAL, HAS_KPM, HAS_IDX, NS, BN, BAND, PREC)
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
    has = l_i > 0
    out = tl.where(has[:, None], acc / tl.where(has, l_i, 1.0)[:, None], 0.0)
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
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
    (out's dtype) and lse [R]: weights exp(lse_s - max lse), in split order."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    offs_d = tl.arange(0, BD)
    r_ok = rows < R
    mask = r_ok[:, None] & (offs_d < D)[None, :]
    m = tl.full([BR], float("-inf"), tl.float32)
    for s in range(S):
        m = tl.maximum(m, tl.load(part_lse_ptr + s * R + rows, mask=r_ok, other=float("-inf")))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    den = tl.zeros([BR], tl.float32)
    acc = tl.zeros([BR, BD], tl.float32)
    for s in range(S):
        w = tl.exp(tl.load(part_lse_ptr + s * R + rows, mask=r_ok, other=float("-inf")) - m_safe)
        den += w
        acc += w[:, None] * tl.load(part_ptr + (s * R + rows)[:, None] * D + offs_d[None, :], mask=mask, other=0.0)
    has = den > 0
    out = tl.where(has[:, None], acc / tl.where(has, den, 1.0)[:, None], 0.0)
    tl.store(out_ptr + rows[:, None] * D + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(lse_ptr + rows, tl.where(has, m_safe + tl.log(tl.where(has, den, 1.0)), float("-inf")), mask=r_ok)


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
def _sort_rows(x, LOG_BN: tl.constexpr):
    """Ascending sort of each row of x [BM, 2^LOG_BN]: a bitonic network of gathers (one per
    compare-exchange step), cheap on a GPU and in the interpreter alike (tl.sort is not)."""
    idx = tl.broadcast_to(tl.arange(0, x.shape[1])[None, :], x.shape)
    for kk in tl.static_range(1, LOG_BN + 1):
        for jj in tl.static_range(kk):
            partner = idx ^ (1 << (kk - 1 - jj))
            y = tl.gather(x, partner, axis=1)
            keep_min = (idx < partner) == ((idx & (1 << kk)) == 0)
            x = tl.where(keep_min, tl.minimum(x, y), tl.maximum(x, y))
    return x


@triton.jit
def _scatter_rows(dqe_base, ds, row, ok, m_ok, SPAD: tl.constexpr, BN: tl.constexpr,
                  LOG_BN: tl.constexpr):
    """dqe[m, row[m, n]] += ds[m, n] over the tile's valid pairs, deterministically and without
    atomics or a [BM, BN, SPAD] one-hot: sort each query's (row, key) pairs, sum runs of equal rows
    with a segmented scan, and let only each run's last element add into the scratch row, so every
    address is written once per call."""
    n = tl.arange(0, BN)
    key = tl.where(ok, row * BN + n[None, :], SPAD * BN)  # invalid pairs sort last, out of range
    key = _sort_rows(key, LOG_BN)
    r = key // BN
    v = tl.gather(ds, key % BN, axis=1)
    j = tl.broadcast_to(n[None, :], r.shape)
    start = (j == 0) | (r != tl.gather(r, tl.maximum(j - 1, 0), axis=1))
    end = (j == BN - 1) | (r != tl.gather(r, tl.minimum(j + 1, BN - 1), axis=1))
    total, _ = tl.associative_scan((v, start), 1, _seg_add)
    mask = end & (r < SPAD) & m_ok[:, None]
    ptr = dqe_base + tl.arange(0, r.shape[0])[:, None] * SPAD + r
    tl.store(ptr, tl.load(ptr, mask=mask, other=0.0) + total, mask=mask)


@triton.jit
def _cra_bwd_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, coords_ptr, tp_ptr, kpm_ptr, do_ptr, lse_ptr, delta_ptr,
    dq_ptr, dk_ptr, dv_ptr, ddn_ptr, dsmall_ptr, dqe_ptr,
    H, Lq, Lk, D, N, C, table_hs, small_off, idx_off, idx_n, idx_min, DN0, NDN, G,
    sk_b, sk_h, sv_b, sv_h,
    alpha, scale, seed, threshold, keep_scale,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_IDX: tl.constexpr, NS: tl.constexpr,
    DROPOUT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
    BAND: tl.constexpr, SPAD: tl.constexpr, PREC: tl.constexpr, CH: tl.constexpr, LOG_BN: tl.constexpr,
):
    # Scratch (fp32, one region per (group, batch·head)): dk/dv [G, B·H, Lk, D],
    # ddn [G, B·H, NDN, D] (index-table gradient by Δn - DN0), dsmall [G, B·H, SPAD, D],
    # dqe [G, B·H, BM, SPAD]: d loss / d (q·E) of the current query tile, zero between tiles.
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
    dsmall_base = dsmall_ptr + region * SPAD * D
    dqe_base = dqe_ptr + region * BM * SPAD
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
        if NS > 0:
            qe_small = _small_products(q, table_h, small_off, N, D, offs_d, SPAD, PREC)
        else:
            qe_small = tl.zeros([BM, SPAD], dtype=tl.float32)
        dq = tl.zeros([BM, BD], tl.float32)
        end_n = Lk
        if CAUSAL:
            end_n = tl.minimum(Lk, a0 + BM)
        for j0 in range(0, end_n, BN):
            offs_n = j0 + tl.arange(0, BN)
            n_ok = offs_n < Lk
            kv_mask = n_ok[:, None] & d_ok[None, :]
            k = tl.load(k_base + offs_n[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_base + offs_n[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
            s = _logits(q, k, qe_small, table_h, coords_b, tp_ptr, kpm_b, a_i, a0, j0, offs_m, offs_n,
                        offs_d, Lq, Lk, D, idx_off, idx_n, idx_min, alpha, scale,
                        CAUSAL, HAS_KPM, HAS_IDX, NS, BN, BAND, PREC)
            p = tl.where((s == float("-inf")) | (lse == float("-inf"))[:, None], 0.0,
                         tl.exp(s - lse_safe[:, None]))
            dp = _dot(do, tl.trans(v), PREC).to(tl.float32)
            p_used = p
            if DROPOUT:
                keep = _dropout_keep(seed, bh, offs_m, offs_n, threshold)
                p_used = tl.where(keep, p * keep_scale, 0.0)
                dp = tl.where(keep, dp * keep_scale, 0.0)
            ds = p * (dp - delta[:, None]) * scale  # d loss / d (q·k + alpha·relative)
            dq += _dot(ds.to(k.dtype), k, PREC)
            _rmw(dv_base, offs_n, offs_d, D, _dot(tl.trans(p_used.to(do.dtype)), do, PREC), kv_mask)
            _rmw(dk_base, offs_n, offs_d, D, _dot(tl.trans(ds.to(q.dtype)), q, PREC), kv_mask)
            if HAS_IDX:
                # band column c holds Δn = dn_lo + c, i.e. key j = a_i - dn_lo - c of this tile
                dn_lo = a0 - (j0 + BN - 1)
                jl = (a_i[:, None] - dn_lo - tl.arange(0, BAND)[None, :]) - j0
                inside = (jl >= 0) & (jl < BN)
                dqe = tl.where(inside, tl.gather(ds, tl.minimum(tl.maximum(jl, 0), BN - 1), axis=1), 0.0)
                dqe = dqe * alpha
                e = _band(table_h, dn_lo, idx_off, idx_n, idx_min, D, offs_d, BAND)
                dq += _dot(dqe.to(q.dtype), e.to(q.dtype), PREC)
                _rmw(ddn_base, dn_lo - DN0 + tl.arange(0, BAND), offs_d, D,
                     _dot(tl.trans(dqe.to(q.dtype)), q, PREC), d_ok[None, :])
            for t in tl.static_range(NS):
                row, ok = _term_rows(tp_ptr, t, coords_b, Lk, a_i, offs_n, m_ok, n_ok)
                _scatter_rows(dqe_base, ds * alpha, row, ok, m_ok, SPAD, BN, LOG_BN)
                # the next scatter's threads may own other (m, row) pairs: make the adds visible
                tl.debug_barrier()
        # dq += dqe·E and dE += dqeᵀ·q in column chunks of the scratch, zeroing it for the next tile.
        if NS > 0:
            for c0 in range(0, SPAD, CH):
                cols = c0 + tl.arange(0, CH)
                ptr = dqe_base + tl.arange(0, BM)[:, None] * SPAD + cols[None, :]
                dqe = tl.load(ptr)
                tl.store(ptr, tl.zeros([BM, CH], tl.float32))
                e = _table_rows(table_h, small_off + cols, N, D, offs_d)
                dq += _dot(dqe.to(q.dtype), e.to(q.dtype), PREC)
                _rmw(dsmall_base, cols, offs_d, D, _dot(tl.trans(dqe.to(q.dtype)), q, PREC), d_ok[None, :])
            tl.debug_barrier()
        tl.store(dq_ptr + (bh * Lq + offs_m)[:, None] * D + offs_d[None, :], dq.to(dq_ptr.dtype.element_ty),
                 mask=qmask)


# ----------------------------------------------------------------------------- host side

class _Plan:
    """Kernel parameters derived from the term list: index term, small terms, block sizes."""

    def __init__(self, table: Tensor, terms: List[int], Lq: int, Lk: int, D: int):
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
        self.BM = 16 if Lq <= 16 else 32
        self.BN = 32
        self.BAND = triton.next_power_of_2(self.BM + self.BN - 1)
        self.SPAD = max(16, triton.next_power_of_2(max(self.N - self.small_off, 1)))
        n_mtiles = triton.cdiv(Lq, self.BM)
        # Δn of every band any tile pair can touch: [DN0, DN0 + NDN)
        self.DN0 = (Lk - Lq) - (triton.cdiv(Lk, self.BN) * self.BN - 1)
        self.NDN = (n_mtiles * self.BM + Lk - Lq) - self.DN0 + self.BAND


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
    # fp32 inputs keep fp32 products (tl.dot would otherwise use TF32 on NVIDIA GPUs); 16-bit
    # inputs use tensor cores ("tf32" is ignored for them), or exact widening in the interpreter.
    if q.dtype in (torch.float32, torch.float64):
        prec = "ieee"
    else:
        prec = "upcast" if q.device.type == "cpu" else "tf32"
    return dict(CAUSAL=bool(causal), HAS_KPM=kpm is not None, HAS_IDX=p.has_idx, NS=p.ns,
                DROPOUT=dropout_p > 0.0, BM=p.BM, BN=p.BN, BD=p.BD, BAND=p.BAND, SPAD=p.SPAD,
                PREC=prec)


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
    n_mtiles = triton.cdiv(Lq, p.BM)
    splits = decode_splits(n_mtiles * B * H, Lk, p.BN) if splits is None else max(1, int(splits))
    keys_per_split = triton.cdiv(triton.cdiv(Lk, splits), p.BN) * p.BN
    splits = triton.cdiv(Lk, keys_per_split)
    cx = _constexprs(p, causal, kpm, dropout_p, q) | dict(SPLIT=splits > 1)
    if splits == 1:
        _cra_fwd_kernel[(n_mtiles, B * H)](q, k, v, table, coords, p.tp, kpm_t, out, lse, **args,
                                           keys_per_split=Lk, **cx)
        return out, lse
    part = torch.empty(splits, B * H * Lq, D, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(splits, B * H * Lq, dtype=torch.float32, device=q.device)
    _cra_fwd_kernel[(n_mtiles, B * H, splits)](q, k, v, table, coords, p.tp, kpm_t, part, part_lse,
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
    """[Ht, NDN, D] gradient by Δn -> [Ht, idx_n, D] table rows (clamped ends summed)."""
    Ht, NDN, D = ddn.shape
    r = torch.arange(NDN, device=ddn.device) + p.DN0 - p.idx_min
    n = p.idx_n
    out = ddn.new_zeros(Ht, n, D)
    mid = (r > 0) & (r < n - 1)
    out[:, r[mid]] = ddn[:, mid]  # unique rows: an assignment, no accumulation order involved
    out[:, 0] += ddn[:, r <= 0].sum(1)
    if n > 1:
        out[:, n - 1] += ddn[:, r >= n - 1].sum(1)
    return out


def backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
             table: Tensor, coords: Tensor, terms: List[int], alpha: float, scale: float,
             causal: bool, kpm: Optional[Tensor], dropout_p: float, seed: int):
    """(dq, dk, dv, dtable) like q, k, v, table."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    p = _Plan(table, terms, Lq, Lk, D)
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
    dsmall = torch.zeros(G, B * H, p.SPAD if p.ns else 1, D, **f32)
    dqe = torch.zeros(G, B * H, p.BM if p.ns else 1, p.SPAD if p.ns else 1, **f32)
    _cra_bwd_kernel[(G, B * H)](q, k, v, table, coords, p.tp, kpm_t, grad_out, lse, delta,
                                dq, dk, dv, ddn, dsmall, dqe, **args, DN0=p.DN0, NDN=p.NDN, G=G,
                                **_constexprs(p, causal, kpm, dropout_p, q), CH=min(64, p.SPAD),
                                LOG_BN=p.BN.bit_length() - 1)
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
    """The Triton twin of torch.ops.fastattn.circular_relative_attention: (out, lse fp32)."""
    return forward(q, k, v, table, coords, terms, alpha, scale, causal, key_padding_mask, dropout_p, seed)


@circular_relative_attention_op.register_fake
def _(q, k, v, table, coords, terms, alpha, scale, causal, key_padding_mask, dropout_p, seed):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


# The same autograd glue as the C++ op, with this module's backward kernel.
circular_relative_attention_op.register_autograd(backward_with(backward), setup_context=setup_context)
