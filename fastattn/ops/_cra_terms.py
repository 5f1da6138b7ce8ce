"""Argument checking and term assembly for circular relative attention.

Fused kernels see the relative terms in one uniform form: a single table
``[Ht, N_total, D]`` (Ht = 1 shared, or H per-head) made by concatenating one block of rows per
term, an int32 coordinate tensor ``[B, C, Lk]``, and ``TERM_INTS`` integers per term saying how
to turn a (query, key) pair into a row of that term's block. Combining factor tables
(Hadamard or sum, optional linear maps) happens here in ordinary differentiable PyTorch, so
the kernels return one gradient, for the concatenated table, and autograd routes it back to
the factors. The layout must match ``csrc/include/cra_common.h``.
"""
from __future__ import annotations

import numbers
from typing import Callable, List, NamedTuple

import torch
from torch import Tensor

# Term kinds (cra_common.h: CRA_KIND_*).
KIND_INDEX, KIND_DIRECT, KIND_QUOTIENT, KIND_FIELDS = 0, 1, 2, 3
# Which rows a decomposed term reads: the (hi, lo) outer-product block, or one factor alone.
PART_COMBINED, PART_HI, PART_LO = 0, 1, 2
# kind, part, ch_hi, ch_lo, param (period R, or lo offset for fields), hi_min, n_hi, n_lo, row_offset
TERM_INTS = 9

# Limits of the kernels' int32 arithmetic (csrc/include/cra_problem.h: CRA_COORD_MAX,
# CRA_SHIFT_MAX): coordinates up to 2^30, minimum differences and offsets within ±(2^30 - 1), so
# that no difference a kernel forms can wrap.
INT32_MAX = 2**31 - 1
COORD_MAX = 2**30
SHIFT_MAX = 2**30 - 1
MIN_ARGS = ("bar_min", "octave_min", "rel_index_min", "time_min", "pitch_min")

TABLE_ARGS = ("rel_index_table", "bar_table", "pos_table", "octave_table", "pitch_class_table",
              "time_table", "pitch_table")
COORD_ARGS = ("onset", "pitch", "bar", "position")


class Assembled(NamedTuple):
    table: Tensor        # [Ht, N_total, D]
    coords: Tensor       # int32 [B, C, Lk]
    terms: List[int]     # TERM_INTS per term


