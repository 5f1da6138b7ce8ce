"""Token ↔ MIDI round trips on every window of POP909, in both representations.

    python bench/bench_pop909_roundtrip.py --data ../shared/data/pop909 \\
        --out bench/results/pop909_roundtrip.json

For every window of every split (the prepared corpus, ``fastattn.music.pop909``): tokens →
notes → MIDI (in memory) → notes → tokens must give the same tokens and coordinates, note-based
and event-based. Prints and writes the failure counts, the number of windows, the first
failures (window, representation), and how many notes the canonical form merged and cut while
preparing the songs. CI checks a fixed sample of songs
(tests/test_music_tokens.py); this script checks all of them (48 min on the shared 2-core
machine under heavy load; the preparation adds seconds).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from fastattn.music import tokens as T
from fastattn.music.data import SPLITS
from fastattn.music.pop909 import SkipSong, load_midi_folder, prepare_pop909_song


def round_trip_ok(window: np.ndarray, representation: str) -> bool:
    """tokens → notes → MIDI → notes → tokens reproduces the window's tokens exactly."""
    if representation == "note":
        tok = T.encode_notes(window)
        back = T.encode_notes(T.through_midi(T.decode_notes(tok.tokens)))
    else:
        tok = T.encode_events(window, n_bars=T.N_BARS)
        back = T.encode_events(T.through_midi(T.decode_events(tok.tokens)), n_bars=T.N_BARS)
    return all(a.shape == b.shape and np.array_equal(a, b) for a, b in zip(tok, back))


def canonical_form_counts(root: Path) -> dict:
    """Notes of all POP909 songs, and how many the canonical form merged (started together
    with a longer or equal note of their track and pitch) and cut (still sounding at the next
    onset of their track and pitch), counted by preparing every song again."""
    counts = {"notes_before": 0, "merged": 0, "cut": 0}
    real = T.resolve_overlaps

    def counting(onset, track, pitch, duration):
        keep, dur = real(onset, track, pitch, duration)
        counts["notes_before"] += len(keep)
        counts["merged"] += int((~keep).sum())
        counts["cut"] += int((keep & (dur != np.asarray(duration))).sum())
        return keep, dur

    T.resolve_overlaps = counting
    try:
        for song in sorted(p for p in root.iterdir() if (p / "beat_midi.txt").exists()):
            try:
                prepare_pop909_song(song)
            except SkipSong:
                pass
    finally:
        T.resolve_overlaps = real
    return counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/pop909")
    p.add_argument("--cache", default=None, help="prepared-corpus cache folder")
    p.add_argument("--out", default=None, help="JSON result file")
    a = p.parse_args(argv)
    t0 = time.time()
    corpus = load_midi_folder(a.data, cache_dir=a.cache, progress=True)
    t_prep = time.time() - t0
    canonical = canonical_form_counts(Path(a.data))
    counts = {rep: 0 for rep in ("note", "event")}
    failures, n_windows = [], 0
    t0 = time.time()
    todo = [(split, i) for split in SPLITS for i in range(corpus.n_windows(split))]
    for split, i in tqdm(todo, desc="round trips", unit="window", mininterval=30):
        w = corpus.window(split, i)
        n_windows += 1
        for rep in counts:
            if not round_trip_ok(w, rep):
                counts[rep] += 1
                if len(failures) < 20:
                    song, bar0 = (int(x) for x in corpus.windows[split][i])
                    failures.append({"song": corpus.names[song], "first_bar": bar0,
                                     "representation": rep})
    result = {"songs": len(corpus.songs), "skipped_songs": len(corpus.skipped),
              "windows": n_windows, "failures": counts, "first_failures": failures,
              "canonical_form": canonical,
              "seconds_check": round(time.time() - t0, 1), "seconds_prepare": round(t_prep, 1)}
    print(json.dumps(result, indent=1))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0 if not any(counts.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
