"""Next-bar metrics, self-similarity and repetition on hand-computed cases (SPEC §4)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from fastattn.music import metrics as M
from helpers import n



EMPTY = n()
BAR = n((15, 0, 0, 60, 12), (15, 12, 1, 64, 6), (15, 24, 2, 67, 24), (15, 40, 2, 72, 8))


def test_note_f1_sets_and_empty_bars():
    """The authors: sets of (bar, position, track, pitch), duration ignored; 0 if either bar is
    empty (two empty bars included)."""
    pred = n((15, 0, 0, 60, 12), (15, 12, 0, 62, 12))
    true = n((15, 0, 0, 60, 24), (15, 24, 0, 64, 12))
    assert M.note_f1(pred, true) == pytest.approx(0.5)  # 1 match: P = R = 1/2
    # Duplicates collapse: {(0,0,60)} vs {(0,0,60)} → 1 (a multiset F1 would say 2/3).
    assert M.note_f1(n((0, 0, 0, 60, 1), (0, 0, 0, 60, 1)), n((0, 0, 0, 60, 1))) == 1.0
    assert M.note_f1(n((0, 0, 1, 60, 1)), n((0, 0, 0, 60, 1))) == 0.0  # other track
    assert M.note_f1(EMPTY, EMPTY) == 0.0 and M.note_f1(EMPTY, BAR) == 0.0
    assert M.note_f1(BAR, EMPTY) == 0.0


def test_pianoroll_f1_clipping_and_empty_bars():
    # Cells 0..11 vs 6..17 on pitch 60: overlap 6 → P = R = 1/2.
    assert M.pianoroll_f1(n((15, 0, 0, 60, 12)), n((15, 6, 2, 60, 12))) == pytest.approx(0.5)
    roll = M.pianoroll(n((0, 40, 0, 70, 24)))  # clipped at the bar end: 8 cells
    assert roll.shape == (128, 48) and roll.sum() == 8 and roll[70, 40:].all()
    # A duplicate adds no cell; duration matters here.
    assert M.pianoroll_f1(n((0, 0, 0, 60, 12), (0, 0, 0, 60, 12)), n((0, 0, 0, 60, 24))) == \
        pytest.approx(2 * 1 * 0.5 / 1.5)
    assert M.pianoroll_f1(EMPTY, EMPTY) == 0.0 and M.pianoroll_f1(EMPTY, BAR) == 0.0


def test_pitch_range_similarity():
    pred = n((0, 0, 0, 60, 1), (0, 1, 0, 72, 1), (0, 2, 0, 66, 1))
    assert M.pitch_range_similarity(pred, n((0, 0, 0, 60, 1))) == pytest.approx(1 - 12 / 127)
    assert M.pitch_range_similarity(BAR, BAR) == 1.0
    # One note has range 0 but is not empty: 1 − 12/127, not 0.
    assert M.pitch_range_similarity(n((0, 5, 1, 40, 3)), pred) == pytest.approx(1 - 12 / 127)
    # Empty bars score 0 (ours used to give an empty prediction 1 − 12/127 here).
    assert M.pitch_range_similarity(EMPTY, pred) == 0.0
    assert M.pitch_range_similarity(EMPTY, EMPTY) == 0.0


def test_note_density_similarity():
    pred = n((0, 0, 0, 60, 1), (0, 1, 0, 72, 1), (0, 2, 0, 66, 1))
    assert M.note_density_similarity(pred, n((0, 0, 0, 60, 1))) == pytest.approx(1 - 2 / 48)
    # Duplicates collapse: 3 notes, one of them twice, against 3 → 1.
    assert M.note_density_similarity(np.concatenate([pred, pred[:1]]), pred) == 1.0
    # Counts, not sets of anything: two empty bars score 1; an empty one against 4 notes 1 − 4/48.
    assert M.note_density_similarity(EMPTY, EMPTY) == 1.0
    assert M.note_density_similarity(EMPTY, BAR) == pytest.approx(1 - 4 / 48)
    # Not floored: 60 distinct notes against none → 1 − 60/48 < 0.
    many = n(*[(0, i % 48, i // 48, 60, 1) for i in range(60)])
    assert M.note_density_similarity(many, EMPTY) == pytest.approx(1 - 60 / 48)


def test_chroma_similarity_by_onsets_per_half_bar():
    """The authors: binary pitch-class onsets per half bar (positions < 24 | >= 24), cosine
    per half, 0 for a half where either side has no onset; mean of the two halves."""
    c4 = n((0, 0, 0, 60, 48))   # sounds through both halves but starts in the first
    c5 = n((0, 0, 1, 72, 6))
    g = n((0, 0, 0, 67, 24))
    assert M.chroma_similarity(c4, c5) == pytest.approx(0.5)  # octave-blind; second half 0
    assert M.chroma_similarity(c4, g) == 0.0
    # Onsets at the half-bar edge: position 23 is in the first half, 24 in the second.
    a = n((0, 23, 0, 60, 1), (0, 24, 0, 62, 1))
    b = n((0, 0, 0, 48, 1), (0, 47, 0, 50, 1))
    assert M.chroma(a).tolist() == M.chroma(b).tolist()
    assert M.chroma_similarity(a, b) == pytest.approx(1.0)
    # Binary: repeated or long notes weigh the same. First half {C, E} vs {C}: 1/√2;
    # second half {G} vs {G}: 1 → (1/√2 + 1) / 2.
    p = n((0, 0, 0, 60, 1), (0, 4, 0, 60, 1), (0, 8, 0, 64, 1), (0, 30, 0, 67, 12))
    t = n((0, 0, 1, 48, 24), (0, 24, 0, 55, 1))
    assert M.chroma_similarity(p, t) == pytest.approx((1 / math.sqrt(2) + 1) / 2)
    assert M.chroma_similarity(EMPTY, EMPTY) == 0.0 and M.chroma_similarity(EMPTY, BAR) == 0.0
    # The other definition, by name: sounding durations per half bar.
    ch = M.chroma(n((0, 20, 0, 62, 8)), weighting="duration")  # D sounds 4 cells in each half
    assert ch[0, 2] == 4 and ch[1, 2] == 4 and ch.sum() == 8
    assert M.chroma_similarity(c4, c5, weighting="duration") == pytest.approx(
        (1 + 0) / 2)  # C5 sounds only in the first half
    with pytest.raises(ValueError, match="weighting"):
        M.chroma(c4, weighting="energy")


def test_grooving_similarity_and_pitch_class_entropy():
    a = n((0, 0, 0, 60, 1), (0, 12, 0, 60, 1))
    b = n((0, 0, 0, 50, 1), (0, 24, 0, 50, 1))
    assert M.grooving_similarity(a, b) == pytest.approx(0.5)
    # Duplicates collapse: histogram [1 at 0, 1 at 12], not [2, 1].
    assert M.grooving_similarity(np.concatenate([a, a[:1]]), a) == pytest.approx(1.0)
    # Onset at the last position of the bar counts there.
    assert M.onset_histogram(n((0, 47, 0, 60, 1)))[47] == 1
    assert M.grooving_similarity(EMPTY, EMPTY) == 0.0 and M.grooving_similarity(EMPTY, a) == 0.0
    assert M.pitch_class_entropy(n((0, 0, 0, 60, 1), (0, 0, 0, 64, 1), (0, 0, 0, 67, 1),
                                   (0, 0, 0, 72, 1))) == pytest.approx(1.5)
    # Distinct notes: a duplicate C does not tilt the histogram.
    assert M.pitch_class_entropy(n((0, 0, 0, 60, 1), (0, 0, 0, 60, 1), (0, 0, 0, 62, 1))) == 1.0
    assert math.isnan(M.pitch_class_entropy(EMPTY))
    m = M.bar_metrics(BAR, BAR)
    assert all(m[k] == pytest.approx(1.0) for k in ("note_f1", "pianoroll_f1", "chroma_sim",
                                                    "grooving_sim", "pitch_range_sim",
                                                    "note_density_sim"))
    # A bar whose notes all start in its first half matches itself only half in chroma.
    assert M.bar_metrics(a, a)["chroma_sim"] == pytest.approx(0.5)


def test_empty_bars_in_bar_metrics_and_means():
    """What an empty bar scores (module docstring): 0 everywhere but density; entropy NaN,
    left out of the mean."""
    m = M.bar_metrics(EMPTY, BAR)
    assert {k: m[k] for k in m if k != "pce_true"} == pytest.approx(
        {"note_f1": 0, "pianoroll_f1": 0, "pitch_range_sim": 0, "note_density_sim": 1 - 4 / 48,
         "chroma_sim": 0, "grooving_sim": 0, "pce": float("nan")}, nan_ok=True)
    e = M.bar_metrics(EMPTY, EMPTY)
    assert e["note_density_sim"] == 1.0 and e["note_f1"] == 0.0 and math.isnan(e["pce_true"])
    rows = [M.bar_metrics(BAR, BAR), m]
    mean = M.mean_bar_metrics(rows)
    assert mean["note_f1"] == pytest.approx(0.5)
    assert mean["pce"] == pytest.approx(M.pitch_class_entropy(BAR))  # the empty bar left out
    assert math.isnan(M.mean_bar_metrics([e])["pce"]) and M.mean_bar_metrics([]) == {}


def test_self_similarity_and_repetition_lags():
    # Bar b plays pattern b % 4 (four disjoint pitches): similarity 1 at lags 4/8/12, else 0.
    piece = n(*[(b, 0, 0, 60 + (b % 4), 12) for b in range(16)])
    S = M.self_similarity(piece, 16)
    assert S.shape == (16, 16) and np.allclose(np.diag(S), 1)
    assert S[0, 4] == pytest.approx(1) and S[0, 1] == 0 and S[3, 15] == pytest.approx(1)
    rep = M.repetition_scores(S)
    assert rep == {4: pytest.approx(1), 8: pytest.approx(1), 12: pytest.approx(1)}
    assert M.repetition_scores(S, lags=(1, 2))[2] == 0.0
    # Half the note shared between two bars: cosine 12 / (sqrt(12)·sqrt(24)) = 1/√2.
    S2 = M.self_similarity(n((0, 0, 0, 60, 12), (1, 0, 0, 60, 12), (1, 12, 0, 60, 12)), 2)
    assert S2[0, 1] == pytest.approx(1 / math.sqrt(2))
    assert math.isnan(M.repetition_scores(S2)[4])
    # Empty bars never count as repeats (not even of themselves).
    S3 = M.self_similarity(n((0, 0, 0, 60, 12), (2, 0, 0, 60, 12)), 4)
    assert S3[0, 2] == pytest.approx(1) and S3[1, 3] == 0 and S3[1, 1] == 0


def test_plot_self_similarity(tmp_path):
    pytest.importorskip("matplotlib")
    M.plot_self_similarity({"a": np.eye(16), "b": np.ones((16, 16))}, tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
