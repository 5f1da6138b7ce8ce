"""Circular relative attention from the fused ops' raw arguments, in plain PyTorch.

``torch.ops.fastattn.circular_relative_attention(q, k, v, table, coords, terms, ...)`` takes the
assembled form (``fastattn.ops._cra_terms.assemble``): one table [Ht, N, D], int32 coordinate
channels [B, C, Lk] and TERM_INTS integers per term. This module is that op's specification:

- :func:`check_raw_args` accepts exactly the arguments the C++ check (``cra_make_problem`` in
  csrc/include/cra_problem.h) accepts and raises ValueError naming the first problem otherwise;
- :func:`circular_relative_attention_raw` computes the op's output with every index formed in
  int64 (the rule of ``cra_term_row`` in csrc/include/cra_common.h), differentiably.

Uses: the oracle of the raw-op fuzzer (tests/raw_fuzz.py) and the double backward of the fused
ops (autograd through this formulation when ``create_graph=True``).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from fastattn.reference.circular_relative_attention import attend

KIND_INDEX, KIND_DIRECT, KIND_QUOTIENT, KIND_FIELDS = 0, 1, 2, 3
PART_COMBINED, PART_HI, PART_LO = 0, 1, 2
TERM_INTS, MAX_TERMS = 9, 8
INT32_MAX = 2**31 - 1
SIZE_MAX = INT32_MAX - 2**16  # csrc/include/check_bounds.h: kSizeMax
COORD_MAX, SHIFT_MAX = 2**30, 2**30 - 1  # cra_problem.h: CRA_COORD_MAX, CRA_SHIFT_MAX


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise ValueError(msg)


def _in(x: int, lo: int, hi: int, what: str) -> int:
    _need(lo <= x <= hi, f"{what} must be in [{lo}, {hi}], got {x}")
    return x


def term_rows(kind: int, part: int, n_hi: int, n_lo: int) -> int:
    """Rows of the table one term occupies."""
    if kind in (KIND_INDEX, KIND_DIRECT) or part == PART_HI:
        return n_hi
    return n_lo if part == PART_LO else n_hi * n_lo


def check_terms(terms: Sequence[int], C: int, N: int, Lk: int) -> List[List[int]]:
    """The term integers split per term, after the checks of ``cra_check_term``."""
    _need(len(terms) % TERM_INTS == 0 and len(terms) // TERM_INTS <= MAX_TERMS,
          f"terms must hold {TERM_INTS} ints per term and at most {MAX_TERMS} terms")
    out, total, blocks = [], 0, []
    for t in range(len(terms) // TERM_INTS):
        kind, part, ch_hi, ch_lo, param, hi_min, n_hi, n_lo, off = terms[t * TERM_INTS:(t + 1) * TERM_INTS]
        _in(kind, KIND_INDEX, KIND_FIELDS, f"terms[{t}] kind")
        decomposed = kind in (KIND_QUOTIENT, KIND_FIELDS)
        _in(part, PART_COMBINED, PART_LO if decomposed else PART_COMBINED, f"terms[{t}] part")
        # channels a kind does not use must be -1, the others must exist
        _in(ch_hi, *((-1, -1) if kind == KIND_INDEX else (0, C - 1)), f"terms[{t}] ch_hi")
        _in(ch_lo, *((0, C - 1) if decomposed else (-1, -1)), f"terms[{t}] ch_lo")
        if kind == KIND_QUOTIENT:
            _in(param, 1, COORD_MAX, f"terms[{t}] period")
        elif kind == KIND_FIELDS:
            _in(param, -SHIFT_MAX, SHIFT_MAX, f"terms[{t}] fields offset")
        else:
            _in(param, 0, 0, f"terms[{t}] param")
        _in(hi_min, -SHIFT_MAX, SHIFT_MAX, f"terms[{t}] hi_min")
        _in(n_hi, 1, INT32_MAX, f"terms[{t}] n_hi")
        _in(n_lo, 1, INT32_MAX if decomposed else 1, f"terms[{t}] n_lo")
        rows = term_rows(kind, part, n_hi, n_lo)
        _need(rows <= N, f"terms[{t}]: term rows exceed the table ({rows} > {N})")
        _in(off, 0, N - rows, f"terms[{t}] row_offset")
        if kind == KIND_INDEX:
            _need(Lk + abs(hi_min) + n_hi <= INT32_MAX, f"terms[{t}]: Lk + |hi_min| + n_hi must fit in int32")
        for u, (o2, r2) in enumerate(blocks):
            _need(off >= o2 + r2 or o2 >= off + rows, f"terms: row blocks overlap (terms {u} and {t} share table rows)")
        blocks.append((off, rows))
        total += rows
        out.append([kind, part, ch_hi, ch_lo, param, hi_min, n_hi, n_lo, off])
    _need(total <= INT32_MAX, "terms: the rows of all terms together must fit in int32")
    return out


def check_raw_args(q: Tensor, k: Tensor, v: Tensor, table: Tensor, coords: Tensor, terms: Sequence[int],
                   alpha: float, scale: float, causal: bool, key_padding_mask: Optional[Tensor],
                   dropout_p: float, seed: int, check_values: bool = True) -> None:
    """ValueError unless the fused op accepts these arguments (the rules of ``cra_make_problem``).
    ``check_values=False`` skips reading the coordinate values (GPU tensors: no device sync)."""
    _need(q.dim() == 4 and k.dim() == 4 and v.dim() == 4, "q, k, v must be 4-D")
    B, H, Lq, D = (_in(s, 0, SIZE_MAX, f"q size {i}") for i, s in enumerate(q.shape))
    Lk = _in(k.shape[2], 0, SIZE_MAX, "Lk")
    _need((k.shape[0], k.shape[1], k.shape[3]) == (B, H, D), "k: B, H, D must match q")
    _need(v.shape == k.shape, "v must have the shape of k")
    _need(Lq <= Lk, "Lq must be <= Lk")
    _need(k.dtype == q.dtype and v.dtype == q.dtype and table.dtype == q.dtype, "dtypes differ")
    _need(q.is_contiguous() and table.is_contiguous(), "q and table must be contiguous")
    for t in (k, v):
        _need((t.stride(3) == 1 or D == 1) and (t.stride(2) == D or Lk == 1), "k, v need dense rows")
    _need(table.dim() == 3 and table.shape[2] == D and table.shape[0] in (1, H), "table must be [1 or H, N, D]")
    N = _in(table.shape[1], 0, SIZE_MAX, "N")
    _need(coords.dim() == 3 and coords.shape[0] == B and coords.shape[2] == Lk and coords.dtype == torch.int32
          and coords.is_contiguous(), "coords must be contiguous int32 [B, C, Lk]")
    C = _in(coords.shape[1], 0, SIZE_MAX, "C")
    check_terms(list(terms), C, N, Lk)
    if check_values and coords.numel():
        lo, hi = int(coords.min()), int(coords.max())
        _need(lo >= -SHIFT_MAX and hi <= COORD_MAX, f"coords values must be in [{-SHIFT_MAX}, {COORD_MAX}]")
    if key_padding_mask is not None:
        m = key_padding_mask
        _need(m.dtype == torch.bool and m.dim() == 2 and tuple(m.shape) == (B, Lk) and m.is_contiguous(),
              "key_padding_mask must be contiguous bool [B, Lk]")
    _need(0.0 <= dropout_p < 1.0, "dropout_p must be in [0, 1)")


def relative_scores_raw(q: Tensor, table: Tensor, coords: Tensor, terms: Sequence[int], Lk: int) -> Tensor:
    """Σ over terms of q·table[row(i, j)] (0 where a coordinate is missing): [B, H, Lq, Lk].
    q [B, H, Lq, D], table [Ht, N, D], coords int [B, C, Lk]; rows in int64 arithmetic."""
    B, H, Lq, _ = q.shape
    dev = q.device
    qe = torch.einsum("bhid,hnd->bhin", q, table.expand(H, -1, -1))  # [B, H, Lq, N]
    a = torch.arange(Lq, device=dev) + (Lk - Lq)
    c = coords.long()
    total = q.new_zeros(B, H, Lq, Lk)
    for kind, part, ch_hi, ch_lo, param, hi_min, n_hi, n_lo, off in (
            terms[i:i + TERM_INTS] for i in range(0, len(terms), TERM_INTS)):
        if kind == KIND_INDEX:
            dn = (a.view(Lq, 1) - torch.arange(Lk, device=dev).view(1, Lk)).expand(B, Lq, Lk)
            rows, valid = off + (dn - hi_min).clamp(0, n_hi - 1), torch.ones_like(dn, dtype=torch.bool)
        else:
            hq, hk = c[:, ch_hi, a].unsqueeze(-1), c[:, ch_hi].unsqueeze(1)  # [B, Lq, 1], [B, 1, Lk]
            valid = (hq >= 0) & (hk >= 0)
            if kind == KIND_DIRECT:
                rows = off + (hq - hk - hi_min).clamp(0, n_hi - 1)
            else:
                lq, lk = c[:, ch_lo, a].unsqueeze(-1), c[:, ch_lo].unsqueeze(1)
                dh, dl = hq - hk, lq - lk
                if kind == KIND_QUOTIENT:  # borrow from the quotient when the remainder is negative
                    borrow = (dl < 0).long()
                    dl, dh = dl + borrow * param, dh - borrow
                else:
                    valid = valid & (lq >= 0) & (lk >= 0)
                    dl = dl + param
                hi, lo = (dh - hi_min).clamp(0, n_hi - 1), dl.clamp(0, n_lo - 1)
                rows = off + (hi if part == PART_HI else lo if part == PART_LO else hi * n_lo + lo)
            rows = torch.where(valid, rows, off)  # any in-range row; masked below
        s = torch.gather(qe, -1, rows.unsqueeze(1).expand(B, H, Lq, Lk))
        total = total + s.masked_fill(~valid.unsqueeze(1), 0.0)
    return total


def circular_relative_attention_raw(q: Tensor, k: Tensor, v: Tensor, table: Tensor, coords: Tensor,
                                    terms: Sequence[int], alpha: float, scale: float, causal: bool,
                                    key_padding_mask: Optional[Tensor], dropout_p: float, seed: int) -> Tensor:
    """The fused op's output [B, H, Lq, D] (arguments as ``torch.ops.fastattn.circular_relative_attention``)."""
    rel = relative_scores_raw(q, table, coords, list(terms), k.shape[2])
    return attend(q, k, v, rel, alpha=alpha, scale=scale, causal=causal, key_padding_mask=key_padding_mask,
                  dropout_p=dropout_p, dropout_seed=seed)
