"""Sampling from the music Transformer with a KV cache (SPEC §4).

``generate`` extends one tokenised prompt token by token. Each step feeds only the new token
through the model, whose per-layer ``KVCache`` keeps the keys, values and coordinates of
everything before (``use_cache=False`` recomputes the whole sequence instead: the test oracle).

Constraints keep every sample decodable and time monotone:
- note-based: the type head may choose note or end (never start); the bar stays or advances by
  one (never back, never skipping a bar: training windows hold no empty bar) and, within the
  same bar, the position may not go back; other fields are free (their heads only span valid
  values);
- event-based: a grammar — BOS → Bar; Bar/Duration → Position | next Bar | EOS; Position →
  Track → Pitch → Duration; Bars are consecutive (Bar_{b+1} after Bar_b); positions within a
  bar never go back.
Generation stops at the end token, when the next note or Bar would fall at or after
``end_bar``, or at ``max_new_tokens`` / the model's max_len.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor

from fastattn.music import tokens as T
from fastattn.music.model import MusicTransformer


@dataclass
class SamplingConfig:
    """How next tokens are drawn."""
    temperature: float = 1.0
    """Divides the logits; 0 = greedy (argmax)."""
    top_k: int = 0
    """Keep only the k most likely values (0 = all)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of values whose probability reaches top_p."""
    max_new_tokens: int = 1024
    """Upper bound on generated tokens."""


class Generation(NamedTuple):
    """A generated sequence: ``tokens`` [L, 6] or [L] (prompt included), its coordinates
    ``onset``/``pitch``/``bar``/``position`` [L] (the model's convention), ``n_prompt`` prompt
    tokens, ``stop`` ("eos", "end_bar", "max_tokens") and, when asked for, the logits each step
    sampled from (list of [V] or tuples of six [V_f])."""
    tokens: np.ndarray
    onset: np.ndarray
    pitch: np.ndarray
    n_prompt: int
    stop: str
    logits: Optional[list] = None
    bar: Optional[np.ndarray] = None
    position: Optional[np.ndarray] = None


def sample_from(logits: Tensor, cfg: SamplingConfig, generator: Optional[torch.Generator],
                allowed: Optional[Tensor] = None) -> int:
    """Draw one index from ``logits`` [V] restricted to ``allowed`` [V] bool."""
    logits = logits.detach().float().clone()
    if allowed is not None:
        if not bool(allowed.any()):
            raise ValueError("no value is allowed at this step")
        logits[~allowed] = float("-inf")
    if cfg.temperature <= 0:
        return int(logits.argmax())
    logits = logits / cfg.temperature
    if cfg.top_k > 0:
        k = min(cfg.top_k, int(torch.isfinite(logits).sum()))
        kth = torch.topk(logits, k).values[-1]
        logits[logits < kth] = float("-inf")
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a value when the mass before it already reaches top_p (the first always stays).
        drop = (torch.cumsum(probs, dim=-1) - probs) >= cfg.top_p
        logits[order[drop]] = float("-inf")
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


class _Stepper:
    """Runs the model on new tokens, with or without a KV cache; returns last-position logits.
    Coordinates come from the whole token list (``tokens.coordinates``, the model's convention),
    so the cached and the recomputing path see the same ones."""

    def __init__(self, model: MusicTransformer, use_cache: bool):
        self.model, self.use_cache = model, use_cache
        self.device = next(model.parameters()).device
        self.caches = model.new_caches(1) if use_cache else None
        self.fed = 0

    def __call__(self, tokens: List):
        start = self.fed if self.use_cache else 0
        arr = np.asarray(tokens)
        c = T.coordinates(arr, self.model.cfg.representation, self.model.cfg.convention)
        x = torch.as_tensor(arr[start:], device=self.device)[None]
        coords = {n: torch.as_tensor(getattr(c, n)[start:], dtype=torch.int64,
                                     device=self.device)[None]
                  for n in self.model.coordinate_names}
        out = self.model(x, caches=self.caches, **coords)
        self.fed = len(tokens)
        if isinstance(out, tuple):
            return tuple(o[0, -1] for o in out)
        return out[0, -1]


@torch.no_grad()
def generate(model: MusicTransformer, prompt: T.Tokens, *, end_bar: int = T.N_BARS,
             min_bar: int = 0, sampling: SamplingConfig = SamplingConfig(),
             generator: Optional[torch.Generator] = None, use_cache: bool = True,
             return_logits: bool = False) -> Generation:
    """Continue ``prompt`` (a tokenised piece without its end token; its coordinates are
    recomputed from its tokens in the model's convention).

    end_bar: stop before the first note (note-based) or Bar token (event-based) at bar
        ``end_bar`` or later. min_bar: the first bar a new note may take (continuations set it
        to the first bar after the prompt, the next-bar test to the bar to fill; event-based, a
        note may start only once the Bar token of bar ``min_bar`` or later has been reached).
        ``generator`` makes sampling reproducible.
    """
    model.eval()
    rep = model.cfg.representation
    toks = [np.asarray(t) for t in prompt.tokens] if rep == "note" else [int(t) for t in prompt.tokens]
    n_prompt = len(toks)
    if n_prompt == 0:
        raise ValueError("the prompt must hold at least the start token")
    if n_prompt >= model.cfg.max_len:
        raise ValueError(f"the prompt has {n_prompt} tokens; max_len={model.cfg.max_len} leaves "
                         f"no room to generate")
    step = _Stepper(model, use_cache)
    limit = min(n_prompt + sampling.max_new_tokens, model.cfg.max_len)
    seen = [] if return_logits else None
    stop = "max_tokens"
    dev = step.device

    if rep == "note":
        notes = np.asarray(toks)[np.asarray(toks)[:, 0] == T.TYPE_NOTE]
        last_bar = int(notes[-1, 1]) if len(notes) else -1
        last_pos = int(notes[-1, 2]) if len(notes) else 0
        while len(toks) < limit:
            lg = step(toks)
            if seen is not None:
                seen.append(tuple(x.float().cpu() for x in lg))
            allowed_type = torch.zeros(3, dtype=torch.bool, device=dev)
            allowed_type[[T.TYPE_NOTE, T.TYPE_EOS]] = True
            typ = sample_from(lg[0], sampling, generator, allowed_type)
            if typ == T.TYPE_EOS:
                toks.append(np.array([T.TYPE_EOS, *T.FIELD_PAD[1:]]))
                stop = "eos"
                break
            lo = max(last_bar, min_bar, 0)
            if lo >= T.N_BARS:
                stop = "end_bar"
                break
            # Monotone, and no bar skipped (training windows never hold an empty bar).
            hi = max(last_bar + 1, lo)
            bars = torch.arange(T.N_BARS, device=dev)
            bar = sample_from(lg[1], sampling, generator, (bars >= lo) & (bars <= hi))
            if bar >= end_bar:
                stop = "end_bar"
                break
            min_pos = last_pos if bar == last_bar else 0
            pos = sample_from(lg[2], sampling, generator,
                              torch.arange(T.BAR_RES, device=dev) >= min_pos)
            trk = sample_from(lg[3], sampling, generator)
            p = sample_from(lg[4], sampling, generator)
            dur = sample_from(lg[5], sampling, generator)
            toks.append(np.array([T.TYPE_NOTE, bar, pos, trk, p, dur]))
            last_bar, last_pos = bar, pos
        arr = np.stack(toks).astype(np.int64)
    else:
        kinds = T.event_kind(np.asarray(toks))
        bar_tokens = [t - T.BAR_OFFSET for t in toks if T.BAR_OFFSET <= t < T.POS_OFFSET]
        cur_bar = bar_tokens[-1] if bar_tokens else -1
        # Last position in the current bar (positions never go back inside a bar).
        last_pos = 0
        for t in reversed(toks):
            if T.BAR_OFFSET <= t < T.POS_OFFSET:
                break
            if T.POS_OFFSET <= t < T.TRACK_OFFSET:
                last_pos = t - T.POS_OFFSET
                break
        ids = torch.arange(T.EVENT_VOCAB, device=dev)
        while len(toks) < limit:
            lg = step(toks)
            if seen is not None:
                seen.append(lg.float().cpu())
            kind = int(kinds[-1]) if len(toks) else 0
            last = toks[-1]
            if last == T.BOS:
                allowed = ids == T.BAR_OFFSET + cur_bar + 1
            elif kind in (1, 5):  # after Bar or Duration: Position, next Bar or EOS
                allowed = ids == T.EOS
                if cur_bar >= min_bar:
                    allowed |= (ids >= T.POS_OFFSET + last_pos) & (ids < T.TRACK_OFFSET)
                if cur_bar + 1 < T.N_BARS:
                    allowed |= ids == T.BAR_OFFSET + cur_bar + 1
            elif kind == 2:
                allowed = (ids >= T.TRACK_OFFSET) & (ids < T.PITCH_OFFSET)
            elif kind == 3:
                allowed = (ids >= T.PITCH_OFFSET) & (ids < T.DUR_OFFSET)
            elif kind == 4:
                allowed = ids >= T.DUR_OFFSET
            else:
                raise ValueError(f"cannot continue after token {last} (end or padding)")
            tok = sample_from(lg, sampling, generator, allowed)
            if tok == T.EOS:
                toks.append(tok)
                stop = "eos"
                break
            k = int(T.event_kind(tok))
            if k == 1:
                if tok - T.BAR_OFFSET >= end_bar:
                    stop = "end_bar"
                    break
                cur_bar, last_pos = tok - T.BAR_OFFSET, 0
            elif k == 2:
                last_pos = tok - T.POS_OFFSET
            toks.append(tok)
            kinds = np.append(kinds, k)
        arr = np.asarray(toks, dtype=np.int64)
    c = T.coordinates(arr, rep, model.cfg.convention)
    return Generation(arr, c.onset, c.pitch, n_prompt, stop, seen, c.bar, c.position)


def decode(model_or_rep, tokens) -> np.ndarray:
    """Tokens of either representation → piece notes [N, 5]."""
    rep = model_or_rep if isinstance(model_or_rep, str) else model_or_rep.cfg.representation
    return T.decode_notes(tokens) if rep == "note" else T.decode_events(tokens)


def prompt_from_notes(notes: np.ndarray, representation: str, n_bars: int,
                      convention: str = "slides") -> T.Tokens:
    """Prompt made of the notes of bars 0…n_bars − 1 (start token, no end token). Event-based
    prompts end with the Bar token of bar ``n_bars`` when it exists (its notes come next)."""
    head = notes[notes[:, T.BAR] < n_bars]
    if representation == "note":
        return T.encode_notes(head, eos=False)
    return T.encode_events(head, n_bars=min(n_bars + 1, T.N_BARS), eos=False,
                           convention=convention)
