"""The music Transformer (SPEC §4): decoder-only, attention variant by name, two representations.

nanoGPT-style, one file: ``ModelConfig`` → ``MusicTransformer``. Blocks are pre-LayerNorm
(``x + attn(ln(x))``, ``x + mlp(ln(x))``) around ``fastattn.nn.CircularRelativeAttention``, so the
five variants of Inaba et al. (Attn, RelAttn, RIPO, CirRelAttn, CirRelAttn-H) differ only in the
attention module's flags.

Shapes: B batch, L tokens, E = d_model, F = 6 note fields, V event vocabulary (224).
- note-based inputs [B, L, 6]: summed field embeddings; six output heads → logits
  ([B, L, 3], [B, L, 16], [B, L, 48], [B, L, 3], [B, L, 128], [B, L, 27]);
- event-based inputs [B, L]: one embedding and one head → logits [B, L, 224].
Both get learned absolute position embeddings and pass the per-token coordinates (onset, pitch,
bar, position [B, L]) to every layer; ``cfg.convention`` picks the attention's convention and the
coordinates the data must carry (``fastattn.music.tokens``, ``data.encode(..., convention)``).

Padding sits at the end of each sequence and attention is causal, so real tokens never see a
pad: no key-padding mask is needed (padded positions are excluded from the loss only).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, List, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastattn.music import tokens as T
from fastattn.nn import CONVENTIONS, VARIANTS, CircularRelativeAttention, KVCache


@dataclass
class ModelConfig:
    """Architecture of the music Transformer (defaults: the authors' configuration)."""
    representation: str = "note"
    """"note" (six fields per note) or "event" (REMI-like, 224 tokens)."""
    variant: str = "CirRelAttn-H"
    """Attention variant: Attn, RelAttn, RIPO, CirRelAttn or CirRelAttn-H."""
    n_layer: int = 4
    """Transformer blocks."""
    d_model: int = 256
    """Residual width E."""
    n_head: int = 8
    """Attention heads (head dim = d_model / n_head)."""
    d_ff: int = 1024
    """Hidden width of the feed-forward block."""
    dropout: float = 0.2
    """Dropout on embeddings, residual branches and attention probabilities."""
    max_len: int = 0
    """Longest input (tokens; also rows of the relative-index table); 0 = 1024 for note-based,
    4096 for event-based."""
    alpha: float = 0.1
    """Weight of the relative terms in the attention logits."""
    convention: str = "authors"
    """"authors" (the paper authors' code: their relative rules and event coordinates) or
    "slides" (SPEC §2); see ``fastattn.nn.CONVENTIONS`` and ``fastattn.music.tokens``."""
    linear: bool = True
    """Pass every relative table through its own D×D linear map (the authors' best setting)."""
    backend: str = "auto"
    """Attention backend ("auto", "cpp", "cuda", "triton", "reference")."""

    def __post_init__(self):
        if self.representation not in ("note", "event"):
            raise ValueError(f"representation must be 'note' or 'event', got {self.representation!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {list(VARIANTS)}, got {self.variant!r}")
        if self.convention not in CONVENTIONS:
            raise ValueError(f"convention must be one of {list(CONVENTIONS)}, got "
                             f"{self.convention!r}")
        if self.max_len == 0:
            self.max_len = 1024 if self.representation == "note" else 4096


class LossParts(NamedTuple):
    """Summed negative log-likelihoods (nats) and target counts, per field ([F] each; F = 6
    note-based, 1 event-based). Sums, not means, so that ranks of a distributed run can be
    combined exactly."""
    nll_sum: Tensor
    count: Tensor


class Block(nn.Module):
    """Pre-LN Transformer block: x + attn(ln(x)), then x + mlp(ln(x)). x [B, L, E]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CircularRelativeAttention.from_variant(
            cfg.variant, cfg.d_model, cfg.n_head, max_len=cfg.max_len, alpha=cfg.alpha,
            bar_res=T.BAR_RES, n_bar=T.N_BARS, dropout=cfg.dropout, linear=cfg.linear,
            backend=cfg.backend, convention=cfg.convention)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_ff), nn.GELU(),
                                 nn.Linear(cfg.d_ff, cfg.d_model), nn.Dropout(cfg.dropout))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, coords: Dict[str, Optional[Tensor]],
                kv_cache: Optional[KVCache] = None) -> Tensor:
        x = x + self.drop(self.attn(self.ln1(x), kv_cache=kv_cache, **coords))
        return x + self.mlp(self.ln2(x))


class MusicTransformer(nn.Module):
    """Decoder-only music Transformer; see the module docstring for shapes."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        E = cfg.d_model
        if cfg.representation == "note":
            # One extra row per field for its padding value (FIELD_PAD = vocabulary size).
            self.embed = nn.ModuleList(nn.Embedding(n + 1, E) for n in T.FIELD_SIZES)
            self.heads = nn.ModuleList(nn.Linear(E, n) for n in T.FIELD_SIZES)
        else:
            self.embed = nn.Embedding(T.EVENT_VOCAB + 1, E)
            self.heads = nn.Linear(E, T.EVENT_VOCAB)
        self.pos = nn.Embedding(cfg.max_len, E)
        self.drop = nn.Dropout(cfg.dropout)
        # GPT-2 initialisation for embeddings and linear maps outside attention (the attention
        # module initialises its projections and relative tables itself).
        for mod in [self.embed, self.heads, self.pos]:
            for m in mod.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(m.weight, std=0.02)
                    if getattr(m, "bias", None) is not None:
                        nn.init.zeros_(m.bias)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(E)

    @property
    def fields(self) -> Tuple[str, ...]:
        return T.FIELDS if self.cfg.representation == "note" else ("token",)

    @property
    def coordinate_names(self) -> Tuple[str, ...]:
        """The coordinates the attention layers read (e.g. ("bar", "position", "pitch"))."""
        return self.blocks[0].attn.coordinate_names if len(self.blocks) else ()

    def new_caches(self, batch_size: int) -> List[KVCache]:
        """One empty KV cache per layer for incremental decoding."""
        return [b.attn.new_kv_cache(batch_size) for b in self.blocks]

    def forward(self, inputs: Tensor, onset: Optional[Tensor] = None,
                pitch: Optional[Tensor] = None, caches: Optional[List[KVCache]] = None, *,
                bar: Optional[Tensor] = None,
                position: Optional[Tensor] = None) -> Union[Tensor, Tuple[Tensor, ...]]:
        """Logits for the next token at every input position.

        inputs [B, L, 6] or [B, L]; onset, pitch, bar, position [B, L] int64 (−1 = missing),
        those the attention reads (``coordinate_names``). With ``caches`` the inputs are the new
        tokens only: they sit at positions len(cache) … len(cache) + L − 1 and attend over the
        cached tokens too.
        Returns a tuple of six [B, L, V_f] (note-based) or one [B, L, 224] (event-based).
        """
        B, L = inputs.shape[:2]
        start = len(caches[0]) if caches is not None else 0
        if start + L > self.cfg.max_len:
            raise ValueError(f"sequence of {start + L} tokens exceeds max_len={self.cfg.max_len}")
        if self.cfg.representation == "note":
            x = sum(emb(inputs[..., f]) for f, emb in enumerate(self.embed))
        else:
            x = self.embed(inputs)
        x = self.drop(x + self.pos(torch.arange(start, start + L, device=inputs.device)))
        coords = dict(onset=onset, pitch=pitch, bar=bar, position=position)
        for i, block in enumerate(self.blocks):
            x = block(x, coords, None if caches is None else caches[i])
        x = self.ln_f(x)
        if self.cfg.representation == "note":
            return tuple(h(x) for h in self.heads)
        return self.heads(x)

    def loss_parts(self, inputs: Tensor, targets: Tensor, onset: Optional[Tensor] = None,
                   pitch: Optional[Tensor] = None, *, bar: Optional[Tensor] = None,
                   position: Optional[Tensor] = None) -> LossParts:
        """Summed cross-entropies per field; targets equal to the padding value are ignored.
        Note-based targets of start/end tokens count only in the type field (their other
        fields hold the padding value). Coordinates as in ``forward``."""
        logits = self(inputs, onset, pitch, bar=bar, position=position)
        if self.cfg.representation == "note":
            sums, counts = [], []
            for f, lg in enumerate(logits):
                tgt = targets[..., f]
                sums.append(F.cross_entropy(lg.flatten(0, 1).float(), tgt.flatten(),
                                            ignore_index=T.FIELD_PAD[f], reduction="sum"))
                counts.append((tgt != T.FIELD_PAD[f]).sum())
            return LossParts(torch.stack(sums), torch.stack(counts))
        nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                              ignore_index=T.EVENT_PAD, reduction="sum")
        return LossParts(nll[None], (targets != T.EVENT_PAD).sum()[None])


def loss_from_parts(parts: LossParts, count: Optional[Tensor] = None) -> Tensor:
    """Training loss: the sum over fields of each field's mean cross-entropy (one field for
    event-based). ``count`` overrides the per-field counts (e.g. all-reduced global counts)."""
    count = parts.count if count is None else count
    return (parts.nll_sum / count.clamp_min(1)).sum()


def config_dict(cfg) -> dict:
    """A dataclass config as a plain dict (for checkpoints loaded with weights_only=True)."""
    return asdict(cfg)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
