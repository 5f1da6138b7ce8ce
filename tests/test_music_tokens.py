"""Both token representations: exact round trips through MIDI (random, synthetic and real
POP909 pieces), the canonical form, per-token coordinates in both conventions."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fastattn.music import tokens as T
from fastattn.music.synthetic import synthetic_piece
from helpers import n

POP909 = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "pop909"
# A fixed sample of real songs: four of those with the most notes merged and cut by the
# canonical form (180: 68 merged, 166 cut of 2,601 notes), and 001.
POP909_SAMPLE = ("001", "076", "180", "234", "729")


def _random_piece(seed, n=60, n_bars=16, pitches=(0, 128)):
    rng = np.random.default_rng(seed)
    notes = np.stack([rng.integers(0, n_bars, n), rng.integers(0, 48, n), rng.integers(0, 3, n),
                      rng.integers(*pitches, n), rng.choice(T.DURATIONS, n)], axis=1)
    notes[0, :2] = (n_bars - 1, 47)  # the last bar is non-empty (MIDI cannot hold empty tails)
    return notes


def test_duration_mapping():
    assert len(T.DURATIONS) == 27
    got = T.quantize_duration([0, 1, 12, 13, 14, 17, 19, 22, 45, 90, 96, 500])
    # 13 → 12 (nearer), 14 → 15, 17 → 16 (tie 16/18: the shorter), 19 → 18 (tie), 22 → 21,
    # 45 → 42 (tie 42/48), 90 → 84 (tie 84/96), ≥ 96 → 96, 0 → 1.
    assert got.tolist() == [1, 1, 12, 12, 15, 16, 18, 21, 42, 84, 96, 96]
    assert T.duration_index([96]).tolist() == [26]


@pytest.mark.parametrize("piece", ["random", "synthetic"])
def test_note_round_trip_through_midi(tmp_path, piece):
    notes = T.canonicalize(_random_piece(0)) if piece == "random" else synthetic_piece(0, 1, 16)
    tok = T.encode_notes(notes)
    assert tok.tokens.shape == (len(notes) + 2, 6)
    assert tok.tokens[0, 0] == T.TYPE_SOS and tok.tokens[-1, 0] == T.TYPE_EOS
    for f, size in enumerate(T.FIELD_SIZES):
        assert tok.tokens[1:-1, f].max() < size
    T.write_midi(T.decode_notes(tok.tokens), tmp_path / "a.mid")
    back = T.encode_notes(T.read_midi(tmp_path / "a.mid"))
    for a, b in zip(tok, back):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("piece", ["random", "synthetic"])
def test_event_round_trip_through_midi(tmp_path, piece):
    notes = T.canonicalize(_random_piece(1)) if piece == "random" else synthetic_piece(0, 2, 16)
    tok = T.encode_events(notes, n_bars=16)
    assert len(tok.tokens) == 2 + 16 + 4 * len(notes)
    assert tok.tokens.max() < T.EVENT_VOCAB == 224
    T.write_midi(T.decode_events(tok.tokens), tmp_path / "a.mid")
    back = T.encode_events(T.read_midi(tmp_path / "a.mid"), n_bars=16)
    for a, b in zip(tok, back):
        np.testing.assert_array_equal(a, b)


def test_per_token_onset_and_pitch():
    # Two notes: bar 0 pos 12 (MELODY, C5, 6 ticks) and bar 2 pos 0 (PIANO, A3, 48 ticks).
    notes = np.array([[2, 0, 2, 57, 48], [0, 12, 0, 72, 6]])
    nt = T.encode_notes(notes)
    assert nt.onset.tolist() == [-1, 12, 96, -1]
    assert nt.pitch.tolist() == [-1, 72, 57, -1]
    assert nt.tokens[1].tolist() == [1, 0, 12, 0, 72, 5]  # duration 6 is index 5
    assert nt.bar.tolist() == [-1, 0, 2, -1] and nt.position.tolist() == [-1, 12, 0, -1]
    for conv in ("slides", "authors"):
        c = T.note_coordinates(nt.tokens, conv)
        for name in T.Coords._fields:
            assert getattr(c, name).tolist() == getattr(nt, name).tolist(), (conv, name)
    ev = T.encode_events(notes)
    P, Tr, Pi, Du, B = T.POS_OFFSET, T.TRACK_OFFSET, T.PITCH_OFFSET, T.DUR_OFFSET, T.BAR_OFFSET
    assert ev.tokens.tolist() == [T.BOS, B, P + 12, Tr + 0, Pi + 72, Du + 5, B + 1, B + 2, P + 0,
                                  Tr + 2, Pi + 57, Du + 22, T.EOS]
    assert ev.onset.tolist() == [-1, 0, 12, 12, 12, 12, 48, 96, 96, 96, 96, 96, -1]
    # Pitch is known from the Pitch token on (earlier would leak the target).
    assert ev.pitch.tolist() == [-1, -1, -1, -1, 72, 72, -1, -1, -1, -1, 57, 57, -1]
    assert ev.bar.tolist() == [-1, 0, 0, 0, 0, 0, 1, 2, 2, 2, 2, 2, -1]
    assert ev.position.tolist() == [-1, 0, 12, 12, 12, 12, 0, 0, 0, 0, 0, 0, -1]
    c = T.event_coordinates(ev.tokens)
    assert c.onset.tolist() == ev.onset.tolist() and c.pitch.tolist() == ev.pitch.tolist()
    assert T.event_kind(ev.tokens).tolist() == [0, 1, 2, 3, 4, 5, 1, 1, 2, 3, 4, 5, 0]
    # The authors' event coordinates: each field from its latest token (a Bar token keeps the
    # previous note's position, a Position token the previous note's pitch; EOS keeps them all).
    au = T.encode_events(notes, convention="authors")
    assert au.tokens.tolist() == ev.tokens.tolist()
    assert au.bar.tolist() == [-1, 0, 0, 0, 0, 0, 1, 2, 2, 2, 2, 2, 2]
    assert au.position.tolist() == [-1, -1, 12, 12, 12, 12, 12, 12, 0, 0, 0, 0, 0]
    assert au.pitch.tolist() == [-1, -1, -1, -1, 72, 72, 72, 72, 72, 72, 57, 57, 57]
    assert au.onset.tolist() == [-1, -1, 12, 12, 12, 12, 60, 108, 96, 96, 96, 96, 96]
    assert T.coordinates(ev.tokens, "event", "authors").pitch.tolist() == au.pitch.tolist()
    with pytest.raises(ValueError, match="convention"):
        T.event_coordinates(ev.tokens, "paper")


def test_validation_rejects_out_of_range():
    with pytest.raises(ValueError, match="position"):
        T.encode_notes(np.array([[0, 48, 0, 60, 12]]))
    with pytest.raises(ValueError, match="duration"):
        T.encode_events(np.array([[0, 0, 0, 60, 13]]))


# ---------------------------------------------------------------------------------------------
# The canonical form: one sounding note per (track, pitch) at a time.


def test_canonical_form_by_hand():
    # The POP909 case: a note starts inside a longer one of the same pitch and track
    # and ends first. MIDI pairs note-offs first-in-first-out, so the raw pair comes back as
    # 10 and 4 ticks; the canonical form cuts the first note at the second one's onset.
    raw = n((0, 30, 2, 63, 11), (0, 37, 2, 63, 3))
    assert T.canonicalize(raw).tolist() == [[0, 30, 2, 63, 7], [0, 37, 2, 63, 3]]
    assert T.through_midi(raw).tolist() == [[0, 30, 2, 63, 7], [0, 37, 2, 63, 3]]
    # Exact duplicates, and notes starting together: one note, the longest.
    assert T.canonicalize(n((1, 0, 0, 60, 12), (1, 0, 0, 60, 12))).tolist() == [[1, 0, 0, 60, 12]]
    assert T.canonicalize(n((1, 0, 0, 60, 12), (1, 0, 0, 60, 24))).tolist() == [[1, 0, 0, 60, 24]]
    # Cut to the longest known duration that fits the gap: 13 → 12, 17 → 16, 47 → 42.
    for gap, cut in ((13, 12), (17, 16), (47, 42), (1, 1)):
        got = T.canonicalize(n((0, 0, 0, 60, 96), (0, gap, 0, 60, 6)))
        assert got.tolist() == [[0, 0, 0, 60, cut], [0, gap, 0, 60, 6]], gap
    # Across a bar line, and a chain: each note is cut at the next onset.
    assert T.canonicalize(n((0, 40, 1, 50, 24), (1, 2, 1, 50, 6))).tolist() == [
        [0, 40, 1, 50, 10], [1, 2, 1, 50, 6]]
    assert T.canonicalize(n((0, 0, 0, 70, 48), (0, 6, 0, 70, 48), (0, 12, 0, 70, 6)))[:, 4].tolist() \
        == [6, 6, 6]
    # Other tracks, other pitches and notes that end in time are left alone.
    keep = n((0, 0, 0, 60, 24), (0, 6, 1, 60, 24), (0, 6, 0, 61, 24), (0, 24, 0, 60, 12))
    assert T.canonicalize(keep).tolist() == T.canonical(keep).tolist()


@pytest.mark.parametrize("seed", range(4))
def test_midi_reads_back_the_canonical_form(seed):
    """For any piece, even one crowded with same-pitch collisions: MIDI gives back exactly its
    canonical form, and a canonical piece is a fixed point."""
    notes = _random_piece(seed, n=200, n_bars=4, pitches=(60, 63))
    canon = T.canonicalize(notes)
    assert len(canon) < len(notes)  # the collisions were real
    assert np.array_equal(T.through_midi(notes), canon)
    assert np.array_equal(T.canonicalize(canon), canon)
    assert np.array_equal(T.through_midi(canon), canon)


@pytest.mark.skipif(not POP909.is_dir(), reason="POP909 not found at ../shared/data/pop909")
def test_pop909_sample_round_trips_exactly(tmp_path, monkeypatch):
    """Every window of a fixed sample of real songs: tokens → MIDI → tokens, both
    representations (bench/bench_pop909_roundtrip.py checks all of POP909)."""
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from bench_pop909_roundtrip import round_trip_ok

    from fastattn.music.pop909 import load_midi_folder
    changed = {"merged": 0, "cut": 0}
    real = T.resolve_overlaps

    def spy(onset, track, pitch, duration):
        keep, dur = real(onset, track, pitch, duration)
        changed["merged"] += int((~keep).sum())
        changed["cut"] += int((keep & (dur != np.asarray(duration))).sum())
        return keep, dur

    monkeypatch.setattr(T, "resolve_overlaps", spy)
    c = load_midi_folder(POP909, songs=POP909_SAMPLE, cache_dir=tmp_path)
    assert sorted(c.names) == sorted(POP909_SAMPLE) and not c.skipped
    # The sample holds what used to break the round trip.
    assert changed["merged"] > 200 and changed["cut"] > 200, changed
    windows = [c.window(s, i) for s in c.windows for i in range(c.n_windows(s))]
    assert len(windows) > 150
    for w in windows:
        for rep in ("note", "event"):
            assert round_trip_ok(w, rep), rep
