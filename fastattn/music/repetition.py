"""Continuations of fixed prompts and their repetition, for every model on the same windows.

``continue_windows`` gives each of ``n`` windows of a split (spread evenly, the same windows for
every model) to the model as a 4-bar prompt, generates bars 4…15, and returns the pieces with
their bar-level self-similarity matrices and those of the true windows, so that rep@k
(``metrics.REP_DEFINITION``) of a model and of the ground truth average the same prompts.
"""
from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from fastattn.music import metrics as M
from fastattn.music import tokens as T
from fastattn.music.data import WindowCorpus


class Continuations(NamedTuple):
    """``n`` continued windows: ``indices`` into the split, the true windows and the generated
    pieces (notes [N, 5] each; bars < ``prompt_bars`` are the prompt), and their self-similarity
    matrices ``S`` / ``S_true`` ([n_bars, n_bars] each)."""
    indices: List[int]
    truth: List[np.ndarray]
    pieces: List[np.ndarray]
    S: List[np.ndarray]
    S_true: List[np.ndarray]
    prompt_bars: int

    def rep(self, lags: Sequence[int] = M.LAGS) -> Dict[int, Tuple[float, float, int]]:
        """rep@k of the generated pieces: (mean, std, n) per lag."""
        return M.repetition_summary(self.S, lags)

    def rep_true(self, lags: Sequence[int] = M.LAGS) -> Dict[int, Tuple[float, float, int]]:
        """rep@k of the true windows of the same prompts."""
        return M.repetition_summary(self.S_true, lags)


@torch.no_grad()
def continue_windows(model, corpus: WindowCorpus, split: str = "valid", n: int = 8, *,
                     prompt_bars: int = 4, sampling=None, seed: int = 0,
                     generator: Optional[torch.Generator] = None) -> Continuations:
    """Continue ``n`` windows of ``split`` (spread evenly over it) from their first
    ``prompt_bars`` bars."""
    from fastattn.music.evaluate import _pick, continue_piece
    from fastattn.music.generate import SamplingConfig
    sampling = sampling if sampling is not None else SamplingConfig(top_k=8)
    gen = generator if generator is not None else torch.Generator().manual_seed(seed)
    idx = _pick(corpus.n_windows(split), n)
    truth, pieces, S, S_true = [], [], [], []
    for i in idx:
        w = corpus.window(split, i)
        notes = continue_piece(model, w, prompt_bars=prompt_bars, total_bars=corpus.window_bars,
                               sampling=sampling, generator=gen)
        truth.append(T.canonical(w))
        pieces.append(notes)
        S.append(M.self_similarity(notes, corpus.window_bars))
        S_true.append(M.self_similarity(w, corpus.window_bars))
    return Continuations(idx, truth, pieces, S, S_true, prompt_bars)
