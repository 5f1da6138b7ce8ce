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

from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from fastattn._io import atomic_write_json
from fastattn.music import metrics as M
from fastattn.music import tokens as T
from fastattn.music.data import WindowCorpus
from fastattn.music.generate import SamplingConfig, decode, generate, prompt_from_notes
from fastattn.music.model import MusicTransformer
from fastattn.music.repetition import continue_windows
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
    ``out_dir``. Returns the summary dict: ``repetition`` (``_std``) and ``repetition_truth``
    (``_std``) rep@k at lags 4/8/12 as mean (std) over the continuations and over the true
    windows they continue, ``continuations`` the ``repetition.Continuations`` (its ``S`` /
    ``S_true``: their [16, 16] self-similarity matrices)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"name": name, "variant": model.cfg.variant,
               "representation": model.cfg.representation}
    summary["nll"] = evaluate_nll(model, corpus, split, batch_size=batch_size,
                                  max_windows=nll_windows, device=device)
    summary["next_bar"] = next_bar_test(model, corpus, split, n_windows=next_bar_windows,
                                        sampling=sampling, seed=seed)
    c = continue_windows(model, corpus, split, n_continuations, sampling=sampling, seed=seed)
    files = []
    for k, (w, notes) in enumerate(zip(c.truth, c.pieces)):
        path = out / f"{name}_continuation_{k}.mid"
        T.write_midi(notes, path)
        T.write_midi(w[w[:, T.BAR] < c.prompt_bars], out / f"{name}_prompt_{k}.mid")
        files.append(str(path))
    summary["midi"] = files
    # rep@k (metrics.REP_DEFINITION): mean and std over the continuations, and over the true
    # windows of the same prompts.
    for key, rep in (("repetition", c.rep()), ("repetition_truth", c.rep_true())):
        summary[key] = {str(lag): m for lag, (m, _, _) in rep.items()}
        summary[key + "_std"] = {str(lag): sd for lag, (_, sd, _) in rep.items()}
    atomic_write_json(out / f"{name}_metrics.json", summary, indent=1)
    summary["continuations"] = c
    return summary
