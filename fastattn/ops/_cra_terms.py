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

import functools
import math
import numbers
from typing import Callable, Dict, List, NamedTuple, Optional

import torch
from torch import Tensor

from fastattn import _ext

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
MAX_PITCH = 127  # MIDI
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
    limits = coordinate_limits(kw["bar_res"])
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


# ---------------------------------------------------------------------------------- layout
# The structure of the kernels' inputs depends only on which tables are given (and their row
# counts), the options, and (with ``shrink``) a few statistics of the coordinates; the values
# of the coordinate channels are per token. So a decoding step can reuse the table and convert
# only the new tokens' coordinates (``token_channels``).

class Channel(NamedTuple):
    """One int32 coordinate channel: from coordinate ``coord`` ("onset", "pitch", "bar",
    "position"), ``c // period`` ("div"), ``(c mod period) // step`` ("mod") or ``c // step``
    ("id"); -1 (missing) stays -1."""
    coord: str
    op: str
    period: int = 1
    step: int = 1


class Layout(NamedTuple):
    terms: List[int]           # TERM_INTS per term
    channels: List[Channel]    # coords[:, c] is channels[c] of every token
    blocks: List[tuple]        # table blocks in row order: ("table", name, rows) or ("outer", hi, lo)
    key: tuple                 # everything besides the source tables that the table depends on
    names: List[str]           # the source tables' argument names
    kw: dict                   # the op's table/option arguments the layout was made for

    @property
    def sources(self) -> List[Tensor]:
        return [self.kw[n] for n in self.names]

    @property
    def coordinates(self) -> List[str]:
        """The coordinates (onset, pitch, bar, position) the channels read, each once, in order."""
        return list(dict.fromkeys(ch.coord for ch in self.channels))


def _channel_values(ch: Channel, c: Tensor) -> Tensor:
    missing = c < 0
    if ch.op == "div":
        x = torch.div(c, ch.period, rounding_mode="floor")
    elif ch.op == "mod":
        x = torch.remainder(c, ch.period)
        x = x if ch.step == 1 else torch.div(x, ch.step, rounding_mode="floor")
    else:
        x = c if ch.step == 1 else torch.div(c, ch.step, rounding_mode="floor")
    return torch.where(missing, -1, x).to(torch.int32)


_OPS = {"id": 0, "div": 1, "mod": 2}


def coordinate_limits(bar_res: int) -> Dict[str, tuple]:
    """Allowed values of each coordinate (the same as ``validate`` enforces)."""
    return {"onset": (-1, COORD_MAX), "pitch": (-1, MAX_PITCH), "bar": (-1, COORD_MAX), "position": (-1, bar_res - 1)}


@functools.lru_cache(maxsize=64)
def _channel_spec(channels: tuple, limits: tuple) -> tuple:
    """(coordinate names, spec, lo, hi) of ``coordinate_channels`` for these channels and limits
    ((name, (lo, hi)) pairs; none: unchecked), remembered: a decoding step converts one token."""
    names = list(dict.fromkeys(ch.coord for ch in channels))
    lims = dict(limits)
    lims = [lims[n] if lims else (-2**62, 2**62) for n in names]
    spec = [x for ch in channels for x in (names.index(ch.coord), _OPS[ch.op], ch.period, ch.step)]
    return names, spec, [lo for lo, _ in lims], [hi for _, hi in lims]


def token_channels(layout: Layout, coords: Dict[str, Tensor], B: int, L: int, device,
                   limits: Optional[Dict[str, tuple]] = None) -> Tensor:
    """int32 [B, C, L]: the layout's channels for tokens whose coordinates are ``coords``
    (name -> [B, L]); works on any range of tokens (each channel is per token). With ``limits``
    (name -> (lo, hi)) the coordinates read are checked to lie in range (ValueError)."""
    if not layout.channels:
        return torch.zeros(B, 0, L, dtype=torch.int32, device=device)
    names, spec, lo, hi = _channel_spec(tuple(layout.channels), tuple(limits.items()) if limits else ())
    if torch.device(device).type == "cpu" and _ext.extension() is not None and not torch.compiler.is_compiling():
        return torch.ops.fastattn.coordinate_channels([coords[n] for n in names], spec, B, L, lo, hi, names)
    if limits and L > 0:
        for n, n_lo, n_hi in zip(names, lo, hi):
            t_min, t_max = torch.aminmax(coords[n])
            if t_min < n_lo:
                raise ValueError(f"{n} has values below {n_lo} (-1 marks a missing value)")
            if t_max > n_hi:
                raise ValueError(f"{n} has values above {n_hi}")
    return torch.stack([_channel_values(ch, coords[ch.coord]) for ch in layout.channels], dim=1).contiguous()


