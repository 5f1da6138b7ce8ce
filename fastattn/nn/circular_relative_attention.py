"""Drop-in multi-head attention with circular relative terms (SPEC §3).

``CircularRelativeAttention`` owns the q/k/v and output projections and the relative-term
tables, and calls :func:`fastattn.circular_relative_attention` (SPEC §2) for the attention
itself. Its flags map one-to-one to the ablations of Inaba et al. (APSIPA ASC 2024); see
``VARIANTS``. Two conventions fix how relative coordinates become table rows (``CONVENTIONS``):
"slides" (SPEC §2: query minus key, time split from the onset) and "authors" (the paper
authors' code, tatsuropfgt/Transformer-SMG: key minus query, time from bar/position fields).
``KVCache`` holds keys, values and the per-token coordinates for incremental decoding.

Conventions used throughout:
  B batch, L tokens (new tokens in a decoding step), Lk keys (cache length), E = embed_dim,
  H = num_heads, D = E / H head dim, N rows of a relative table, R = bar_res.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from fastattn import _ext
from fastattn.backends import BACKENDS
from fastattn.ops import _cra_terms
from fastattn.ops.circular_relative_attention import cached_decode, circular_relative_attention

__all__ = ["CircularRelativeAttention", "KVCache", "VARIANTS", "CONVENTIONS", "variant_kwargs",
           "sinusoidal_table"]

# Fixed offsets of the op's relative tables (the op reads row clamp(Δ − min) with Δ = query −
# key). Under causal attention Δn >= 0 and, for onsets that never decrease, Δt >= 0, so the
# index/time tables start at 0; anything outside a table's range is clamped to its first/last row.
# Pitch differences span -127..127: 255 direct rows, or octaves ⌊Δp / 12⌋ in -11..10 (22 rows).
REL_INDEX_MIN = 0
BAR_MIN = 0
TIME_MIN = 0
OCTAVE_MIN, N_OCTAVE = -11, 22
PITCH_MIN, N_PITCH = -127, 255
N_PITCH_CLASS = 12
MAX_PITCH = _cra_terms.MAX_PITCH

# Sinusoid bases. FME (Guo et al. 2022) uses 7920 for time-like and 9919 for pitch-like values;
# the index table uses the Transformer's 10000. The authors' code uses one base per table.
FME_BASES = {"rel_index_table": 10000.0, "bar_table": 7920.0, "pos_table": 7920.0,
             "time_table": 7920.0, "octave_table": 9919.0, "pitch_class_table": 9919.0,
             "pitch_table": 9919.0}
AUTHORS_BASES = {"bar_table": 7920.0, "pos_table": 8993.0, "time_table": 7920.0,
                 "octave_table": 9919.0, "pitch_class_table": 10469.0, "pitch_table": 9919.0}

# The two named conventions: every option they set (README, "Conventions").
CONVENTIONS: Dict[str, dict] = {
    # SPEC §2 / the paper's slides: Δ = query − key; Δt split into ⌊Δt / R⌋ and Δt mod R; a
    # linear map on every table; FME sinusoids; scaled initialisation.
    "slides": dict(time_mode="onset", difference="query_minus_key", linear_index=True,
                   sinusoid="fme", init="scaled"),
    # The authors' code: Δ = key − query; time from per-token bar and position fields; linear
    # maps on the time and pitch factor tables only; their sinusoids; N(0, 1) tables and
    # nn.Linear's default initialisation; a 24-row learned octave table.
    "authors": dict(time_mode="fields", difference="key_minus_query", linear_index=False,
                    sinusoid="authors", init="authors"),
}
_OPTION_VALUES = {"time_mode": ("onset", "fields"),
                  "difference": ("query_minus_key", "key_minus_query"),
                  "linear_index": (True, False), "sinusoid": ("fme", "authors"),
                  "init": ("scaled", "authors")}

# The paper's five attention variants (Inaba et al. 2024) as constructor flags. Every
# other argument (linear maps, sinusoidal tables, alpha, convention, ...) keeps the constructor
# default and can be overridden in ``from_variant``.
VARIANTS: Dict[str, dict] = {
    # Vanilla causal attention: no relative term at all.
    "Attn": dict(rel_index=False, rel_time=False, rel_pitch=False),
    # Music Transformer (Huang et al. 2018): relative index only.
    "RelAttn": dict(rel_index=True, rel_time=False, rel_pitch=False),
    # RIPO attention (Guo et al. 2022): index + direct (non-decomposed) time and pitch tables.
    "RIPO": dict(rel_index=True, rel_time=True, rel_pitch=True, decompose=False),
    # Circular relative attention: bar/position and octave/pitch-class factors, summed.
    "CirRelAttn": dict(rel_index=True, rel_time=True, rel_pitch=True, decompose=True,
                       combine="add"),
    # ... combined by Hadamard product (the paper's best).
    "CirRelAttn-H": dict(rel_index=True, rel_time=True, rel_pitch=True, decompose=True,
                         combine="hadamard"),
}

_TABLE_NAMES = ("rel_index_table", "bar_table", "pos_table", "octave_table",
                "pitch_class_table", "time_table", "pitch_table")
# Tables whose stored rows run the other way in key-minus-query order (the op reads them by a
# query-minus-key difference). Pitch tables keep their order: the pitches are mirrored instead.
_REVERSED_IN_KEY_ORDER = ("rel_index_table", "bar_table", "pos_table", "time_table")
COORDINATES = ("onset", "pitch", "bar", "position")


def variant_kwargs(name: str) -> dict:
    """Constructor flags of one of the paper's variants (a fresh copy of ``VARIANTS[name]``)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose one of {list(VARIANTS)}")
    return dict(VARIANTS[name])


