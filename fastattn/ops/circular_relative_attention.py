"""Circular relative attention: public function, op registration (fake + autograd), dispatch.

The fused op ``torch.ops.fastattn.circular_relative_attention`` is declared once in C++
(``csrc/fastattn.cpp``) and implemented per device in ``csrc/cpu`` / ``csrc/cuda``; the
dispatcher routes by device. Here we add what torch needs around it (fake kernels, autograd)
and the public function that validates, picks a backend, and assembles the term tables.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor

from fastattn import _ext
from fastattn.backends import dtype_device_reason, select, triton_reason
from fastattn.ops import _cra_terms
from fastattn.ops._cra_autograd import backward_with, setup_context
from fastattn.ops._dropout import new_seed
from fastattn.reference.circular_relative_attention import circular_relative_attention as _reference_op

OP = "circular_relative_attention"
_CPU_DTYPES = (torch.float32, torch.float64)


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fwd_fake(q, k, v, table, coords, terms, alpha, scale, causal, key_padding_mask, dropout_p, seed):
    torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4)
    torch._check(table.dim() == 3 and table.shape[2] == q.shape[3])
    B, H, Lq, _ = q.shape
    return torch.empty_like(q), q.new_empty((B, H, Lq), dtype=_lse_dtype(q.dtype))


if _ext.extension() is not None:
    torch.library.register_fake("fastattn::circular_relative_attention")(_fwd_fake)

    @torch.library.register_fake("fastattn::circular_relative_attention_backward")
    def _bwd_fake(grad_out, q, k, v, out, lse, table, coords, terms, alpha, scale, causal,
                  key_padding_mask, dropout_p, seed):
        return torch.empty_like(q), k.new_empty(k.shape), v.new_empty(v.shape), torch.empty_like(table)

    torch.library.register_autograd(
        "fastattn::circular_relative_attention",
        backward_with(torch.ops.fastattn.circular_relative_attention_backward), setup_context=setup_context)


def _dense_rows(t: Tensor) -> Tensor:
    """Kernels accept k/v strided over batch and head (a KV-cache slice) but need dense rows."""
    D, L = t.shape[-1], t.shape[-2]
    return t if (t.stride(-1) == 1 or D == 1) and (t.stride(-2) == D or L == 1) else t.contiguous()


def _cpp_reason(q: Tensor) -> Optional[str]:
    if not _ext.has_backend("cpp"):
        return _ext.extension_error() or "the extension was built without the C++ CPU kernels"
    return dtype_device_reason(q, ("cpu",), _CPU_DTYPES)


_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _cuda_reason(q: Tensor) -> Optional[str]:
    """csrc/cuda kernels: CUDA tensors, fp32/fp16/bf16, head dims multiple of 16 up to 256.
    (Their relative tables must also fit a block's shared memory; the op says so if not.)"""
    if not _ext.has_backend("cuda"):
        return "this build has no CUDA kernels (CPU-only build, or FASTATTN_NO_CUDA=1)"
    why = dtype_device_reason(q, ("cuda",), _CUDA_DTYPES)
    D = q.shape[-1]
    if why is None and (D % 16 != 0 or not 16 <= D <= 256):
        why = f"head dim must be a multiple of 16 in [16, 256], got {D}"
    return why


_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _triton_reason(q: Tensor) -> Optional[str]:
    return triton_reason(q, _TRITON_DTYPES, _TRITON_DTYPES)


REASONS = {
    "cuda": _cuda_reason,
    "triton": _triton_reason,
    "cpp": _cpp_reason,
    "reference": lambda q: None,
}


# The cpp decoding op serves calls with at most this many queries that need no gradient.
DECODE_MAX_LQ = 16
# From this many queries on, the cpp path shrinks decomposed tables to the rows the coordinates
# reach (_cra_terms.layout): a few small reductions per call against q·E work that grows with Lq.
SHRINK_MIN_LQ = 64


def _decoding(q: Tensor, k: Tensor, v: Tensor, kw: dict, dropout_p: float) -> bool:
    if q.shape[2] > DECODE_MAX_LQ or dropout_p > 0.0:
        return False
    tables = [kw[n] for n in _cra_terms.TABLE_ARGS if kw[n] is not None]
    return _cra_terms.cacheable(tables + [q, k, v])


def decode_op(q: Tensor, k: Tensor, v: Tensor, table_t: Tensor, coords: Tensor, terms, alpha: float,
              scale: float, causal: bool, key_padding_mask: Optional[Tensor]) -> Tensor:
    """The cpp decoding op (forward only): q [B, H, Lq, D], k/v [B, H, Lk, D] (strided over batch
    and head allowed), table_t [Ht, D, N] (the assembled table transposed), coords int32
    [B, C, Lk] and key_padding_mask [B, Lk] with dense rows (strided views allowed)."""
    return torch.ops.fastattn.circular_relative_attention_decode(
        q.contiguous(), _dense_rows(k), _dense_rows(v), table_t, coords, terms, float(alpha), float(scale),
        bool(causal), key_padding_mask)


def cached_decode(q: Tensor, cache, new_coords: dict, kw: dict, *, combine: str, time_mode: str,
                  alpha: float, causal: bool, key_padding_mask: Optional[Tensor] = None,
                  backend: str = "auto", op_coordinates: Optional[tuple] = None) -> Optional[Tensor]:
    """Attention of the cache's last Lq tokens (queries q [B, H, Lq, D]) over a KV cache that
    already holds them, by the cpp decoding op; None where that path does not apply (another
    backend, gradients needed, too many queries), and the caller then runs the public op.

    ``cache`` is a ``fastattn.nn.KVCache`` (k, v, key_padding_mask, derived). ``new_coords``:
    the new tokens' coordinates (name -> [B, Lq] or None: onset, pitch, bar, position) and
    ``key_padding_mask`` their mask, validated here; ``kw``: the op's table and integer term
    arguments as in ``circular_relative_attention``. Per step this converts only the new tokens'
    coordinate channels (kept in the cache), reuses the transposed assembled table while the
    tables hold the same values, and makes one kernel call. ``op_coordinates`` = (key, fn):
    the cache stores coordinates that ``fn(name -> [B, n]) -> name -> [B, n]`` turns into the
    op's (``new_coords`` are already converted); ``key`` names that conversion.
    """
    if q.shape[2] > DECODE_MAX_LQ or torch.compiler.is_compiling() or _selected(backend, q) != "cpp":
        return None
    lay = _cra_terms.layout(kw, combine, time_mode, q.shape[1])
    if not _cra_terms.cacheable(lay.sources + [q]):
        return None
    read = lay.coordinates
    if any(new_coords.get(name) is None for name in read):
        return None  # the op's own checks name the missing coordinate
    if op_coordinates is None and not all(cache.stores(name) for name in read):
        return None  # the cache does not store a coordinate these terms read
    convert_key, convert = op_coordinates if op_coordinates is not None else (None, lambda c: c)

    def check():  # every argument, whenever the tables are (re)built (shapes and dtypes included)
        new = {n: new_coords.get(n) for n in _cra_terms.COORD_ARGS}
        _cra_terms.validate(q, q, q, new["onset"], new["pitch"], {**kw, "bar": new["bar"], "position": new["position"]},
                            key_padding_mask, combine, time_mode, alpha, None, 0.0)

    table_t = _cra_terms.tables(lay, q, transposed=True, on_build=check)["table_t"]
    B = q.shape[0]
    # Each token's coordinates are range-checked once, when its channels are made.
    limits = _cra_terms.coordinate_limits(kw["bar_res"])
    coords = cache.derived(("circular_relative_attention", tuple(lay.channels), convert_key),
                           lambda c, n: _cra_terms.token_channels(lay, convert(c), B, n, q.device, limits))
    return decode_op(q, cache.k, cache.v, table_t, coords, lay.terms, alpha, q.shape[-1] ** -0.5, causal,
                     cache.key_padding_mask)


_SELECTED: dict = {}


def _selected(backend: str, q: Tensor) -> str:
    """select() for decoding steps, remembered per (backend, device, dtype): it does not depend
    on anything else, and a step should not pay for it."""
    key = (backend, q.device, q.dtype)
    if key not in _SELECTED:
        _SELECTED[key] = select(OP, backend, q, REASONS)
    return _SELECTED[key]


def circular_relative_attention(
    q: Tensor, k: Tensor, v: Tensor, onset: Optional[Tensor] = None,
    pitch: Optional[Tensor] = None, *,
    rel_index_table: Optional[Tensor] = None,
    bar_table: Optional[Tensor] = None, pos_table: Optional[Tensor] = None,
    octave_table: Optional[Tensor] = None, pitch_class_table: Optional[Tensor] = None,
    bar_res: int = 48, bar_min: int = 0, octave_min: int = -11, rel_index_min: int = 0,
    combine: str = "hadamard", alpha: float = 1.0, scale: Optional[float] = None,
    causal: bool = True, key_padding_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
    backend: str = "auto",
    time_mode: str = "quotient", bar: Optional[Tensor] = None, position: Optional[Tensor] = None,
    time_table: Optional[Tensor] = None, time_min: int = 0,
    pitch_table: Optional[Tensor] = None, pitch_min: int = -127,
    dropout_seed: Optional[int] = None,
) -> Tensor:
    """Attention whose logits carry relative index, time and pitch terms (SPEC §2).

    Shapes: q [B, H, Lq, D]; k, v [B, H, Lk, D] with Lq <= Lk (queries are the last Lq
    positions); onset, pitch, bar, position [B, Lk] integer (-1 = missing); every table
    [N, D] (shared) or [H, N, D] (per head). Returns [B, H, Lq, D].

    Terms (each present when its tables are given):
      index  rel_index_table [N_idx, D], row clamp(Δn - rel_index_min)
      time   bar_table [N_bar, D] and pos_table [bar_res, D] (time_mode="quotient": Δt split
             into ⌊Δt / bar_res⌋ and Δt mod bar_res) or [2·bar_res - 1, D] (time_mode="fields":
             per-token bar/position), combined by ``combine``; or time_table [N, D], the
             direct (non-decomposed) term, row clamp(Δt - time_min)
      pitch  octave_table [N_oct, D] and pitch_class_table [12, D] (⌊Δp / 12⌋, Δp mod 12), or
             pitch_table [N, D], row clamp(Δp - pitch_min)
    logits = scale · (q·k + alpha · (S_idx + S_time + S_pitch)); ``causal`` and
    ``key_padding_mask`` [B, Lk] (True = excluded) remove keys; rows with no key give zeros.
    ``dropout_p`` > 0 applies attention dropout with a counter-based mask chosen by
    ``dropout_seed``, an integer in [0, 2³²) (drawn from torch's generator when None).
    """
    kw = dict(rel_index_table=rel_index_table, bar_table=bar_table, pos_table=pos_table,
              octave_table=octave_table, pitch_class_table=pitch_class_table,
              time_table=time_table, pitch_table=pitch_table, bar=bar, position=position,
              bar_res=bar_res, bar_min=bar_min, octave_min=octave_min,
              rel_index_min=rel_index_min, time_min=time_min, pitch_min=pitch_min)
    _cra_terms.validate(q, k, v, onset, pitch, kw, key_padding_mask, combine, time_mode, alpha,
                        scale, dropout_p, check_values=not torch.compiler.is_compiling())
    name = select(OP, backend, q, REASONS)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if dropout_seed is not None and (isinstance(dropout_seed, bool) or not isinstance(dropout_seed, numbers.Integral)
                                     or not 0 <= dropout_seed < 2 ** 32):
        # Every backend hashes a 32-bit seed: 2**32 + s would silently repeat s's masks.
        raise ValueError(f"dropout_seed must be an integer in [0, 2**32), got {dropout_seed!r}")
    seed = 0 if dropout_p == 0.0 else (new_seed() if dropout_seed is None else int(dropout_seed))
    if name == "reference":
        return _reference_op(
            q, k, v, onset, pitch, alpha=alpha, scale=scale, causal=causal,
            key_padding_mask=key_padding_mask, dropout_p=dropout_p, dropout_seed=seed,
            time_mode=time_mode, combine=combine, **kw)
    if name == "cpp" and _decoding(q, k, v, kw, dropout_p):
        asm = _cra_terms.assemble(q, k.shape[2], onset, pitch, kw, combine, time_mode, transposed=True)
        return decode_op(q, k, v, asm.table, asm.coords, asm.terms, alpha, scale, causal, key_padding_mask)
    shrink = name == "cpp" and q.shape[2] >= SHRINK_MIN_LQ
    asm = _cra_terms.assemble(q, k.shape[2], onset, pitch, kw, combine, time_mode, shrink=shrink)
    op = torch.ops.fastattn.circular_relative_attention
    if name == "triton":
        from fastattn.triton.circular_relative_attention import circular_relative_attention_op as op
    out, _ = op(
        q.contiguous(), _dense_rows(k), _dense_rows(v), asm.table, asm.coords, asm.terms,
        float(alpha), scale, bool(causal),
        None if key_padding_mask is None else key_padding_mask.contiguous(), float(dropout_p), seed)
    return out
