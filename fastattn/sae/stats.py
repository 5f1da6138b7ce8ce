"""Per-feature statistics, burstiness and the 1-bit flip codec of BAE codes (SPEC §5, §6).

- :func:`feature_frequencies` / :func:`frequency_summary`: activation frequency of every latent
  over a store, dead (never fired) and dense (frequency > threshold) counts, a log10 histogram.
- :func:`burstiness`: β = log2(|h − p| + 1e-6) of binary codes h [N, n] against the firing
  rates p [n]; :func:`top_active_features`: a token's active features are its top-10 by β.
- :func:`encode_flips` / :func:`decode_flips`: store only where a token's bit differs from the
  majority bit of its latent (|h − p| > 0.5), as CSR (offsets, latent indices); the round trip
  of h is exact. Choice named here: the majority bit is 1[p > 0.5], so at p = 0.5 exactly a 1 is
  stored as a flip (the rule |h − p| > 0.5 alone would lose that bit, since |1 − 0.5| = |0 − 0.5|).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

BURST_EPS = 1e-6


def burstiness(h: Tensor, p: Tensor) -> Tensor:
    """β [N, n] = log2(|h − p| + 1e-6) for codes h [N, n] (0/1) and firing rates p [n]."""
    return torch.log2((h.double() - p.double()).abs() + BURST_EPS)


def top_active_features(h: Tensor, p: Tensor, k: int = 10):
    """A token's active features: the k latents with the largest β (ties: lower index).
    Returns (beta [N, k] descending, indices [N, k] int64)."""
    beta = burstiness(h, p)
    k = min(k, beta.shape[1])
    values, idx = torch.sort(beta, dim=1, descending=True, stable=True)
    return values[:, :k], idx[:, :k]


class FlipCode(NamedTuple):
    """The 1-bit codec of a code matrix h [N, n]: the majority bit per latent plus each token's flips."""
    majority: Tensor  # [n] bool, 1[p > 0.5]
    offsets: Tensor   # [N + 1] int64, token t's flips are indices[offsets[t]:offsets[t + 1]]
    indices: Tensor   # [F] int64 latent indices (increasing within a token)

    @property
    def n_tokens(self) -> int:
        return self.offsets.numel() - 1

    def bits(self) -> int:
        """Flips stored (the codec's size in entries)."""
        return int(self.indices.numel())


def encode_flips(h: Tensor, p: Optional[Tensor] = None) -> FlipCode:
    """h [N, n] 0/1 (p [n] firing rates; default: h's own column means) -> FlipCode."""
    hb = h != 0
    if p is None:
        p = hb.double().mean(0)
    majority = p > 0.5
    flips = hb ^ majority
    rows, cols = flips.nonzero(as_tuple=True)  # row-major order: cols increase within a row
    counts = torch.bincount(rows, minlength=h.shape[0])
    offsets = torch.zeros(h.shape[0] + 1, dtype=torch.long, device=h.device)
    offsets[1:] = counts.cumsum(0)
    return FlipCode(majority, offsets, cols)


def decode_flips(code: FlipCode) -> Tensor:
    """FlipCode -> h [N, n] bool (exactly the encoded matrix)."""
    N, n = code.n_tokens, code.majority.numel()
    h = code.majority.unsqueeze(0).expand(N, n).clone()
    rows = torch.repeat_interleave(torch.arange(N, device=code.offsets.device), code.offsets.diff())
    h[rows, code.indices] ^= True
    return h


class FrequencySummary(NamedTuple):
    frequency: Tensor      # [n] fraction of tokens each latent fires on
    tokens: int
    dead: int              # latents that never fired
    dense: int             # latents firing on more than dense_frequency of the tokens
    dense_frequency: float

    def as_dict(self) -> dict:
        n = self.frequency.numel()
        return {"latents": n, "tokens": self.tokens, "dead": self.dead, "dead_frac": self.dead / n,
                "dense": self.dense, "dense_frac": self.dense / n, "dense_frequency": self.dense_frequency,
                "mean_frequency": float(self.frequency.mean()),
                "median_frequency": float(self.frequency.median())}


@torch.no_grad()
def feature_frequencies(model, batches, dense_frequency: float = 0.1) -> FrequencySummary:
    """Activation frequency of every latent of a TopKSAE or BinaryAutoencoder over ``batches``."""
    from fastattn.sae.modules import BinaryAutoencoder

    counts, tokens = None, 0
    for x in batches:
        if isinstance(model, BinaryAutoencoder):
            c = model.encode_counts(x)
        else:
            xs, _ = model.preprocess(x)
            values, indices = model.encode(xs)
            c = torch.bincount(indices[values > 0], minlength=model.n_latents)
        counts = c if counts is None else counts + c
        tokens += x.shape[0]
    freq = counts.double() / max(tokens, 1)
    return FrequencySummary(freq, tokens, int((counts == 0).sum()), int((freq > dense_frequency).sum()),
                            dense_frequency)


def frequency_histogram(summaries: dict, path: str, title: str = "activation frequency") -> None:
    """PNG of log10 activation-frequency histograms, one curve per named FrequencySummary;
    never-firing latents are drawn in a separate bin at the left edge."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.linspace(-7, 0, 57)
    for name, s in summaries.items():
        f = s.frequency.numpy()
        logf = np.log10(np.where(f > 0, f, 10 ** -7.5))
        ax.hist(np.clip(logf, -7.5, 0), bins=np.concatenate([[-7.6], bins]), histtype="step", linewidth=1.5,
                label=f"{name}: dead {s.dead}, dense {s.dense} of {f.size}")
    ax.set_xlabel("log10 activation frequency (left bin: never fired)")
    ax.set_ylabel("latents")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
