"""Per-feature statistics, burstiness and the 1-bit flip codec of BAE codes (SPEC §5, §6).

- :func:`feature_frequencies` / :func:`frequency_summary`: activation frequency of every latent
  over a store, dead (never fired) and dense (frequency > threshold) counts, a log10 histogram.
- :func:`burstiness`: β = log2(|h − p| + 1e-6) of binary codes h [N, n] against the firing
  rates p [n]; :func:`top_active_features`: a token's active features are its top-10 by β.
- :func:`feature_activity`: the BAE paper's feature comparison applied the same way to a BAE and a
  TopK SAE (each latent's state per token: bit = 1, or activation > 0): dead / ever active /
  dense by the *minority state*, top-10-by-β activity ("features activated"), burstiness.
- :func:`encode_flips` / :func:`decode_flips`: store only where a token's bit differs from the
  majority bit of its latent (|h − p| > 0.5), as CSR (offsets, latent indices); the round trip
  of h is exact. Choice named here: the majority bit is 1[p > 0.5], so at p = 0.5 exactly a 1 is
  stored as a flip (the rule |h − p| > 0.5 alone would lose that bit, since |1 − 0.5| = |0 − 0.5|).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from fastattn.sae.entropy import binary_entropy_bits
from fastattn.sae.modules import DENSE_FREQUENCY

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
    frequency: Tensor      # [n] fraction of tokens each latent fires on (bit 1 / activation > 0)
    tokens: int
    dead: int              # latents that never leave their usual state (see feature_activity)
    dense: int             # latents in their minority state on more than dense_frequency of the tokens
    dense_frequency: float

    def as_dict(self) -> dict:
        n = self.frequency.numel()
        return {"latents": n, "tokens": self.tokens, "dead": self.dead, "dead_frac": self.dead / n,
                "dense": self.dense, "dense_frac": self.dense / n, "dense_frequency": self.dense_frequency,
                "mean_frequency": float(self.frequency.mean()),
                "median_frequency": float(self.frequency.median())}


@torch.no_grad()
def feature_frequencies(model, batches, dense_frequency: float = 0.1) -> FrequencySummary:
    """Activation frequency of every latent of a TopKSAE or BinaryAutoencoder over ``batches``;
    dead and dense by the minority state q = min(p, 1 − p) (q = 0; q > ``dense_frequency``), the
    rule of :func:`feature_activity` for both models (for a TopK latent that fires on fewer than
    half the tokens, the usual "never fired" and "fires on more than 10 %")."""
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
    q = torch.minimum(freq, 1 - freq)
    return FrequencySummary(freq, tokens, int((q == 0).sum()), int((q > dense_frequency).sum()), dense_frequency)


def frequency_histogram(summaries: dict, path: str, title: str = "activation frequency",
                        minority: bool = False) -> None:
    """PNG of log10 activation-frequency histograms, one curve per named FrequencySummary;
    never-firing latents are drawn in a separate bin at the left edge. ``minority``: plot each
    latent's minority-state rate min(p, 1 − p) instead of p (see :func:`feature_activity`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.linspace(-7, np.log10(0.5) if minority else 0, 57)
    for name, s in summaries.items():
        f = s.frequency.numpy()
        f = np.minimum(f, 1 - f) if minority else f
        logf = np.log10(np.where(f > 0, f, 10 ** -7.5))
        ax.hist(np.clip(logf, -7.5, 0), bins=np.concatenate([[-7.6], bins]), histtype="step", linewidth=1.5,
                label=f"{name}: dead {s.dead}, dense {s.dense} of {f.size}")
    if minority:
        ax.axvline(np.log10(next(iter(summaries.values())).dense_frequency), color="gray", linestyle=":")
        ax.set_xlabel("log10 minority-state rate min(p, 1 − p)   (left bin: never leaves its state)")
    else:
        ax.set_xlabel("log10 activation frequency (left bin: never fired)")
    ax.set_ylabel("latents")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


TOP_ACTIVE = 10      # a token's active features: its top-10 by β (the BAE paper, §4.1)
MIN_ACTIVATIONS = 8  # a feature counts as "activated" when active on at least this many tokens (Table 1)


@torch.no_grad()
def model_states(model, x: Tensor):
    """(state [N, n] bool, strength [N, n] or None) of a TopKSAE (activation > 0; strength = the
    activation) or a BinaryAutoencoder (bit = 1; no strength: β plays that part)."""
    from fastattn.sae.modules import BinaryAutoencoder

    if isinstance(model, BinaryAutoencoder):
        return model.preactivation(x) > 0, None
    xs, _ = model.preprocess(x)
    values, indices = model.encode(xs)
    acts = torch.zeros(x.shape[0], model.n_latents, dtype=values.dtype).scatter_(1, indices, values)
    return acts > 0, acts


