"""Both token representations: exact round trips through MIDI, per-token onset/pitch."""
from __future__ import annotations

import numpy as np
import pytest

from fastattn.music import tokens as T
from fastattn.music.synthetic import synthetic_piece


def _random_piece(seed, n=60, n_bars=16):
    rng = np.random.default_rng(seed)
    notes = np.stack([rng.integers(0, n_bars, n), rng.integers(0, 48, n), rng.integers(0, 3, n),
                      rng.integers(0, 128, n), rng.choice(T.DURATIONS, n)], axis=1)
    notes[0, :2] = (n_bars - 1, 47)  # the last bar is non-empty (MIDI cannot hold empty tails)
    notes[1] = notes[2]  # a duplicate note survives too
    return T.canonical(notes)


def test_duration_mapping():
    assert len(T.DURATIONS) == 27
    got = T.quantize_duration([0, 1, 12, 13, 14, 17, 19, 22, 45, 90, 96, 500])
    # 13 → 12 (nearer), 14 → 15, 17 → 16 (tie 16/18: the shorter), 19 → 18 (tie), 22 → 21,
    # 45 → 42 (tie 42/48), 90 → 84 (tie 84/96), ≥ 96 → 96, 0 → 1.
    assert got.tolist() == [1, 1, 12, 12, 15, 16, 18, 21, 42, 84, 96, 96]
    assert T.duration_index([96]).tolist() == [26]


@pytest.mark.parametrize("piece", ["random", "synthetic"])
def test_note_round_trip_through_midi(tmp_path, piece):
    notes = _random_piece(0) if piece == "random" else synthetic_piece(0, 1, 16)
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
    notes = _random_piece(1) if piece == "random" else synthetic_piece(0, 2, 16)
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
    on, pi = T.note_coordinates(nt.tokens)
    assert on.tolist() == nt.onset.tolist() and pi.tolist() == nt.pitch.tolist()
    ev = T.encode_events(notes)
    P, Tr, Pi, Du, B = T.POS_OFFSET, T.TRACK_OFFSET, T.PITCH_OFFSET, T.DUR_OFFSET, T.BAR_OFFSET
    assert ev.tokens.tolist() == [T.BOS, B, P + 12, Tr + 0, Pi + 72, Du + 5, B + 1, B + 2, P + 0,
                                  Tr + 2, Pi + 57, Du + 22, T.EOS]
    assert ev.onset.tolist() == [-1, 0, 12, 12, 12, 12, 48, 96, 96, 96, 96, 96, -1]
    # Pitch is known from the Pitch token on (earlier would leak the target).
    assert ev.pitch.tolist() == [-1, -1, -1, -1, 72, 72, -1, -1, -1, -1, 57, 57, -1]
    on, pi = T.event_coordinates(ev.tokens)
    assert on.tolist() == ev.onset.tolist() and pi.tolist() == ev.pitch.tolist()
    assert T.event_kind(ev.tokens).tolist() == [0, 1, 2, 3, 4, 5, 1, 1, 2, 3, 4, 5, 0]


def test_validation_rejects_out_of_range():
    with pytest.raises(ValueError, match="position"):
        T.encode_notes(np.array([[0, 48, 0, 60, 12]]))
    with pytest.raises(ValueError, match="duration"):
        T.encode_events(np.array([[0, 0, 0, 60, 13]]))