def sinusoidal_table(values: Tensor, dim: int, base: float, style: str = "fme") -> Tensor:
    """Sinusoidal encoding of integer ``values`` [N] -> [N, dim] (default dtype).

    Even columns hold sin, odd columns cos (interleaved). Column c's frequency is
    base^(-2·⌊c/2⌋ / dim) for ``style="fme"`` (Guo et al.'s Fundamental Music Embedding: a sin
    and a cos per frequency) and base^(-2c / dim) for ``style="authors"`` (the paper authors'
    code: every column its own frequency). Computed in float64 so large relative values (up
    to thousands of ticks) keep their phase exactly.
    """
    if style not in ("fme", "authors"):
        raise ValueError(f"style must be 'fme' or 'authors', got {style!r}")
    c = torch.arange(dim, dtype=torch.float64)
    expo = torch.div(c, 2, rounding_mode="floor") if style == "fme" else c
    inv_freq = float(base) ** (-2.0 * expo / dim)
    angles = values.to(torch.float64).unsqueeze(-1) * inv_freq
    table = torch.where(c.long() % 2 == 0, torch.sin(angles), torch.cos(angles))
    return table.to(torch.get_default_dtype())


def fields_onset(bar: Tensor, position: Tensor, bar_res: int) -> Tensor:
    """Onset bar·R + position [B, L] of per-token fields (−1 where either field is missing)."""
    return torch.where((bar < 0) | (position < 0), -1, bar * bar_res + position)


def mirror_pitch(pitch: Tensor) -> Tensor:
    """127 − p for pitches 0…127 (others unchanged), so that the op's query-minus-key pitch
    difference becomes key minus query. Out-of-range values stay out of range for the op to
    report."""
    return torch.where((pitch >= 0) & (pitch <= MAX_PITCH), MAX_PITCH - pitch, pitch)