class FeatureActivity(NamedTuple):
    """Per-latent activity over a set of tokens (see :func:`feature_activity`)."""
    state_rate: Tensor        # [n] p: fraction of tokens with bit 1 / positive activation
    top_beta: Tensor          # [n] tokens on which the latent is among the top-10 by β
    top_value: Optional[Tensor]  # [n] TopK only: tokens on which it is among the top-10 by activation
    tokens: int
    mean_top_beta: float      # mean β of a token's top-10 (burstiness of what a token activates)
    state_on_per_token: float   # mean number of latents with state 1 per token
    minority_per_token: float   # mean number of latents in their minority state per token

    @property
    def minority_rate(self) -> Tensor:
        """[n] q = min(p, 1 − p): how often the latent leaves its usual state."""
        return torch.minimum(self.state_rate, 1 - self.state_rate)

    def as_dict(self, dense: float = DENSE_FREQUENCY, min_tokens: int = MIN_ACTIVATIONS) -> dict:
        q, n = self.minority_rate, self.state_rate.numel()
        out = {"latents": n, "tokens": self.tokens,
               "ever_active": int((q > 0).sum()), "dead": int((q == 0).sum()),
               "dense": int((q > dense).sum()), "dense_frequency": dense,
               "dense_state_1": int((self.state_rate > dense).sum()),
               "features_activated_top10_beta": int((self.top_beta >= min_tokens).sum()),
               "min_tokens": min_tokens, "mean_top10_beta": self.mean_top_beta,
               "state_on_per_token": self.state_on_per_token, "minority_per_token": self.minority_per_token,
               "entropy_bits": float(binary_entropy_bits(self.state_rate).sum())}
        if self.top_value is not None:
            out["features_activated_top10_value"] = int((self.top_value >= min_tokens).sum())
        return out


@torch.no_grad()
def feature_activity(model, batches, top: int = TOP_ACTIVE) -> FeatureActivity:
    """Activity of every latent of a TopKSAE or BinaryAutoencoder over ``batches`` (an iterable
    of [B, d] tensors, read twice: a callable returning a fresh iterable, or a list).

    The same rules for both models, on each latent's binary state per token (BAE: its bit; TopK:
    activation > 0) with p its rate over all tokens:
    - *minority state*: a latent is active on a token when its state differs from its usual one
      (1[p > 0.5]). For TopK latents (p < 0.5) that is "fires"; for a BAE bit it is whichever of
      0/1 is rare — a bit that is 1 on 95 % of tokens carries as little as one that is 0 there
      (the decoder bias absorbs the constant), so "bit = 1" is no measure of a binary latent's
      activity. Dead: never leaves its usual state (q = min(p, 1 − p) = 0); ever active: q > 0;
      dense: q > 0.1 (``as_dict``), i.e. the latent changes state on more than 10 % of tokens.
    - *top-10 by β* (the paper, §4.1): β = log2(|s − p| + 1e-6); a token's active features are its
      10 largest β; a feature is "activated" when active on >= 8 tokens (Table 1). TopK also gets
      the paper's rule for SAEs: the top-10 by activation value.
    """
    source = batches if callable(batches) else (lambda: batches)
    counts, tokens, on = None, 0, 0
    for x in source():
        st, _ = model_states(model, x)
        c = st.sum(0)
        counts = c if counts is None else counts + c
        tokens += x.shape[0]
        on += int(c.sum())
    if counts is None:
        raise ValueError("feature_activity: no data")
    p = counts.double() / tokens
    majority = p > 0.5
    n = p.numel()
    top_beta = torch.zeros(n, dtype=torch.long)
    top_value = None
    beta_sum, minority = 0.0, 0
    k = min(top, n)
    for x in source():
        st, strength = model_states(model, x)
        beta, idx = top_active_features(st, p, k)
        top_beta += torch.bincount(idx.flatten(), minlength=n)
        beta_sum += float(beta.sum())
        minority += int((st ^ majority).sum())
        if strength is not None:
            v, i = strength.topk(k, dim=1)
            top_value = torch.zeros(n, dtype=torch.long) if top_value is None else top_value
            top_value += torch.bincount(i[v > 0], minlength=n)
    return FeatureActivity(p, top_beta, top_value, tokens, beta_sum / (tokens * k), on / tokens, minority / tokens)
