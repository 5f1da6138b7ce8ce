"""Note arrays, the two token representations and MIDI I/O (SPEC §4).

A *piece* is an int64 array ``notes [N, 5]`` with columns (bar, position, track, pitch, duration):
bar index, position 0…47 inside a 4/4 bar at 12 ticks per beat, track 0 MELODY / 1 BRIDGE /
2 PIANO, MIDI pitch 0…127, duration in ticks (one of the 27 known durations). Rows are kept in
canonical order — by onset (bar·48 + position), then pitch, track, duration — so that every
conversion has one answer. A piece in *canonical form* also sounds each (track, pitch) at most
once at a time (``canonicalize``: notes starting together merge into the longest, a note still
sounding at the next onset of its track and pitch is cut there): that is what MIDI holds, so
tokens → MIDI → tokens is exact for canonical pieces, and reading any MIDI file gives one.

Note-based tokens (MusicBERT / MMT style) are ``[L, 6]``: fields (type, bar, position, track,
pitch, duration index); type 0 = start of song, 1 = note, 2 = end of song. Non-note tokens hold
the padding value in the other five fields (they have no bar or pitch).

Event-based tokens (REMI style) are ``[L]`` over one vocabulary of 224:
BOS, EOS, Bar_0…15, Position_0…47, Track_0…2, Pitch_0…127, Duration_0…26 (+ PAD = 224).

Both come with per-token coordinates for the relative attention terms (``Coords``: onset,
pitch, bar, position; [L] int64, −1 = missing), by one of two conventions. A token carries only
what is known *at* that token (its pitch is never the target it predicts):

- note-based (both conventions): a note token carries its bar, position, onset = bar·48 +
  position and pitch; start/end tokens carry nothing.
- event-based, "slides": Bar_b carries onset b·48 (position 0); a note's Position and Track
  tokens carry its onset and pitch −1 (its pitch is the target two tokens later), its Pitch and
  Duration tokens onset and pitch; bar and position are split from the onset.
- event-based, "authors" (the paper authors' REMI model): bar, position and pitch are each the
  value of the latest Bar, Position and Pitch token (missing before the first one), so a Bar
  token keeps the previous note's position and a Position token the previous note's pitch;
  onset = bar·48 + position.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import numpy as np

TICKS_PER_BEAT = 12
BAR_RES = 48                      # positions per 4/4 bar
N_BARS = 16                       # bars per window (and rows of the bar vocabulary)
TRACK_NAMES = ("MELODY", "BRIDGE", "PIANO")
# The 27 known durations (ticks at 12 per beat); longer notes are capped at 96.
DURATIONS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 15, 16, 18, 20, 21, 24, 30, 36, 40, 42,
             48, 60, 72, 84, 96)
MAX_DURATION = DURATIONS[-1]
NOTE_COLUMNS = ("bar", "position", "track", "pitch", "duration")
BAR, POS, TRACK, PITCH, DUR = range(5)

# ---------------------------------------------------------------------------------------------
# Note-based representation
FIELDS = ("type", "bar", "position", "track", "pitch", "duration")
FIELD_SIZES = (3, N_BARS, BAR_RES, len(TRACK_NAMES), 128, len(DURATIONS))
TYPE_SOS, TYPE_NOTE, TYPE_EOS = 0, 1, 2
# Padding value of a field = its vocabulary size (one extra embedding row; ignored in the loss).
FIELD_PAD = FIELD_SIZES

# ---------------------------------------------------------------------------------------------
# Event-based representation: one vocabulary, blocks in this order.
BOS, EOS = 0, 1
BAR_OFFSET = 2
POS_OFFSET = BAR_OFFSET + N_BARS              # 18
TRACK_OFFSET = POS_OFFSET + BAR_RES           # 66
PITCH_OFFSET = TRACK_OFFSET + len(TRACK_NAMES)  # 69
DUR_OFFSET = PITCH_OFFSET + 128               # 197
EVENT_VOCAB = DUR_OFFSET + len(DURATIONS)     # 224
EVENT_PAD = EVENT_VOCAB
EVENT_KINDS = ("special", "bar", "position", "track", "pitch", "duration")


def _nearest_duration_table() -> np.ndarray:
    """Index of the nearest known duration for every tick count 0…96 (ties go to the shorter)."""
    d = np.asarray(DURATIONS)
    ticks = np.arange(MAX_DURATION + 1)
    return np.abs(ticks[:, None] - d[None, :]).argmin(axis=1)  # argmin picks the first = shorter


_DUR_INDEX = _nearest_duration_table()


def duration_index(ticks) -> np.ndarray:
    """Known-duration index (0…26) of durations in ticks: capped at 96, at least 1, nearest."""
    t = np.clip(np.asarray(ticks, dtype=np.int64), 1, MAX_DURATION)
    return _DUR_INDEX[t]


def quantize_duration(ticks) -> np.ndarray:
    """Durations in ticks mapped to the nearest of the 27 known durations."""
    return np.asarray(DURATIONS, dtype=np.int64)[duration_index(ticks)]


def event_kind(tokens) -> np.ndarray:
    """Block of each event token: 0 special (BOS/EOS/PAD), 1 bar, 2 position, 3 track, 4 pitch,
    5 duration. Same shape as ``tokens``."""
    t = np.asarray(tokens)
    return np.searchsorted(np.array([BAR_OFFSET, POS_OFFSET, TRACK_OFFSET, PITCH_OFFSET,
                                     DUR_OFFSET, EVENT_VOCAB]), t, side="right") % 6


def canonical(notes) -> np.ndarray:
    """Copy of ``notes [N, 5]`` as int64 sorted by (onset, pitch, track, duration)."""
    n = np.asarray(notes, dtype=np.int64).reshape(-1, 5)
    onset = n[:, BAR] * BAR_RES + n[:, POS]
    order = np.lexsort((n[:, DUR], n[:, TRACK], n[:, PITCH], onset))
    return n[order].copy()


def resolve_overlaps(onset, track, pitch, duration) -> Tuple[np.ndarray, np.ndarray]:
    """Make every (track, pitch) sound at most once at a time, which is what MIDI can hold.

    Inputs are [N] int arrays (onsets in ticks on the 12-per-beat grid, known durations).
    Notes of one track and pitch that start together (exact duplicates included) become one,
    the longest; a note still sounding when the next note of its track and pitch starts is cut
    there, to the longest known duration that ends at or before that onset. (A MIDI reader pairs
    note-offs first-in-first-out, so without this two such notes come back with their durations
    swapped.) Returns (keep [N] bool, duration [N]) in the input's order.
    """
    on, trk, p = (np.asarray(a, dtype=np.int64) for a in (onset, track, pitch))
    dur = np.asarray(duration, dtype=np.int64).copy()
    order = np.lexsort((-dur, on, p, trk))
    o, t, q = on[order], trk[order], p[order]
    same_key = (t[1:] == t[:-1]) & (q[1:] == q[:-1])
    keep_sorted = np.ones(len(order), dtype=bool)
    keep_sorted[1:] = ~(same_key & (o[1:] == o[:-1]))  # the first of a group is the longest
    idx = order[keep_sorted]
    o, t, q = on[idx], trk[idx], p[idx]
    nxt = np.full(len(idx), np.iinfo(np.int64).max)
    follows = (t[1:] == t[:-1]) & (q[1:] == q[:-1])
    nxt[:-1] = np.where(follows, o[1:], nxt[:-1])
    gap = nxt - o
    cut = dur[idx] > gap
    known = np.asarray(DURATIONS, dtype=np.int64)
    dur[idx[cut]] = known[np.searchsorted(known, gap[cut], side="right") - 1]
    keep = np.zeros(len(on), dtype=bool)
    keep[idx] = True
    return keep, dur


def canonicalize(notes) -> np.ndarray:
    """The canonical form of a 4/4 piece ``notes [N, 5]``: overlaps of one track and pitch
    resolved (``resolve_overlaps``), canonical order. Reading back a MIDI file written from a
    piece gives its canonical form; a canonical piece comes back exactly."""
    n = np.asarray(notes, dtype=np.int64).reshape(-1, 5)
    keep, dur = resolve_overlaps(n[:, BAR] * BAR_RES + n[:, POS], n[:, TRACK], n[:, PITCH],
                                 n[:, DUR])
    out = n[keep].copy()
    out[:, DUR] = dur[keep]
    return canonical(out)


def validate_notes(notes: np.ndarray, n_bars: int = N_BARS) -> None:
    """Raise ValueError naming the column when a piece does not fit the vocabularies."""
    if notes.ndim != 2 or notes.shape[1] != 5:
        raise ValueError(f"notes must be [N, 5] (bar, position, track, pitch, duration), "
                         f"got {list(notes.shape)}")
    limits = (n_bars, BAR_RES, len(TRACK_NAMES), 128)
    for col, hi in enumerate(limits):
        v = notes[:, col]
        if v.size and (v.min() < 0 or v.max() >= hi):
            raise ValueError(f"{NOTE_COLUMNS[col]} must be in 0…{hi - 1}, got "
                             f"{v.min()}…{v.max()}")
    if notes.size and not np.isin(notes[:, DUR], DURATIONS).all():
        raise ValueError("duration must be one of the 27 known durations (quantize_duration)")


COORD_CONVENTIONS = ("slides", "authors")


class Tokens(NamedTuple):
    """A tokenised piece: ``tokens`` [L, 6] (note-based) or [L] (event-based); ``onset``,
    ``pitch``, ``bar`` and ``position`` [L] int64 coordinates for the relative terms (−1 =
    missing). bar/position may be None (hand-made prompts): they are then split from onset."""
    tokens: np.ndarray
    onset: np.ndarray
    pitch: np.ndarray
    bar: Optional[np.ndarray] = None
    position: Optional[np.ndarray] = None


class Coords(NamedTuple):
    """Per-token coordinates [L] int64 (−1 = missing)."""
    onset: np.ndarray
    pitch: np.ndarray
    bar: np.ndarray
    position: np.ndarray


def fields_of_onset(onset) -> Tuple[np.ndarray, np.ndarray]:
    """(bar, position) of onsets in ticks (−1 where the onset is missing)."""
    on = np.asarray(onset, dtype=np.int64)
    return np.where(on >= 0, on // BAR_RES, -1), np.where(on >= 0, on % BAR_RES, -1)


def _forward_fill(values: np.ndarray, is_set: np.ndarray) -> np.ndarray:
    """values[j] of the latest j <= i with is_set[j], for every i (−1 before the first)."""
    idx = np.maximum.accumulate(np.where(is_set, np.arange(len(values)), -1)) if len(values) \
        else np.zeros(0, dtype=np.int64)
    return np.where(idx >= 0, values[np.maximum(idx, 0)], -1).astype(np.int64)


# ---------------------------------------------------------------------------------------------
def encode_notes(notes, *, sos: bool = True, eos: bool = True) -> Tokens:
    """Piece ``notes [N, 5]`` → note-based tokens [N (+2), 6] with onset/pitch [N (+2)]."""
    n = canonical(notes)
    validate_notes(n)
    body = np.empty((len(n), 6), dtype=np.int64)
    body[:, 0] = TYPE_NOTE
    body[:, 1:5] = n[:, :4]
    body[:, 5] = duration_index(n[:, DUR])
    special = np.array(FIELD_PAD, dtype=np.int64)
    rows = [np.concatenate([[TYPE_SOS], special[1:]])[None]] if sos else []
    rows.append(body)
    if eos:
        rows.append(np.concatenate([[TYPE_EOS], special[1:]])[None])
    tokens = np.concatenate(rows).astype(np.int64)
    return Tokens(tokens, *note_coordinates(tokens))


def decode_notes(tokens) -> np.ndarray:
    """Note-based tokens [L, 6] → piece [N, 5]: keeps the note tokens, stops at the first EOS."""
    t = np.asarray(tokens, dtype=np.int64).reshape(-1, 6)
    eos = np.nonzero(t[:, 0] == TYPE_EOS)[0]
    if len(eos):
        t = t[:eos[0]]
    t = t[t[:, 0] == TYPE_NOTE]
    out = np.empty((len(t), 5), dtype=np.int64)
    out[:, :4] = t[:, 1:5]
    out[:, DUR] = np.asarray(DURATIONS, dtype=np.int64)[t[:, 5]]
    return canonical(out)


def note_coordinates(tokens, convention: str = "slides") -> Coords:
    """Coordinates of note-based tokens [L, 6]: the note's fields, −1 on non-note tokens
    (the same in both conventions: the authors' note model masks every field of a token whose
    bar field is padding)."""
    _check_convention(convention)
    t = np.asarray(tokens, dtype=np.int64).reshape(-1, 6)
    is_note = t[:, 0] == TYPE_NOTE
    bar, pos = np.where(is_note, t[:, 1], -1), np.where(is_note, t[:, 2], -1)
    return Coords(np.where(is_note, bar * BAR_RES + pos, -1), np.where(is_note, t[:, 4], -1),
                  bar, pos)


def _check_convention(convention: str) -> None:
    if convention not in COORD_CONVENTIONS:
        raise ValueError(f"convention must be one of {list(COORD_CONVENTIONS)}, got {convention!r}")


def coordinates(tokens, representation: str, convention: str = "slides") -> Coords:
    """Per-token coordinates of a token sequence of either representation (module docstring)."""
    if representation == "note":
        return note_coordinates(tokens, convention)
    if representation == "event":
        return event_coordinates(tokens, convention)
    raise ValueError(f"representation must be 'note' or 'event', got {representation!r}")


# ---------------------------------------------------------------------------------------------
def encode_events(notes, *, n_bars: Optional[int] = None, bos: bool = True,
                  eos: bool = True, convention: str = "slides") -> Tokens:
    """Piece ``notes [N, 5]`` → event tokens [L]: BOS, per bar Bar_b and per note Position,
    Track, Pitch, Duration, then EOS. ``n_bars`` (default: last bar with a note + 1) Bar tokens
    are written, so empty bars inside the piece keep their place. Coordinates by
    ``convention`` (module docstring)."""
    n = canonical(notes)
    if n_bars is None:
        n_bars = int(n[:, BAR].max()) + 1 if len(n) else 0
    validate_notes(n, max(n_bars, 1))
    toks: List[int] = [BOS] if bos else []
    bars = n[:, BAR]
    for b in range(n_bars):
        toks.append(BAR_OFFSET + b)
        for _, pos, trk, p, dur in n[bars == b]:
            toks += [POS_OFFSET + pos, TRACK_OFFSET + trk, PITCH_OFFSET + p,
                     DUR_OFFSET + int(duration_index(dur))]
    if eos:
        toks.append(EOS)
    tokens = np.asarray(toks, dtype=np.int64)
    return Tokens(tokens, *event_coordinates(tokens, convention))


def event_coordinates(tokens, convention: str = "slides") -> Coords:
    """Coordinates of event tokens [L] by ``convention`` (module docstring): a running parse,
    vectorised (each value comes from the latest token of some kinds)."""
    _check_convention(convention)
    t = np.asarray(tokens, dtype=np.int64).reshape(-1)
    kind = event_kind(t)
    is_bar, is_pos, is_pitch = kind == 1, kind == 2, kind == 4
    bar = _forward_fill(t - BAR_OFFSET, is_bar)
    if convention == "authors":
        pos = _forward_fill(t - POS_OFFSET, is_pos)
        pitch = _forward_fill(t - PITCH_OFFSET, is_pitch)
        # BOS and padding carry nothing; EOS keeps the fields before it, as in their model.
        none = (t == BOS) | (t >= EVENT_VOCAB)
        bar, pos, pitch = (np.where(none, -1, a) for a in (bar, pos, pitch))
        onset = np.where((bar < 0) | (pos < 0), -1, bar * BAR_RES + pos)
        return Coords(onset, pitch, bar, pos)
    # Onset from the latest Bar (its downbeat) or Position token; pitch from the latest Pitch
    # token unless a Bar or Position came after it (a new note: its pitch is not known yet),
    # never on a Track token.
    here = np.where(is_bar, (t - BAR_OFFSET) * BAR_RES,
                    np.maximum(bar, 0) * BAR_RES + t - POS_OFFSET)
    onset = _forward_fill(here, is_bar | is_pos)
    pitch = _forward_fill(np.where(is_pitch, t - PITCH_OFFSET, -1), is_pitch | is_bar | is_pos)
    special = kind == 0
    onset, pitch = np.where(special, -1, onset), np.where(special | (kind == 3), -1, pitch)
    return Coords(onset, pitch, *fields_of_onset(onset))


def decode_events(tokens) -> np.ndarray:
    """Event tokens [L] → piece [N, 5]. Stops at the first EOS; a note is kept only when its
    four tokens (Position, Track, Pitch, Duration) follow each other after a Bar token
    (sampling with ``generate`` always produces such sequences)."""
    t = [int(x) for x in np.asarray(tokens).reshape(-1)]
    notes = []
    bar, i = -1, 0
    while i < len(t):
        tok = t[i]
        if tok == EOS:
            break
        if BAR_OFFSET <= tok < POS_OFFSET:
            bar = tok - BAR_OFFSET
        elif POS_OFFSET <= tok < TRACK_OFFSET and bar >= 0 and i + 3 < len(t):
            trk, p, d = t[i + 1] - TRACK_OFFSET, t[i + 2] - PITCH_OFFSET, t[i + 3] - DUR_OFFSET
            if 0 <= trk < 3 and 0 <= p < 128 and 0 <= d < len(DURATIONS):
                notes.append((bar, tok - POS_OFFSET, trk, p, DURATIONS[d]))
                i += 4
                continue
        i += 1
    return canonical(np.asarray(notes, dtype=np.int64).reshape(-1, 5))


def n_bars_of_events(tokens) -> int:
    """Bars spanned by an event sequence (highest Bar token + 1)."""
    t = np.asarray(tokens).reshape(-1)
    bars = t[(t >= BAR_OFFSET) & (t < POS_OFFSET)]
    return int(bars.max() - BAR_OFFSET + 1) if len(bars) else 0


# ---------------------------------------------------------------------------------------------
# MIDI I/O through symusic (imported lazily: ``import fastattn`` needs only torch and numpy).
def notes_to_score(notes, *, tempo_bpm: float = 120.0, velocity: int = 80):
    """Piece ``notes [N, 5]`` → ``symusic.Score`` at 12 ticks per quarter, 4/4, one track per
    track name (MELODY, BRIDGE, PIANO; program 0, like POP909). The piece is written in its
    canonical form (``canonicalize``), the only form MIDI holds exactly."""
    import symusic

    n = canonicalize(notes)
    score = symusic.Score(TICKS_PER_BEAT)
    score.time_signatures.append(symusic.TimeSignature(0, 4, 4))
    score.tempos.append(symusic.Tempo(0, qpm=float(tempo_bpm)))
    for k, name in enumerate(TRACK_NAMES):
        track = symusic.Track(name=name, program=0)
        for bar, pos, _, p, dur in n[n[:, TRACK] == k]:
            track.notes.append(symusic.Note(int(bar * BAR_RES + pos), int(dur), int(p),
                                            int(velocity)))
        score.tracks.append(track)
    return score


def write_midi(notes, path, **kw) -> None:
    """Write a piece as a MIDI file (see ``notes_to_score``)."""
    notes_to_score(notes, **kw).dump_midi(str(path))


def track_index(name: str, fallback: int) -> int:
    """Track id from a track name (MELODY/BRIDGE/PIANO, case-insensitive), else ``fallback``."""
    key = name.strip().upper()
    return TRACK_NAMES.index(key) if key in TRACK_NAMES else fallback


def score_to_notes(score, *, beat_offset_ticks: float = 0.0, beats_per_bar: int = 4):
    """``symusic.Score`` (any ticks per quarter) → piece [N, 5] on the 12-per-beat grid.

    Bars are ``beats_per_bar`` quarters long from ``beat_offset_ticks`` (the tick of a downbeat;
    earlier notes are dropped). Tracks are mapped by name; unnamed non-drum tracks go to PIANO.
    Durations are snapped and mapped to the nearest known duration; overlaps of one track and
    pitch are then resolved (``resolve_overlaps``).
    """
    tpq = score.ticks_per_quarter
    bar_len = beats_per_bar * TICKS_PER_BEAT
    rows = []
    for k, track in enumerate(score.tracks):
        if track.is_drum or not len(track.notes):
            continue
        trk = track_index(track.name, 2)
        arr = track.notes.numpy()
        on = np.rint((arr["time"] - beat_offset_ticks) * TICKS_PER_BEAT / tpq).astype(np.int64)
        dur = np.rint(arr["duration"] * TICKS_PER_BEAT / tpq).astype(np.int64)
        keep = on >= 0
        on, dur, p = on[keep], dur[keep], arr["pitch"][keep].astype(np.int64)
        rows.append(np.stack([on, np.full_like(on, trk), p, quantize_duration(dur)], axis=1))
    if not rows:
        return np.zeros((0, 5), dtype=np.int64)
    on, trk, p, dur = np.concatenate(rows).T
    keep, dur = resolve_overlaps(on, trk, p, dur)
    on, trk, p, dur = on[keep], trk[keep], p[keep], dur[keep]
    return canonical(np.stack([on // bar_len, on % bar_len, trk, p, dur], axis=1))


def through_midi(notes, **kw) -> np.ndarray:
    """The piece a MIDI file written from ``notes`` reads back as (in memory): its canonical
    form (``canonicalize``)."""
    import symusic

    return score_to_notes(symusic.Score.from_midi(notes_to_score(notes, **kw).dumps_midi()))


# Longer "songs" are damaged or hostile files (a 20-byte MIDI can hold a note at tick 2^28):
# checked before anything is allocated per bar. 10,000 4/4 bars are 5.5 hours at 120 bpm.
MAX_SONG_BARS = 10_000


def check_song_length(score) -> None:
    """ValueError when a ``symusic.Score`` has a note starting beyond ``MAX_SONG_BARS`` 4/4 bars."""
    tpq = max(int(score.ticks_per_quarter), 1)
    last = max((int(t.notes.numpy()["time"].max()) for t in score.tracks if len(t.notes)), default=0)
    if last >= MAX_SONG_BARS * 4 * tpq:
        raise ValueError(f"a note starts at tick {last:,} = bar {last // (4 * tpq):,}, beyond the "
                         f"{MAX_SONG_BARS:,}-bar limit (a damaged file?)")


def read_midi(path) -> np.ndarray:
    """A MIDI file written by ``write_midi`` (or any 4/4 MIDI starting on a downbeat) → piece."""
    import symusic

    score = symusic.Score(str(path))
    try:
        check_song_length(score)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return score_to_notes(score)
