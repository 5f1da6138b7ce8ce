"""Drop-in multi-head attention with circular relative terms (SPEC §3).

``CircularRelativeAttention`` owns the q/k/v and output projections and the relative-term
tables, and calls :func:`fastattn.circular_relative_attention` (SPEC §2) for the attention
itself. Its flags map one-to-one to the ablations of Inaba et al. (APSIPA ASC 2024); see
``VARIANTS``. ``KVCache`` holds keys, values and the per-token onset/pitch for incremental
decoding.

Conventions used throughout:
  B batch, L tokens (new tokens in a decoding step), Lk keys (cache length), E = embed_dim,
  H = num_heads, D = E / H head dim, N rows of a relative table.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
from torch import Tensor, nn

from fastattn.backends import BACKENDS
from fastattn.ops import _cra_terms
from fastattn.ops.circular_relative_attention import cached_decode, circular_relative_attention

__all__ = ["CircularRelativeAttention", "KVCache", "VARIANTS", "variant_kwargs", "sinusoidal_table"]

# Fixed offsets of the relative tables (rows start at these relative values). Under causal
# attention Δn >= 0 and, for onsets that never decrease, Δt >= 0, so the index/time tables start
# at 0; anything outside a table's range is clamped to its first/last row by the op.
# Pitch differences span -127..127: 255 direct rows, or octaves ⌊Δp / 12⌋ in -11..10 (22 rows).
REL_INDEX_MIN = 0
BAR_MIN = 0
TIME_MIN = 0
OCTAVE_MIN, N_OCTAVE = -11, 22
PITCH_MIN, N_PITCH = -127, 255
N_PITCH_CLASS = 12

# Sinusoid bases: FME (Guo et al. 2022) uses 7920 for time-like and 9919 for pitch-like values;
# the index table uses the Transformer's 10000.
BASE_INDEX, BASE_TIME, BASE_PITCH = 10000.0, 7920.0, 9919.0

# The paper's five attention variants (Inaba et al. 2024) as constructor flags. Every
# other argument (linear maps, sinusoidal tables, alpha, ...) keeps the constructor default and
# can be overridden in ``from_variant``.
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

# Integer options of the op that the table layout depends on.
_TERM_INT_OPTIONS = ("bar_res", "bar_min", "octave_min", "rel_index_min", "time_min", "pitch_min")

_TABLE_NAMES = ("rel_index_table", "bar_table", "pos_table", "octave_table",
                "pitch_class_table", "time_table", "pitch_table")


def variant_kwargs(name: str) -> dict:
    """Constructor flags of one of the paper's variants (a fresh copy of ``VARIANTS[name]``)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose one of {list(VARIANTS)}")
    return dict(VARIANTS[name])


def sinusoidal_table(values: Tensor, dim: int, base: float) -> Tensor:
    """FME-style sinusoidal encoding of integer ``values`` [N] -> [N, dim] (default dtype).

    Column c uses frequency base^(-2·⌊c/2⌋ / dim); even columns hold sin, odd columns cos
    (interleaved, as in Guo et al.'s Fundamental Music Embedding). Computed in float64 so
    large relative values (up to thousands of ticks) keep their phase exactly.
    """
    c = torch.arange(dim, dtype=torch.float64)
    inv_freq = float(base) ** (-2.0 * torch.div(c, 2, rounding_mode="floor") / dim)
    angles = values.to(torch.float64).unsqueeze(-1) * inv_freq
    table = torch.where(c.long() % 2 == 0, torch.sin(angles), torch.cos(angles))
    return table.to(torch.get_default_dtype())


