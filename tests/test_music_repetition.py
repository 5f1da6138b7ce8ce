"""One definition of rep@k (per piece, and mean ± std over a set of pieces), the pictures that
show it (self-similarity, piano roll), and continuations of the same prompts for every model."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastattn.music import metrics as M
from fastattn.music import plots
from fastattn.music.model import ModelConfig, MusicTransformer
from fastattn.music.repetition import continue_windows
from fastattn.music.synthetic import SyntheticConfig, synthetic_corpus
from helpers import n



def periodic(period, n_bars=16):
    """Bar b plays pitch 60 + (b mod period) at position 0 for a quarter note."""
    return n(*[(b, 0, 0, 60 + b % period, 12) for b in range(n_bars)])


def test_rep_of_one_piece_by_hand():
    # Period 4: every lag-4/8/12 pair is the same bar → 1. Period 8: lag 8 → 1, lags 4 and 12
    # pair different pitches → 0. Period 3: lag 12 → 1 (12 = 4 · 3), lags 4/8 → 0.
    def rep(p):
        return {k: round(v, 12) for k, v in M.repetition_scores(M.self_similarity(p)).items()}
    assert rep(periodic(4)) == {4: 1.0, 8: 1.0, 12: 1.0}
    assert rep(periodic(8)) == {4: 0.0, 8: 1.0, 12: 0.0}
    assert rep(periodic(3)) == {4: 0.0, 8: 0.0, 12: 1.0}
    # Bars 4…15 silent (a model that stopped): the lag-4 diagonal has 12 pairs, every one
    # touching a silent bar → 0.
    half = n(*[(b, 0, 0, 60, 12) for b in range(4)])
    assert M.repetition_scores(M.self_similarity(half))[4] == 0.0
    # 2 of the 12 lag-4 pairs repeat (bars 0→4 and 1→5): rep@4 = 2/12.
    p = n(*[(b, 0, 0, 40 + b, 12) for b in range(16)], (4, 0, 0, 40, 12), (5, 0, 0, 41, 12))
    p = p[~((p[:, 0] == 4) & (p[:, 3] == 44)) & ~((p[:, 0] == 5) & (p[:, 3] == 45))]
    assert M.repetition_scores(M.self_similarity(p))[4] == pytest.approx(2 / 12)


def test_rep_of_a_set_is_mean_and_std_over_pieces():
    S = [M.self_similarity(periodic(4)), M.self_similarity(periodic(8)),
         M.self_similarity(periodic(3))]
    summ = M.repetition_summary(S)
    # rep@4 per piece: 1, 0, 0 → mean 1/3, sample std sqrt(((2/3)² + 2·(1/3)²) / 2) = 1/√3.
    assert summ[4] == (pytest.approx(1 / 3), pytest.approx(1 / math.sqrt(3)), 3)
    assert summ[8] == (pytest.approx(2 / 3), pytest.approx(1 / math.sqrt(3)), 3)
    # The mean equals rep@k of the mean matrix (what the PNG draws).
    mean_rep = M.repetition_scores(np.mean(S, axis=0))
    assert all(mean_rep[k] == pytest.approx(summ[k][0]) for k in M.LAGS)
    assert M.repetition_summary(S[:1])[4] == (pytest.approx(1.0), 0.0, 1)
    # rep@12 per piece: 1 (period 4), 0 (period 8: 12 mod 8 = 4), 1 (period 3) → 2/3.
    assert M.format_repetition(summ) == "0.33 ± 0.58 / 0.67 ± 0.58 / 0.67 ± 0.58"


def test_self_similarity_png_titles_use_the_set_definition(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.axes
    titles = []
    real = matplotlib.axes.Axes.set_title
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title",
                        lambda self, t, *a, **k: (titles.append(t), real(self, t, *a, **k))[1])
    S = [M.self_similarity(periodic(4)), M.self_similarity(periodic(8))]
    M.plot_self_similarity({"model": S, "one": S[0]}, tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    assert titles[0] == "model (mean of 2)\nrep@4/8/12 = " + M.format_repetition(M.repetition_summary(S))
    assert titles[1] == "one\nrep@4/8/12 = 1.00 ± 0.00 / 1.00 ± 0.00 / 1.00 ± 0.00"


def test_note_rectangles_and_pianoroll_png(tmp_path):
    r = plots.note_rectangles(n((2, 24, 1, 50, 12), (0, 0, 2, 64, 48)))
    assert r.tolist() == [[2.5, 0.25, 50, 1], [0.0, 1.0, 64, 2]]
    pytest.importorskip("matplotlib")
    path = tmp_path / "roll.png"
    plots.plot_pianorolls({"ground truth": periodic(4), "model": periodic(8)}, path,
                          title="test")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_continuations_share_prompts_with_the_truth():
    corpus = synthetic_corpus(SyntheticConfig(n_songs=10, n_bars=17))
    torch.manual_seed(0)
    model = MusicTransformer(ModelConfig(variant="Attn", n_layer=1, d_model=32, n_head=2,
                                         d_ff=64, max_len=384))
    c = continue_windows(model, corpus, "valid", 2, seed=0)
    assert c.indices == [0, corpus.n_windows("valid") - 1]
    for truth, piece, idx in zip(c.truth, c.pieces, c.indices):
        prompt = lambda x: x[x[:, 0] < 4]
        assert np.array_equal(prompt(piece), prompt(truth))
        assert np.array_equal(truth, M.T.canonical(corpus.window("valid", idx)))
    assert len(c.S) == len(c.S_true) == 2 and c.rep()[4][2] == 2
    assert c.rep_true()[4][0] == pytest.approx(np.mean([M.repetition_scores(S)[4] for S in c.S_true]))


def test_demo_reports_rep_the_same_way_everywhere(tmp_path):
    """Demo table, results.md and PNG use rep@k over the same prompts, with the ground truth."""
    pytest.importorskip("matplotlib")
    from fastattn.music.demo import DemoConfig, run_demo
    res = run_demo(DemoConfig(out_dir=str(tmp_path), steps=2, next_bar_windows=1,
                              continuations=2))
    md = (tmp_path / "results.md").read_text()
    assert md.startswith(M.REP_DEFINITION)
    s = res["CirRelAttn-H"]
    cell = f"{s['repetition']['4']:.2f} ± {s['repetition_std']['4']:.2f}"
    assert cell in md.splitlines()[-2] and md.splitlines()[-1].startswith("| ground truth |")
    c = s["continuations"]
    assert s["repetition"]["4"] == pytest.approx(M.repetition_summary(c.S)[4][0])
    assert s["repetition_truth"] == res["Attn"]["repetition_truth"]       # same prompts
    for png in ("self_similarity.png", "pianoroll.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
