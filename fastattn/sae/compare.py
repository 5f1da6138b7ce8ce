"""TopK SAE vs BAE at the same width d': activation-frequency histograms, dead and dense counts.

    python -m fastattn.sae.compare --source synthetic --out-dir runs/sae-compare/synthetic
    python -m fastattn.sae.compare --source gpt2 --out-dir runs/sae-compare/gpt2   # needs transformers

Sources: ``synthetic`` (the random-direction data, rank 16, d = 64) or ``gpt2`` (hidden states of a
randomly initialised tiny Hugging Face GPT-2 — models cannot be downloaded here — on random token
sequences: 64-token contexts, the first (BOS) position dropped, the chosen layer's output).
Both models train with fastattn.sae.train on the same store; frequencies are measured on a
held-out split. Prints one JSON object as the last line and writes ``frequencies.png``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from fastattn.sae.entropy import estimate_entropy_bits, random_direction_data
from fastattn.sae.stats import feature_frequencies, frequency_histogram
from fastattn.sae.stores import TensorStore
from fastattn.sae.train import TrainConfig, train


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


def compare(x: torch.Tensor, out_dir: Path, d_hidden: int, k: int, epochs: int, bae_kw: dict,
            seed: int = 0, title: str = "") -> dict:
    n_train = int(0.8 * x.shape[0])
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    train_x, eval_x = x[perm[:n_train]], x[perm[n_train:]]
    store = TensorStore(train_x)
    summaries, result = {}, {"tokens_train": n_train, "tokens_eval": x.shape[0] - n_train, "d": x.shape[1],
                             "d_hidden": d_hidden}
    topk_cfg = TrainConfig(model="topk", n_latents=d_hidden, k=k, epochs=epochs, batch_size=512, seed=seed,
                           dead_tokens=max(1, n_train), out_dir=str(out_dir / "topk"), progress=False)
    bae_cfg = TrainConfig(model="bae", n_latents=d_hidden, epochs=epochs, batch_size=512, seed=seed,
                          out_dir=str(out_dir / "bae"), progress=False, **bae_kw)
    for name, cfg in (("topk", topk_cfg), ("bae", bae_cfg)):
        model = train(cfg, store, resume=False).eval()
        s = feature_frequencies(model, eval_x.split(4096))
        summaries[f"{name} (k={k})" if name == "topk" else "bae"] = s
        with torch.no_grad():
            out = model(eval_x) if name == "topk" else model(eval_x, alpha_entropy=0.0, alpha_cov=0.0)
        fvu = float(out.fvu) if name == "topk" else float(((out.x_hat - eval_x) ** 2).sum()
                                                           / ((eval_x - eval_x.mean(0)) ** 2).sum())
        result[name] = {**s.as_dict(), "fvu": fvu}
        if name == "bae":
            result[name]["entropy_bits"] = estimate_entropy_bits(model, eval_x.split(4096))
    frequency_histogram(summaries, str(out_dir / "frequencies.png"), title=title)
    result["png"] = str(out_dir / "frequencies.png")
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", choices=("synthetic", "gpt2"), default="synthetic")
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--rank", type=int, default=16, help="synthetic: coins")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layer", type=int, default=2, help="gpt2: hidden_states index")
    p.add_argument("--k", type=int, default=8, help="TopK active latents")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--ste", default="sigmoid")
    p.add_argument("--alpha", type=float, default=1e-5, help="BAE α_e = α_c")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    if args.source == "synthetic":
        x = random_direction_data(args.rank, args.dim, samples=args.tokens, seed=args.seed).x
        title = f"random directions r={args.rank}, d={args.dim}"
    else:
        x = gpt2_hidden_states(args.tokens, args.layer, args.dim, seed=args.seed)
        x = x - x.mean(0)  # the GPT-2 residual stream has a large mean direction
        title = f"random-init GPT-2 (d={args.dim}) hidden_states[{args.layer}]"
    out_dir = Path(args.out_dir or f"runs/sae-compare/{args.source}")
    out_dir.mkdir(parents=True, exist_ok=True)
    bae_kw = dict(ste=args.ste, alpha_entropy=args.alpha, alpha_cov=args.alpha, entropy_off_epochs=args.epochs // 4)
    res = compare(x, out_dir, 4 * args.dim, args.k, args.epochs, bae_kw, args.seed, title)
    res.update(source=args.source, epochs=args.epochs, alpha=args.alpha, ste=args.ste)
    (out_dir / "summary.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
