"""Next-bar metrics on the POP909 test bars with bar 14 as the prediction of bar 15.

    python bench/bench_pop909_metrics.py --data ../shared/data/pop909 \\
        --out bench/results/pop909_metrics.json

A model-free reference point of the next-bar test: for every test window (the prepared corpus,
``fastattn.music.pop909``, canonical form), the notes of bar 14 moved to bar 15 are scored
against the true bar 15 by ``fastattn.music.metrics`` — the paper authors' definitions — and by
the named alternative (chroma of sounding durations). With ``--compare-commit REV`` (a git
revision of this repository, e.g. 85301e4) the metrics module of that revision is scored on the
same pairs too, and the share of pairs on which each metric differs is reported.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from fastattn.music import metrics as M
from fastattn.music import tokens as T
from fastattn.music.pop909 import load_midi_folder


def _module_at(rev: str):
    """fastattn/music/metrics.py as of git revision ``rev``, imported under another name."""
    root = Path(__file__).resolve().parents[1]
    src = subprocess.run(["git", "-C", str(root), "show", f"{rev}:fastattn/music/metrics.py"],
                         check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "metrics_then.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("metrics_then", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/pop909")
    p.add_argument("--cache", default=None, help="prepared-corpus cache folder")
    p.add_argument("--split", default="test")
    p.add_argument("--compare-commit", default=None)
    p.add_argument("--out", default=None, help="JSON result file")
    a = p.parse_args(argv)
    corpus = load_midi_folder(a.data, cache_dir=a.cache, progress=False)
    then = _module_at(a.compare_commit) if a.compare_commit else None
    rows, rows_then, chroma_duration = [], [], []
    for i in range(corpus.n_windows(a.split)):
        w = corpus.window(a.split, i)
        pred = w[w[:, T.BAR] == 14].copy()
        pred[:, T.BAR] = 15
        true = w[w[:, T.BAR] == 15]
        rows.append(M.bar_metrics(pred, true))
        chroma_duration.append(M.chroma_similarity(pred, true, weighting="duration"))
        if then is not None:
            rows_then.append(then.bar_metrics(pred, true))
    result = {"split": a.split, "pairs": len(rows),
              "authors_definitions": M.mean_bar_metrics(rows),
              "chroma_sim_by_duration": float(np.mean(chroma_duration))}
    if then is not None:
        result["compare_commit"] = a.compare_commit
        result["then"] = {k: float(np.mean([r[k] for r in rows_then])) for k in rows_then[0]}
        result["pairs_differing_pct"] = {
            k: round(100.0 * float(np.mean([not np.isclose(r[k], s[k], equal_nan=True)
                                             for r, s in zip(rows, rows_then)])), 2)
            for k in rows[0]}
    print(json.dumps(result, indent=1))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