def _kv_buffer(shape, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Zeroed K/V storage: on the CPU from the extension's ``kv_storage`` (huge pages for
    buffers of 2 MiB or more: a decoding step streams the whole cache, and with 4 KiB pages a
    cache-cold step spent a fifth of its reading on page walks)."""
    if device.type == "cpu" and dtype.is_floating_point and _ext.extension() is not None:
        return torch.ops.fastattn.kv_storage(list(shape), dtype)
    return torch.zeros(shape, device=device, dtype=dtype)


class KVCache:
    """Keys, values and per-token coordinates of the tokens decoded so far.

    Storage is preallocated with a capacity that doubles when exceeded, so appending one token
    at a time costs amortised O(1) copies per token. The properties return views of the valid
    prefix:

      k, v              [B, H, Lk, D]
      onset, pitch,     [B, Lk] int64, or None when never appended (the module only stores
      bar, position     the coordinates its relative terms read)
      key_padding_mask  [B, Lk] bool (True = padded), or None when no append gave one

    The views are strided (row stride = capacity), not contiguous.

    The cache is for inference: appending tensors that require grad while grad mode is on
    raises, because later in-place appends would invalidate the autograd graph. Decode under
    ``torch.no_grad()`` or ``torch.inference_mode()`` (and keep using the same mode for a given
    cache: tensors allocated in inference mode cannot be written outside it).

    Storage is allocated at the first append with that append's dtype and device, unless
    ``dtype``/``device`` are given here (then later appends must match them).
    """

    def __init__(self, batch_size: int, num_heads: int, head_dim: int, *, capacity: int = 64,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None):
        if batch_size < 1 or num_heads < 1 or head_dim < 1:
            raise ValueError(f"batch_size, num_heads and head_dim must be >= 1, got "
                             f"{batch_size}, {num_heads}, {head_dim}")
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.batch_size, self.num_heads, self.head_dim = batch_size, num_heads, head_dim
        self._capacity = int(capacity)
        self._len = 0
        self._k: Optional[Tensor] = None
        self._v: Optional[Tensor] = None
        # Coordinate storage; allocated on demand and kept across reset() for reuse.
        self._coords: Dict[str, Optional[Tensor]] = {n: None for n in COORDINATES}
        self._coords["key_padding_mask"] = None
        # Which coordinates the current sequence carries (decided by the first append).
        self._has: Dict[str, bool] = {}
        # Per-token int32 channels derived from the coordinates (see derived()):
        # key -> [buffer [B, C, capacity], tokens converted so far].
        self._derived: Dict[object, list] = {}
        if device is not None or dtype is not None:
            self._allocate(torch.device(device) if device is not None else torch.device("cpu"),
                           dtype if dtype is not None else torch.get_default_dtype())

    # ----------------------------------------------------------------------------------------
    def _allocate(self, device: torch.device, dtype: torch.dtype) -> None:
        shape = (self.batch_size, self.num_heads, self._capacity, self.head_dim)
        self._k, self._v = _kv_buffer(shape, device, dtype), _kv_buffer(shape, device, dtype)

    def _grow(self, needed: int) -> None:
        """Make room for ``needed`` tokens in total: double the capacity (at least)."""
        if needed <= self._capacity:
            return
        new_cap = max(needed, 2 * self._capacity)
        n = self._len

        def regrow(t: Optional[Tensor], seq_dim: int) -> Optional[Tensor]:
            if t is None:
                return None
            shape = list(t.shape)
            shape[seq_dim] = new_cap
            out = _kv_buffer(shape, t.device, t.dtype) if t.dim() == 4 else t.new_zeros(shape)
            out.narrow(seq_dim, 0, n).copy_(t.narrow(seq_dim, 0, n))
            return out

        self._k, self._v = regrow(self._k, 2), regrow(self._v, 2)
        for name, t in self._coords.items():
            self._coords[name] = regrow(t, 1)
        for entry in self._derived.values():
            entry[0] = regrow(entry[0], 2)
        self._capacity = new_cap

    def _coord_buffer(self, name: str, dtype: torch.dtype, device: torch.device) -> Tensor:
        t = self._coords[name]
        if t is None:
            t = torch.zeros(self.batch_size, self._capacity, dtype=dtype, device=device)
            self._coords[name] = t
        return t

    # ----------------------------------------------------------------------------------------
    def append(self, k: Tensor, v: Tensor, onset: Optional[Tensor] = None,
               pitch: Optional[Tensor] = None, key_padding_mask: Optional[Tensor] = None, *,
               bar: Optional[Tensor] = None, position: Optional[Tensor] = None) -> None:
        """Append L new tokens: k, v [B, H, L, D]; onset, pitch, bar, position [B, L] int;
        mask [B, L] bool.

        Each coordinate must be given for every append of a sequence or for none (checked
        against the first append after construction or ``reset()``). A key_padding_mask may be
        given for some appends only; tokens appended without one are unpadded. An append that
        raises leaves the cache unchanged.
        """
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            raise RuntimeError("KVCache is for inference: call the decoding step under "
                               "torch.no_grad() or torch.inference_mode()")
        B, H, D = self.batch_size, self.num_heads, self.head_dim
        for name, t in (("k", k), ("v", v)):
            if t.dim() != 4 or (t.shape[0], t.shape[1], t.shape[3]) != (B, H, D):
                raise ValueError(f"{name} must be [B={B}, H={H}, L, D={D}], got {list(t.shape)}")
        if v.shape[2] != k.shape[2]:
            raise ValueError(f"k has L={k.shape[2]} but v has L={v.shape[2]}")
        L = k.shape[2]
        if self._k is None:
            self._allocate(k.device, k.dtype)
        if k.dtype != self._k.dtype or v.dtype != self._k.dtype:
            raise TypeError(f"cache holds {self._k.dtype}, got k {k.dtype} / v {v.dtype}")
        if k.device != self._k.device or v.device != self._k.device:
            raise ValueError(f"cache is on {self._k.device}, got k on {k.device} / v on {v.device}")
        given = {"onset": onset, "pitch": pitch, "bar": bar, "position": position,
                 "key_padding_mask": key_padding_mask}
        for name, t in given.items():
            if t is None:
                continue
            if tuple(t.shape) != (B, L):
                raise ValueError(f"{name} must be [B, L] = [{B}, {L}], got {list(t.shape)}")
            if name == "key_padding_mask" and t.dtype != torch.bool:
                raise TypeError(f"key_padding_mask must be bool, got {t.dtype}")
            if name != "key_padding_mask" and (t.is_floating_point() or t.dtype == torch.bool):
                raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
        if self._len > 0:
            for name in COORDINATES:
                if self._has.get(name) != (given[name] is not None):
                    was = self._has.get(name)
                    raise ValueError(f"{name} was {'given' if was else 'not given'} for the "
                                     f"cached tokens, so it must be "
                                     f"{'given' if was else 'omitted'} here too")
        else:
            self._has = {name: given[name] is not None for name in COORDINATES}
            self._has["key_padding_mask"] = False

        n = self._len
        self._grow(n + L)
        self._k[:, :, n:n + L].copy_(k)
        self._v[:, :, n:n + L].copy_(v)
        for name in COORDINATES:
            if given[name] is not None:
                self._coord_buffer(name, torch.int64, k.device)[:, n:n + L].copy_(given[name])
        if key_padding_mask is not None and not self._has["key_padding_mask"]:
            # First mask of this sequence: earlier tokens were unpadded.
            self._coord_buffer("key_padding_mask", torch.bool, k.device)[:, :n].fill_(False)
            self._has["key_padding_mask"] = True
        if self._has["key_padding_mask"]:
            m = self._coords["key_padding_mask"][:, n:n + L]
            if key_padding_mask is None:
                m.fill_(False)
            else:
                m.copy_(key_padding_mask)
        self._len = n + L

    def reset(self) -> None:
        """Forget every token (storage is kept for reuse)."""
        self.truncate(0)

    def truncate(self, length: int) -> None:
        """Keep only the first ``length`` tokens (storage is kept). Used to undo an append
        whose decoding step failed, or a speculative step."""
        if not 0 <= length <= self._len:
            raise ValueError(f"truncate: length must be in 0…{self._len}, got {length}")
        self._len = int(length)
        if self._len == 0:
            self._has = {}
        for entry in self._derived.values():
            entry[1] = min(entry[1], self._len)

    def derived(self, key, fn: Callable[[Dict[str, Tensor], int], Tensor]) -> Tensor:
        """Per-token int32 channels [B, C, Lk] computed by ``fn`` from the cached coordinates,
        kept with the cache and extended as tokens are appended: each token is converted once
        (a decoding step converts the new token, not the whole cache). ``fn(coords, n)``
        receives name -> [B, n] for the n tokens not converted yet (every coordinate the cache
        holds) and returns [B, C, n]; ``key`` names the conversion (one buffer per key).
        Returns a strided view of the buffer (row stride = capacity)."""
        entry = self._derived.get(key)
        done = 0 if entry is None else entry[1]
        if entry is None or done < self._len:
            coords = {name: t[:, done:self._len] for name, t in self._coords.items()
                      if name != "key_padding_mask" and self._has.get(name)}
            new = fn(coords, self._len - done)
            if entry is None:
                entry = self._derived[key] = [new.new_empty(self.batch_size, new.shape[1], self._capacity), 0]
            entry[0][:, :, done:self._len].copy_(new)
            entry[1] = self._len
        return entry[0][:, :, :self._len]

    def __len__(self) -> int:
        return self._len

    @property
    def capacity(self) -> int:
        """Tokens the current storage holds before it has to grow."""
        return self._capacity

    @property
    def k(self) -> Optional[Tensor]:
        """Cached keys [B, H, Lk, D] (None before the first append)."""
        return None if self._k is None else self._k[:, :, :self._len]

    @property
    def v(self) -> Optional[Tensor]:
        """Cached values [B, H, Lk, D] (None before the first append)."""
        return None if self._v is None else self._v[:, :, :self._len]

    def stores(self, name: str) -> bool:
        """Whether the cached tokens carry coordinate ``name`` (onset, pitch, bar, position,
        key_padding_mask); the same as ``getattr(cache, name) is not None`` without the view."""
        return bool(self._has.get(name))

    def _coord(self, name: str) -> Optional[Tensor]:
        if not self._has.get(name):
            return None
        return self._coords[name][:, :self._len]

    @property
    def onset(self) -> Optional[Tensor]:
        """Cached onsets [B, Lk] int64, or None."""
        return self._coord("onset")

    @property
    def pitch(self) -> Optional[Tensor]:
        """Cached pitches [B, Lk] int64, or None."""
        return self._coord("pitch")

    @property
    def bar(self) -> Optional[Tensor]:
        """Cached bar fields [B, Lk] int64, or None."""
        return self._coord("bar")

    @property
    def position(self) -> Optional[Tensor]:
        """Cached position fields [B, Lk] int64, or None."""
        return self._coord("position")

    @property
    def key_padding_mask(self) -> Optional[Tensor]:
        """Cached key padding mask [B, Lk] bool (True = padded), or None."""
        return self._coord("key_padding_mask")

    def __repr__(self) -> str:
        return (f"KVCache(len={self._len}, capacity={self._capacity}, "
                f"batch_size={self.batch_size}, num_heads={self.num_heads}, "
                f"head_dim={self.head_dim})")


class CircularRelativeAttention(nn.Module):
    """Multi-head self-attention with relative index, time and pitch terms (SPEC §2, §3).

    Args:
        embed_dim, num_heads: E and H; the head dim D = E / H must be an integer.
        max_len: rows of the relative-index table (Δn = 0 … max_len − 1; larger distances share
            the last row).
        rel_index, rel_time, rel_pitch: which relative terms to add to the logits.
        decompose: True splits time into bar and position and pitch into octave and pitch class
            (circular relative attention). False uses one direct table per term (RIPO / the "no
            decompose" ablation): a time table of n_bar · bar_res rows and a pitch table of 255
            rows for Δp = −127 … 127.
        combine: "hadamard" or "add", how the two factors of a decomposed term combine.
        linear: pass tables through their own bias-free D×D ``nn.Linear`` before
            combining/using them (the authors' best configuration): every factor table, and the
            index table too when ``linear_index``.
        sinusoidal: fixed sinusoidal tables (non-persistent buffers, rebuilt from the
            configuration) instead of learned ones; ``sinusoid`` picks the formula. Combine with
            ``linear=True`` to learn on top of them.
        alpha: weight of the relative terms: logits = (q·k + alpha·S) / √D.
        bar_res: ticks per bar R (48 = 12 ticks per beat in 4/4).
        n_bar: rows of the bar table (bar offsets 0 … n_bar − 1).
        dropout: attention-probability dropout, applied in training mode only.
        bias: bias in the q/k/v and output projections.
        batch_first: x is [B, L, E] when True, [L, B, E] when False. Coordinates and
            key_padding_mask are [B, L] either way (like ``nn.MultiheadAttention``'s mask).
        causal: mask keys after each query.
        per_head_tables: learned tables [H, N, D] (one per head) instead of [N, D] shared.
        backend: forwarded to the op: "auto", "cuda", "triton", "cpp" or "reference".
        convention: "slides" or "authors", a preset of the six options below (``CONVENTIONS``);
            an option passed explicitly overrides the preset.
        time_mode: "onset" (time from per-token onsets: Δt split into ⌊Δt / R⌋ and Δt mod R)
            or "fields" (from per-token bar and position fields: Δbar and Δposition, a position
            table of 2R − 1 rows; the direct time table reads bar·R + position).
        difference: "query_minus_key" or "key_minus_query": which way coordinate differences
            are taken, so which stored row a (query, key) pair reads (table below). It changes
            the function only through the octave / pitch-class split (⌊Δp / 12⌋ is not odd in Δp);
            elsewhere it reverses the stored row order. "key_minus_query" needs
            time_mode="fields" when the decomposed time term is on.
        linear_index: whether ``linear`` also maps the index table.
        sinusoid: "fme" (frequency base^(−2⌊c/2⌋/D), bases 10000 index, 7920 time, 9919
            pitch) or "authors" (base^(−2c/D), bases 7920 bar and time, 8993 position, 9919
            octave and pitch, 10469 pitch class; the index table stays learned).
        init: "scaled" (see below; orthogonal linear maps, Xavier in-projection) or "authors"
            (tables N(0, 1), ``nn.Linear``'s default initialisation everywhere).
        n_octave: rows of the octave table; default 22 (octaves −11 … 10), 24 for the authors'
            learned table (their rows 22 and 23 are never read).

    Row read for a query token q and key token k (a table of N rows, R = bar_res; clamp to the
    table; a coordinate of −1 is missing and the terms reading it contribute 0):

    ============  =============================  ===========================================
    table         query_minus_key (slides)       key_minus_query (authors)
    ============  =============================  ===========================================
    index         n_q − n_k                      (n_k − n_q) + N − 1
    bar           ⌊Δt/R⌋ or bar_q − bar_k        (bar_k − bar_q) + N − 1 (fields only)
    position      Δt mod R or pos_q − pos_k + R−1  (pos_k − pos_q) + R − 1 (fields only)
    time (direct) t_q − t_k                      (t_k − t_q) + N − 1
    octave        ⌊(p_q − p_k)/12⌋ + 11          ⌊(p_k − p_q)/12⌋ + 11
    pitch class   (p_q − p_k) mod 12             (p_k − p_q) mod 12
    pitch (direct) (p_q − p_k) + 127             (p_k − p_q) + 127
    ============  =============================  ===========================================

    With Δt = t_q − t_k of onsets t (time_mode="onset") or t = bar·R + position ("fields").
    A sinusoidal row r encodes the value it stands for: in query-minus-key order r plus the
    table's lowest value; in key-minus-query order the authors' values (the negated difference
    d = r − offset, except the pitch class, which encodes d itself).

    Learned tables with init="scaled" are N(0, σ²) so that the combined relative embedding has
    entries of std ≈ 1/√D, like a single table of std 1/√D: σ = D^(−1/2) for index and direct
    tables, D^(−1/4) for each factor of a Hadamard product, (2D)^(−1/2) for each summand.

    Tables are attributes named like the op's arguments (``rel_index_table``, ``bar_table``,
    ``pos_table``, ``octave_table``, ``pitch_class_table``, ``time_table``, ``pitch_table``),
    stored in the row order of ``difference``; disabled ones are None. Their linear maps live in
    ``table_maps[name]``. ``relative_tables()`` gives them in the op's layout.
    """

    def __init__(self, embed_dim: int, num_heads: int, *, max_len: int = 1024,
                 rel_index: bool = True, rel_time: bool = True, rel_pitch: bool = True,
                 decompose: bool = True, combine: str = "hadamard", linear: bool = True,
                 sinusoidal: bool = False, alpha: float = 0.1, bar_res: int = 48, n_bar: int = 16,
                 dropout: float = 0.0, bias: bool = False, batch_first: bool = True,
                 causal: bool = True, per_head_tables: bool = False, backend: str = "auto",
                 convention: str = "slides", time_mode: Optional[str] = None,
                 difference: Optional[str] = None, linear_index: Optional[bool] = None,
                 sinusoid: Optional[str] = None, init: Optional[str] = None,
                 n_octave: Optional[int] = None):
        super().__init__()
        if embed_dim < 1 or num_heads < 1 or embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be a positive multiple of num_heads "
                             f"({num_heads})")
        if combine not in ("hadamard", "add"):
            raise ValueError(f"combine must be 'hadamard' or 'add', got {combine!r}")
        if convention not in CONVENTIONS:
            raise ValueError(f"convention must be one of {list(CONVENTIONS)}, got {convention!r}")
        opts = dict(CONVENTIONS[convention])
        given = dict(time_mode=time_mode, difference=difference, linear_index=linear_index,
                     sinusoid=sinusoid, init=init)
        opts.update({k: v for k, v in given.items() if v is not None})
        for name, allowed in _OPTION_VALUES.items():
            if opts[name] not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {opts[name]!r}")
        if n_octave is None:
            n_octave = 24 if convention == "authors" and not sinusoidal else N_OCTAVE
        for name, val in (("max_len", max_len), ("bar_res", bar_res), ("n_bar", n_bar),
                          ("n_octave", n_octave)):
            if int(val) != val or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"backend must be 'auto' or one of {list(BACKENDS)}, got {backend!r}")
        if sinusoidal and per_head_tables:
            # Fixed encodings are identical for every head; a per-head copy would change nothing.
            raise ValueError("per_head_tables=True needs learned tables; it has no effect with "
                             "sinusoidal=True")
        if (rel_time and decompose and opts["time_mode"] == "onset"
                and opts["difference"] == "key_minus_query"):
            # ⌊Δt / R⌋ of a key-minus-query onset difference is no reordering of the op's rows.
            raise ValueError("difference='key_minus_query' needs time_mode='fields' for the "
                             "decomposed time term (the authors split bar and position fields)")

        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.max_len, self.bar_res, self.n_bar = int(max_len), int(bar_res), int(n_bar)
        self.n_octave = int(n_octave)
        self.rel_index, self.rel_time, self.rel_pitch = rel_index, rel_time, rel_pitch
        self.decompose, self.combine, self.linear = decompose, combine, linear
        self.sinusoidal, self.per_head_tables = sinusoidal, per_head_tables
        self.alpha, self.dropout = float(alpha), float(dropout)
        self.batch_first, self.causal, self.backend = batch_first, causal, backend
        self.convention = convention
        self.time_mode, self.difference = opts["time_mode"], opts["difference"]
        self.linear_index, self.sinusoid, self.init = (opts["linear_index"], opts["sinusoid"],
                                                       opts["init"])

        # One fused in-projection for q, k, v (rows: q block, k block, v block).
        self.in_proj = nn.Linear(embed_dim, 3 * embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        if self.init == "scaled":  # nn.MultiheadAttention's initialisation
            nn.init.xavier_uniform_(self.in_proj.weight)
        # (init="authors": nn.Linear's default, as for their separate to_q / to_k / to_v, whose
        # fan-in E is the fused map's too.)
        if bias:
            nn.init.zeros_(self.in_proj.bias)
            nn.init.zeros_(self.out_proj.bias)

        self.table_maps = nn.ModuleDict()
        self._table_names = []
        D, R = self.head_dim, self.bar_res
        pair_std = D ** -0.25 if combine == "hadamard" else (2 * D) ** -0.5
        if rel_index:
            self._add_table("rel_index_table", self.max_len, D ** -0.5)
        if rel_time and decompose:
            self._add_table("bar_table", self.n_bar, pair_std)
            self._add_table("pos_table", R if self.time_mode == "onset" else 2 * R - 1, pair_std)
        elif rel_time:
            self._add_table("time_table", self.n_bar * R, D ** -0.5)
        if rel_pitch and decompose:
            self._add_table("octave_table", self.n_octave, pair_std)
            self._add_table("pitch_class_table", N_PITCH_CLASS, pair_std)
        elif rel_pitch:
            self._add_table("pitch_table", N_PITCH, D ** -0.5)
        for name in _TABLE_NAMES:
            if name not in self._table_names:
                self.register_parameter(name, None)

    def _row_values(self, name: str, rows: int) -> Tensor:
        """The relative value each stored row of a table stands for (what a sinusoid encodes)."""
        r = torch.arange(rows)
        if self.difference == "query_minus_key":
            low = {"rel_index_table": REL_INDEX_MIN, "bar_table": BAR_MIN, "time_table": TIME_MIN,
                   "octave_table": OCTAVE_MIN, "pitch_class_table": 0, "pitch_table": PITCH_MIN,
                   "pos_table": 0 if self.time_mode == "onset" else 1 - self.bar_res}[name]
            return r + low
        # Key-minus-query row r stands for the difference r − offset; the authors' sinusoids
        # encode its negation (their aranges run downwards), except the pitch class (upwards).
        offset = {"octave_table": -OCTAVE_MIN, "pitch_class_table": 0, "pitch_table": -PITCH_MIN,
                  "pos_table": self.bar_res - 1}.get(name, rows - 1)
        return r - offset if name == "pitch_class_table" else offset - r

    def _add_table(self, name: str, rows: int, std: float) -> None:
        D = self.head_dim
        authors = self.sinusoid == "authors"
        if self.sinusoidal and not (authors and name == "rel_index_table"):
            base = (AUTHORS_BASES if authors else FME_BASES)[name]
            table = sinusoidal_table(self._row_values(name, rows), D, base, self.sinusoid)
            # Non-persistent: fully determined by the configuration, so kept out of state_dict.
            self.register_buffer(name, table, persistent=False)
        else:
            shape = (self.num_heads, rows, D) if self.per_head_tables else (rows, D)
            std = 1.0 if self.init == "authors" else std
            self.register_parameter(name, nn.Parameter(torch.randn(shape) * std))
        if self.linear and (self.linear_index or name != "rel_index_table"):
            lin = nn.Linear(D, D, bias=False)
            if self.init == "scaled":
                nn.init.orthogonal_(lin.weight)
            self.table_maps[name] = lin
        self._table_names.append(name)

    # --------------------------------------------------------------------------------------------
    @classmethod
    def from_variant(cls, name: str, embed_dim: int, num_heads: int,
                     **overrides) -> "CircularRelativeAttention":
        """Build one of ``VARIANTS`` ("Attn", "RelAttn", "RIPO", "CirRelAttn", "CirRelAttn-H");
        ``overrides`` replace any constructor argument, including the variant's own flags
        (e.g. ``convention="authors"``)."""
        return cls(embed_dim, num_heads, **{**variant_kwargs(name), **overrides})

    def new_kv_cache(self, batch_size: int, capacity: Optional[int] = None,
                     device=None, dtype=None) -> KVCache:
        """An empty ``KVCache`` for this module. capacity defaults to ``max_len`` (one
        allocation for a generation up to the index table's length; it grows beyond that).
        dtype/device default to those of the first appended keys (so autocast works)."""
        return KVCache(batch_size, self.num_heads, self.head_dim,
                       capacity=self.max_len if capacity is None else capacity,
                       device=device, dtype=dtype)

    @property
    def coordinate_names(self) -> Tuple[str, ...]:
        """The per-token coordinates ``forward`` reads (e.g. ("bar", "position", "pitch"))."""
        names: Tuple[str, ...] = ()
        if self.rel_time:
            names += ("bar", "position") if self.time_mode == "fields" else ("onset",)
        if self.rel_pitch:
            names += ("pitch",)
        return names

    def relative_tables(self, dtype: Optional[torch.dtype] = None) -> Dict[str, Tensor]:
        """The op's table arguments: each table through its linear map (when it has one), in
        the op's row order (reversed for the key-minus-query tables listed in the class
        docstring), then cast to ``dtype`` (a no-op when it already matches). Shapes [N, D] or
        [H, N, D].

        When no gradient is needed (decoding) the result is kept and handed out again while
        the tables and maps hold the same values (compared by content, so in-place updates,
        optimizer steps, ``.data`` writes and replacements are all noticed), so a decoding step
        neither recomputes the maps nor makes the op re-assemble its table."""
        sources = [getattr(self, n) for n in self._table_names]
        sources += [m.weight for m in self.table_maps.values()]

        def build() -> Dict[str, Tensor]:
            out = {}
            for name in self._table_names:
                t = getattr(self, name)
                if name in self.table_maps:
                    t = self.table_maps[name](t)
                if self.difference == "key_minus_query" and name in _REVERSED_IN_KEY_ORDER:
                    t = t.flip(-2)
                out[name] = t if dtype is None else t.to(dtype)
            return out

        key = ("nn.CircularRelativeAttention.relative_tables", dtype, torch.is_inference_mode_enabled(),
               self.difference, tuple(self._table_names), tuple(self.table_maps.keys()))
        return dict(_cra_terms.cached(key, sources, build))

    def op_arguments(self, onset: Optional[Tensor] = None, pitch: Optional[Tensor] = None,
                     bar: Optional[Tensor] = None, position: Optional[Tensor] = None,
                     dtype: Optional[torch.dtype] = None) -> dict:
        """Keyword arguments of ``fastattn.circular_relative_attention`` for keys with these
        coordinates ([B, Lk] each): the tables (``relative_tables``), the coordinates as the op
        reads them (fields → onset for the direct time table; pitches mirrored for
        key_minus_query), the table offsets, ``combine`` and ``alpha``."""
        kw = self.relative_tables(dtype)
        if self.rel_time and self.time_mode == "fields" and self.decompose:
            kw.update(time_mode="fields")
        kw.update(self._op_coordinates(onset=onset, pitch=pitch, bar=bar, position=position))
        kw.update(bar_res=self.bar_res, bar_min=BAR_MIN, octave_min=OCTAVE_MIN,
                  rel_index_min=REL_INDEX_MIN, time_min=TIME_MIN, pitch_min=PITCH_MIN,
                  combine=self.combine, alpha=self.alpha)
        return kw

    def _op_coordinates(self, onset: Optional[Tensor] = None, pitch: Optional[Tensor] = None,
                        bar: Optional[Tensor] = None, position: Optional[Tensor] = None) -> dict:
        """The coordinates [B, L] as the op reads them (onset, pitch, bar, position; None where
        no term reads one). Per token, so a decoding step converts only its new tokens."""
        if self.rel_time and self.time_mode == "fields":
            if self.decompose:
                onset = None
            else:
                onset, bar, position = fields_onset(bar, position, self.bar_res), None, None
        else:
            bar = position = None
        if self.rel_pitch and self.difference == "key_minus_query" and pitch is not None:
            pitch = mirror_pitch(pitch)
        return dict(onset=onset if self.rel_time else None, pitch=pitch if self.rel_pitch else None,
                    bar=bar if self.rel_time else None, position=position if self.rel_time else None)

    def _coordinate(self, name: str, t: Optional[Tensor], B: int, L: int) -> Optional[Tensor]:
        if name not in self.coordinate_names:
            return None  # no term reads it: ignore whatever was passed
        if t is None:
            why = {"onset": "rel_time=True", "pitch": "rel_pitch=True"}.get(
                name, "rel_time=True and time_mode='fields'")
            raise ValueError(f"{name} [B, L] is required because {why}; pass the {name} of each "
                             f"token (-1 where missing)")
        if tuple(t.shape) != (B, L):
            raise ValueError(f"{name} must be [B, L] = [{B}, {L}] (batch-major even when "
                             f"batch_first=False), got {list(t.shape)}")
        return t

    def forward(self, x: Tensor, onset: Optional[Tensor] = None, pitch: Optional[Tensor] = None,
                key_padding_mask: Optional[Tensor] = None,
                kv_cache: Optional[KVCache] = None, *, bar: Optional[Tensor] = None,
                position: Optional[Tensor] = None) -> Tensor:
        """Self-attention over x.

        Args:
            x: [B, L, E] (batch_first) or [L, B, E].
            onset: [B, L] integer onset ticks (-1 = missing); read when rel_time and
                time_mode="onset".
            pitch: [B, L] integer MIDI pitches 0…127 (-1 = missing); read when rel_pitch.
            bar, position: [B, L] integer bar index and position 0…R−1 in the bar (-1 =
                missing; either missing zeroes the time term); read when rel_time and
                time_mode="fields".
            key_padding_mask: [B, L] bool, True where a token is padding (never attended to).
            kv_cache: when given, x (and the coordinates and mask) are the *new* tokens; their
                keys and values are appended to the cache and the queries attend over every
                cached token (query i sits at absolute position len(cache_before) + i). A call
                that raises leaves the cache as it was.

        Returns:
            Tensor shaped like x.
        """
        if x.dim() != 3:
            raise ValueError(f"x must be 3-D ({'[B, L, E]' if self.batch_first else '[L, B, E]'}),"
                             f" got {list(x.shape)}")
        if not self.batch_first:
            x = x.transpose(0, 1)
        B, L, E = x.shape
        if E != self.embed_dim:
            raise ValueError(f"x has embedding size {E}, expected embed_dim={self.embed_dim}")
        given = {"onset": onset, "pitch": pitch, "bar": bar, "position": position}
        coords = {n: self._coordinate(n, given[n], B, L) for n in COORDINATES}

        H, D = self.num_heads, self.head_dim
        out = None
        # [B, L, 3E] -> three [B, H, L, D] views.
        q, k, v = self.in_proj(x).view(B, L, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        n_before = None
        if kv_cache is not None:
            if kv_cache.batch_size != B or kv_cache.num_heads != H or kv_cache.head_dim != D:
                raise ValueError(f"kv_cache is for B={kv_cache.batch_size}, H={kv_cache.num_heads},"
                                 f" D={kv_cache.head_dim}; this call has B={B}, H={H}, D={D}")
            n_before, new_coords, new_mask = len(kv_cache), coords, key_padding_mask
            kv_cache.append(k, v, key_padding_mask=key_padding_mask, **coords)
        try:
            if kv_cache is not None:
                out = self._decode_step(q, new_coords, new_mask, kv_cache)
                if out is None:  # the public op over the whole cache (views made only when needed)
                    k, v, key_padding_mask = kv_cache.k, kv_cache.v, kv_cache.key_padding_mask
                    coords = {n: getattr(kv_cache, n) for n in COORDINATES}
            if out is None:
                if key_padding_mask is not None:
                    # The cache hands out strided views; give the op a dense mask (kernels read it flat).
                    key_padding_mask = key_padding_mask.contiguous()
                out = circular_relative_attention(
                    q, k, v, **self.op_arguments(**coords, dtype=q.dtype), causal=self.causal,
                    key_padding_mask=key_padding_mask,
                    dropout_p=self.dropout if self.training else 0.0, backend=self.backend)
        except BaseException:
            if n_before is not None:  # a rejected step must not leave its tokens in the cache
                kv_cache.truncate(n_before)
            raise
        out = self.out_proj(out.transpose(1, 2).reshape(B, L, E))  # [B, L, E]
        return out if self.batch_first else out.transpose(0, 1)

    def _decode_step(self, q: Tensor, coords: Dict[str, Optional[Tensor]],
                     key_padding_mask: Optional[Tensor], kv_cache: KVCache) -> Optional[Tensor]:
        """Attention of the new tokens' q [B, H, L, D] (coordinates ``coords``, name -> [B, L])
        over ``kv_cache`` (already appended to) by the cpp decoding path
        (``ops.circular_relative_attention.cached_decode``), or None where it does not apply.
        ``relative_tables`` keeps the mapped tables while the parameters are unchanged, so a
        step computes no map; the cache keeps each token's op coordinates."""
        if self.training and self.dropout > 0:
            return None
        kw = {**dict.fromkeys(_cra_terms.TABLE_ARGS), **self.op_arguments(**coords, dtype=q.dtype)}
        new = {n: kw.pop(n) for n in _cra_terms.COORD_ARGS}
        convert = (self.__class__._op_coordinates, self.rel_time, self.rel_pitch, self.time_mode,
                   self.difference, self.decompose, self.bar_res)
        return cached_decode(q, kv_cache, new, kw, combine=kw.pop("combine"),
                             time_mode=kw.pop("time_mode", "quotient"), alpha=kw.pop("alpha"),
                             causal=self.causal, key_padding_mask=key_padding_mask, backend=self.backend,
                             op_coordinates=(convert, lambda c: self._op_coordinates(**c)))

    def extra_repr(self) -> str:
        terms = [n for n, on in (("index", self.rel_index), ("time", self.rel_time),
                                 ("pitch", self.rel_pitch)) if on]
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"terms={terms or 'none'}, decompose={self.decompose}, combine={self.combine!r}, "
                f"linear={self.linear}, sinusoidal={self.sinusoidal}, alpha={self.alpha}, "
                f"bar_res={self.bar_res}, n_bar={self.n_bar}, max_len={self.max_len}, "
                f"dropout={self.dropout}, causal={self.causal}, batch_first={self.batch_first}, "
                f"per_head_tables={self.per_head_tables}, backend={self.backend!r}, "
                f"convention={self.convention!r}, time_mode={self.time_mode!r}, "
                f"difference={self.difference!r}, linear_index={self.linear_index}, "
                f"sinusoid={self.sinusoid!r}, init={self.init!r}")
