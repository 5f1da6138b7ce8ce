"""Objective metrics of the next-bar test, self-similarity and repetition (SPEC §4).

All functions take pieces ``notes [N, 5]`` (bar, position, track, pitch, duration; see
``fastattn.music.tokens``). The bar metrics compare a predicted bar with the true bar (the notes
of one bar each, positions 0…47; the bar column is not compared) by the paper authors'
definitions (tatsuropfgt/Transformer-SMG, metrics.py and data_utils.cleaning_seq):

- exact duplicate notes are collapsed first (their evaluation keeps a set of notes);
- chroma marks which pitch classes have an onset in each half bar (positions 0…23, 24…47);
- a metric with nothing to compare scores 0 — an empty bar against any bar, or (chroma) a half
  bar without onsets on either side — except note density, which compares counts (two empty
  bars: 1) and is not floored (1 − |Δn| / 48 < 0 when the counts differ by more than 48);
- pitch-class entropy of an empty bar is NaN (undefined; ``mean_bar_metrics`` averages over the
  non-empty bars, as the authors do).

``chroma_similarity(..., weighting="duration")`` keeps the one other definition: cosine of
sounding-duration chroma per half bar.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple, Union

import numpy as np

from fastattn.music import tokens as T

LAGS = (4, 8, 12)
HALF = T.BAR_RES // 2


def _notes(notes) -> np.ndarray:
    return np.asarray(notes, dtype=np.int64).reshape(-1, 5)


def collapse_duplicates(notes) -> np.ndarray:
    """The distinct notes of ``notes`` [N, 5] (exact duplicates collapsed), sorted."""
    return np.unique(_notes(notes), axis=0)


def _f1(tp: float, n_pred: float, n_true: float) -> float:
    """F1 of tp matches among n_pred predicted and n_true true items; 0 without a match."""
    if tp == 0:
        return 0.0
    p, r = tp / n_pred, tp / n_true
    return 2 * p * r / (p + r)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity; 0 when either vector is zero (nothing to compare)."""
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0 or nb == 0:
        return 0.0
    return float(np.dot(a.ravel(), b.ravel()) / (na * nb))


def note_f1(pred: np.ndarray, true: np.ndarray) -> float:
    """F1 of the sets of (position, track, pitch) of the two bars (duration ignored). 0 when
    either bar is empty."""
    key = lambda n: set(map(tuple, _notes(n)[:, 1:4].tolist()))  # noqa: E731
    a, b = key(pred), key(true)
    return _f1(len(a & b), len(a), len(b))


def pianoroll(notes: np.ndarray, n_positions: int = T.BAR_RES) -> np.ndarray:
    """[128, n_positions] bool: cell (pitch, t) is on while a note sounds (onset to onset +
    duration, clipped to the bar). Bars are ignored: pass the notes of one bar."""
    roll = np.zeros((128, n_positions), dtype=bool)
    for _, pos, _, p, dur in _notes(notes):
        roll[p, pos:min(pos + dur, n_positions)] = True
    return roll


def pianoroll_f1(pred: np.ndarray, true: np.ndarray) -> float:
    """F1 of the active cells of the two 128 × 48 pianorolls (all tracks merged). 0 when
    either bar is empty."""
    a, b = pianoroll(pred), pianoroll(true)
    return _f1(float((a & b).sum()), float(a.sum()), float(b.sum()))


def pitch_range(notes: np.ndarray) -> int:
    """Highest minus lowest pitch (0 for no notes)."""
    p = _notes(notes)[:, T.PITCH]
    return int(p.max() - p.min()) if len(p) else 0


def pitch_range_similarity(pred: np.ndarray, true: np.ndarray) -> float:
    """1 − |range_a − range_b| / 127; 0 when either bar is empty."""
    if len(_notes(pred)) == 0 or len(_notes(true)) == 0:
        return 0.0
    return 1.0 - abs(pitch_range(pred) - pitch_range(true)) / 127.0


def note_density_similarity(pred: np.ndarray, true: np.ndarray) -> float:
    """1 − |n_a − n_b| / 48 of the counts of distinct notes; two empty bars score 1; not
    floored (negative when the counts differ by more than 48)."""
    return 1.0 - abs(len(collapse_duplicates(pred)) - len(collapse_duplicates(true))) / 48.0


def chroma(notes: np.ndarray, weighting: str = "onset") -> np.ndarray:
    """[2, 12] chroma of the two half bars (positions 0…23 and 24…47).

    weighting "onset" (the authors'): 1 where a note of that pitch class starts in that half,
    else 0. "duration": the number of sounding 12-per-beat cells of that pitch class in that
    half (clipped to the bar)."""
    n = _notes(notes)
    out = np.zeros((2, 12))
    if weighting == "onset":
        out[(n[:, T.POS] >= HALF).astype(int), n[:, T.PITCH] % 12] = 1.0
    elif weighting == "duration":
        seg = pianoroll(n).reshape(128, 2, HALF).sum(axis=2)  # [128, 2]
        for pc in range(12):
            out[:, pc] = seg[pc::12].sum(axis=0)
    else:
        raise ValueError(f"weighting must be 'onset' or 'duration', got {weighting!r}")
    return out


def chroma_similarity(pred: np.ndarray, true: np.ndarray, weighting: str = "onset") -> float:
    """Mean over the two half bars of the cosine of their chroma (``chroma``); a half in which
    either bar has no note scores 0, so two empty bars score 0."""
    a, b = chroma(pred, weighting), chroma(true, weighting)
    return float(np.mean([_cosine(a[h], b[h]) for h in range(2)]))


def onset_histogram(notes: np.ndarray) -> np.ndarray:
    """[48] counts of distinct notes starting at each position."""
    return np.bincount(collapse_duplicates(notes)[:, T.POS], minlength=T.BAR_RES)[:T.BAR_RES]


def grooving_similarity(pred: np.ndarray, true: np.ndarray) -> float:
    """Cosine of the 48-bin onset histograms; 0 when either bar is empty."""
    return _cosine(onset_histogram(pred).astype(float), onset_histogram(true).astype(float))


def pitch_class_entropy(notes: np.ndarray) -> float:
    """Entropy (bits) of the pitch-class histogram of the distinct notes; NaN for no notes."""
    p = collapse_duplicates(notes)[:, T.PITCH]
    if len(p) == 0:
        return float("nan")
    h = np.bincount(p % 12, minlength=12) / len(p)
    h = h[h > 0]
    return float(-(h * np.log2(h)).sum())


def bar_metrics(pred: np.ndarray, true: np.ndarray) -> Dict[str, float]:
    """All next-bar metrics of a predicted bar against the true bar (notes of one bar each):
    note_f1, pianoroll_f1, pitch_range_sim, note_density_sim, chroma_sim, grooving_sim and the
    pitch-class entropies pce (predicted bar) and pce_true."""
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


def mean_bar_metrics(rows: List[Dict[str, float]]) -> Dict[str, float]:
    """Mean of each metric over bars (``bar_metrics`` rows); entropies over the non-empty bars
    only (NaN when there is none), as the authors' evaluation averages them."""
    if not rows:
        return {}
    return {k: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
            for k in rows[0] for v in [np.array([r[k] for r in rows], dtype=float)]}


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
    return {k: mean_std([r[k] for r in per_piece]) for k in lags}


def mean_std(x: Sequence[float]) -> Tuple[float, float, int]:
    """(mean, sample std, n) of x: std 0 for one value, mean NaN for none."""
    a = np.asarray(x, dtype=float)
    return (float(a.mean()) if len(a) else float("nan"), float(a.std(ddof=1)) if len(a) > 1 else 0.0, len(a))


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