def _present_range(c: Tensor):
    """(min, max) of the non-missing values of an integer tensor, or None when all are missing."""
    present = c[c >= 0]
    if present.numel() == 0:
        return None
    lo, hi = torch.aminmax(present)
    return int(lo), int(hi)


def _common_step(c: Tensor, period: int) -> int:
    """The largest step g dividing ``period`` and every non-missing value of ``c`` mod period."""
    present = torch.remainder(c[c >= 0], period)
    if present.numel() == 0:
        return period
    values = torch.bincount(present.flatten(), minlength=period).nonzero().flatten().tolist()
    return math.gcd(period, *values)


_INT_OPTIONS = ("bar_res", "bar_min", "octave_min", "rel_index_min", "time_min", "pitch_min")
_LAYOUTS: Dict[tuple, Layout] = {}  # layouts without shrinking, by table shapes and options


def layout(kw: dict, combine: str, time_mode: str, H: int, coords: Optional[Dict[str, Tensor]] = None) -> Layout:
    """The term layout for the op's table/option arguments ``kw``.

    With ``coords`` (name -> [B, Lk] of every token), decomposed terms are shrunk to the rows
    these coordinates can reach: the hi factor to the range of its clamped differences, and the
    lo factor to every g-th row when all lo values share a step g (onsets on a 6-tick grid use
    8 of 48 positions). Exact: every pair reads the same row values as without shrinking.
    Without ``coords`` the layout depends only on the tables' shapes and the options, and is
    remembered (a decoding step then builds none).
    """
    memo = None
    if coords is None:
        memo = (combine, time_mode, H) + tuple(kw[n] for n in _INT_OPTIONS) + tuple(
            (n, tuple(kw[n].shape)) for n in TABLE_ARGS if kw[n] is not None)
        hit = _LAYOUTS.get(memo)
        if hit is not None:
            return hit._replace(kw=kw)
    blocks: List[tuple] = []
    terms: List[int] = []
    channels: List[Channel] = []
    names: List[str] = []
    key: list = [combine, time_mode, H]
    rows = 0

    def channel(ch: Channel) -> int:
        channels.append(ch)
        return len(channels) - 1

    def add(block: tuple, n_rows: int, kind, part=PART_COMBINED, ch_hi=-1, ch_lo=-1, param=0, hi_min=0,
            n_hi=0, n_lo=1):
        nonlocal rows
        terms.extend([kind, part, ch_hi, ch_lo, param, hi_min, n_hi, n_lo, rows])
        blocks.append(block)
        rows += n_rows

    def table(name: str, rows_slice: Optional[slice] = None) -> tuple:
        names.append(name)
        sl = None if rows_slice is None else (rows_slice.start, rows_slice.stop, rows_slice.step)
        key.append(sl)
        return ("table", name, sl)

    def decomposed(kind, n_hi_name, n_lo_name, hi: Channel, lo: Channel, param, hi_min):
        n_hi, n_lo = kw[n_hi_name].shape[-2], kw[n_lo_name].shape[-2]
        hi_rows, lo_rows = slice(0, n_hi), slice(0, n_lo)
        if coords is not None:
            hi_rows, lo_rows, lo, param, hi_min = _shrink(kind, coords, hi, lo, n_hi, n_lo, param, hi_min)
        b_hi, b_lo = table(n_hi_name, hi_rows), table(n_lo_name, lo_rows)
        n_hi, n_lo = len(range(n_hi)[hi_rows]), len(range(n_lo)[lo_rows])
        common = dict(ch_hi=channel(hi), ch_lo=channel(lo), param=param, hi_min=hi_min, n_hi=n_hi, n_lo=n_lo)
        if combine == "hadamard":
            add(("outer", b_hi, b_lo), n_hi * n_lo, kind, PART_COMBINED, **common)
        else:  # the sum splits into two gathers from much smaller blocks
            add(b_hi, n_hi, kind, PART_HI, **common)
            add(b_lo, n_lo, kind, PART_LO, **common)

    if kw["rel_index_table"] is not None:
        n = kw["rel_index_table"].shape[-2]
        add(table("rel_index_table"), n, KIND_INDEX, hi_min=kw["rel_index_min"], n_hi=n)
    if kw["bar_table"] is not None:
        R = kw["bar_res"]
        if time_mode == "fields":
            decomposed(KIND_FIELDS, "bar_table", "pos_table", Channel("bar", "id"), Channel("position", "id"),
                       R - 1, kw["bar_min"])
        else:
            decomposed(KIND_QUOTIENT, "bar_table", "pos_table", Channel("onset", "div", R),
                       Channel("onset", "mod", R), R, kw["bar_min"])
    if kw["time_table"] is not None:
        n = kw["time_table"].shape[-2]
        add(table("time_table"), n, KIND_DIRECT, ch_hi=channel(Channel("onset", "id")), hi_min=kw["time_min"],
            n_hi=n)
    if kw["octave_table"] is not None:
        decomposed(KIND_QUOTIENT, "octave_table", "pitch_class_table", Channel("pitch", "div", 12),
                   Channel("pitch", "mod", 12), 12, kw["octave_min"])
    if kw["pitch_table"] is not None:
        n = kw["pitch_table"].shape[-2]
        add(table("pitch_table"), n, KIND_DIRECT, ch_hi=channel(Channel("pitch", "id")), hi_min=kw["pitch_min"],
            n_hi=n)
    lay = Layout(terms, channels, blocks, tuple(key) + (tuple(terms),), names, kw)
    if memo is not None:
        if len(_LAYOUTS) > 256:
            _LAYOUTS.clear()
        _LAYOUTS[memo] = lay._replace(kw={})
    return lay


