"""Tiny models and contexts shared by the tests/test_analyze_*.py files (random init, offline)."""

from __future__ import annotations

import torch

V, D, LAYERS, POS = 97, 16, 2, 40


def tiny_gpt2(seed: int = 0):
    """A randomly initialised 2-layer GPT-2 (vocab 97, width 16) in eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=V, n_positions=POS, n_embd=D, n_layer=LAYERS, n_head=2, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(cfg).eval()


def tiny_subject(seed: int = 0):
    from fastattn.analyze.subjects import HFSubject

    return HFSubject(tiny_gpt2(seed), name="tiny-gpt2")


def tiny_contexts(n_tokens: int = 300, context: int = 16, stride=None, seed: int = 0):
    from fastattn.analyze.subjects import id_contexts

    g = torch.Generator().manual_seed(seed)
    return id_contexts(torch.randint(1, V, (n_tokens,), generator=g).tolist(), context, 0, stride)


def tiny_music(representation: str = "note", seed: int = 0):
    """A random-init 1-layer music Transformer and a 10-song synthetic corpus."""
    from fastattn.analyze.subjects import MusicSubject
    from fastattn.music.model import ModelConfig, MusicTransformer
    from fastattn.music.synthetic import SyntheticConfig, synthetic_corpus

    torch.manual_seed(seed)
    model = MusicTransformer(
        ModelConfig(
            representation=representation,
            variant="Attn",
            n_layer=1,
            d_model=16,
            n_head=2,
            d_ff=32,
            dropout=0.0,
            max_len=128,
            backend="reference",
        )
    )
    return MusicSubject(model, name="tiny-music"), synthetic_corpus(SyntheticConfig(n_songs=10, seed=seed))
