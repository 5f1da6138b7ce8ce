"""POP909 preparation (SPEC §4) and loading of plain MIDI folders, cached on disk.

POP909 song folders ``NNN/`` hold ``NNN.mid`` and ``beat_midi.txt`` (one line per beat: time
in seconds, a marker, downbeat flag). Preparation of one song:

1. beat times (seconds) → MIDI ticks through the tempo map; in every consistent song they sit on
   an exact quarter-note grid shifted by a per-song phase (the first beat's tick).
2. songs whose beats are off that grid (by > 0.05 quarter) are dropped as inconsistent.
3. onsets are snapped to 12 ticks per beat *after* removing the phase; bars come from the
   downbeat flags; a bar's length is the number of beat lines until the next downbeat.
4. tracks by name (MELODY 0, BRIDGE 1, PIANO 2); durations capped at 96 and mapped to the
   nearest known duration; then the canonical form (``tokens.resolve_overlaps``): notes of one
   track and pitch starting together (exact duplicates included) merge into the longest, and a
   note still sounding when the next note of its track and pitch starts is cut there (to the
   longest known duration that fits). MIDI holds nothing else exactly, so this makes what the
   model sees exactly what the MIDI it writes reads back as.
5. windows: 16 consecutive bars, all 4 beats long and none without a note onset, stride 1 bar.
6. songs are split 80/10/10 with a fixed seed.

Folders without ``beat_midi.txt`` files are read as plain MIDI: every ``*.mid``/``*.midi``
file is one song in 4/4 from tick 0. Unreadable, empty or odd files are skipped with a reason.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from fastattn import _io
from fastattn.music import tokens as T
from fastattn.music.data import WindowCorpus, split_songs, windows_of, SPLITS

CACHE_VERSION = 2  # 2: canonical form (resolved same-pitch overlaps) at preparation
GRID_TOLERANCE = 0.05  # quarters a beat marker may sit off the song's quarter grid


class SkipSong(Exception):
    """A song that cannot be used; the message is the reason reported to the user."""


def default_cache_dir() -> Path:
    """$FASTATTN_CACHE, else ~/.cache/fastattn."""
    return Path(os.environ.get("FASTATTN_CACHE", Path.home() / ".cache" / "fastattn"))


def seconds_to_ticks(seconds: np.ndarray, tempos: Sequence[Tuple[int, int]], tpq: int) -> np.ndarray:
    """Times in seconds → (fractional) ticks through a tempo map [(tick, µs per quarter), …]."""
    tempos = sorted(tempos) or [(0, 500000)]
    if tempos[0][0] != 0:  # MIDI default tempo before the first event
        tempos = [(0, 500000)] + list(tempos)
    ticks = np.array([t for t, _ in tempos], dtype=np.float64)
    mspq = np.array([m for _, m in tempos], dtype=np.float64)
    # Seconds at which each tempo segment starts.
    seg_sec = np.concatenate([[0.0], np.cumsum(np.diff(ticks) * mspq[:-1] / 1e6 / tpq)])
    seg = np.clip(np.searchsorted(seg_sec, seconds, side="right") - 1, 0, len(ticks) - 1)
    return ticks[seg] + (seconds - seg_sec[seg]) * 1e6 / mspq[seg] * tpq


def read_beats(path: Path) -> np.ndarray:
    """beat_midi.txt → [n_beats, 3] float (seconds, marker, downbeat flag)."""
    try:
        beats = np.loadtxt(path, ndmin=2)
    except (OSError, ValueError) as e:
        raise SkipSong(f"unreadable beat file: {e}") from None
    if beats.shape[0] < 1 or beats.shape[1] < 3:
        raise SkipSong(f"beat file has shape {list(beats.shape)}, expected [n, 3]")
    if not np.all(np.diff(beats[:, 0]) > 0):
        raise SkipSong("inconsistent beat markers: times do not increase")
    return beats


def load_score(path: Path):
    """symusic.Score of a MIDI file, or SkipSong with the reason."""
    import symusic

    try:
        if path.stat().st_size == 0:
            raise SkipSong("empty file")
        score = symusic.Score(str(path))
    except SkipSong:
        raise
    except Exception as e:  # symusic raises RuntimeError/ValueError/IOError variants
        raise SkipSong(f"unreadable MIDI: {type(e).__name__}: {str(e)[:100]}") from None
    if score.note_num() == 0:
        raise SkipSong("no notes")
    try:
        T.check_song_length(score)
    except ValueError as e:
        raise SkipSong(f"too long: {e}") from None
    return score


def prepare_pop909_song(folder: Path) -> Tuple[np.ndarray, np.ndarray]:
    """One POP909 song → (notes [N, 5] with song-level bars, beats per bar [n_bars]).

    Notes before the first downbeat or after the last beat line are dropped (no bar holds them).
    Raises SkipSong when the song cannot be used.
    """
    midi = folder / f"{folder.name}.mid"
    if not midi.exists():
        raise SkipSong(f"missing {midi.name}")
    beats = read_beats(folder / "beat_midi.txt")
    score = load_score(midi)
    tpq = score.ticks_per_quarter
    tempos = [(int(t.time), int(t.mspq)) for t in score.tempos]
    beat_ticks = seconds_to_ticks(beats[:, 0], tempos, tpq)
    # Beats must lie on one quarter grid: k-th line at phase + (k0 + k)·tpq.
    rel = (beat_ticks - beat_ticks[0]) / tpq
    k = np.rint(rel)
    off = np.abs(rel - k).max()
    if off > GRID_TOLERANCE or not np.all(np.diff(k) == 1):
        raise SkipSong(f"inconsistent beat markers (up to {off:.2f} quarter off the beat grid)")
    downbeats = np.nonzero(beats[:, 2] == 1)[0]
    if len(downbeats) == 0:
        raise SkipSong("no downbeat in the beat file")
    bar_beats = np.diff(np.append(downbeats, len(beats)))
    # Grid indices relative to beat line 0 (the phase offset is removed by subtracting its tick).
    bar_start = downbeats * T.TICKS_PER_BEAT
    song_end = len(beats) * T.TICKS_PER_BEAT
    rows = []
    for trk_i, track in enumerate(score.tracks):
        if not len(track.notes) or track.is_drum:
            continue
        trk = T.track_index(track.name, min(trk_i, 2))
        arr = track.notes.numpy()
        g = np.rint((arr["time"] - beat_ticks[0]) * T.TICKS_PER_BEAT / tpq).astype(np.int64)
        dur = np.rint(arr["duration"] * T.TICKS_PER_BEAT / tpq).astype(np.int64)
        bar = np.searchsorted(bar_start, g, side="right") - 1
        keep = (bar >= 0) & (g < song_end)
        g, dur, bar, p = g[keep], dur[keep], bar[keep], arr["pitch"][keep].astype(np.int64)
        rows.append(np.stack([g, bar, np.full_like(g, trk), p, T.quantize_duration(dur)], axis=1))
    if rows:
        g, bar, trk, p, dur = np.concatenate(rows).T
        keep, dur = T.resolve_overlaps(g, trk, p, dur)  # on grid ticks: bars may be 5+ beats
        g, bar, trk, p, dur = g[keep], bar[keep], trk[keep], p[keep], dur[keep]
        notes = T.canonical(np.stack([bar, g - bar_start[bar], trk, p, dur], axis=1))
    else:
        notes = np.zeros((0, 5), np.int64)
    if len(notes) == 0:
        raise SkipSong("no notes inside the annotated bars")
    return notes, bar_beats


def _is_pop909_layout(root: Path) -> bool:
    return any(root.glob("*/beat_midi.txt"))


def _fingerprint(files: Sequence[Path]) -> List[Tuple[str, int, int]]:
    out = []
    for f in files:
        try:
            st = f.stat()
            out.append((f.name, st.st_size, int(st.st_mtime)))
        except OSError:
            out.append((f.name, -1, 0))
    return out


def _atomic_savez(path: Path, **arrays) -> None:
    with _io.atomic_write(path) as f:
        np.savez(f, **arrays)


def _to_arrays(c: WindowCorpus) -> dict:
    lens = np.array([len(s) for s in c.songs], dtype=np.int64)
    return dict(notes=np.concatenate(c.songs) if c.songs else np.zeros((0, 5), np.int64),
                lens=lens, names=np.array(c.names, dtype=str),
                meta=np.array(json.dumps({"skipped": c.skipped, "stats": c.stats,
                                          "window_bars": c.window_bars})),
                **{f"windows_{s}": c.windows[s] for s in SPLITS})


def _from_arrays(z) -> WindowCorpus:
    meta = json.loads(str(z["meta"]))
    songs = np.split(z["notes"], np.cumsum(z["lens"])[:-1]) if len(z["lens"]) else []
    return WindowCorpus(songs=[s.astype(np.int64) for s in songs], names=[str(n) for n in z["names"]],
                        windows={s: z[f"windows_{s}"] for s in SPLITS},
                        window_bars=meta["window_bars"], skipped=meta["skipped"],
                        stats=meta["stats"])


def load_midi_folder(root, *, seed: int = 0, window_bars: int = T.N_BARS,
                     songs: Optional[Sequence[str]] = None, cache_dir=None,
                     use_cache: bool = True, progress: bool = False) -> WindowCorpus:
    """Prepare (or load from the cache) a corpus from a POP909 folder or a folder of MIDI files.

    songs: only these song folder / file names (e.g. a POP909 subset); default all.
    cache_dir: where the prepared corpus is cached (default ``default_cache_dir()``); the key
        covers the file names, sizes and mtimes and every preparation setting.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist")
    pop909 = _is_pop909_layout(root)
    if pop909:
        items = sorted(p for p in root.iterdir() if p.is_dir() and (p / "beat_midi.txt").exists()
                       or (p.is_dir() and (p / f"{p.name}.mid").exists()))
        files = [p / f"{p.name}.mid" for p in items] + [p / "beat_midi.txt" for p in items]
    else:
        items = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".mid", ".midi"))
        files = items
    if songs is not None:
        wanted = set(songs)
        items = [p for p in items if p.name in wanted or p.stem in wanted]
        files = [f for f in files if f.parent.name in wanted or f.name in wanted or f.stem in wanted]
    key = hashlib.sha1(json.dumps([CACHE_VERSION, str(root.resolve()), pop909, seed,
                                   window_bars, _fingerprint(files)]).encode()).hexdigest()[:16]
    cache = Path(cache_dir or default_cache_dir()) / f"{root.name}-{key}.npz"
    if use_cache and cache.exists():
        try:
            with np.load(cache, allow_pickle=False) as z:
                return _from_arrays(z)
        except Exception as e:  # damaged zip, bad CRC, missing member, bad metadata, …
            _io.notice(f"prepared-data cache {cache} is unreadable ({type(e).__name__}: "
                       f"{str(e)[:120]}); rebuilding it")
            cache.unlink(missing_ok=True)

    kept, names, bar_ok, skipped = [], [], [], {}
    stats = dict(bars=0, bars_4beat=0, windows_4beat=0, windows_dropped_empty_bar=0)
    it = items
    if progress:
        from tqdm import tqdm
        it = tqdm(items, desc="preparing", unit="song")
    for item in it:
        try:
            if pop909:
                notes, bar_beats = prepare_pop909_song(item)
            else:
                score = load_score(item)
                notes = T.score_to_notes(score)
                if len(notes) == 0:
                    raise SkipSong("no notes")
                bar_beats = np.full(int(notes[:, T.BAR].max()) + 1, 4)
        except SkipSong as e:
            skipped[item.name] = str(e)
            continue
        nonempty = np.zeros(len(bar_beats), dtype=bool)
        nonempty[np.unique(notes[:, T.BAR])] = True
        four = bar_beats == 4
        stats["bars"] += len(bar_beats)
        stats["bars_4beat"] += int(four.sum())
        n4 = len(windows_of(four, window_bars))
        ok = four & nonempty
        stats["windows_4beat"] += n4
        stats["windows_dropped_empty_bar"] += n4 - len(windows_of(ok, window_bars))
        kept.append(notes)
        names.append(item.name)
        bar_ok.append(ok)
    parts = split_songs(len(kept), seed)
    windows = {}
    for split in SPLITS:
        rows = [np.stack([np.full(len(w), s), w], axis=1)
                for s in parts[split] for w in [windows_of(bar_ok[s], window_bars)]]
        windows[split] = np.concatenate(rows).astype(np.int64) if rows else np.zeros((0, 2), np.int64)
    corpus = WindowCorpus(kept, names, windows, window_bars, skipped, stats)
    if use_cache:
        _atomic_savez(cache, **_to_arrays(corpus))
    return corpus