def _shrink(kind, coords, hi: Channel, lo: Channel, n_hi, n_lo, param, hi_min):
    """Row slices of the two factors (and the adjusted lo channel, param and hi_min) that serve
    every pair of these coordinates; see ``layout``."""
    hi_vals = _channel_values(hi, coords[hi.coord])
    hi_rows = slice(0, n_hi)
    r = _present_range(hi_vals)
    if r is not None:  # Δhi over all pairs lies in [min - max - 1, max - min] (1: the borrow)
        lo_d = r[0] - r[1] - (1 if kind == KIND_QUOTIENT else 0)
        first = min(max(lo_d - hi_min, 0), n_hi - 1)
        last = min(max(r[1] - r[0] - hi_min, 0), n_hi - 1)
        hi_rows, hi_min = slice(first, last + 1), hi_min + first
    lo_rows = slice(0, n_lo)
    if kind == KIND_QUOTIENT:
        R = lo.period  # lo = c mod R; R rows
        g = _common_step(coords[lo.coord], R)
        if g > 1:
            lo, param, lo_rows = lo._replace(step=g), R // g, slice(0, R, g)
    else:  # FIELDS: row Δpos + param over positions 0 .. param (validated), 2·param + 1 rows
        g = _common_step(coords[lo.coord], param + 1) if n_lo == 2 * param + 1 else 1
        if g > 1:  # rows g·k + (param mod g): Δpos' + param // g
            lo, lo_rows, param = lo._replace(step=g), slice(param % g, n_lo, g), param // g
    return hi_rows, lo_rows, lo, param, hi_min


# --------------------------------------------------------------------------- table cache
# Assembled tables of recent calls that need no gradient (decoding: the same tables at every
# step). An entry is valid while its source tables hold the same bytes: compared with a snapshot
# on every use, because a write through ``.data`` (or into a tensor made in inference mode)
# leaves the version counter alone. The comparison is one memcmp of the sources (CPU), far
# cheaper than rebuilding and transposing the table.

class _Entry(NamedTuple):
    key: tuple
    snapshots: List[Tensor]
    value: dict  # "table" [Ht, N, D]; "table_t" [Ht, D, N] added on first use


_TABLE_CACHE: List[_Entry] = []  # most recent last
_TABLE_CACHE_SIZE = 32


