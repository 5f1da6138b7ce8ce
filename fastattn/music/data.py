"""Corpora of 16-bar windows, and batches of tokens for training (SPEC §4).

A ``WindowCorpus`` holds whole songs (``notes [N, 5]`` with song-level bar indices, see
``fastattn.music.tokens``) and, per split, the list of windows (song, first bar). Windows are cut
on demand, so 44k POP909 windows cost no more memory than the 900 songs they come from.

``make_batch`` turns windows into padded tensors for either representation; ``batch_indices``
draws the windows and transpositions of training step ``s`` from (seed, s) alone, so a resumed
run sees exactly the batches an uninterrupted run would (no data-loader state to save).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from fastattn.music import tokens as T

SPLITS = ("train", "valid", "test")


@dataclass
class WindowCorpus:
    """Songs and their windows.

    songs: per song, notes [N_s, 5] (bar = bar index inside the song), canonical order.
    names: song names (folder or file names).
    windows: split → int64 [W, 2] rows (song index, first bar).
    window_bars: bars per window (16).
    skipped: song name → why it was skipped (unreadable, empty, inconsistent beats, …).
    stats: counts gathered while preparing (bars, dropped windows, …) for reports.
    """
    songs: List[np.ndarray]
    names: List[str]
    windows: Dict[str, np.ndarray]
    window_bars: int = T.N_BARS
    skipped: Dict[str, str] = field(default_factory=dict)
    stats: Dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        # Rows ordered by (bar, position): canonical onset order breaks this in bars longer than
        # 4 beats (positions ≥ 48). lexsort is stable, so ties keep the canonical order and a
        # window (4-beat bars only) comes out in canonical order.
        self.songs = [s[np.lexsort((s[:, T.POS], s[:, T.BAR]))] for s in self.songs]
        # Row offsets of each bar inside a song, for O(1) window slicing.
        self._bar_starts = [np.searchsorted(s[:, T.BAR], np.arange(int(s[:, T.BAR].max(initial=-1)) + 2))
                            for s in self.songs]

    def n_windows(self, split: str) -> int:
        return len(self.windows[split])

    def window(self, split: str, i: int) -> np.ndarray:
        """Window i of a split as notes [N, 5] with bars 0…window_bars − 1."""
        song, bar0 = (int(x) for x in self.windows[split][i])
        starts = self._bar_starts[song]
        lo = starts[min(bar0, len(starts) - 1)]
        hi = starts[min(bar0 + self.window_bars, len(starts) - 1)]
        w = self.songs[song][lo:hi].copy()
        w[:, T.BAR] -= bar0
        return w

    def summary(self) -> str:
        counts = " / ".join(f"{s} {self.n_windows(s):,}" for s in SPLITS)
        return (f"{len(self.songs)} songs ({len(self.skipped)} skipped), windows: {counts}")


def windows_of(bar_ok: np.ndarray, window_bars: int) -> np.ndarray:
    """First bars j such that bar_ok[j : j + window_bars] are all True ([W] int64)."""
    ok = np.asarray(bar_ok, dtype=bool)
    if len(ok) < window_bars:
        return np.zeros(0, dtype=np.int64)
    run = np.convolve(ok.astype(np.int64), np.ones(window_bars, dtype=np.int64), mode="valid")
    return np.nonzero(run == window_bars)[0].astype(np.int64)


def split_songs(n_songs: int, seed: int, fractions=(0.8, 0.1, 0.1)) -> Dict[str, np.ndarray]:
    """Song indices per split: a seeded permutation cut at 80 % / 90 % (rounded)."""
    perm = np.random.default_rng(seed).permutation(n_songs)
    a = int(round(fractions[0] * n_songs))
    b = a + int(round(fractions[1] * n_songs))
    return {"train": np.sort(perm[:a]), "valid": np.sort(perm[a:b]), "test": np.sort(perm[b:])}


# ---------------------------------------------------------------------------------------------
class Batch(NamedTuple):
    """A padded batch.

    inputs:  [B, L, 6] note fields or [B, L] event ids (padding values where ``pad``)
    targets: same shape as inputs, the next token (padding where there is none)
    onset, pitch, bar, position: [B, L] int64 coordinates of the inputs (−1 = missing)
    pad: [B, L] bool, True on padding positions of the inputs
    """
    inputs: Tensor
    targets: Tensor
    onset: Tensor
    pitch: Tensor
    pad: Tensor
    bar: Tensor
    position: Tensor

    def coordinates(self) -> Dict[str, Tensor]:
        """The coordinates as keyword arguments of ``MusicTransformer``."""
        return dict(onset=self.onset, pitch=self.pitch, bar=self.bar, position=self.position)

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device, non_blocking=True) for t in self))


def transpose_notes(notes: np.ndarray, shift: int) -> np.ndarray:
    """Shift every pitch by ``shift`` semitones, clamped to the shift that keeps 0…127."""
    if len(notes) == 0 or shift == 0:
        return notes
    lo, hi = int(notes[:, T.PITCH].min()), int(notes[:, T.PITCH].max())
    shift = int(np.clip(shift, -lo, 127 - hi))
    out = notes.copy()
    out[:, T.PITCH] += shift
    return out


def encode(notes: np.ndarray, representation: str, n_bars: int = T.N_BARS,
           convention: str = "slides") -> T.Tokens:
    """Encode a window in ``representation`` ("note" or "event"), with the coordinates of
    ``convention`` ("slides" or "authors"; see ``fastattn.music.tokens``)."""
    if representation == "note":
        return T.encode_notes(notes)
    if representation == "event":
        return T.encode_events(notes, n_bars=n_bars, convention=convention)
    raise ValueError(f"representation must be 'note' or 'event', got {representation!r}")


def make_batch(pieces: Sequence[T.Tokens], representation: str, max_len: int) -> Batch:
    """Pad tokenised pieces into a Batch. Sequences longer than ``max_len`` + 1 tokens are cut
    (inputs are tokens[:-1], targets tokens[1:], both at most ``max_len`` long)."""
    L = min(max(len(p.tokens) for p in pieces) - 1, max_len)
    B = len(pieces)
    if representation == "note":
        pad_row = torch.tensor(T.FIELD_PAD, dtype=torch.int64)
        inputs = pad_row.repeat(B, L, 1)
    else:
        inputs = torch.full((B, L), T.EVENT_PAD, dtype=torch.int64)
    targets = inputs.clone()
    coords = {name: torch.full((B, L), -1, dtype=torch.int64) for name in T.Coords._fields}
    pad = torch.ones(B, L, dtype=torch.bool)
    for b, p in enumerate(pieces):
        n = min(len(p.tokens) - 1, L)
        tok = torch.from_numpy(p.tokens)
        inputs[b, :n] = tok[:n]
        targets[b, :n] = tok[1:n + 1]
        bar, position = (p.bar, p.position) if p.bar is not None else T.fields_of_onset(p.onset)
        for name, c in zip(T.Coords._fields, (p.onset, p.pitch, bar, position)):
            coords[name][b, :n] = torch.from_numpy(np.asarray(c[:n], dtype=np.int64))
        pad[b, :n] = False
    return Batch(inputs, targets, coords["onset"], coords["pitch"], pad, coords["bar"],
                 coords["position"])


def batch_indices(n_windows: int, batch_size: int, seed: int, step: int,
                  max_shift: int = 0) -> tuple:
    """Windows and pitch shifts of one training step, a pure function of (seed, step):
    ``batch_size`` indices drawn uniformly with replacement and shifts in
    [−max_shift, max_shift] (random transposition; 0 disables it)."""
    rng = np.random.default_rng([int(seed), int(step)])
    idx = rng.integers(0, n_windows, size=batch_size)
    shifts = rng.integers(-max_shift, max_shift + 1, size=batch_size) if max_shift else \
        np.zeros(batch_size, dtype=np.int64)
    return idx, shifts


def corpus_batch(corpus: WindowCorpus, split: str, idx: Sequence[int], representation: str,
                 max_len: int, shifts: Optional[Sequence[int]] = None,
                 convention: str = "slides") -> Batch:
    """Batch of the windows ``idx`` of a split, each transposed by ``shifts[i]`` semitones;
    coordinates by ``convention`` (the model's ``cfg.convention``)."""
    pieces = []
    for k, i in enumerate(idx):
        w = corpus.window(split, int(i))
        if shifts is not None:
            w = transpose_notes(w, int(shifts[k]))
        pieces.append(encode(w, representation, corpus.window_bars, convention))
    return make_batch(pieces, representation, max_len)
