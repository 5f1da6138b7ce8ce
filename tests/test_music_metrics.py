"""Next-bar metrics, self-similarity and repetition on hand-computed cases (SPEC §4)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from fastattn.music import metrics as M


def n(*rows):
    return np.array(rows, dtype=np.int64).reshape(-1, 5)


def test_note_f1_ignores_duration_and_counts_multisets():
    pred = n((15, 0, 0, 60, 12), (15, 12, 0, 62, 12))
    true = n((15, 0, 0, 60, 24), (15, 24, 0, 64, 12))
    assert M.note_f1(pred, true) == pytest.approx(0.5)  # 1 match: P = R = 1/2
    assert M.note_f1(n((0, 0, 0, 60, 1), (0, 0, 0, 60, 1)), n((0, 0, 0, 60, 1))) == pytest.approx(2 / 3)
    assert M.note_f1(n((0, 0, 1, 60, 1)), n((0, 0, 0, 60, 1))) == 0.0  # other track
    assert M.note_f1(n(), n()) == 1.0 and M.note_f1(n(), n((0, 0, 0, 60, 1))) == 0.0


def test_pianoroll_f1_and_clipping():
    # Cells 0..11 vs 6..17 on pitch 60: overlap 6 → P = R = 1/2.
    assert M.pianoroll_f1(n((15, 0, 0, 60, 12)), n((15, 6, 2, 60, 12))) == pytest.approx(0.5)
    roll = M.pianoroll(n((0, 40, 0, 70, 24)))
    assert roll.shape == (128, 48) and roll.sum() == 8 and roll[70, 40:].all()


def test_range_density_similarity():
    pred = n((0, 0, 0, 60, 1), (0, 1, 0, 72, 1), (0, 2, 0, 66, 1))
    true = n((0, 0, 0, 60, 1))
    assert M.pitch_range_similarity(pred, true) == pytest.approx(1 - 12 / 127)
    assert M.note_density_similarity(pred, true) == pytest.approx(1 - 2 / 48)
    many = n(*[(0, i % 48, 0, 60, 1) for i in range(60)])
    assert M.note_density_similarity(many, n()) == 0.0


def test_chroma_similarity_per_half_bar():
    c4_first_half = n((0, 0, 0, 60, 24))
    c5_first_half = n((0, 0, 1, 72, 24))
    g_first_half = n((0, 0, 0, 67, 24))
    assert M.chroma_similarity(c4_first_half, c5_first_half) == pytest.approx(1.0)  # octave-blind
    # First half orthogonal (0), second half both empty (1) → 0.5.
    assert M.chroma_similarity(c4_first_half, g_first_half) == pytest.approx(0.5)
    ch = M.chroma(n((0, 20, 0, 62, 8)))  # D sounding 4 cells in each half
    assert ch[0, 2] == 4 and ch[1, 2] == 4 and ch.sum() == 8


def test_grooving_similarity_and_pitch_class_entropy():
    a = n((0, 0, 0, 60, 1), (0, 12, 0, 60, 1))
    b = n((0, 0, 0, 50, 1), (0, 24, 0, 50, 1))
    assert M.grooving_similarity(a, b) == pytest.approx(0.5)
    assert M.pitch_class_entropy(n((0, 0, 0, 60, 1), (0, 0, 0, 64, 1), (0, 0, 0, 67, 1),
                                   (0, 0, 0, 72, 1))) == pytest.approx(1.5)
    assert M.pitch_class_entropy(n()) == 0.0
    m = M.bar_metrics(a, a)
    assert all(m[k] == pytest.approx(1.0) for k in ("note_f1", "pianoroll_f1", "chroma_sim",
                                                    "grooving_sim", "pitch_range_sim",
                                                    "note_density_sim"))


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
