"""BAE entropy dynamics: one BAE per (layer, token position), entropy plotted per layer (SPEC §6).

For every collected layer L and position p (e.g. 2^0 … 2^10, from ``collect --positions pow2``)
the activations at that position of every context form a set of n_contexts vectors; a BAE
(fastattn.sae.train, d' = 4d by default) is trained on 80 % of them and the entropy estimate
Σ_j h2(p_j) (bits, fastattn.sae.entropy) is taken over the whole set, as the spec defines it.
The held-out FVU says whether the code still describes the vectors.

Named choice: each set is standardised before training (centred, then scaled by one scalar so
that the mean squared entry is 1). The BAE loss weighs reconstruction error against α·entropy,
so without this the same α would mean a different trade-off at every layer (embeddings are
orders of magnitude smaller than later residual streams); centring and one global scale leave
the geometry, hence the information, unchanged. ``standardize=False`` trains on the raw vectors.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from fastattn.analyze.collect import Collection, select_position
from fastattn.sae.entropy import estimate_entropy_bits
from fastattn.sae.modules import fvu
from fastattn.sae.stores import TensorStore
from fastattn.sae.train import TrainConfig, train


def entropy_dynamics(
    coll: Collection,
    out_dir: str | Path,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    *,
    d_hidden: int | None = None,
    epochs: int = 30,
    batch_size: int = 256,
    ste: str = "sigmoid",
    alpha: float = 1e-5,
    lr: float | None = None,
    seed: int = 0,
    standardize: bool = True,
    progress: bool = True,
) -> dict:
    """Train a BAE per (layer, position); returns {"entropy_bits": {layer: {position: bits}}, ...}."""
    layers = list(coll.meta["layers"] if layers is None else layers)
    positions = list(coll.meta["positions"] if positions is None else positions)
    out = Path(out_dir)
    jobs = [(L, p) for L in layers for p in positions]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc="entropy dynamics", unit="BAE", dynamic_ncols=True)
    res = {
        "model": coll.meta["model"],
        "collection": str(coll.root),
        "layers": layers,
        "positions": positions,
        "epochs": epochs,
        "ste": ste,
        "alpha": alpha,
        "lr": lr,
        "d_hidden": d_hidden,
        "standardize": standardize,
        "entropy_bits": {},
        "heldout_fvu": {},
        "samples": None,
    }
    for L, p in jobs:
        x = select_position(coll, L, p)
        if x.shape[0] < 10:
            raise ValueError(f"layer {L} position {p}: only {x.shape[0]} vectors; collect more contexts")
        if standardize:
            x = x - x.mean(0)
            x = x / x.pow(2).mean().sqrt().clamp_min(1e-12)
        perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
        n_train = int(0.8 * x.shape[0])
        cfg = TrainConfig(
            model="bae",
            n_latents=d_hidden,
            epochs=epochs,
            batch_size=batch_size,
            ste=ste,
            alpha_entropy=alpha,
            alpha_cov=alpha,
            entropy_off_epochs=epochs // 4,
            seed=seed,
            lr=lr,
            log_every=10**9,
            checkpoint_every=10**12,
            out_dir=str(out / f"L{L:02d}_p{p:04d}"),
            progress=False,
        )
        model = train(cfg, TensorStore(x[perm[:n_train]]), resume=False).eval()
        bits = estimate_entropy_bits(model, x.split(4096))
        with torch.no_grad():
            held = x[perm[n_train:]]
            f = float(fvu(held, model(held, alpha_entropy=0.0, alpha_cov=0.0).x_hat))
        res["entropy_bits"].setdefault(str(L), {})[str(p)] = bits
        res["heldout_fvu"].setdefault(str(L), {})[str(p)] = f
        res["samples"] = int(x.shape[0])
        if bar is not None:
            bar.update(1)
            bar.set_postfix(layer=L, position=p, bits=f"{bits:.1f}")
    if bar is not None:
        bar.close()
    return res


def plot_entropy(res: dict, path: str | Path) -> None:
    """Left: entropy by layer, one line per position. Right: entropy by position, one line per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, positions = res["layers"], res["positions"]
    e = res["entropy_bits"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    cmap = plt.get_cmap("viridis")
    for i, p in enumerate(positions):
        a1.plot(
            layers,
            [e[str(L)][str(p)] for L in layers],
            marker="o",
            color=cmap(i / max(len(positions) - 1, 1)),
            label=f"pos {p}",
        )
    a1.set_xticks(layers)
    a1.set_xlabel("layer (residual stream after L blocks)")
    a1.set_ylabel("BAE entropy estimate (bits)")
    a1.legend(fontsize=7, ncol=2)
    for i, L in enumerate(layers):
        a2.plot(
            positions,
            [e[str(L)][str(p)] for p in positions],
            marker="o",
            color=plt.get_cmap("plasma")(i / max(len(layers) - 1, 1)),
            label=f"layer {L}",
        )
    a2.set_xscale("log", base=2)
    a2.set_xlabel("token position")
    a2.legend(fontsize=7)
    fig.suptitle(
        f"BAE entropy dynamics: {res['model']} ({res['samples']} contexts, α = {res['alpha']:g}, "
        f"d' = {res.get('d_hidden') or '4d'})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