def same_content(a: List[Tensor], b: List[Tensor]) -> bool:
    """Whether each pair holds the same values (bitwise for CPU tensors: NaN equals NaN)."""
    if len(a) != len(b):
        return False
    if all(x.device.type == "cpu" for x in a) and _ext.extension() is not None:
        return bool(torch.ops.fastattn.same_bytes(a, b))
    return all(x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a, b))


def cacheable(sources: List[Tensor]) -> bool:
    """Results built from ``sources`` may be cached: no gradient will flow, not compiling, real
    data (meta tensors, as bench/gpu_resources.py plans launches with, have no contents)."""
    if torch.compiler.is_compiling() or any(t.device.type == "meta" for t in sources):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in sources))


def cached(key: tuple, sources: List[Tensor], build: Callable[[], dict]) -> dict:
    """``build()`` (a dict of tensors), reused while ``key`` and the contents of ``sources`` are
    unchanged; built afresh when gradients are needed."""
    if not cacheable(sources):
        return build()
    key = key + tuple((tuple(t.shape), t.dtype, t.device) for t in sources)
    for i in range(len(_TABLE_CACHE) - 1, -1, -1):  # most recent first: a decoding step hits the last
        e = _TABLE_CACHE[i]
        if e.key == key and same_content(sources, e.snapshots):
            _TABLE_CACHE.append(_TABLE_CACHE.pop(i))
            return e.value
    value = build()
    with torch.inference_mode(False), torch.no_grad():
        snapshots = [t.detach().clone().contiguous() for t in sources]
    _TABLE_CACHE.append(_Entry(key, snapshots, value))
    del _TABLE_CACHE[:-_TABLE_CACHE_SIZE]
    return value


def _block(lay: Layout, block: tuple, combine: str) -> Tensor:
    if block[0] == "outer":
        return _outer(_block(lay, block[1], combine), _block(lay, block[2], combine), combine)
    t, sl = lay.kw[block[1]], block[2]
    return t if sl is None else t[..., slice(*sl), :]


def build_table(lay: Layout, q: Tensor) -> Tensor:
    """The concatenated table [Ht, N, D] of a layout (Ht = 1, or H with per-head tables)."""
    _, H, _, D = q.shape
    parts = [_block(lay, b, lay.key[0]) for b in lay.blocks]
    if not parts:
        return q.new_zeros(1, 0, D)
    if any(b.dim() == 3 for b in parts):
        parts = [b if b.dim() == 3 else b.unsqueeze(0).expand(H, -1, -1) for b in parts]
    else:
        parts = [b.unsqueeze(0) for b in parts]
    return torch.cat(parts, dim=1).contiguous()


def tables(lay: Layout, q: Tensor, transposed: bool = False, on_build: Optional[Callable[[], None]] = None) -> dict:
    """{"table": [Ht, N, D]} (and "table_t": [Ht, D, N] when ``transposed``), cached;
    ``on_build()`` runs first whenever the table is (re)built."""
    def build() -> dict:
        if on_build is not None:
            on_build()
        return {"table": build_table(lay, q)}
    key = lay.key + (q.dtype, q.device, q.shape[-1])  # D matters when there is no table at all
    value = cached(key, lay.sources, build)
    if transposed and "table_t" not in value:
        value["table_t"] = value["table"].transpose(1, 2).contiguous()
    return value


def assemble(q: Tensor, Lk: int, onset, pitch, kw: dict, combine: str, time_mode: str,
             shrink: bool = False, transposed: bool = False) -> Assembled:
    """Build the concatenated table, coordinate channels and term integers for the kernels.
    The table is reused across calls with the same tables when no gradient is needed. With
    ``shrink`` the decomposed terms keep only the rows these coordinates reach (``layout``);
    ``transposed``: the table as the decoding op takes it ([Ht, D, N], ``tables``)."""
    B, H = q.shape[:2]
    coords = {"onset": onset, "pitch": pitch, "bar": kw["bar"], "position": kw["position"]}
    lay = layout(kw, combine, time_mode, H, coords if shrink else None)
    table = tables(lay, q, transposed)["table_t" if transposed else "table"]
    return Assembled(table, token_channels(lay, coords, B, Lk, q.device), lay.terms)
