"""Which corpus to train on: the embedded synthetic one or a POP909 / MIDI folder.

Library code (the demo, experiments) and the CLI share ``load_corpus``; the heavy modules are
imported on use.
"""
from __future__ import annotations

from pathlib import Path


def load_corpus(data, *, seed: int = 0, songs: int = 0, cache_dir=None, progress: bool = True):
    """The embedded synthetic corpus (``data`` None) or a POP909 / MIDI folder (first ``songs``
    songs when > 0)."""
    if data is None:
        from fastattn.music.synthetic import SyntheticConfig, synthetic_corpus
        return synthetic_corpus(SyntheticConfig(seed=seed))
    from fastattn.music.pop909 import load_midi_folder
    subset = None
    if songs:
        root = Path(data)
        names = sorted(p.name for p in root.iterdir() if p.is_dir() or p.suffix.lower() in (".mid", ".midi"))
        subset = names[:songs]
    return load_midi_folder(data, seed=seed, songs=subset, cache_dir=cache_dir, progress=progress)
