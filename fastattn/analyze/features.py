"""Per-feature statistics of SAE/BAE codes over a collection (SPEC §6).

The core works on plain tensors, batch by batch, so that hand-made codes test it exactly:
:class:`FeatureAccumulator` takes firing masks fires [B, n] (bool) with per-row context ids,
positions, token ids and group ids, in storage order (by context, then position), and gathers

- firing counts → activation frequency, dead (never fired) and dense (> 10 % of tokens) counts;
- runs of consecutive firing: a run starts where a feature fires and did not fire at the
  previous position of the same context. Mean span length of a feature = firings / runs
  (meaningful when all positions were collected);
- firings per group (e.g. Japanese / English tokens; pitch class, track, beat) → a feature is
  assigned to a group when at least ``threshold`` (0.9) of its labelled firings fall in it, else
  "mixed" (rows with group −1 are unlabelled and not counted);
- (feature, token) firing counts, kept sparse → monosemanticity R = 1 − H_semantic / H_token,
  H_token the entropy (bits) of the feature's firing distribution over token ids, H_semantic over
  clusters of token embeddings (:func:`token_clusters`); R = 1 when H_token = 0.

"Firing": a TopK latent with a positive activation; a BAE bit equal to 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor


def _entropy_bits_by_feature(feat: Tensor, counts: Tensor, n: int) -> Tensor:
    """Entropy [n] (bits) of each feature's distribution given sparse (feature, count) entries."""
    total = torch.zeros(n, dtype=torch.float64).index_add_(0, feat, counts.double())
    p = counts.double() / total[feat]
    h = torch.zeros(n, dtype=torch.float64).index_add_(0, feat, -p * torch.log2(p))
    return h


def _merge(keys: Tensor, counts: Tensor, new_keys: Tensor, new_counts: Tensor):
    k = torch.cat([keys, new_keys])
    uk, inv = torch.unique(k, return_inverse=True)
    return uk, torch.zeros(uk.numel(), dtype=torch.long).index_add_(0, inv, torch.cat([counts, new_counts]))


def token_clusters(embeddings: Tensor, threshold: float = 0.5) -> Tensor:
    """Cluster ids [V] of token embeddings [V, d] by cosine similarity (leader clustering, in row
    order): a token joins the most similar existing cluster leader when their cosine similarity
    is ≥ ``threshold``, else it founds a new cluster. Identical directions always share a cluster."""
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be a cosine similarity in [-1, 1], got {threshold}")
    e = embeddings.double()
    e = e / e.norm(dim=1, keepdim=True).clamp_min(1e-12)
    leaders: list[int] = []
    out = torch.empty(e.shape[0], dtype=torch.long)
    for i in range(e.shape[0]):
        if leaders:
            sims = e[leaders] @ e[i]
            j = int(sims.argmax())
            if sims[j] >= threshold - 1e-12:
                out[i] = j
                continue
        out[i] = len(leaders)
        leaders.append(i)
    return out


