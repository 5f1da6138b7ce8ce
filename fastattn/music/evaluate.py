"""Evaluation: test NLL, the next-bar test, continuations with MIDI and self-similarity (SPEC §4).

- ``next_bar_test``: for each window, bars 0…14 are given and bar 15 is generated, then compared
  with the truth by the metrics of ``fastattn.music.metrics`` (the authors' definitions;
  averaged over windows, entropies over non-empty bars).
- ``continue_piece``: the first 4 bars of a window are given and bars 4…15 generated; the
  prompt's bars are never written into.
- ``evaluate_model``: both, plus test NLL/perplexity, writing MIDI files, a self-similarity PNG
  and a JSON summary into a folder.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from fastattn.music import metrics as M
from fastattn.music import tokens as T
from fastattn.music.data import WindowCorpus
from fastattn.music.generate import SamplingConfig, decode, generate, prompt_from_notes
from fastattn.music.model import MusicTransformer
from fastattn.music.train import evaluate_nll


def _pick(n_total: int, n: int) -> List[int]:
    """n window indices spread evenly over a split (deterministic)."""
    if n <= 0 or n >= n_total:
        return list(range(n_total))
    return [int(i) for i in np.linspace(0, n_total - 1, n).round()]


@torch.no_grad()
def next_bar_test(model: MusicTransformer, corpus: WindowCorpus, split: str = "test", *,
                  n_windows: int = 50, sampling: SamplingConfig = SamplingConfig(top_k=8),
                  seed: int = 0) -> Dict[str, float]:
    """Mean next-bar metrics over ``n_windows`` windows (15 bars given, bar 16 generated)."""
    last = corpus.window_bars - 1
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in _pick(corpus.n_windows(split), n_windows):
        w = corpus.window(split, i)
        prompt = prompt_from_notes(w, model.cfg.representation, last, model.cfg.convention)
        cfg = SamplingConfig(sampling.temperature, sampling.top_k, sampling.top_p,
                             min(sampling.max_new_tokens, 4 * 96 + 2))
        g = generate(model, prompt, end_bar=last + 1, min_bar=last, sampling=cfg, generator=gen)
        notes = decode(model, g.tokens)
        rows.append(M.bar_metrics(notes[notes[:, T.BAR] == last], w[w[:, T.BAR] == last]))
    out = M.mean_bar_metrics(rows)
    out["windows"] = len(rows)
    return out


@torch.no_grad()
def continue_piece(model: MusicTransformer, notes: np.ndarray, *, prompt_bars: int = 4,
                   total_bars: int = T.N_BARS, sampling: SamplingConfig = SamplingConfig(top_k=8),
                   generator: Optional[torch.Generator] = None) -> np.ndarray:
    """Notes of a ``total_bars`` piece: the first ``prompt_bars`` bars of ``notes`` and the
    model's continuation, whose notes all lie in bars ``prompt_bars`` … ``total_bars`` − 1."""
    prompt = prompt_from_notes(notes, model.cfg.representation, prompt_bars, model.cfg.convention)
    g = generate(model, prompt, end_bar=total_bars, min_bar=prompt_bars, sampling=sampling,
                 generator=generator)
    return decode(model, g.tokens)


def evaluate_model(model: MusicTransformer, corpus: WindowCorpus, out_dir, *, name: str = "model",
                   split: str = "test", nll_windows: int = 0, next_bar_windows: int = 50,
                   n_continuations: int = 3, sampling: SamplingConfig = SamplingConfig(top_k=8),
                   seed: int = 0, batch_size: int = 16, device="cpu") -> dict:
    """Test NLL, next-bar metrics and continuations of one model; writes
    ``<name>_continuation_<i>.mid``, ``<name>_prompt_<i>.mid`` and ``<name>_metrics.json`` into
    ``out_dir``. Returns the summary dict, whose ``self_similarity`` holds the matrix of the
    first continuation ([16, 16] list) and ``repetition`` the scores at lags 4/8/12 averaged
    over the continuations."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"name": name, "variant": model.cfg.variant,
               "representation": model.cfg.representation}
    summary["nll"] = evaluate_nll(model, corpus, split, batch_size=batch_size,
                                  max_windows=nll_windows, device=device)
    summary["next_bar"] = next_bar_test(model, corpus, split, n_windows=next_bar_windows,
                                        sampling=sampling, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    reps, files, first = [], [], None
    for k, i in enumerate(_pick(corpus.n_windows(split), n_continuations)):
        w = corpus.window(split, i)
        notes = continue_piece(model, w, sampling=sampling, generator=gen)
        path = out / f"{name}_continuation_{k}.mid"
        T.write_midi(notes, path)
        T.write_midi(w[w[:, T.BAR] < 4], out / f"{name}_prompt_{k}.mid")
        files.append(str(path))
        S = M.self_similarity(notes, corpus.window_bars)
        first = S if first is None else first
        reps.append(M.repetition_scores(S))
    summary["midi"] = files
    summary["repetition"] = {str(lag): float(np.nanmean([r[lag] for r in reps]))
                             for lag in M.LAGS} if reps else {}
    summary["self_similarity"] = first.tolist() if first is not None else None
    with open(out / f"{name}_metrics.json", "w") as f:
        json.dump({k: v for k, v in summary.items() if k != "self_similarity"}, f, indent=1)
    return summary
