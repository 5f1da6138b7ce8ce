"""Pure-PyTorch circular relative attention: the test oracle, benchmark baseline and fallback.

Written straight from SPEC §2 and deliberately independent of the fused backends' table
assembly (``fastattn.ops.circular_relative_attention._assemble``): relative indices are
computed here with ``floor_divide``/``remainder`` on [B, Lq, Lk] difference matrices, whereas
the fused kernels use per-token quotient/remainder coordinates and a borrow.

Memory: O(B·H·Lq·(Lk + N)) — it builds [B, H, Lq, Lk] logits and [B, H, Lq, N] q·E products,
but never anything L×L×D. Inputs are assumed validated by the public function.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from fastattn.ops._dropout import dropout_keep_mask


def _qe(q: Tensor, table: Tensor) -> Tensor:
    """q [B, H, Lq, D] · table [N, D] or [H, N, D] -> [B, H, Lq, N]."""
    if table.dim() == 2:
        return q @ table.transpose(0, 1)
    return torch.einsum("bhid,hnd->bhin", q, table)


def _gather(qe: Tensor, rows: Tensor) -> Tensor:
    """qe [B, H, Lq, N], rows [B or 1, Lq, Lk] (long) -> [B, H, Lq, Lk]."""
    B, H, Lq, _ = qe.shape
    rows = rows.expand(B, rows.shape[1], rows.shape[2]).unsqueeze(1).expand(B, H, Lq, -1)
    return torch.gather(qe, -1, rows)


def _pair_diff(coord: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    """coord [B, Lk] -> (query-minus-key differences [B, Lq, Lk], both-present mask)."""
    coord = coord.long()  # an unsigned coordinate would wrap when subtracted
    cq = coord[:, a]
    diff = cq.unsqueeze(-1) - coord.unsqueeze(1)
    valid = (cq >= 0).unsqueeze(-1) & (coord >= 0).unsqueeze(1)
    return diff, valid


def _outer(a: Tensor, b: Tensor, combine: str) -> Tensor:
    """Combined table of every (row of a, row of b) pair: [.., Na*Nb, D], row = ia*Nb + ib."""
    x = a.unsqueeze(-2) * b.unsqueeze(-3) if combine == "hadamard" else a.unsqueeze(-2) + b.unsqueeze(-3)
    return x.flatten(-3, -2)


def _decomposed(q, hi, lo, valid, t_hi, t_lo, combine):
    """S = q·(E_hi[hi] ⊙ E_lo[lo]) (or the sum), zero where a coordinate is missing."""
    if combine == "hadamard":
        s = _gather(_qe(q, _outer(t_hi, t_lo, combine)), hi * t_lo.shape[-2] + lo)
    else:
        s = _gather(_qe(q, t_hi), hi) + _gather(_qe(q, t_lo), lo)
    return s.masked_fill(~valid.unsqueeze(1), 0.0)


def relative_scores(q: Tensor, onset: Optional[Tensor], pitch: Optional[Tensor], Lk: int, *,
                    rel_index_table=None, bar_table=None, pos_table=None, octave_table=None,
                    pitch_class_table=None, time_table=None, pitch_table=None, bar=None,
                    position=None, time_mode="quotient", bar_res=48, bar_min=0, octave_min=-11,
                    rel_index_min=0, time_min=0, pitch_min=-127, combine="hadamard") -> Tensor:
    """S_idx + S_time + S_pitch as [B, H, Lq, Lk] (before alpha and scale)."""
    B, H, Lq, _ = q.shape
    dev = q.device
    a = torch.arange(Lq, device=dev) + (Lk - Lq)
    total = torch.zeros(B, H, Lq, Lk, dtype=q.dtype, device=dev)
    if rel_index_table is not None:
        dn = a.view(1, Lq, 1) - torch.arange(Lk, device=dev).view(1, 1, Lk)
        rows = (dn - rel_index_min).clamp(0, rel_index_table.shape[-2] - 1)
        total = total + _gather(_qe(q, rel_index_table), rows)
    if bar_table is not None:
        n_bar = bar_table.shape[-2]
        if time_mode == "fields":
            dbar, vb = _pair_diff(bar, a)
            dpos, vp = _pair_diff(position, a)
            b = (dbar - bar_min).clamp(0, n_bar - 1)
            r = (dpos + bar_res - 1).clamp(0, pos_table.shape[-2] - 1)
            valid = vb & vp
        else:
            dt, valid = _pair_diff(onset, a)
            b = (torch.div(dt, bar_res, rounding_mode="floor") - bar_min).clamp(0, n_bar - 1)
            r = torch.remainder(dt, bar_res)
        total = total + _decomposed(q, b, r, valid, bar_table, pos_table, combine)
    if time_table is not None:
        dt, valid = _pair_diff(onset, a)
        rows = (dt - time_min).clamp(0, time_table.shape[-2] - 1)
        total = total + _gather(_qe(q, time_table), rows).masked_fill(~valid.unsqueeze(1), 0.0)
    if octave_table is not None:
        dp, valid = _pair_diff(pitch, a)
        o = (torch.div(dp, 12, rounding_mode="floor") - octave_min).clamp(0, octave_table.shape[-2] - 1)
        c = torch.remainder(dp, 12)
        total = total + _decomposed(q, o, c, valid, octave_table, pitch_class_table, combine)
    if pitch_table is not None:
        dp, valid = _pair_diff(pitch, a)
        rows = (dp - pitch_min).clamp(0, pitch_table.shape[-2] - 1)
        total = total + _gather(_qe(q, pitch_table), rows).masked_fill(~valid.unsqueeze(1), 0.0)
    return total


def attention_mask(B: int, Lq: int, Lk: int, causal: bool, key_padding_mask: Optional[Tensor],
                   device) -> Tensor:
    """Bool [B, 1, Lq, Lk], True where key j is visible to query i."""
    allowed = torch.ones(B, 1, Lq, Lk, dtype=torch.bool, device=device)
    if causal:
        a = torch.arange(Lq, device=device) + (Lk - Lq)
        allowed = allowed & (torch.arange(Lk, device=device).view(1, Lk) <= a.view(Lq, 1))
    if key_padding_mask is not None:
        allowed = allowed & ~key_padding_mask.view(B, 1, 1, Lk)
    return allowed


def circular_relative_attention(q: Tensor, k: Tensor, v: Tensor, onset=None, pitch=None, *,
                                alpha=1.0, scale=None, causal=True, key_padding_mask=None,
                                dropout_p=0.0, dropout_seed=0, **terms) -> Tensor:
    """Reference op. q [B, H, Lq, D], k/v [B, H, Lk, D] -> [B, H, Lq, D].

    ``terms`` are the table and coordinate keyword arguments of
    ``fastattn.circular_relative_attention``; ``dropout_seed`` selects the counter-based mask.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return attend(q, k, v, relative_scores(q, onset, pitch, k.shape[2], **terms), alpha=alpha, scale=scale,
                  causal=causal, key_padding_mask=key_padding_mask, dropout_p=dropout_p, dropout_seed=dropout_seed)


def attend(q: Tensor, k: Tensor, v: Tensor, rel: Tensor, *, alpha: float, scale: float, causal: bool,
           key_padding_mask: Optional[Tensor], dropout_p: float, dropout_seed: int) -> Tensor:
    """softmax(scale · (q·kᵀ + alpha · rel), masked) · v with the relative scores rel [B, H, Lq, Lk]
    given; rows with no visible key give zeros. q [B, H, Lq, D], k/v [B, H, Lk, D]."""
    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    logits = (q @ k.transpose(-1, -2) + alpha * rel) * scale
    allowed = attention_mask(B, Lq, Lk, causal, key_padding_mask, q.device)
    logits = logits.masked_fill(~allowed, float("-inf"))
    # A row with no visible key is all -inf: softmax gives NaN, so zero it explicitly.
    any_key = allowed.any(-1, keepdim=True)
    p = torch.softmax(logits.masked_fill(~any_key, 0.0), dim=-1) * any_key
    if dropout_p > 0.0:
        keep = dropout_keep_mask(dropout_seed, B, H, Lq, Lk, dropout_p, q.device)
        p = p * keep / (1.0 - dropout_p)
    return p @ v
