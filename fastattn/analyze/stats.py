"""`fastattn analyze stats`: feature statistics of trained SAEs/BAEs over one collected layer.

Groups (``schemes``) label each stored token; each scheme gives group names and a group id per
row (−1 = unlabelled):
- ``script`` (text): "ja" when the token's text has kana or CJK ideographs, "en" when it has
  Latin letters; punctuation, digits and special tokens ([CLS], [UNK], <...>) are unlabelled.
- ``pitch_class``, ``octave``, ``track``, ``beat`` (music): from the note's pitch, its track
  (MELODY / BRIDGE / PIANO) and the beat of its onset in a 48-position 4/4 bar; tokens without
  a note attribute (start of song, Bar tokens, ...) are unlabelled.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from fastattn.analyze.features import FeatureAccumulator, group_assignment, token_clusters
from fastattn.analyze.subjects import NOTE_NAMES
from fastattn.sae.stats import FrequencySummary, model_states

_JA = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uff66-\uff9f]")
_EN = re.compile(r"[A-Za-z]")
_SPECIAL = re.compile(r"^(\[[A-Z]+\]|<.*>)$")


def script_of(token: str) -> int:
    """0 = Japanese, 1 = English, −1 = neither (see module docstring)."""
    if _SPECIAL.match(token):
        return -1
    if _JA.search(token):
        return 0
    return 1 if _EN.search(token) else -1


def _music(name: str):
    def ids(rows: dict[str, Tensor], _lut) -> Tensor:
        if name == "track":
            return rows["x_track"]
        if name == "beat":
            o = rows["x_onset"]
            return torch.where(o >= 0, (o % 48) // 12, -1)
        p = rows["x_pitch"]
        if name == "pitch_class":
            return torch.where(p >= 0, p % 12, -1)
        return torch.where(p >= 0, (p // 12).clamp(max=10), -1)  # octave index 0…10 (MIDI octave − 1 + 1)

    return ids


SCHEMES = {
    "script": (("ja", "en"), lambda rows, lut: lut[rows["tokens"]]),
    "pitch_class": (NOTE_NAMES, _music("pitch_class")),
    "octave": (tuple(f"oct{o - 1}" for o in range(11)), _music("octave")),
    "track": (("MELODY", "BRIDGE", "PIANO"), _music("track")),
    "beat": (("beat1", "beat2", "beat3", "beat4"), _music("beat")),
}


@torch.no_grad()
def encode_fires(model, x: Tensor) -> tuple[Tensor, Tensor]:
    """(fires [B, n] bool, strength [B, n]) of a TopKSAE (activations after TopK/ReLU) or a
    BinaryAutoencoder (bits; strength = the pre-activation x W_in + b_in)."""
    from fastattn.sae.modules import BinaryAutoencoder

    if isinstance(model, BinaryAutoencoder):
        pre = model.preactivation(x)
        return pre > 0, pre
    return model_states(model, x)


@torch.no_grad()
def _majority_bits(model, coll, layer: int) -> Tensor:
    """[d'] bool: each BAE bit's value on most of the layer's tokens (1[p > 0.5])."""
    counts, total = None, 0
    for x, _rows in coll.rows(layer):
        c = model.encode_counts(x)
        counts = c if counts is None else counts + c
        total += x.shape[0]
    return counts.double() / max(total, 1) > 0.5


def _summary(values: Tensor, mask: Tensor) -> dict:
    v = values[mask & ~torch.isnan(values)]
    if v.numel() == 0:
        return {"features": 0}
    return {
        "features": int(v.numel()),
        "mean": float(v.mean()),
        "median": float(v.median()),
        "p10": float(v.quantile(0.1)),
        "p90": float(v.quantile(0.9)),
    }


def analyze_layer(
    coll,
    layer: int,
    models: dict[str, object],
    schemes: Sequence[str] = (),
    *,
    threshold: float = 0.9,
    cluster_threshold: float = 0.5,
    dense_frequency: float = 0.1,
    min_firings: int = 10,
    progress: bool = True,
    bae_state: str = "minority",
):
    """Statistics of every model on ``coll``'s layer. Returns (results dict, {name: (FeatureStats,
    R [n])}) — the second for plots.

    ``bae_state``: when a BAE feature "fires". "minority" (default): on the tokens where its bit
    differs from the bit it has on most tokens (fastattn.sae.stats.feature_activity explains why:
    a bit that is 1 almost everywhere is as inactive as one that is 0 almost everywhere); "one":
    where the bit is 1. TopK latents fire where their activation is positive (their usual state
    is 0), so "minority" applies the same rule to both."""
    if bae_state not in ("minority", "one"):
        raise ValueError(f"bae_state must be 'minority' or 'one', got {bae_state!r}")
    for s in schemes:
        if s not in SCHEMES:
            raise ValueError(f"unknown group scheme {s!r}; choose from {sorted(SCHEMES)}")
    vocab = coll.vocab()
    lut = torch.tensor([script_of(t) for t in vocab]) if "script" in schemes else None
    ids, emb = coll.embeddings()
    clusters = token_clusters(emb, cluster_threshold)
    cluster_of = torch.full((len(vocab),), -1, dtype=torch.long)
    cluster_of[ids] = clusters
    results = {
        "layer": layer,
        "collection": str(coll.root),
        "model": coll.meta["model"],
        "threshold": threshold,
        "cluster_threshold": cluster_threshold,
        "token_clusters": int(clusters.max()) + 1,
        "distinct_tokens": int(ids.numel()),
        "min_firings_for_R": min_firings,
        "bae_state": bae_state,
        "models": {},
    }
    raw = {}
    for name, model in models.items():
        n = model.n_latents if hasattr(model, "n_latents") else model.d_hidden
        acc = FeatureAccumulator(n, len(vocab), {s: len(SCHEMES[s][0]) for s in schemes})
        flip = _majority_bits(model, coll, layer) if bae_state == "minority" and not hasattr(model, "n_latents") \
            else torch.zeros(n, dtype=torch.bool)
        rows_iter = coll.rows(layer)
        if progress:
            from tqdm import tqdm

            rows_iter = tqdm(
                rows_iter, total=coll.meta["n_shards"], desc=f"stats {name} L{layer}", unit="shard"
            )
        for x, rows in rows_iter:
            step = max(256, (1 << 23) // n)  # keeps the dense [rows, n] activations near 32 MB
            for lo in range(0, x.shape[0], step):
                sl = slice(lo, lo + step)
                fires, _ = encode_fires(model, x[sl])
                fires = fires ^ flip
                r = {k: v[sl] for k, v in rows.items()}
                acc.add(
                    fires,
                    r["contexts"],
                    r["positions"],
                    r["tokens"],
                    {s: SCHEMES[s][1](r, lut) for s in schemes},
                )
        st = acc.result()
        r_val, h_tok, h_sem = st.monosemanticity(cluster_of)
        live = st.counts >= min_firings
        freq = FrequencySummary(
            st.frequency,
            st.tokens,
            int((st.counts == 0).sum()),
            int((st.frequency > dense_frequency).sum()),
            dense_frequency,
        )
        res = {
            **freq.as_dict(),
            "l0": float(st.counts.sum()) / max(st.tokens, 1),
            "mean_span": _summary(st.mean_span(), st.counts > 0),
            "monosemanticity": _summary(r_val, live),
            "h_token_bits": _summary(h_tok, live),
            "h_semantic_bits": _summary(h_sem, live),
            "groups": {},
        }
        for s in schemes:
            ga = group_assignment(st.group_counts[s], SCHEMES[s][0], threshold)
            rows_s = st.group_rows[s].double()
            res["groups"][s] = {
                "counts": ga["counts"],
                "labelled_rows": int(rows_s.sum()),
                "base_rates": dict(zip(SCHEMES[s][0], (rows_s / rows_s.sum().clamp_min(1)).tolist())),
            }
        results["models"][name] = res
        raw[name] = (st, r_val, freq)
    return results, raw


def plot_stats(raw: dict, results: dict, out_prefix: str, title: str) -> list[str]:
    """PNGs: activation frequency (fastattn.sae.stats.frequency_histogram), span lengths,
    monosemanticity R, and the group assignment counts per scheme. Returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fastattn.sae.stats import frequency_histogram

    paths = [f"{out_prefix}_frequency.png", f"{out_prefix}_spans_R.png"]
    frequency_histogram({k: v[2] for k, v in raw.items()}, paths[0], title=f"{title}: activation frequency")
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, (st, r_val, _f) in raw.items():
        span = st.mean_span()
        span = span[~torch.isnan(span)].numpy()
        a1.hist(
            np.log2(span),
            bins=40,
            histtype="step",
            linewidth=1.5,
            label=f"{name}: mean {span.mean():.2f}" if span.size else name,
        )
        live = (st.counts >= results["min_firings_for_R"]) & ~torch.isnan(r_val)
        rv = r_val[live].numpy()
        a2.hist(
            rv,
            bins=np.linspace(0, 1, 41),
            histtype="step",
            linewidth=1.5,
            label=f"{name}: mean {rv.mean():.3f} ({rv.size} features)" if rv.size else name,
        )
    a1.set_xlabel("log2 mean span length (tokens of consecutive firing)")
    a1.set_ylabel("features")
    a2.set_xlabel("monosemanticity R = 1 − H_semantic / H_token")
    for a in (a1, a2):
        a.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    schemes = next(iter(results["models"].values()))["groups"]
    if schemes:
        fig, axes = plt.subplots(1, len(schemes), figsize=(5.5 * len(schemes), 4), squeeze=False)
        for ax, s in zip(axes[0], schemes):
            labels = [k for k in schemes[s]["counts"]]
            width = 0.8 / max(len(results["models"]), 1)
            for i, (name, res) in enumerate(results["models"].items()):
                c = [res["groups"][s]["counts"][k] for k in labels]
                ax.bar(np.arange(len(labels)) + i * width, c, width, label=name)
            ax.set_xticks(np.arange(len(labels)) + width * (len(results["models"]) - 1) / 2)
            ax.set_xticklabels(labels, rotation=60, fontsize=7)
            ax.set_title(f"{s}: features at ≥{results['threshold']:.0%} of firings")
            ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(f"{out_prefix}_groups.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def finite(x):
    """JSON-safe floats (NaN/inf → None), recursively."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return x
