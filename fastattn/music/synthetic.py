"""An embedded synthetic corpus: seeded three-track pieces with bar-periodic structure.

The default data when no folder is given, so that training, generation and the demo run
anywhere in minutes. Each piece is ``n_bars`` 4/4 bars long and has what circular relative
attention is meant to pick up:

- a chord progression of 4 bars (one or two chords per bar) drawn from common pop loops,
  repeated for the whole piece;
- a melody (track MELODY) built from a 4-bar or 8-bar phrase that repeats with that period;
  some repeats are transposed diatonically (a "sequence"), so the same contour returns at
  another pitch — identical relative pitch, different absolute pitch;
- a bridge line (BRIDGE) of chord roots in a rhythm fixed per piece, one octave down;
- piano chords (PIANO) in a comping rhythm fixed per piece;
- a random key (the whole piece transposed by 0…11 semitones).

Everything is a pure function of (seed, piece index), so corpora are reproducible.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import numpy as np

from fastattn.music import tokens as T
from fastattn.music.data import WindowCorpus, split_songs, windows_of, SPLITS

MAJOR = np.array([0, 2, 4, 5, 7, 9, 11])
# Progressions as scale degrees (0 = I), one entry per half bar over 4 bars.
PROGRESSIONS = (
    (0, 0, 4, 4, 5, 5, 3, 3),   # I V vi IV
    (5, 5, 3, 3, 0, 0, 4, 4),   # vi IV I V
    (0, 0, 5, 5, 3, 3, 4, 4),   # I vi IV V
    (1, 1, 4, 4, 0, 0, 0, 0),   # ii V I I
    (0, 3, 4, 0, 5, 3, 4, 4),   # two chords per bar
    (3, 3, 4, 4, 2, 2, 5, 5),   # IV V iii vi
)
# Rhythms as onset positions within a bar (48 per bar) with durations.
MELODY_CELLS = (
    ((0, 12), (12, 12), (24, 24)),
    ((0, 6), (6, 6), (12, 12), (24, 12), (36, 12)),
    ((0, 18), (18, 6), (24, 24)),
    ((0, 12), (12, 6), (18, 6), (24, 12), (36, 12)),
    ((0, 24), (24, 12), (36, 12)),
    ((6, 6), (12, 12), (24, 6), (30, 18)),
)
BRIDGE_RHYTHMS = (((0, 24), (24, 24)), ((0, 36), (36, 12)), ((0, 48),), ((0, 12), (24, 12)))
PIANO_RHYTHMS = (((0, 12), (24, 12)), ((12, 12), (36, 12)), ((0, 24), (24, 24)),
                 ((0, 6), (12, 6), (24, 6), (36, 6)))


@dataclass
class SyntheticConfig:
    """Settings of the synthetic corpus."""
    n_songs: int = 200
    """Pieces to generate (split 80/10/10 by piece)."""
    n_bars: int = 24
    """Bars per piece; 16-bar windows are cut at a stride of one bar."""
    seed: int = 0
    """Seed of the whole corpus (piece i uses the seed sequence [seed, i])."""
    window_bars: int = T.N_BARS
    """Bars per training window."""


def _scale_pitch(degree: int, octave_base: int) -> int:
    """MIDI pitch of a (possibly negative or > 6) scale degree above ``octave_base`` (a C)."""
    return octave_base + 12 * (degree // 7) + int(MAJOR[degree % 7])


def synthetic_piece(seed: int, index: int, n_bars: int = 24) -> np.ndarray:
    """Piece ``index`` of the corpus with seed ``seed``: notes [N, 5] (bars 0…n_bars − 1)."""
    rng = np.random.default_rng([seed, index])
    key = int(rng.integers(0, 12))
    prog = PROGRESSIONS[rng.integers(len(PROGRESSIONS))]
    period = int(rng.choice([4, 8]))
    # Melody phrase: per bar a rhythm cell and scale degrees walking near the chord.
    phrase = []
    degree = int(rng.integers(2, 7))
    for b in range(period):
        cell = MELODY_CELLS[rng.integers(len(MELODY_CELLS))]
        for pos, dur in cell:
            chord_root = prog[(2 * b + pos // 24) % 8]
            # Mostly steps, sometimes a leap to a chord tone.
            if rng.random() < 0.3:
                degree = chord_root + int(rng.choice([0, 2, 4])) + 7 * int(degree >= 7)
            else:
                degree += int(rng.choice([-2, -1, 1, 2]))
            degree = int(np.clip(degree, 0, 11))
            phrase.append((b, pos, degree, dur))
    # Which repeats of the phrase are transposed (by a diatonic step), chosen per piece.
    shifts = [0] + [int(rng.choice([0, 0, 1, -1, 2])) for _ in range(n_bars // period + 1)]
    bridge = BRIDGE_RHYTHMS[rng.integers(len(BRIDGE_RHYTHMS))]
    piano = PIANO_RHYTHMS[rng.integers(len(PIANO_RHYTHMS))]
    notes = []
    for bar in range(n_bars):
        rep, b = divmod(bar, period)
        for pb, pos, deg, dur in phrase:
            if pb == b:
                notes.append((bar, pos, 0, _scale_pitch(deg + shifts[rep], 60) + key, dur))
        for pos, dur in bridge:
            root = prog[(2 * (bar % 4) + pos // 24) % 8]
            notes.append((bar, pos, 1, _scale_pitch(root, 36) + key, dur))
        for pos, dur in piano:
            root = prog[(2 * (bar % 4) + pos // 24) % 8]
            for third in (0, 2, 4):  # triad in close position
                notes.append((bar, pos, 2, _scale_pitch(root + third, 48) + key, dur))
    return T.canonical(np.asarray(notes, dtype=np.int64))


def synthetic_corpus(config: SyntheticConfig = SyntheticConfig()) -> WindowCorpus:
    """The synthetic corpus as a WindowCorpus (songs split 80/10/10 with ``config.seed``)."""
    songs: List[np.ndarray] = [synthetic_piece(config.seed, i, config.n_bars)
                               for i in range(config.n_songs)]
    parts = split_songs(len(songs), config.seed)
    starts = windows_of(np.ones(config.n_bars, dtype=bool), config.window_bars)
    windows = {s: np.stack([np.repeat(parts[s], len(starts)),
                            np.tile(starts, len(parts[s]))], axis=1).astype(np.int64)
               for s in SPLITS}
    return WindowCorpus(songs, [f"synthetic-{config.seed}-{i:04d}" for i in range(len(songs))],
                        windows, config.window_bars,
                        stats=dict(bars=config.n_songs * config.n_bars))