class FeatureStats(NamedTuple):
    counts: Tensor  # [n] firings
    tokens: int  # rows seen
    runs: Tensor  # [n] runs of consecutive firing
    group_counts: dict[str, Tensor]  # scheme -> [n, G] firings per group (labelled rows only)
    group_rows: dict[str, Tensor]  # scheme -> [G] rows per group (base rates)
    pair_keys: Tensor  # [P] feature · vocab + token, sorted
    pair_counts: Tensor  # [P] firings of each (feature, token)
    vocab_size: int

    @property
    def frequency(self) -> Tensor:
        return self.counts.double() / max(self.tokens, 1)

    def mean_span(self) -> Tensor:
        """[n] firings / runs (NaN for dead features)."""
        return torch.where(
            self.runs > 0,
            self.counts.double() / self.runs.clamp_min(1).double(),
            torch.tensor(float("nan"), dtype=torch.float64),
        )

    def monosemanticity(self, cluster_of: Tensor):
        """(R [n], H_token [n], H_semantic [n]) with ``cluster_of`` [vocab] the cluster of every
        token id (R NaN for dead features; 1 where H_token = 0)."""
        n = self.counts.numel()
        feat, tok = self.pair_keys // self.vocab_size, self.pair_keys % self.vocab_size
        h_tok = _entropy_bits_by_feature(feat, self.pair_counts, n)
        ck, cc = _merge(
            torch.zeros(0, dtype=torch.long),
            torch.zeros(0, dtype=torch.long),
            feat * self.vocab_size + cluster_of[tok],
            self.pair_counts,
        )
        h_sem = _entropy_bits_by_feature(ck // self.vocab_size, cc, n)
        r = torch.where(h_tok > 1e-12, 1 - h_sem / h_tok.clamp_min(1e-12), torch.ones_like(h_tok))
        r[self.counts == 0] = float("nan")
        return r, h_tok, h_sem


class FeatureAccumulator:
    """Streams firing masks into :class:`FeatureStats` (see the module docstring)."""

    def __init__(self, n_latents: int, vocab_size: int, group_sizes: dict[str, int] | None = None):
        self.n, self.V = n_latents, vocab_size
        self.group_sizes = dict(group_sizes or {})
        self.counts = torch.zeros(n_latents, dtype=torch.long)
        self.runs = torch.zeros(n_latents, dtype=torch.long)
        self.group_counts = {
            s: torch.zeros(n_latents, G, dtype=torch.long) for s, G in self.group_sizes.items()
        }
        self.group_rows = {s: torch.zeros(G, dtype=torch.long) for s, G in self.group_sizes.items()}
        self.keys = torch.zeros(0, dtype=torch.long)
        self.kcounts = torch.zeros(0, dtype=torch.long)
        self.tokens = 0
        self._prev = None  # (fires [n], context, position) of the last row seen

    def add(
        self,
        fires: Tensor,
        contexts: Tensor,
        positions: Tensor,
        tokens: Tensor,
        groups: dict[str, Tensor] | None = None,
    ) -> None:
        """fires [B, n] bool; contexts, positions, tokens [B] int64; groups: scheme name → [B]
        int64 group ids (−1 = unlabelled), one entry per scheme given to the constructor."""
        B = fires.shape[0]
        if fires.dim() != 2 or fires.shape[1] != self.n:
            raise ValueError(f"fires must be [B, {self.n}], got {tuple(fires.shape)}")
        for name, t in (("contexts", contexts), ("positions", positions), ("tokens", tokens)):
            if t.shape != (B,):
                raise ValueError(f"{name} must be [{B}], got {tuple(t.shape)}")
        if B == 0:
            return
        if tokens.min() < 0 or tokens.max() >= self.V:
            raise ValueError(
                f"token ids must be in [0, {self.V}), got [{int(tokens.min())}, {int(tokens.max())}]"
            )
        fires = fires.bool()
        self.counts += fires.sum(0)
        self.tokens += B
        # Runs: a firing starts a run unless the previous row is the previous position of the
        # same context and the feature fired there too (the previous batch's last row included).
        same = (contexts[1:] == contexts[:-1]) & (positions[1:] == positions[:-1] + 1)
        prev_fire = torch.cat([fires[:1] & False, fires[:-1]])
        cont = torch.cat([torch.zeros(1, dtype=torch.bool), same])
        if self._prev is not None:
            pf, pc, pp = self._prev
            prev_fire[0] = pf
            cont[0] = bool(contexts[0] == pc and positions[0] == pp + 1)
        self.runs += (fires & ~(prev_fire & cont[:, None])).sum(0)
        self._prev = (fires[-1].clone(), int(contexts[-1]), int(positions[-1]))
        groups = groups or {}
        if set(groups) != set(self.group_sizes):
            raise ValueError(f"groups must have the schemes {sorted(self.group_sizes)}, got {sorted(groups)}")
        for name, g in groups.items():
            G = self.group_sizes[name]
            if g.shape != (B,):
                raise ValueError(f"groups[{name!r}] must be [{B}], got {tuple(g.shape)}")
            if g.max() >= G:
                raise ValueError(f"groups[{name!r}]: ids must be < {G}, got {int(g.max())}")
            onehot = torch.zeros(B, G, dtype=torch.float64)
            lab = (g >= 0).nonzero().squeeze(1)
            onehot[lab, g[lab]] = 1
            self.group_counts[name] += (fires.double().t() @ onehot).round().long()
            self.group_rows[name] += onehot.sum(0).long()
        r, f = fires.nonzero(as_tuple=True)
        keys = f * self.V + tokens[r]
        uk, c = torch.unique(keys, return_counts=True)
        self.keys, self.kcounts = _merge(self.keys, self.kcounts, uk, c)

    def result(self) -> FeatureStats:
        return FeatureStats(
            self.counts,
            self.tokens,
            self.runs,
            self.group_counts,
            self.group_rows,
            self.keys,
            self.kcounts,
            self.V,
        )


def group_assignment(group_counts: Tensor, names: Sequence[str], threshold: float = 0.9) -> dict[str, object]:
    """Per feature: the group holding ≥ ``threshold`` of its labelled firings, else "mixed";
    features without labelled firings (dead ones included) are "unlabelled". Returns the labels [n]
    and the counts per label."""
    if not 0.5 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0.5, 1], got {threshold}")
    if group_counts.shape[1] != len(names):
        raise ValueError(f"{group_counts.shape[1]} groups but {len(names)} names")
    total = group_counts.sum(1)
    frac = group_counts.double() / total.clamp_min(1)[:, None].double()
    best = frac.argmax(1)
    labels = []
    for i in range(group_counts.shape[0]):
        if total[i] == 0:
            labels.append("unlabelled")
        elif frac[i, best[i]] >= threshold:
            labels.append(names[int(best[i])])
        else:
            labels.append("mixed")
    summary = {name: labels.count(name) for name in list(names) + ["mixed", "unlabelled"]}
    return {"labels": labels, "counts": summary, "fractions": frac}
