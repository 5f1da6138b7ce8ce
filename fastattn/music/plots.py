"""Piano-roll pictures: prompt + continuation of each model beside the ground truth.

``plot_pianorolls`` draws one panel per piece, stacked on a shared time axis (bars) and pitch
axis: notes as bars coloured by track (MELODY, BRIDGE, PIANO), bar lines, the prompt shaded and
its end marked by a vertical line, and each panel titled with the piece's rep@k (the per-piece
score of ``metrics.repetition_scores``).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np

from fastattn.music import metrics as M
from fastattn.music import tokens as T

TRACK_COLOURS = ("#d62728", "#1f77b4", "#2ca02c")   # MELODY red, BRIDGE blue, PIANO green


def note_rectangles(notes: np.ndarray, bar_res: int = T.BAR_RES) -> np.ndarray:
    """[N, 4] float (start, length, pitch, track) in bars for drawing notes [N, 5]: start =
    bar + position / bar_res, length = duration / bar_res."""
    n = np.asarray(notes, dtype=np.int64).reshape(-1, 5)
    out = np.empty((len(n), 4))
    out[:, 0] = n[:, T.BAR] + n[:, T.POS] / bar_res
    out[:, 1] = n[:, T.DUR] / bar_res
    out[:, 2] = n[:, T.PITCH]
    out[:, 3] = n[:, T.TRACK]
    return out


def plot_pianorolls(pieces: Dict[str, np.ndarray], path, *, prompt_bars: int = 4,
                    n_bars: int = T.N_BARS, title: str = "",
                    lags: Sequence[int] = M.LAGS, pitch_range: Optional[tuple] = None) -> None:
    """Save stacked piano rolls of ``pieces`` (name → notes [N, 5]) as one PNG.

    Every panel spans bars 0…n_bars with the same pitch range (``pitch_range`` or the range of
    all pieces ± 2), the prompt (bars < prompt_bars) shaded grey with a black line at its end,
    thin lines at bars, thicker every 4 bars; the panel title is the name and the piece's
    rep@k."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import PolyCollection
    from matplotlib.patches import Patch

    rects = {name: note_rectangles(p) for name, p in pieces.items()}
    if pitch_range is None:
        allp = np.concatenate([r[:, 2] for r in rects.values()] + [np.array([60.0])])
        pitch_range = (int(allp.min()) - 2, int(allp.max()) + 3)
    lo, hi = pitch_range
    n = len(pieces)
    fig, axes = plt.subplots(n, 1, figsize=(14, 2.2 * n + 0.8), sharex=True, squeeze=False)
    for ax, (name, r) in zip(axes[:, 0], rects.items()):
        ax.axvspan(0, prompt_bars, color="0.92", zorder=0)
        for b in range(n_bars + 1):
            ax.axvline(b, color="0.55" if b % 4 else "0.25", lw=0.4 if b % 4 else 0.8, zorder=1)
        ax.axvline(prompt_bars, color="black", lw=2.0, zorder=3)
        verts = [[(s, p - 0.4), (s + d, p - 0.4), (s + d, p + 0.4), (s, p + 0.4)]
                 for s, d, p, _ in r]
        colours = [TRACK_COLOURS[int(t) % len(TRACK_COLOURS)] for t in r[:, 3]]
        ax.add_collection(PolyCollection(verts, facecolors=colours, edgecolors="none", zorder=2))
        rep = M.repetition_scores(M.self_similarity(pieces[name], n_bars), lags)
        ax.set_title(f"{name} — rep@{'/'.join(map(str, lags))} = "
                     + " / ".join(f"{rep[k]:.2f}" for k in lags), fontsize=9, loc="left")
        ax.set_ylim(lo, hi)
        ax.set_ylabel("pitch")
    ax = axes[-1, 0]
    ax.set_xlim(0, n_bars)
    ax.set_xticks(range(0, n_bars + 1, 1))
    ax.set_xlabel(f"bar (shaded: the {prompt_bars}-bar prompt; right of the black line: generated)")
    handles = [Patch(color=c, label=t) for c, t in zip(TRACK_COLOURS, T.TRACK_NAMES)]
    axes[0, 0].legend(handles=handles, loc="lower right", bbox_to_anchor=(1.0, 1.0), fontsize=8,
                      ncol=3, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
