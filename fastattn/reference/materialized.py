"""Circular relative attention the way the paper authors' PyTorch code computes it.

A benchmark baseline and a second oracle, independent of ``reference.circular_relative_attention``
(which gathers [B, H, Lq, N] products with ``torch.gather``). Here everything is materialised:

- relative coordinate matrices [B, Lq, Lk] (query minus key) for index, bar, position, octave, class;
- the q·E products of a decomposed term for *every* (hi, lo) row pair: [B, H, Lq, N_bar, bar_res]
  for time and [B, H, Lq, N_oct, 12] for pitch;
- per-(query, key) scores picked out of those by advanced indexing into [B, H, Lq, Lk] tensors,
  whose backward is an accumulating ``index_put_`` over B·H·Lq·Lk elements.

Semantics follow SPEC §2 (floor division, non-negative remainder, clamps, -1 = missing -> term 0,
rows with no visible key -> zeros). Tables are [N, D] (shared) or [H, N, D] (per head).
No dropout, no time_mode="fields", no direct tables: the benchmark configuration does not use them.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


def _per_head(table: Tensor, H: int) -> Tensor:
    """[N, D] or [H, N, D] -> [H, N, D] (a view for shared tables)."""
    return table.expand(H, -1, -1) if table.dim() == 2 else table


def _relative(coord: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    """coord [B, Lk] -> query-minus-key differences [B, Lq, Lk] (int64), both-present mask."""
    cq, ck = coord[:, a].long(), coord.long()
    return cq[:, :, None] - ck[:, None, :], (cq >= 0)[:, :, None] & (ck >= 0)[:, None, :]


def _q_dot_pairs(q: Tensor, t_hi: Tensor, t_lo: Tensor, combine: str) -> Tensor:
    """q·(E_hi[n] ⊙ E_lo[r]) (or q·E_hi[n] + q·E_lo[r]) for every (n, r): [B, H, Lq, N_hi, N_lo]."""
    H = q.shape[1]
    hi, lo = _per_head(t_hi, H), _per_head(t_lo, H)
    if combine == "hadamard":
        return torch.einsum("bhid,hnrd->bhinr", q, hi[:, :, None, :] * lo[:, None, :, :])
    return (torch.einsum("bhid,hnd->bhin", q, hi)[..., :, None]
            + torch.einsum("bhid,hrd->bhir", q, lo)[..., None, :])


def _pick(qe: Tensor, *rows: Tensor) -> Tensor:
    """qe [B, H, Lq, N...] and one [B or 1, Lq, Lk] row matrix per N axis -> [B, H, Lq, Lk]."""
    B, H, Lq = qe.shape[:3]
    dev = qe.device
    b = torch.arange(B, device=dev).view(B, 1, 1, 1)
    h = torch.arange(H, device=dev).view(1, H, 1, 1)
    i = torch.arange(Lq, device=dev).view(1, 1, Lq, 1)
    return qe[(b, h, i) + tuple(r[:, None] for r in rows)]


def circular_relative_attention_materialized(
    q: Tensor, k: Tensor, v: Tensor, onset: Optional[Tensor] = None,
    pitch: Optional[Tensor] = None, *,
    rel_index_table: Optional[Tensor] = None,
    bar_table: Optional[Tensor] = None, pos_table: Optional[Tensor] = None,
    octave_table: Optional[Tensor] = None, pitch_class_table: Optional[Tensor] = None,
    bar_res: int = 48, bar_min: int = 0, octave_min: int = -11, rel_index_min: int = 0,
    combine: str = "hadamard", alpha: float = 1.0, scale: Optional[float] = None,
    causal: bool = True, key_padding_mask: Optional[Tensor] = None,
) -> Tensor:
    """q [B, H, Lq, D], k/v [B, H, Lk, D] -> [B, H, Lq, D]; arguments as the public op."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    dev = q.device
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    a = torch.arange(Lq, device=dev) + (Lk - Lq)          # absolute query positions
    j = torch.arange(Lk, device=dev)
    rel = torch.zeros(B, H, Lq, Lk, dtype=q.dtype, device=dev)

    if rel_index_table is not None:                        # Music Transformer index term
        dn = (a[:, None] - j[None, :])[None]               # [1, Lq, Lk]
        idx = (dn - rel_index_min).clamp(0, rel_index_table.shape[-2] - 1)
        qe = torch.einsum("bhid,hnd->bhin", q, _per_head(rel_index_table, H))
        rel = rel + _pick(qe, idx)
    if bar_table is not None:                              # time: bar and position in the bar
        dt, present = _relative(onset, a)
        bar_idx = (torch.div(dt, bar_res, rounding_mode="floor") - bar_min).clamp(0, bar_table.shape[-2] - 1)
        pos_idx = torch.remainder(dt, bar_res)
        s = _pick(_q_dot_pairs(q, bar_table, pos_table, combine), bar_idx, pos_idx)
        rel = rel + torch.where(present[:, None], s, 0.0)
    if octave_table is not None:                           # pitch: octave and pitch class
        dp, present = _relative(pitch, a)
        oct_idx = (torch.div(dp, 12, rounding_mode="floor") - octave_min).clamp(0, octave_table.shape[-2] - 1)
        pc_idx = torch.remainder(dp, 12)
        s = _pick(_q_dot_pairs(q, octave_table, pitch_class_table, combine), oct_idx, pc_idx)
        rel = rel + torch.where(present[:, None], s, 0.0)

    logits = (q @ k.transpose(-1, -2) + alpha * rel) * scale
    visible = torch.ones(B, 1, Lq, Lk, dtype=torch.bool, device=dev)
    if causal:
        visible = visible & (j[None, :] <= a[:, None])
    if key_padding_mask is not None:
        visible = visible & ~key_padding_mask[:, None, None, :]
    has_key = visible.any(-1, keepdim=True)                # rows with no key output zeros
    logits = logits.masked_fill(~visible, float("-inf")).masked_fill(~has_key, 0.0)
    p = torch.softmax(logits, dim=-1) * has_key
    return p @ v
