"""TopK SAE vs BAE at the same width d': the BAE paper's feature comparison (§4.2, Table 1, Fig. 4)
with the same rules for both models (fastattn.sae.stats.feature_activity).

    python -m fastattn.sae.compare --data runs/analyze/minilm/layer_03 \
        --checkpoint topk=runs/cmp/topk/checkpoint.pt --checkpoint bae=runs/cmp/bae/checkpoint.pt \
        --out-dir runs/cmp                                   # trained models on a collected layer
    python -m fastattn.sae.compare --source synthetic --out-dir runs/sae-compare/synthetic  # trains both

Sources when training here: ``synthetic`` (the random-direction data, rank 16, d = 64), ``gpt2``
(hidden states of a randomly initialised tiny Hugging Face GPT-2 on random tokens; needs
transformers) or ``--data`` (an activation store). Both models train with fastattn.sae.train on the
same rows (80 %) and are measured on the held-out 20 %; with ``--checkpoint`` the models are
measured on every row of ``--data``. Reports per model: latents ever active / dead / dense (by the
minority state: a latent is active on a token when its state differs from its usual one; dense
when that happens on > 10 % of tokens), features activated (top-10 by β on >= 8 tokens, the
paper's Table 1 count; TopK also by activation value), mean top-10 β, state-1 latents per token,
entropy Σ h2(p), FVU. Writes summary.json, summary.md and a minority-rate histogram, and prints
the JSON as the last line.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from fastattn.sae.modules import BinaryAutoencoder
from fastattn.sae.stats import FrequencySummary, feature_activity, frequency_histogram
from fastattn.sae.stores import TensorStore
from fastattn.sae.train import TrainConfig, load_trained, train


@torch.no_grad()
def gpt2_hidden_states(tokens: int = 32768, layer: int = 2, d_model: int = 64, n_layer: int = 3,
                       context: int = 64, vocab: int = 2048, seed: int = 0) -> torch.Tensor:
    """[tokens, d_model] hidden states (output of block ``layer``) of a random-init tiny GPT-2 on
    uniformly random token sequences, BOS position dropped."""
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=context, n_embd=d_model, n_layer=n_layer, n_head=4)
    model = GPT2Model(cfg).eval()
    per_seq = context - 1
    n_seq = -(-tokens // per_seq)
    g = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n_seq, 64):
        ids = torch.randint(0, vocab, (min(64, n_seq - start), context), generator=g)
        hs = model(ids, output_hidden_states=True).hidden_states[layer]  # [b, context, d]
        out.append(hs[:, 1:].reshape(-1, d_model))
    return torch.cat(out)[:tokens].float()


@torch.no_grad()
def model_fvu(model, x: torch.Tensor) -> float:
    """FVU of a TopKSAE or BinaryAutoencoder on x [N, d] (streamed in chunks)."""
    num, mean = 0.0, x.double().mean(0)
    for xb in x.split(4096):
        out = model(xb, alpha_entropy=0.0, alpha_cov=0.0) if isinstance(model, BinaryAutoencoder) else model(xb)
        num += float((out.x_hat.double() - xb.double()).pow(2).sum())
    return num / float((x.double() - mean).pow(2).sum())


def measure(models: dict, x: torch.Tensor) -> dict:
    """feature_activity + FVU of every model on x [N, d]; returns {name: dict} (and the activities)."""
    res, acts = {}, {}
    for name, model in models.items():
        model.eval()
        a = feature_activity(model, list(x.split(4096)))
        acts[name] = a
        res[name] = {**a.as_dict(), "fvu": model_fvu(model, x)}
    return res, acts


def minority_histogram(acts: dict, path: str, title: str) -> None:
    """PNG: log10 histogram of every latent's minority-state rate q = min(p, 1 − p)."""
    summaries = {}
    for name, a in acts.items():
        d = a.as_dict()
        summaries[name] = FrequencySummary(a.state_rate, a.tokens, d["dead"], d["dense"], d["dense_frequency"])
    frequency_histogram(summaries, path, title, minority=True)