class KVCache:
    """Keys, values and per-token coordinates of the tokens decoded so far.

    Storage is preallocated with a capacity that doubles when exceeded, so appending one token
    at a time costs amortised O(1) copies per token. The properties return views of the valid
    prefix:

      k, v              [B, H, Lk, D]
      onset, pitch      [B, Lk] int64, or None when never appended (the module only stores
                        the coordinates its relative terms need)
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
        self._coords: Dict[str, Optional[Tensor]] = {"onset": None, "pitch": None,
                                                     "key_padding_mask": None}
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
        self._k = torch.zeros(shape, device=device, dtype=dtype)
        self._v = torch.zeros(shape, device=device, dtype=dtype)

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
            out = t.new_zeros(shape)
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
               pitch: Optional[Tensor] = None, key_padding_mask: Optional[Tensor] = None) -> None:
        """Append L new tokens: k, v [B, H, L, D]; onset, pitch [B, L] int; mask [B, L] bool.

        onset/pitch must be given for every append of a sequence or for none (checked against
        the first append after construction or ``reset()``). A key_padding_mask may be given
        for some appends only; tokens appended without one are unpadded.
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
        given = {"onset": onset, "pitch": pitch, "key_padding_mask": key_padding_mask}
        for name, t in given.items():
            if t is None:
                continue
            if tuple(t.shape) != (B, L):
                raise ValueError(f"{name} must be [B, L] = [{B}, {L}], got {list(t.shape)}")
            if name == "key_padding_mask" and t.dtype != torch.bool:
                raise TypeError(f"key_padding_mask must be bool, got {t.dtype}")
            if name != "key_padding_mask" and (t.is_floating_point() or t.dtype == torch.bool):
                raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
        for name in ("onset", "pitch"):
            present = given[name] is not None
            if self._len == 0:
                self._has[name] = present
            elif self._has.get(name) != present:
                raise ValueError(f"{name} was {'given' if self._has.get(name) else 'not given'} "
                                 f"for the cached tokens, so it must be "
                                 f"{'given' if self._has.get(name) else 'omitted'} here too")
        if self._len == 0:
            self._has["key_padding_mask"] = False

        n = self._len
        self._grow(n + L)
        self._k[:, :, n:n + L].copy_(k)
        self._v[:, :, n:n + L].copy_(v)
        for name in ("onset", "pitch"):
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
        self._len = 0
        self._has = {}
        for entry in self._derived.values():
            entry[1] = 0

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` tokens and forget the rest (storage is kept), e.g. to undo a
        speculative or timed decoding step."""
        if not 0 <= n <= self._len:
            raise ValueError(f"truncate: n must be in [0, {self._len}], got {n}")
        if n == 0:
            self.reset()
            return
        self._len = n
        for entry in self._derived.values():
            entry[1] = min(entry[1], n)

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
        decompose: True splits Δt into bar ⌊Δt / bar_res⌋ and position Δt mod bar_res, and Δp
            into octave ⌊Δp / 12⌋ and pitch class Δp mod 12 (circular relative attention).
            False uses one direct table per term (RIPO / the "no decompose" ablation): a time
            table of n_bar · bar_res rows for Δt = 0 … n_bar·bar_res − 1 and a pitch table of
            255 rows for Δp = −127 … 127.
        combine: "hadamard" or "add", how the two factors of a decomposed term combine.
        linear: pass every table (each factor separately) through its own bias-free D×D
            ``nn.Linear`` before combining/using it (the authors' best configuration). The maps
            start orthogonal so they keep each row's norm at initialisation.
        sinusoidal: fixed FME-style sinusoidal tables (non-persistent buffers, rebuilt from the
            configuration) instead of learned ones. Row r encodes the relative value it stands
            for (r + that table's minimum: Δn, bar offset, position, octave, pitch class, Δt or
            Δp) with base 7920 for time-like tables, 9919 for pitch-like tables and 10000 for the
            index table. Combine with ``linear=True`` to learn on top of them.
        alpha: weight of the relative terms: logits = (q·k + alpha·S) / √D.
        bar_res: ticks per bar (48 = 12 ticks per beat in 4/4).
        n_bar: rows of the bar table (bar offsets 0 … n_bar − 1).
        dropout: attention-probability dropout, applied in training mode only.
        bias: bias in the q/k/v and output projections.
        batch_first: x is [B, L, E] when True, [L, B, E] when False. onset, pitch and
            key_padding_mask are [B, L] either way (like ``nn.MultiheadAttention``'s mask).
        causal: mask keys after each query.
        per_head_tables: learned tables [H, N, D] (one per head) instead of [N, D] shared.
        backend: forwarded to the op: "auto", "cuda", "triton", "cpp" or "reference".

    Learned tables are initialised N(0, σ²) so that the combined relative embedding has
    entries of std ≈ 1/√D, like a single table of std 1/√D: σ = D^(−1/2) for index and direct
    tables, D^(−1/4) for each factor of a Hadamard product, (2D)^(−1/2) for each summand.

    Tables are attributes named like the op's arguments (``rel_index_table``, ``bar_table``,
    ``pos_table``, ``octave_table``, ``pitch_class_table``, ``time_table``, ``pitch_table``);
    disabled ones are None. Their linear maps live in ``table_maps[name]``.
    """

    def __init__(self, embed_dim: int, num_heads: int, *, max_len: int = 1024,
                 rel_index: bool = True, rel_time: bool = True, rel_pitch: bool = True,
                 decompose: bool = True, combine: str = "hadamard", linear: bool = True,
                 sinusoidal: bool = False, alpha: float = 0.1, bar_res: int = 48, n_bar: int = 16,
                 dropout: float = 0.0, bias: bool = False, batch_first: bool = True,
                 causal: bool = True, per_head_tables: bool = False, backend: str = "auto"):
        super().__init__()
        if embed_dim < 1 or num_heads < 1 or embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be a positive multiple of num_heads "
                             f"({num_heads})")
        if combine not in ("hadamard", "add"):
            raise ValueError(f"combine must be 'hadamard' or 'add', got {combine!r}")
        for name, val in (("max_len", max_len), ("bar_res", bar_res), ("n_bar", n_bar)):
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

        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.max_len, self.bar_res, self.n_bar = int(max_len), int(bar_res), int(n_bar)
        self.rel_index, self.rel_time, self.rel_pitch = rel_index, rel_time, rel_pitch
        self.decompose, self.combine, self.linear = decompose, combine, linear
        self.sinusoidal, self.per_head_tables = sinusoidal, per_head_tables
        self.alpha, self.dropout = float(alpha), float(dropout)
        self.batch_first, self.causal, self.backend = batch_first, causal, backend

        # One fused in-projection for q, k, v (rows: q block, k block, v block).
        self.in_proj = nn.Linear(embed_dim, 3 * embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        # nn.MultiheadAttention's initialisation.
        nn.init.xavier_uniform_(self.in_proj.weight)
        if bias:
            nn.init.zeros_(self.in_proj.bias)
            nn.init.zeros_(self.out_proj.bias)

        self.table_maps = nn.ModuleDict()
        self._table_names = []
        D = self.head_dim
        pair_std = D ** -0.25 if combine == "hadamard" else (2 * D) ** -0.5
        if rel_index:
            self._add_table("rel_index_table", self.max_len, REL_INDEX_MIN, BASE_INDEX, D ** -0.5)
        if rel_time and decompose:
            self._add_table("bar_table", self.n_bar, BAR_MIN, BASE_TIME, pair_std)
            self._add_table("pos_table", self.bar_res, 0, BASE_TIME, pair_std)
        elif rel_time:
            self._add_table("time_table", self.n_bar * self.bar_res, TIME_MIN, BASE_TIME, D ** -0.5)
        if rel_pitch and decompose:
            self._add_table("octave_table", N_OCTAVE, OCTAVE_MIN, BASE_PITCH, pair_std)
            self._add_table("pitch_class_table", N_PITCH_CLASS, 0, BASE_PITCH, pair_std)
        elif rel_pitch:
            self._add_table("pitch_table", N_PITCH, PITCH_MIN, BASE_PITCH, D ** -0.5)
        for name in _TABLE_NAMES:
            if name not in self._table_names:
                self.register_parameter(name, None)

    def _add_table(self, name: str, rows: int, value_min: int, base: float, std: float) -> None:
        D = self.head_dim
        if self.sinusoidal:
            values = torch.arange(rows) + value_min
            # Non-persistent: fully determined by the configuration, so kept out of state_dict.
            self.register_buffer(name, sinusoidal_table(values, D, base), persistent=False)
        else:
            shape = (self.num_heads, rows, D) if self.per_head_tables else (rows, D)
            self.register_parameter(name, nn.Parameter(torch.randn(shape) * std))
        if self.linear:
            lin = nn.Linear(D, D, bias=False)
            nn.init.orthogonal_(lin.weight)
            self.table_maps[name] = lin
        self._table_names.append(name)

    # --------------------------------------------------------------------------------------------
    @classmethod
    def from_variant(cls, name: str, embed_dim: int, num_heads: int,
                     **overrides) -> "CircularRelativeAttention":
        """Build one of ``VARIANTS`` ("Attn", "RelAttn", "RIPO", "CirRelAttn", "CirRelAttn-H");
        ``overrides`` replace any constructor argument, including the variant's own flags."""
        return cls(embed_dim, num_heads, **{**variant_kwargs(name), **overrides})

    def new_kv_cache(self, batch_size: int, capacity: Optional[int] = None,
                     device=None, dtype=None) -> KVCache:
        """An empty ``KVCache`` for this module. capacity defaults to ``max_len`` (one
        allocation for a generation up to the index table's length; it grows beyond that).
        dtype/device default to those of the first appended keys (so autocast works)."""
        return KVCache(batch_size, self.num_heads, self.head_dim,
                       capacity=self.max_len if capacity is None else capacity,
                       device=device, dtype=dtype)

    def relative_tables(self, dtype: Optional[torch.dtype] = None) -> Dict[str, Tensor]:
        """The op's table arguments: each table through its linear map (when ``linear``), then
        cast to ``dtype`` (a no-op when it already matches). Shapes [N, D] or [H, N, D]."""
        out = {}
        for name in self._table_names:
            t = getattr(self, name)
            if self.linear:
                t = self.table_maps[name](t)
            out[name] = t if dtype is None else t.to(dtype)
        return out

    def _coordinate(self, name: str, t: Optional[Tensor], needed_by: str, B: int,
                    L: int) -> Optional[Tensor]:
        if not needed_by:
            return None  # no term reads it: ignore whatever was passed
        if t is None:
            raise ValueError(f"{name} [B, L] is required because {needed_by}=True; pass the "
                             f"{name} of each token (-1 where missing)")
        if tuple(t.shape) != (B, L):
            raise ValueError(f"{name} must be [B, L] = [{B}, {L}] (batch-major even when "
                             f"batch_first=False), got {list(t.shape)}")
        return t

    def forward(self, x: Tensor, onset: Optional[Tensor] = None, pitch: Optional[Tensor] = None,
                key_padding_mask: Optional[Tensor] = None,
                kv_cache: Optional[KVCache] = None) -> Tensor:
        """Self-attention over x.

        Args:
            x: [B, L, E] (batch_first) or [L, B, E].
            onset: [B, L] integer onset ticks (-1 = missing); required when rel_time.
            pitch: [B, L] integer MIDI pitches 0…127 (-1 = missing); required when rel_pitch.
            key_padding_mask: [B, L] bool, True where a token is padding (never attended to).
            kv_cache: when given, x (and onset/pitch/mask) are the *new* tokens; their keys and
                values are appended to the cache and the queries attend over every cached
                token (query i sits at absolute position len(cache_before) + i).

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
        onset = self._coordinate("onset", onset, "rel_time" if self.rel_time else "", B, L)
        pitch = self._coordinate("pitch", pitch, "rel_pitch" if self.rel_pitch else "", B, L)

        H, D = self.num_heads, self.head_dim
        out = None
        # [B, L, 3E] -> three [B, H, L, D] views.
        q, k, v = self.in_proj(x).view(B, L, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        if kv_cache is not None:
            if kv_cache.batch_size != B or kv_cache.num_heads != H or kv_cache.head_dim != D:
                raise ValueError(f"kv_cache is for B={kv_cache.batch_size}, H={kv_cache.num_heads},"
                                 f" D={kv_cache.head_dim}; this call has B={B}, H={H}, D={D}")
            kv_cache.append(k, v, onset=onset, pitch=pitch, key_padding_mask=key_padding_mask)
            out = self._decode_step(q, onset, pitch, key_padding_mask, kv_cache)
            k, v = kv_cache.k, kv_cache.v
            onset, pitch = kv_cache.onset, kv_cache.pitch
            key_padding_mask = kv_cache.key_padding_mask
        if key_padding_mask is not None:
            # The cache hands out strided views; give the op a dense mask (kernels read it flat).
            key_padding_mask = key_padding_mask.contiguous()

        if out is None:
            out = circular_relative_attention(
                q, k, v, onset, pitch, **self.relative_tables(q.dtype), **self._term_options(),
                key_padding_mask=key_padding_mask,
                dropout_p=self.dropout if self.training else 0.0, backend=self.backend)
        out = self.out_proj(out.transpose(1, 2).reshape(B, L, E))  # [B, L, E]
        return out if self.batch_first else out.transpose(0, 1)

    def _term_options(self) -> dict:
        """The op's keyword arguments besides tables, mask, dropout and backend."""
        return dict(bar_res=self.bar_res, bar_min=BAR_MIN, octave_min=OCTAVE_MIN,
                    rel_index_min=REL_INDEX_MIN, time_min=TIME_MIN, pitch_min=PITCH_MIN,
                    combine=self.combine, alpha=self.alpha, causal=self.causal)

    def _decode_step(self, q: Tensor, onset: Optional[Tensor], pitch: Optional[Tensor],
                     key_padding_mask: Optional[Tensor], kv_cache: KVCache) -> Optional[Tensor]:
        """Attention of the new tokens' q [B, H, L, D] over ``kv_cache`` (already appended to) by
        the cpp decoding path (``ops.circular_relative_attention.cached_decode``), or None where
        it does not apply. The tables after their linear maps are kept while the parameters hold
        the same values, so a step computes no map."""
        if self.training and self.dropout > 0:
            return None
        params = [getattr(self, n) for n in self._table_names] + [m.weight for m in self.table_maps.values()]
        key = ("nn.CircularRelativeAttention.relative_tables", self.linear, q.dtype, q.device,
               tuple(self._table_names))
        tables = _cra_terms.cached(key, params, lambda: self.relative_tables(q.dtype))
        kw = {**dict.fromkeys(_cra_terms.TABLE_ARGS), **tables, "bar": None, "position": None,
              **{n: v for n, v in self._term_options().items() if n in _TERM_INT_OPTIONS}}
        return cached_decode(q, kv_cache, {"onset": onset, "pitch": pitch}, kw, combine=self.combine,
                             time_mode="quotient", alpha=self.alpha, causal=self.causal,
                             key_padding_mask=key_padding_mask, backend=self.backend)

    def extra_repr(self) -> str:
        terms = [n for n, on in (("index", self.rel_index), ("time", self.rel_time),
                                 ("pitch", self.rel_pitch)) if on]
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"terms={terms or 'none'}, decompose={self.decompose}, combine={self.combine!r}, "
                f"linear={self.linear}, sinusoidal={self.sinusoidal}, alpha={self.alpha}, "
                f"bar_res={self.bar_res}, n_bar={self.n_bar}, max_len={self.max_len}, "
                f"dropout={self.dropout}, causal={self.causal}, batch_first={self.batch_first}, "
                f"per_head_tables={self.per_head_tables}, backend={self.backend!r}")