def _shape(t: Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def validate(q, k, v, onset, pitch, kw: dict, key_padding_mask, combine, time_mode, alpha,
             scale, dropout_p, check_values: bool = True) -> None:
    """Raise ValueError/TypeError naming the offending argument; return None when all is well."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, H, L, D], got shape {_shape(t)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    for name, t in (("k", k), ("v", v)):
        if (t.shape[0], t.shape[1], t.shape[3]) != (B, H, D):
            raise ValueError(f"{name} has shape {_shape(t)}; its B, H and D must match q {_shape(q)}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} dtype {t.dtype} differs from q dtype {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if v.shape[2] != Lk:
        raise ValueError(f"v has Lk={v.shape[2]} but k has Lk={Lk}")
    if Lq > Lk:
        raise ValueError(f"q has Lq={Lq} > Lk={Lk}: queries must be the last Lq of the keys")
    if Lq == 0 or D == 0 or B == 0 or H == 0:
        raise ValueError(f"q has an empty dimension: {_shape(q)}")
    if combine not in ("hadamard", "add"):
        raise ValueError(f"combine must be 'hadamard' or 'add', got {combine!r}")
    if time_mode not in ("quotient", "fields"):
        raise ValueError(f"time_mode must be 'quotient' or 'fields', got {time_mode!r}")
    for name in ("bar_res", "bar_min", "octave_min", "rel_index_min", "time_min", "pitch_min"):
        if not isinstance(kw[name], numbers.Integral):
            raise TypeError(f"{name} must be an int, got {kw[name]!r}")
    if not 1 <= kw["bar_res"] <= COORD_MAX:
        raise ValueError(f"bar_res must be in [1, 2**30], got {kw['bar_res']}")
    for name in MIN_ARGS:
        if not -SHIFT_MAX <= kw[name] <= SHIFT_MAX:
            raise ValueError(f"{name} must be in [-(2**30 - 1), 2**30 - 1], got {kw[name]}")
    if not isinstance(alpha, numbers.Real):
        raise TypeError(f"alpha must be a number, got {alpha!r}")
    if scale is not None and not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a number or None, got {scale!r}")
    if not (isinstance(dropout_p, numbers.Real) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")

    for name in TABLE_ARGS:
        t = kw[name]
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a Tensor or None, got {type(t).__name__}")
        if t.dim() not in (2, 3) or (t.dim() == 3 and t.shape[0] != H):
            raise ValueError(f"{name} must be [N, D] or per-head [H={H}, N, D], got {_shape(t)}")
        if t.shape[-1] != D:
            raise ValueError(f"{name} has width {t.shape[-1]} but the head dim D is {D}")
        if t.shape[-2] < 1:
            raise ValueError(f"{name} has no rows")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} dtype {t.dtype} differs from q dtype {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    for a, b in (("bar_table", "pos_table"), ("octave_table", "pitch_class_table")):
        if (kw[a] is None) != (kw[b] is None):
            raise ValueError(f"{a} and {b} must be given together (one term), got only "
                             f"{a if kw[a] is not None else b}")
    if kw["time_table"] is not None and kw["bar_table"] is not None:
        raise ValueError("time_table (direct time term) and bar_table/pos_table (decomposed) are exclusive")
    if kw["pitch_table"] is not None and kw["octave_table"] is not None:
        raise ValueError("pitch_table (direct pitch term) and octave_table/pitch_class_table are exclusive")
    if kw["pitch_class_table"] is not None and kw["pitch_class_table"].shape[-2] != 12:
        raise ValueError(f"pitch_class_table must have 12 rows, got {kw['pitch_class_table'].shape[-2]}")
    if kw["pos_table"] is not None:
        want = kw["bar_res"] if time_mode == "quotient" else 2 * kw["bar_res"] - 1
        if kw["pos_table"].shape[-2] != want:
            raise ValueError(f"pos_table must have {want} rows for time_mode={time_mode!r} and "
                             f"bar_res={kw['bar_res']}, got {kw['pos_table'].shape[-2]}")
    _check_rows(kw, combine, Lk)

    fields = time_mode == "fields" and kw["bar_table"] is not None
    need = {
        "onset": kw["time_table"] is not None or (kw["bar_table"] is not None and not fields),
        "pitch": kw["octave_table"] is not None or kw["pitch_table"] is not None,
        "bar": fields, "position": fields,
    }
    coords = {"onset": onset, "pitch": pitch, "bar": kw["bar"], "position": kw["position"]}
    limits = {"onset": (-1, COORD_MAX), "pitch": (-1, 127), "bar": (-1, COORD_MAX),
              "position": (-1, kw["bar_res"] - 1)}
    ranges = []  # (name, t, lo, hi): read back together, one device sync for all of them
    for name, t in coords.items():
        if t is None:
            if need[name]:
                raise ValueError(f"{name} [B, Lk] is required by the relative term(s) given")
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
        if tuple(t.shape) != (B, Lk):
            raise ValueError(f"{name} must have shape [B, Lk] = [{B}, {Lk}], got {_shape(t)}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
        if check_values and t.numel():
            ranges.append((name, t) + limits[name])
    if ranges:
        found = torch.stack([torch.stack([t.min(), t.max()]).to(torch.int64) for _, t, _, _ in ranges]).tolist()
        for (name, _, lo, hi), (t_min, t_max) in zip(ranges, found):
            if t_min < lo:
                raise ValueError(f"{name} has values below {lo} (-1 marks a missing value)")
            if t_max > hi:
                raise ValueError(f"{name} has values above {hi}")
    if key_padding_mask is not None:
        m = key_padding_mask
        if not isinstance(m, Tensor) or m.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must be a bool Tensor [B, Lk], got "
                            f"{getattr(m, 'dtype', type(m).__name__)}")
        if tuple(m.shape) != (B, Lk):
            raise ValueError(f"key_padding_mask must have shape [B, Lk] = [{B}, {Lk}], got {_shape(m)}")
        if m.device != q.device:
            raise ValueError(f"key_padding_mask is on {m.device} but q is on {q.device}")


def _check_rows(kw: dict, combine: str, Lk: int) -> None:
    """The assembled table's row counts fit the kernels' int32 (a Hadamard term has
    rows(hi) x rows(lo) rows; the index term's clamped runs span Lk + |rel_index_min| + rows)."""
    rows = {n: kw[n].shape[-2] for n in TABLE_ARGS if kw[n] is not None}
    total = 0
    for hi, lo in (("bar_table", "pos_table"), ("octave_table", "pitch_class_table")):
        if hi in rows and combine == "hadamard":
            if rows[hi] * rows[lo] > INT32_MAX:
                raise ValueError(f"{hi} rows x {lo} rows = {rows[hi]} x {rows[lo]} (the combined "
                                 f"Hadamard table) exceeds 2**31 - 1")
            total += rows[hi] * rows[lo]
        elif hi in rows:
            total += rows[hi] + rows[lo]
    total += sum(rows.get(n, 0) for n in ("rel_index_table", "time_table", "pitch_table"))
    if total > INT32_MAX:
        raise ValueError(f"the relative tables have {total} rows together; at most 2**31 - 1")
    if "rel_index_table" in rows and Lk + abs(kw["rel_index_min"]) + rows["rel_index_table"] > INT32_MAX:
        raise ValueError("Lk + |rel_index_min| + rel_index_table rows must be at most 2**31 - 1")


def _outer(a: Tensor, b: Tensor, combine: str) -> Tensor:
    """[.., Na, D] x [.., Nb, D] -> [.., Na*Nb, D] with row ia*Nb + ib."""
    x = a.unsqueeze(-2) * b.unsqueeze(-3) if combine == "hadamard" else a.unsqueeze(-2) + b.unsqueeze(-3)
    return x.flatten(-3, -2)


# Assembled tables of recent calls that need no gradient (decoding: the same tables at every
# step), keyed by the source tables' identities and versions; the entries hold the sources, so an
# id cannot be reused while cached, and an in-place update (optimizer step) bumps the version.
_TABLE_CACHE: List[tuple] = []  # (key, table), most recent last
_TABLE_CACHE_SIZE = 4


def _table_key(kw: dict, combine: str, time_mode: str, H: int):
    tables = [kw[n] for n in TABLE_ARGS if kw[n] is not None]
    if not tables:  # the empty table takes q's dtype, device and D, which the key does not hold
        return None
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(t.requires_grad for t in tables)):
        return None
    if any(t.is_inference() for t in tables):  # no version counter (made under inference_mode)
        return None
    return (combine, time_mode, H) + tuple((t, t._version) for t in tables)


def _same_key(a: tuple, b: tuple) -> bool:
    return a[:3] == b[:3] and len(a) == len(b) and all(
        x is y and vx == vy for (x, vx), (y, vy) in zip(a[3:], b[3:]))


def _cached_table(key, build) -> Tensor:
    if key is None:
        return build()
    for i, (k, table) in enumerate(_TABLE_CACHE):
        if _same_key(k, key):
            _TABLE_CACHE.append(_TABLE_CACHE.pop(i))
            return table
    table = build()
    _TABLE_CACHE.append((key, table))
    del _TABLE_CACHE[:-_TABLE_CACHE_SIZE]
    return table


def assemble(q: Tensor, Lk: int, onset, pitch, kw: dict, combine: str, time_mode: str) -> Assembled:
    """Build the concatenated table, coordinate channels and term integers for the kernels.
    The table is reused across calls with the same tables when no gradient is needed."""
    B, H, _, D = q.shape
    blocks: List[Callable[[], Tensor]] = []
    terms: List[int] = []
    channels: List[Tensor] = []
    rows = 0

    def channel(t: Tensor) -> int:
        channels.append(t.to(torch.int32))
        return len(channels) - 1

    def add(block: Callable[[], Tensor], n_rows: int, kind, part=PART_COMBINED, ch_hi=-1, ch_lo=-1,
            param=0, hi_min=0, n_hi=0, n_lo=1):
        nonlocal rows
        terms.extend([kind, part, ch_hi, ch_lo, param, hi_min, n_hi, n_lo, rows])
        blocks.append(block)
        rows += n_rows

    def table_block(t: Tensor) -> Callable[[], Tensor]:
        return lambda: t

    def decomposed(kind, t_hi, t_lo, ch_hi, ch_lo, param, hi_min):
        n_hi, n_lo = t_hi.shape[-2], t_lo.shape[-2]
        common = dict(ch_hi=ch_hi, ch_lo=ch_lo, param=param, hi_min=hi_min, n_hi=n_hi, n_lo=n_lo)
        if combine == "hadamard":
            add(lambda: _outer(t_hi, t_lo, combine), n_hi * n_lo, kind, PART_COMBINED, **common)
        else:  # the sum splits into two gathers from much smaller blocks
            add(table_block(t_hi), n_hi, kind, PART_HI, **common)
            add(table_block(t_lo), n_lo, kind, PART_LO, **common)

    if kw["rel_index_table"] is not None:
        t = kw["rel_index_table"]
        add(table_block(t), t.shape[-2], KIND_INDEX, hi_min=kw["rel_index_min"], n_hi=t.shape[-2])
    if kw["bar_table"] is not None:
        R = kw["bar_res"]
        if time_mode == "fields":
            decomposed(KIND_FIELDS, kw["bar_table"], kw["pos_table"], channel(kw["bar"]),
                       channel(kw["position"]), R - 1, kw["bar_min"])
        else:
            missing = onset < 0
            hi = torch.where(missing, -1, torch.div(onset, R, rounding_mode="floor"))
            lo = torch.where(missing, -1, torch.remainder(onset, R))
            decomposed(KIND_QUOTIENT, kw["bar_table"], kw["pos_table"], channel(hi), channel(lo),
                       R, kw["bar_min"])
    if kw["time_table"] is not None:
        t = kw["time_table"]
        add(table_block(t), t.shape[-2], KIND_DIRECT, ch_hi=channel(onset), hi_min=kw["time_min"],
            n_hi=t.shape[-2])
    if kw["octave_table"] is not None:
        missing = pitch < 0
        hi = torch.where(missing, -1, torch.div(pitch, 12, rounding_mode="floor"))
        lo = torch.where(missing, -1, torch.remainder(pitch, 12))
        decomposed(KIND_QUOTIENT, kw["octave_table"], kw["pitch_class_table"], channel(hi),
                   channel(lo), 12, kw["octave_min"])
    if kw["pitch_table"] is not None:
        t = kw["pitch_table"]
        add(table_block(t), t.shape[-2], KIND_DIRECT, ch_hi=channel(pitch), hi_min=kw["pitch_min"],
            n_hi=t.shape[-2])

    def build() -> Tensor:
        parts = [make() for make in blocks]
        if not parts:
            return q.new_zeros(1, 0, D)
        if any(b.dim() == 3 for b in parts):
            parts = [b if b.dim() == 3 else b.unsqueeze(0).expand(H, -1, -1) for b in parts]
        else:
            parts = [b.unsqueeze(0) for b in parts]
        return torch.cat(parts, dim=1).contiguous()

    table = _cached_table(_table_key(kw, combine, time_mode, H), build)
    if channels:
        coords = torch.stack(channels, dim=1).contiguous()
    else:
        coords = torch.zeros(B, 0, Lk, dtype=torch.int32, device=q.device)
    return Assembled(table, coords, terms)
