"""Does a model copy the bar that repeats k bars back? Probes logged over training.

The paper's claim is that circular relative attention picks up bar-level repetition. These
probes measure it directly, on windows whose repetition is known:

- ``note_classes``: each note of a window is *copyable at lag k* when an identical note (same
  position, track, pitch and duration) sits in the bar k bars earlier. A note's class is the
  smallest lag at which it is copyable ("lag4", "lag8"), "none" when it is not copyable at any
  lag although bar >= the smallest lag, and "head" in the bars before the smallest lag.
- ``probe``: teacher-forced per-field accuracy (argmax) and NLL of next-token prediction, split
  by the class of the target note, and per layer the attention mass a query puts on
  * ``same``: keys at its own onset − 48k (the same position k bars back), and
  * ``source``: keys at the *target's* onset − 48k (the note a copier would copy),
  next to the mass uniform attention over the visible keys would put there (``chance``).
  Attention probabilities come from the module's own op call (intercepted and replayed with
  one-hot values), so they follow whatever convention the attention module uses.
- ``Ablation`` / ``build_model``: the candidate causes that ``ModelConfig`` cannot express
  (relative tables' initial scale, bar-table size, time from bar/position fields, hiding the
  absolute bar/position input embeddings).
- ``train_with_probes``: the training loop of ``fastattn.music.train.train`` (same batches,
  schedule and optimizer; bit-identical for ``Ablation()``), probing every ``probe_every`` steps
  and writing one JSON line per probe.

Shapes: B windows, L tokens, H heads, F fields.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fastattn._io import append_jsonl
from fastattn.music import data as D
from fastattn.music import tokens as T
from fastattn.music.model import ModelConfig, MusicTransformer

LAGS = (4, 8)
CLASSES = ("head", "lag4", "lag8", "none")
# Fields reported per class: the five note fields (note-based) or the four note-token kinds of
# the event stream (event-based), plus "note" = all five fields right (note-based only).
NOTE_FIELDS = ("bar", "position", "track", "pitch", "duration")
EVENT_KINDS = {2: "position", 3: "track", 4: "pitch", 5: "duration"}


# ---------------------------------------------------------------------------------------------
# Which notes repeat
def copyable(notes: np.ndarray, lags: Sequence[int] = LAGS) -> np.ndarray:
    """[N, len(lags)] bool: note n (canonical order) has an identical (position, track, pitch,
    duration) note in bar (bar_n − lag)."""
    n = T.canonical(notes)
    out = np.zeros((len(n), len(lags)), dtype=bool)
    keys = {tuple(r) for r in n[:, [T.BAR, T.POS, T.TRACK, T.PITCH, T.DUR]].tolist()}
    for i, (bar, pos, trk, p, dur) in enumerate(n.tolist()):
        for c, lag in enumerate(lags):
            out[i, c] = bar >= lag and (bar - lag, pos, trk, p, dur) in keys
    return out


def note_classes(notes: np.ndarray, lags: Sequence[int] = LAGS) -> np.ndarray:
    """[N] int class per note (canonical order), an index into ``classes_for(lags)``: 0 head
    (bar < min lag), 1 + c for the first lag c at which it is copyable, 1 + len(lags) none."""
    n = T.canonical(notes)
    cp = copyable(n, lags)
    cls = np.where(cp.any(axis=1), 1 + cp.argmax(axis=1), 1 + len(lags))
    return np.where(n[:, T.BAR] < min(lags), 0, cls).astype(np.int64)


def classes_for(lags: Sequence[int]) -> Tuple[str, ...]:
    return ("head",) + tuple(f"lag{k}" for k in lags) + ("none",)


class ProbeSet(NamedTuple):
    """Fixed windows to probe, tokenised, with per-target labels.

    batch: the windows as one padded ``data.Batch`` (inputs/targets/onset/pitch [B, L(, 6)]);
    cls: [B, L] class of the note each target belongs to (−1: not a note token, or padding);
    copy: [B, L, K] target copyable at lag k; target_onset: [B, L] onset of each target (−1);
    kind: [B, L] event kind of each target (event-based; 1 for note targets when note-based);
    track: [B, L] track of the note each target belongs to (−1 when none);
    windows: the notes of each window ([N, 5] arrays).
    """
    batch: D.Batch
    cls: Tensor
    copy: Tensor
    target_onset: Tensor
    kind: Tensor
    track: Tensor
    windows: List[np.ndarray]
    lags: Tuple[int, ...]
    representation: str


def probe_set(corpus: D.WindowCorpus, split: str, indices: Sequence[int], representation: str,
              max_len: int, lags: Sequence[int] = LAGS, convention: str = "slides") -> ProbeSet:
    """Tokenise windows ``indices`` of a split (coordinates in the model's ``convention``) and
    label every target with its note's class."""
    wins, toks, cls_rows, copy_rows, kind_rows, track_rows = [], [], [], [], [], []
    for i in indices:
        w = T.canonical(corpus.window(split, int(i)))
        tk = D.encode(w, representation, corpus.window_bars, convention)
        cl, cp = note_classes(w, lags), copyable(w, lags)
        if representation == "note":
            is_note = tk.tokens[:, 0] == T.TYPE_NOTE            # SOS, notes…, EOS
            kind = np.where(is_note, 1, 0)
            note_of = np.cumsum(is_note) - 1
        else:
            kind = T.event_kind(tk.tokens)
            note_start = kind == 2                               # a note begins at its Position
            note_of = np.cumsum(note_start) - 1
            is_note = np.isin(kind, list(EVENT_KINDS))
        idx = np.clip(note_of, 0, max(len(w) - 1, 0))
        c = np.where(is_note, cl[idx] if len(w) else -1, -1)
        trk = np.where(is_note, w[idx, T.TRACK] if len(w) else -1, -1)
        p = np.where(is_note[:, None], cp[idx] if len(w) else False, False)
        # Targets are tokens[1:]: shift the labels by one.
        cls_rows.append(c[1:]); copy_rows.append(p[1:]); kind_rows.append(kind[1:])
        track_rows.append(trk[1:])
        wins.append(w); toks.append(tk)
    batch = D.make_batch(toks, representation, max_len)
    B, L = batch.pad.shape
    cls = torch.full((B, L), -1, dtype=torch.int64)
    copy = torch.zeros(B, L, len(lags), dtype=torch.bool)
    kind = torch.zeros(B, L, dtype=torch.int64)
    track = torch.full((B, L), -1, dtype=torch.int64)
    tgt_on = torch.full((B, L), -1, dtype=torch.int64)
    for b, tk in enumerate(toks):
        n = min(len(tk.tokens) - 1, L)
        cls[b, :n] = torch.from_numpy(cls_rows[b][:n])
        copy[b, :n] = torch.from_numpy(copy_rows[b][:n])
        kind[b, :n] = torch.from_numpy(kind_rows[b][:n])
        track[b, :n] = torch.from_numpy(track_rows[b][:n])
        tgt_on[b, :n] = torch.from_numpy(tk.onset[1:n + 1])
    return ProbeSet(batch, cls, copy, tgt_on, kind, track, wins, tuple(lags), representation)


# ---------------------------------------------------------------------------------------------
# Attention probabilities, exactly as the module computes them
@contextlib.contextmanager
def recorded_attention():
    """Record every call of the attention op made by ``CircularRelativeAttention`` modules
    inside the block; yields the list of (args, kwargs) in call order (one per layer)."""
    import fastattn.nn.circular_relative_attention as mod
    real = mod.circular_relative_attention
    calls: list = []

    def recorder(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    mod.circular_relative_attention = recorder
    try:
        yield calls
    finally:
        mod.circular_relative_attention = real


def replay_probabilities(call) -> Tensor:
    """Attention probabilities [B, H, Lq, Lk] of a recorded op call: the same call with one-hot
    values, D key columns at a time (out = P · V, so V = I[:, j:j+D] gives P[..., j:j+D])."""
    from fastattn.ops.circular_relative_attention import circular_relative_attention as op
    args, kwargs = list(call[0]), dict(call[1])
    q = args[0] if args else kwargs["q"]
    k = args[1] if len(args) > 1 else kwargs["k"]
    B, H, Lq, Dh = q.shape
    Lk = k.shape[2]
    kwargs["dropout_p"] = 0.0
    P = q.new_zeros(B, H, Lq, Lk)
    eye = torch.eye(Lk, dtype=q.dtype, device=q.device)
    for j in range(0, Lk, Dh):
        w = min(Dh, Lk - j)
        V = q.new_zeros(Lk, Dh)
        V[:, :w] = eye[:, j:j + w]
        V = V.expand(B, H, Lk, Dh)
        if len(args) > 2:
            args[2] = V
        else:
            kwargs["v"] = V
        P[..., j:j + w] = op(*args, **kwargs)[..., :w]
    return P


# ---------------------------------------------------------------------------------------------
def _attention_sums(P: Tensor, onset: Tensor, target_onset: Tensor, copy: Tensor,
                    lags: Sequence[int], bar_res: int) -> Dict[str, Tuple[Tensor, float, float]]:
    """Per lag and key set ("same", "source"): (per-head summed attention mass [H], summed
    chance, number of queries) over the queries whose target is copyable at that lag.
    P [B, H, L, L]; onset, target_onset [B, L]; copy [B, L, K]."""
    B, H, L, _ = P.shape
    visible = torch.tril(torch.ones(L, L, dtype=torch.bool, device=P.device))
    n_vis = visible.sum(-1).to(P.dtype)                                  # [L]
    out = {}
    for c, lag in enumerate(lags):
        q_ok = copy[..., c]                                             # [B, L]
        for name, ref in (("same", onset), ("source", target_onset)):
            want = torch.where(ref >= 0, ref - lag * bar_res, -10**9)       # [B, L]
            M = (onset.unsqueeze(1) == want.unsqueeze(2)) & visible          # [B, Lq, Lk]
            mass = (P * M.unsqueeze(1)).sum(-1)                              # [B, H, L]
            chance = M.sum(-1).to(P.dtype) / n_vis                           # [B, L]
            out[f"{name}{lag}"] = ((mass * q_ok.unsqueeze(1)).sum((0, 2)),
                                   float(chance[q_ok].sum()), float(q_ok.sum()))
    return out


@torch.no_grad()
def probe(model: MusicTransformer, ps: ProbeSet, *, batch_size: int = 8,
          attention: bool = True) -> dict:
    """Teacher-forced probes of ``model`` on a ProbeSet (see the module docstring).

    Returns {"nll": total NLL per note token, "acc": {class: {field: acc}}, "nll_by": {class:
    {field: nll}}, "count": {class: n}, "attn": [per layer {…}]} (attn only when asked)."""
    was = model.training
    model.eval()
    rep = ps.representation
    names = classes_for(ps.lags)
    K = len(names)
    fields = NOTE_FIELDS + ("note",) if rep == "note" else tuple(EVENT_KINDS.values())
    correct = torch.zeros(K, len(fields), dtype=torch.float64)
    nll = torch.zeros(K, len(fields), dtype=torch.float64)
    count = torch.zeros(K, len(fields), dtype=torch.float64)
    n_trk = len(T.TRACK_NAMES)
    pitch_ok = torch.zeros(K, n_trk, dtype=torch.float64)   # pitch right, by class and track
    pitch_n = torch.zeros(K, n_trk, dtype=torch.float64)
    total_nll, total_notes = 0.0, 0.0
    layers: List[Dict[str, list]] = []
    B = ps.batch.pad.shape[0]
    for s in range(0, B, batch_size):
        sl = slice(s, s + batch_size)
        b = D.Batch(*(t[sl] for t in ps.batch))
        cls, copy, kind, track = ps.cls[sl], ps.copy[sl], ps.kind[sl], ps.track[sl]
        with recorded_attention() if attention else contextlib.nullcontext() as calls:
            logits = model(b.inputs, b.onset, b.pitch, bar=b.bar, position=b.position)
        is_note = cls >= 0
        if rep == "note":
            per_field_ok, per_field_nll = [], []
            for f, name in enumerate(NOTE_FIELDS, start=1):
                lg, tg = logits[f], b.targets[..., f]
                tg_safe = torch.where(is_note, tg, 0)
                per_field_ok.append(lg.argmax(-1) == tg_safe)
                per_field_nll.append(F.cross_entropy(lg.flatten(0, 1).float(), tg_safe.flatten(),
                                                     reduction="none").view_as(tg))
            per_field_ok.append(torch.stack(per_field_ok).all(0))
            per_field_nll.append(torch.stack(per_field_nll).sum(0))
            type_nll = F.cross_entropy(logits[0].flatten(0, 1).float(),
                                       torch.where(is_note, b.targets[..., 0], 0).flatten(),
                                       reduction="none").view_as(cls)
            total_nll += float(((per_field_nll[-1] + type_nll) * is_note).sum())
            total_notes += float(is_note.sum())
            for f in range(len(fields)):
                for c in range(K):
                    m = cls == c
                    correct[c, f] += float(per_field_ok[f][m].sum())
                    nll[c, f] += float(per_field_nll[f][m].sum())
                    count[c, f] += float(m.sum())
            pitch_right, pitch_target = per_field_ok[NOTE_FIELDS.index("pitch")], is_note
        else:
            tg_safe = torch.where(is_note, b.targets, 0)
            ok = logits.argmax(-1) == tg_safe
            ce = F.cross_entropy(logits.flatten(0, 1).float(), tg_safe.flatten(),
                                 reduction="none").view_as(cls)
            total_nll += float((ce * is_note).sum())
            total_notes += float((is_note & (kind == 2)).sum())
            for f, kd in enumerate(EVENT_KINDS):
                for c in range(K):
                    m = (cls == c) & (kind == kd)
                    correct[c, f] += float(ok[m].sum())
                    nll[c, f] += float(ce[m].sum())
                    count[c, f] += float(m.sum())
            pitch_right, pitch_target = ok, kind == 4
        for c in range(K):
            for t in range(n_trk):
                m = pitch_target & (cls == c) & (track == t)
                pitch_ok[c, t] += float(pitch_right[m].sum())
                pitch_n[c, t] += float(m.sum())
        if attention:
            for li, call in enumerate(calls):
                P = replay_probabilities(call)
                sums = _attention_sums(P, b.onset, ps.target_onset[sl], copy, ps.lags, T.BAR_RES)
                if li >= len(layers):
                    layers.append({})
                for key, (mass, chance, n) in sums.items():
                    acc = layers[li].setdefault(key, [0.0, 0.0, 0.0])
                    acc[0] = acc[0] + mass
                    acc[1] += chance
                    acc[2] += n
    model.train(was)
    out = {"nll_per_note": total_nll / max(total_notes, 1.0),
           "count": {names[c]: int(count[c, 0]) for c in range(K)},
           "acc": {names[c]: {fields[f]: float(correct[c, f] / count[c, f])
                              for f in range(len(fields)) if count[c, f] > 0} for c in range(K)},
           "nll": {names[c]: {fields[f]: float(nll[c, f] / count[c, f])
                              for f in range(len(fields)) if count[c, f] > 0} for c in range(K)},
           "pitch_acc_by_track": {names[c]: {T.TRACK_NAMES[t]: float(pitch_ok[c, t] / pitch_n[c, t])
                                             for t in range(n_trk) if pitch_n[c, t] > 0}
                                  for c in range(K)},
           "count_by_track": {names[c]: {T.TRACK_NAMES[t]: int(pitch_n[c, t]) for t in range(n_trk)}
                              for c in range(K)}}
    if attention:
        # Per layer and key set: mean mass over heads, the best head's, and chance.
        out["attn"] = []
        for layer in layers:
            row = {}
            for key, (mass, chance, n) in layer.items():
                if n > 0:
                    per_head = mass / n
                    row[key] = float(per_head.mean())
                    row[key + "_best_head"] = float(per_head.max())
                    row[key + "_chance"] = chance / n
            out["attn"].append(row)
    return out


# ---------------------------------------------------------------------------------------------
# Candidate causes the model configuration cannot express
@dataclass
class Ablation:
    """Changes to the standard MusicTransformer for one diagnostic run (defaults: none)."""
    table_scale: float = 1.0
    """Multiply every learned relative table by this at initialisation (1 = the module's
    init: entries of each combined row ~ 1/√D)."""
    index_scale: Optional[float] = None
    """Scale of the relative-index table instead of ``table_scale`` (None = the same). The
    authors' init at D = 16: index 4 (their N(0, 1) table, no linear map), factors ≈ 1.15 (N(0, 1)
    through a default nn.Linear: std 1/√3 per factor, ours D^(−1/4))."""
    n_bar: int = T.N_BARS
    """Rows of the bar table (bar offsets ≥ n_bar − 1 share the last row)."""
    time_mode: str = "quotient"
    """"quotient" (Δt split by bar_res) or "fields" (per-token bar and position: bar row
    clamp(Δbar), position row Δposition + 47 of a 95-row table)."""
    hide_fields: Tuple[str, ...] = ()
    """Input fields whose embeddings are zeroed and frozen ("bar", "position"): the model then
    learns time only through relative terms (note-based)."""

    def is_default(self) -> bool:
        return self == Ablation()


def build_model(cfg: ModelConfig, ablation: Ablation = Ablation(), seed: int = 0) -> MusicTransformer:
    """``torch.manual_seed(seed)``, then the MusicTransformer of ``cfg`` with ``ablation``
    applied (the attention modules are rebuilt only when the bar table or time mode change)."""
    from fastattn.nn import CircularRelativeAttention
    torch.manual_seed(seed)
    model = MusicTransformer(cfg)
    if ablation.n_bar != T.N_BARS or ablation.time_mode != "quotient":
        if ablation.time_mode not in ("quotient", "fields"):
            raise ValueError(f"time_mode must be 'quotient' or 'fields', got {ablation.time_mode!r}")
        # time_mode "fields": the module's own option (bar and position per token, a
        # 2·bar_res − 1 row position table), the authors' way of reading time.
        for blk in model.blocks:
            blk.attn = CircularRelativeAttention.from_variant(
                cfg.variant, cfg.d_model, cfg.n_head, max_len=cfg.max_len, alpha=cfg.alpha,
                bar_res=T.BAR_RES, n_bar=ablation.n_bar, dropout=cfg.dropout, linear=cfg.linear,
                backend=cfg.backend, convention=cfg.convention, time_mode=ablation.time_mode
                if ablation.time_mode == "fields" else None)
    index_scale = ablation.table_scale if ablation.index_scale is None else ablation.index_scale
    if ablation.table_scale != 1.0 or index_scale != 1.0:
        with torch.no_grad():
            for blk in model.blocks:
                for name, p in blk.attn.named_parameters():
                    if name.endswith("_table"):
                        p.mul_(index_scale if name == "rel_index_table" else ablation.table_scale)
    for name in ablation.hide_fields:
        if cfg.representation != "note":
            raise ValueError("hide_fields applies to the note-based representation")
        emb = model.embed[T.FIELDS.index(name)]
        with torch.no_grad():
            emb.weight.zero_()
        emb.weight.requires_grad_(False)
    return model


# ---------------------------------------------------------------------------------------------
def train_with_probes(model_cfg: ModelConfig, tc, corpus: D.WindowCorpus, ps: ProbeSet, *,
                      ablation: Ablation = Ablation(), probe_every: int = 100,
                      log_path=None, tag: Optional[dict] = None,
                      attention: bool = True) -> Tuple[MusicTransformer, List[dict]]:
    """Train like ``fastattn.music.train.train`` (same model init, batches, learning-rate
    schedule, AdamW groups, clipping; one process, CPU) and probe at step 0 and every
    ``probe_every`` steps (and at the end). Each probe record (plus ``tag``) is appended to
    ``log_path`` as a JSON line. ``tc`` is a ``TrainConfig``; checkpoints are not written.
    Returns the trained model and the records."""
    from fastattn.music.train import _LossModule, _param_groups, lr_at, optimizer_step

    model = build_model(model_cfg, ablation, tc.seed)
    net = _LossModule(model)
    opt = torch.optim.AdamW(_param_groups(model, tc.weight_decay), lr=tc.lr, betas=tuple(tc.betas))
    n_train = corpus.n_windows("train")
    records, running, t0 = [], [], time.time()

    def record(step: int) -> None:
        r = {**(tag or {}), "step": step, "lr": lr_at(max(step - 1, 0), tc),
             "train_loss": float(np.mean(running)) if running else float("nan"),
             "time_s": round(time.time() - t0, 1), **probe(model, ps, attention=attention)}
        records.append(r)
        running.clear()
        if log_path is not None:
            append_jsonl(log_path, r)

    record(0)
    model.train()
    for step in range(tc.max_steps):
        idx, shifts = D.batch_indices(n_train, tc.batch_size, tc.seed, step, tc.max_shift)
        batch = D.corpus_batch(corpus, "train", idx, model_cfg.representation,
                               model_cfg.max_len, shifts, model_cfg.convention)
        _, loss = optimizer_step(net, opt, batch, step, tc)
        running.append(loss.item())
        if (step + 1) % probe_every == 0 or step + 1 == tc.max_steps:
            record(step + 1)
    return model, records


def ablation_dict(a: Ablation) -> dict:
    d = asdict(a)
    d["hide_fields"] = list(d["hide_fields"])
    return d


def nan_to_none(x):
    """JSON-safe copy (NaN → None) of nested dicts/lists of floats."""
    if isinstance(x, dict):
        return {k: nan_to_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [nan_to_none(v) for v in x]
    if isinstance(x, float) and math.isnan(x):
        return None
    return x
