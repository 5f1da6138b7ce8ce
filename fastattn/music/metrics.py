"""Objective metrics of the next-bar test, self-similarity and repetition (SPEC §4).

All functions take pieces ``notes [N, 5]`` (bar, position, track, pitch, duration; see
``fastattn.music.tokens``). Bar-level metrics look at the notes of one bar with positions
0…47. Conventions for degenerate cases: two empty bars are identical (similarity / F1 = 1);
an empty bar against a non-empty one scores 0.
"""
from __future__ import annotations

from collections import Counter
from typing import Dict, Sequence, Tuple, Union

import numpy as np

from fastattn.music import tokens as T

LAGS = (4, 8, 12)


def _f1(tp: float, n_pred: float, n_true: float) -> float:
    if n_pred == 0 and n_true == 0:
        return 1.0
    if tp == 0:
        return 0.0
    p, r = tp / n_pred, tp / n_true
    return 2 * p * r / (p + r)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float(np.dot(a.ravel(), b.ravel()) / (na * nb))


def note_f1(pred: np.ndarray, true: np.ndarray) -> float:
    """F1 of notes matched on (bar, position, track, pitch), as multisets."""
    key = lambda n: Counter(map(tuple, np.asarray(n).reshape(-1, 5)[:, :4].tolist()))
    a, b = key(pred), key(true)
    tp = sum((a & b).values())
    return _f1(tp, sum(a.values()), sum(b.values()))


def pianoroll(notes: np.ndarray, n_positions: int = T.BAR_RES) -> np.ndarray:
    """[128, n_positions] bool: cell (pitch, t) is on while a note sounds (onset to onset +
    duration, clipped to the bar). Bars are ignored: pass the notes of one bar."""
    roll = np.zeros((128, n_positions), dtype=bool)
    for _, pos, _, p, dur in np.asarray(notes).reshape(-1, 5):
        roll[p, pos:min(pos + dur, n_positions)] = True
    return roll


def pianoroll_f1(pred: np.ndarray, true: np.ndarray) -> float:
    """F1 of the active cells of the two 128 × 48 pianorolls (all tracks merged)."""
    a, b = pianoroll(pred), pianoroll(true)
    return _f1(float((a & b).sum()), float(a.sum()), float(b.sum()))


def pitch_range(notes: np.ndarray) -> int:
    """Highest minus lowest pitch (0 for no notes)."""
    p = np.asarray(notes).reshape(-1, 5)[:, T.PITCH]
    return int(p.max() - p.min()) if len(p) else 0


def pitch_range_similarity(pred: np.ndarray, true: np.ndarray) -> float:
    """1 − |range_a − range_b| / 127."""
    return 1.0 - abs(pitch_range(pred) - pitch_range(true)) / 127.0


def note_density_similarity(pred: np.ndarray, true: np.ndarray) -> float:
    """1 − |n_a − n_b| / 48 (note counts), floored at 0 (more than 48 notes apart = 0)."""
    return max(0.0, 1.0 - abs(len(pred) - len(true)) / 48.0)