def markdown(res: dict, title: str) -> str:
    cols = [("ever_active", "ever active"), ("dead", "dead"), ("dense", "dense (minority > 10 %)"),
            ("dense_state_1", "state 1 on > 10 %"), ("features_activated_top10_beta", "activated (top-10 β, ≥ 8)"),
            ("features_activated_top10_value", "activated (top-10 value, ≥ 8)"), ("mean_top10_beta", "mean top-10 β"),
            ("state_on_per_token", "state-1 latents / token"), ("minority_per_token", "minority-state / token"),
            ("entropy_bits", "Σ h2(p) bits"), ("fvu", "FVU")]
    lines = [title, "", "| model | latents | " + " | ".join(c[1] for c in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for name, r in res.items():
        cells = []
        for key, _ in cols:
            v = r.get(key)
            cells.append("–" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v))
        lines.append(f"| {name} | {r['latents']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def train_both(x: torch.Tensor, out_dir: Path, d_hidden: int, k: int, epochs: int, bae_kw: dict,
               seed: int = 0) -> tuple:
    """Train a TopK SAE and a BAE on 80 % of x's rows; returns ({name: model}, held-out rows)."""
    n_train = int(0.8 * x.shape[0])
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    store = TensorStore(x[perm[:n_train]])
    topk_cfg = TrainConfig(model="topk", n_latents=d_hidden, k=k, epochs=epochs, batch_size=512, seed=seed,
                           dead_tokens=max(1, n_train), out_dir=str(out_dir / "topk"), progress=False)
    bae_cfg = TrainConfig(model="bae", n_latents=d_hidden, epochs=epochs, batch_size=512, seed=seed,
                          out_dir=str(out_dir / "bae"), progress=False, **bae_kw)
    models = {f"topk (k={k})": train(topk_cfg, store, resume=False), "bae": train(bae_cfg, store, resume=False)}
    return models, x[perm[n_train:]]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", choices=("synthetic", "gpt2"), default="synthetic")
    p.add_argument("--data", default=None, help="an activation store (overrides --source)")
    p.add_argument("--checkpoint", action="append", default=[], help="NAME=PATH of a trained model (repeat)")
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--rank", type=int, default=16, help="synthetic: coins")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layer", type=int, default=2, help="gpt2: hidden_states index")
    p.add_argument("--k", type=int, default=10, help="TopK active latents")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--ste", default="reference")
    p.add_argument("--alpha", type=float, default=1e-6, help="BAE α_e = α_c")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    if args.data:
        from fastattn.sae.stores import open_store

        x = torch.cat(list(open_store(args.data).iter_rows(8192))).float()
        title = f"store {args.data}"
    elif args.source == "synthetic":
        from fastattn.sae.entropy import random_direction_data

        x = random_direction_data(args.rank, args.dim, samples=args.tokens, seed=args.seed).x
        title = f"random directions r={args.rank}, d={args.dim}"
    else:
        x = gpt2_hidden_states(args.tokens, args.layer, args.dim, seed=args.seed)
        title = f"random-init GPT-2 (d={args.dim}) hidden_states[{args.layer}]"
    out_dir = Path(args.out_dir or f"runs/sae-compare/{'store' if args.data else args.source}")
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"title": title, "rows": x.shape[0], "d": x.shape[1]}
    if args.checkpoint:
        models = {}
        for spec in args.checkpoint:
            name, _, path = spec.rpartition("=")
            cfg, models[name] = load_trained(path)
            meta[name] = {k: v for k, v in vars(cfg).items() if k not in ("out_dir", "progress", "device", "backend")}
        x_eval = x
        meta["measured_on"] = "every row of --data"
    else:
        d_hidden = 4 * x.shape[1]
        bae_kw = dict(ste=args.ste, alpha_entropy=args.alpha, alpha_cov=args.alpha, entropy_off_epochs=args.epochs // 4)
        models, x_eval = train_both(x, out_dir, d_hidden, args.k, args.epochs, bae_kw, args.seed)
        meta.update(epochs=args.epochs, alpha=args.alpha, ste=args.ste, k=args.k, measured_on="held-out 20 %")
    res, acts = measure(models, x_eval)
    minority_histogram(acts, str(out_dir / "minority_rate.png"), title)
    summary = {"meta": meta, "models": res, "png": str(out_dir / "minority_rate.png")}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / "summary.md").write_text(markdown(res, f"{title}: {meta['measured_on']}"))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
