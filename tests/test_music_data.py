"""POP909 preparation, MIDI folders with bad files, and the synthetic corpus (SPEC §4, §8)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

symusic = pytest.importorskip("symusic")

from fastattn.music import tokens as T  # noqa: E402  (after the importorskip)
from fastattn.music.data import windows_of  # noqa: E402
from fastattn.music.pop909 import load_midi_folder, seconds_to_ticks  # noqa: E402
from fastattn.music.synthetic import SyntheticConfig, synthetic_corpus, synthetic_piece  # noqa: E402
from helpers import load_bench  # noqa: E402

POP909 = Path(os.environ.get("FASTATTN_POP909",
                             Path(__file__).resolve().parents[1].parent / "shared" / "data" / "pop909"))
needs_pop909 = pytest.mark.skipif(not (POP909 / "001" / "001.mid").exists(),
                                  reason=f"POP909 not found at {POP909}")


def _fake_song(folder: Path, bar_beats, empty_bars=(), phase_ticks=100, off_grid_beat=None):
    """A POP909-style song folder: tempo 120 (960 ticks per second at tpq 480), beat lines every
    480 ticks starting at ``phase_ticks``, one MELODY and one PIANO note per beat in non-empty
    bars, onsets jittered by up to 3 ticks (snapping must absorb that)."""
    folder.mkdir(parents=True)
    tpq = 480
    s = symusic.Score(tpq)
    s.tempos.append(symusic.Tempo(0, qpm=120.0))
    mel, pno = symusic.Track(name="MELODY"), symusic.Track(name="PIANO")
    lines, beat = [], 0
    for b, n in enumerate(bar_beats):
        for k in range(n):
            tick = phase_ticks + beat * tpq
            sec = tick / 960.0 + (0.03 if off_grid_beat == beat else 0.0)
            lines.append(f"{sec} {float(k % 2 == 0)} {float(k == 0)}")
            if b not in empty_bars:
                mel.notes.append(symusic.Note(tick + (beat % 3) - 1, 230, 60 + b, 90))  # ~half beat
                pno.notes.append(symusic.Note(tick + 120, 480, 48, 80))  # a quarter later by 1/4 beat
            beat += 1
    s.tracks.extend([mel, pno])
    s.dump_midi(str(folder / f"{folder.name}.mid"))
    (folder / "beat_midi.txt").write_text("\n".join(lines) + "\n")


def test_fake_pop909_alignment_windows_and_skips(tmp_path):
    bars = [4] * 24
    bars[22] = 3
    bars[5] = 6  # positions 48…71 here; the only window starts right after this bar
    _fake_song(tmp_path / "001", bars, empty_bars=(1,))
    _fake_song(tmp_path / "002", [4] * 18, off_grid_beat=7)
    (tmp_path / "003").mkdir()
    (tmp_path / "003" / "003.mid").write_bytes(b"MThd garbage")
    (tmp_path / "003" / "beat_midi.txt").write_text("0.0 1.0 1.0\n0.5 0.0 0.0\n")
    c = load_midi_folder(tmp_path, cache_dir=tmp_path / "cache")
    assert c.names == ["001"]
    assert "inconsistent beat markers" in c.skipped["002"]
    assert "unreadable MIDI" in c.skipped["003"]
    notes = c.songs[0]
    # Phase removed, jitter snapped: melody on every beat (position 12k), piano 3 ticks later.
    mel = notes[notes[:, T.TRACK] == 0]
    pno = notes[notes[:, T.TRACK] == 2]
    assert set(mel[mel[:, T.BAR] == 0, T.POS]) == {0, 12, 24, 36}
    assert set(pno[pno[:, T.BAR] == 0, T.POS]) == {3, 15, 27, 39}
    assert (mel[:, T.PITCH] == 60 + mel[:, T.BAR]).all()  # bar index from the downbeats
    assert set(mel[:, T.DUR]) == {6} and set(pno[:, T.DUR]) == {12}  # 230 ticks → 5.75 → 6
    assert 1 not in set(notes[:, T.BAR])
    # Windows: every 16-bar run of 4-beat, non-empty bars. Bar 1 is empty, bar 5 has 6 beats,
    # bar 22 has 3 beats: only bars 6…21.
    all_w = np.concatenate([c.windows[s] for s in ("train", "valid", "test")])
    assert sorted(all_w[:, 1].tolist()) == [6]
    w = c.window(next(s for s in c.windows if len(c.windows[s])), 0)
    assert set(w[:, T.BAR]) == set(range(16)) and len(w) == 16 * 8
    np.testing.assert_array_equal(w, T.canonical(w))
    assert set(notes[notes[:, T.BAR] == 5, T.POS]) >= {60, 63}  # the 6-beat bar keeps its beats
    # Cached: the second load reads the cache file and gives the same corpus.
    assert list((tmp_path / "cache").glob("*.npz"))
    c2 = load_midi_folder(tmp_path, cache_dir=tmp_path / "cache")
    assert all(np.array_equal(a, b) for a, b in zip(c.songs, c2.songs)) and c2.skipped == c.skipped


def test_midi_folder_skips_corrupt_and_empty_files(tmp_path):
    T.write_midi(synthetic_piece(0, 0, 20), tmp_path / "good.mid")
    (tmp_path / "empty.mid").write_bytes(b"")
    (tmp_path / "corrupt.mid").write_bytes(b"\x00\x01not a midi file at all")
    silent = symusic.Score(480)
    silent.tracks.append(symusic.Track(name="PIANO"))
    silent.dump_midi(str(tmp_path / "silent.mid"))
    c = load_midi_folder(tmp_path, use_cache=False)
    assert c.names == ["good.mid"]
    assert c.skipped["empty.mid"] == "empty file"
    assert c.skipped["corrupt.mid"].startswith("unreadable MIDI")
    assert c.skipped["silent.mid"] == "no notes"
    assert sum(len(c.windows[s]) for s in c.windows) == 5  # 20 bars → 5 windows


def _huge_tick_midi(path: Path, tpq: int = 1, delta: int = 0x0FFFFFFF) -> None:
    load_bench("hostile_cases").huge_midi(path, delta, tpq)


def test_note_at_a_huge_tick_is_skipped_not_allocated(tmp_path):
    T.write_midi(synthetic_piece(0, 0, 20), tmp_path / "good.mid")
    for k in range(4):  # 67-million-bar songs, each would need a per-bar array of 0.5 GB
        _huge_tick_midi(tmp_path / f"huge{k}.mid", delta=0x0FFFFFFF - k)
    c = load_midi_folder(tmp_path, use_cache=False)
    assert c.names == ["good.mid"]
    assert all(c.skipped[f"huge{k}.mid"].startswith("too long: a note starts at tick 268,435,45")
               for k in range(4))
    assert "beyond the 10,000-bar limit" in c.skipped["huge0.mid"]
    with pytest.raises(ValueError, match="huge0.mid: a note starts at tick"):
        T.read_midi(tmp_path / "huge0.mid")
    _huge_tick_midi(tmp_path / "long_ok.mid", tpq=480, delta=480 * 4 * 9_999)  # bar 9,999: kept
    assert "long_ok.mid" not in load_midi_folder(tmp_path, use_cache=False).skipped


@pytest.mark.parametrize("damage", ["truncated", "bitflip", "garbage", "empty"])
def test_corrupt_cache_is_reported_and_rebuilt(tmp_path, capsys, damage):
    (tmp_path / "midi").mkdir()
    for k in range(2):
        T.write_midi(synthetic_piece(k, 0, 20), tmp_path / "midi" / f"s{k}.mid")
    c = load_midi_folder(tmp_path / "midi", cache_dir=tmp_path / "cache")
    cache = next((tmp_path / "cache").glob("*.npz"))
    data = bytearray(cache.read_bytes())
    if damage == "bitflip":
        data[len(data) // 3] ^= 0x10
    cache.write_bytes({"truncated": bytes(data[: len(data) // 2]), "bitflip": bytes(data),
                       "garbage": b"PK\x03\x04" + bytes(50), "empty": b""}[damage])
    capsys.readouterr()
    c2 = load_midi_folder(tmp_path / "midi", cache_dir=tmp_path / "cache")
    err = capsys.readouterr().err
    assert f"prepared-data cache {cache} is unreadable" in err and "rebuilding it" in err
    assert all(np.array_equal(a, b) for a, b in zip(c.songs, c2.songs)) and c2.names == c.names
    load_midi_folder(tmp_path / "midi", cache_dir=tmp_path / "cache")  # the rebuilt cache reads
    assert "unreadable" not in capsys.readouterr().err


def test_seconds_to_ticks_with_tempo_change():
    # 120 bpm for 960 ticks (1 s at tpq 480), then 60 bpm.
    t = seconds_to_ticks(np.array([0.5, 1.0, 2.0]), [(0, 500000), (960, 1000000)], 480)
    np.testing.assert_allclose(t, [480, 960, 1440])


def test_windows_of():
    ok = np.ones(20, bool)
    ok[3] = False
    assert windows_of(ok, 16).tolist() == [4]
    assert windows_of(np.ones(15, bool), 16).tolist() == []


@needs_pop909
def test_pop909_handful_of_songs(tmp_path):
    songs = ["001", "002", "003", "004", "005"]
    c = load_midi_folder(POP909, songs=songs, cache_dir=tmp_path)
    assert c.names == songs and not c.skipped
    notes = c.songs[0]
    # 001.mid: first MELODY note at tick 9160 (pitch 61, 69 ticks); beat line 0 at 0.0553 s =
    # tick 39.84 is a downbeat with 4 beats per bar → (9160 − 39.84)·12/480 = 228 → bar 4, pos 36.
    assert (notes == [4, 36, 0, 61, 2]).all(axis=1).any()
    score = symusic.Score(str(POP909 / "001" / "001.mid"))
    by_name = {t.name: len(t.notes) for t in score.tracks}
    for k, name in enumerate(T.TRACK_NAMES):  # every note lies inside the annotated bars here
        assert (notes[:, T.TRACK] == k).sum() == by_name[name]
    assert np.isin(notes[:, T.DUR], T.DURATIONS).all()
    for i, name in enumerate(songs):
        beats = np.loadtxt(POP909 / name / "beat_midi.txt")
        down = np.nonzero(beats[:, 2] == 1)[0]
        lens = np.diff(np.append(down, len(beats)))
        nonempty = np.isin(np.arange(len(lens)), c.songs[i][:, T.BAR])
        naive = [j for j in range(len(lens) - 15)
                 if (lens[j:j + 16] == 4).all() and nonempty[j:j + 16].all()]
        got = sorted(int(b) for s in c.windows for sg, b in c.windows[s] if sg == i)
        assert got == naive
    for split in c.windows:
        for k in range(0, c.n_windows(split), 97):
            w = c.window(split, k)
            assert w[:, T.POS].max() < 48 and set(w[:, T.BAR]) == set(range(16))


def test_synthetic_corpus_is_seeded_and_periodic():
    a, b = synthetic_piece(3, 7), synthetic_piece(3, 7)
    assert np.array_equal(a, b) and not np.array_equal(a, synthetic_piece(4, 7))
    assert set(a[:, T.TRACK]) == {0, 1, 2} and np.isin(a[:, T.DUR], T.DURATIONS).all()
    # The piano comping repeats every 4 bars exactly (chord loop of 4 bars).
    pno = a[a[:, T.TRACK] == 2]
    bar_set = lambda b: sorted(map(tuple, pno[pno[:, T.BAR] == b][:, 1:].tolist()))
    assert bar_set(1) == bar_set(5) == bar_set(9)
    c = synthetic_corpus(SyntheticConfig(n_songs=10, n_bars=20))
    assert sum(c.n_windows(s) for s in c.windows) == 10 * 5