def chroma(notes: np.ndarray, n_segments: int = 2) -> np.ndarray:
    """[n_segments, 12] chroma: sounding cells of the pianoroll per pitch class, per half bar."""
    roll = pianoroll(notes)
    seg = roll.reshape(128, n_segments, T.BAR_RES // n_segments).sum(axis=2)  # [128, S]
    out = np.zeros((n_segments, 12))
    for pc in range(12):
        out[:, pc] = seg[pc::12].sum(axis=0)
    return out


def chroma_similarity(pred: np.ndarray, true: np.ndarray) -> float:
    """Cosine of the 12-bin chroma of each half bar, averaged over the two halves."""
    a, b = chroma(pred), chroma(true)
    return float(np.mean([_cosine(a[h], b[h]) for h in range(len(a))]))


def onset_histogram(notes: np.ndarray) -> np.ndarray:
    """[48] onset counts per position."""
    return np.bincount(np.asarray(notes).reshape(-1, 5)[:, T.POS], minlength=T.BAR_RES)[:T.BAR_RES]


def grooving_similarity(pred: np.ndarray, true: np.ndarray) -> float:
    """Cosine of the 48-bin onset histograms."""
    return _cosine(onset_histogram(pred).astype(float), onset_histogram(true).astype(float))


def pitch_class_entropy(notes: np.ndarray) -> float:
    """Entropy (bits) of the pitch-class histogram of the notes (0 for no notes)."""
    p = np.asarray(notes).reshape(-1, 5)[:, T.PITCH]
    if len(p) == 0:
        return 0.0
    h = np.bincount(p % 12, minlength=12) / len(p)
    h = h[h > 0]
    return float(-(h * np.log2(h)).sum())


def bar_metrics(pred: np.ndarray, true: np.ndarray) -> Dict[str, float]:
    """All next-bar metrics of a generated bar against the true bar (notes of one bar each)."""
    return {
        "note_f1": note_f1(pred, true),
        "pianoroll_f1": pianoroll_f1(pred, true),
        "pitch_range_sim": pitch_range_similarity(pred, true),
        "note_density_sim": note_density_similarity(pred, true),
        "chroma_sim": chroma_similarity(pred, true),
        "grooving_sim": grooving_similarity(pred, true),
        "pce": pitch_class_entropy(pred),
        "pce_true": pitch_class_entropy(true),
    }


def self_similarity(notes: np.ndarray, n_bars: int = T.N_BARS) -> np.ndarray:
    """[n_bars, n_bars] cosine similarity of the bars' 128 × 48 pianorolls. An empty bar scores
    0 against every bar, itself included: silence is not repetition."""
    notes = np.asarray(notes).reshape(-1, 5)
    rolls = np.stack([pianoroll(notes[notes[:, T.BAR] == b]).ravel().astype(float)
                      for b in range(n_bars)])
    S = np.empty((n_bars, n_bars))
    for i in range(n_bars):
        for j in range(i, n_bars):
            empty = not rolls[i].any() or not rolls[j].any()
            S[i, j] = S[j, i] = 0.0 if empty else _cosine(rolls[i], rolls[j])
    return S


REP_DEFINITION = ("rep@k = mean over i of S[i, i+k], the cosine similarity of the 128 × 48 "
                  "pianorolls of bars i and i+k of one 16-bar piece (4 prompt bars + 12 "
                  "generated: for k ≥ 4 every pair ends in a generated bar; empty bars score "
                  "0); reported as mean ± std over the pieces")


def repetition_scores(S: np.ndarray, lags: Sequence[int] = LAGS) -> Dict[int, float]:
    """rep@k of one piece: the mean of the lag-k diagonal S[i, i + k] of its self-similarity
    matrix, for each lag (NaN when the piece is too short). See ``REP_DEFINITION``."""
    return {k: float(np.mean(np.diagonal(S, k))) if k < len(S) else float("nan") for k in lags}


def repetition_summary(matrices: Sequence[np.ndarray],
                       lags: Sequence[int] = LAGS) -> Dict[int, Tuple[float, float, int]]:
    """rep@k of a set of pieces: (mean, sample std, n) over the pieces of each piece's
    ``repetition_scores`` (std 0 for one piece). The mean equals rep@k of the mean matrix."""
    per_piece = [repetition_scores(np.asarray(S), lags) for S in matrices]
    out = {}
    for k in lags:
        x = np.array([r[k] for r in per_piece], dtype=float)
        out[k] = (float(np.mean(x)) if len(x) else float("nan"),
                  float(np.std(x, ddof=1)) if len(x) > 1 else 0.0, len(x))
    return out


def format_repetition(summary: Dict[int, Tuple[float, float, int]], digits: int = 2) -> str:
    """'0.72 ± 0.05 / 0.60 ± 0.08 / 0.55 ± 0.09' for lags 4/8/12 (the order of ``summary``)."""
    return " / ".join(f"{m:.{digits}f} ± {s:.{digits}f}" for m, s, _ in summary.values())


def plot_self_similarity(matrices: Dict[str, Union[np.ndarray, Sequence[np.ndarray]]], path,
                         title: str = "", prompt_bars: int = 0) -> None:
    """Save self-similarity matrices side by side as a PNG (matplotlib, Agg backend).

    Each entry is one matrix [n, n] or a list of them (one per piece): a list is drawn as its
    mean matrix, and the panel title gives rep@k as mean ± std over its pieces
    (``repetition_summary``), the same numbers a results table reports for that set.
    ``prompt_bars`` > 0 draws dashed lines where the given prompt ends."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(matrices)
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n + 1, 4.6), squeeze=False)
    for ax, (name, mats) in zip(axes[0], matrices.items()):
        mats = [np.asarray(mats)] if np.asarray(mats[0]).ndim == 1 else [np.asarray(m) for m in mats]
        S = np.mean(mats, axis=0)
        im = ax.imshow(S, vmin=0, vmax=1, cmap="magma", origin="upper")
        if prompt_bars:
            ax.axvline(prompt_bars - 0.5, color="white", ls="--", lw=0.8)
            ax.axhline(prompt_bars - 0.5, color="white", ls="--", lw=0.8)
        summ = repetition_summary(mats)
        lags = "/".join(str(k) for k in summ)
        label = f"{name} (mean of {len(mats)})" if len(mats) > 1 else name
        ax.set_title(f"{label}\nrep@{lags} = {format_repetition(summ)}", fontsize=8)
        ax.set_xlabel("bar")
        ax.set_ylabel("bar")
        ticks = list(range(0, len(S), 4))
        ax.set_xticks(ticks)
        ax.set_yticks(ticks)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="cosine similarity")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
