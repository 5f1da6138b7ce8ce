#!/usr/bin/env python
"""Where a trained BAE's gradient comes from: per loss term (reconstruction, α_e·entropy,
α_c·covariance), per parameter (encoder bias b_in, encoder weights W_in), over the batches of one
epoch, the median over latents of |epoch mean| and of RMS; with the encoder rows' median norm and
the range of firing rates, and how far the model's input centre is from the training mean. |mean| ≈ RMS means a steady push that Adam turns into full-size steps.

    fastattn sae entropy-bench --rank 32 --out-dir runs/eb32          # the default setting
    python bench/bae_gradients.py --checkpoint runs/eb32/checkpoint.pt --rank 32

The checkpoint must come from ``entropy-bench`` (its data are regenerated from rank, dim and seed).
Appends a row to --out.json and rewrites --out.md.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from fastattn.sae.entropy import random_direction_data
from fastattn.sae.train import load_trained

TERMS = ("recon", "entropy", "cov")


def gradient_table(model, data, alpha_entropy: float, alpha_cov: float, batch: int, seed: int = 0,
                   max_batches: int = 0) -> dict:
    """{term: {param: (median |mean|, median RMS)}} over an epoch of shuffled batches of data.train."""
    model.train()
    grads = {t: [] for t in TERMS}
    order = torch.randperm(data.n_train, generator=torch.Generator().manual_seed(seed)).split(batch)
    for idx in order[:max_batches or None]:
        for term in TERMS:
            model.zero_grad()
            out = model(data.train[idx], alpha_entropy=alpha_entropy, alpha_cov=alpha_cov)
            loss = {"recon": out.recon_loss, "entropy": alpha_entropy * out.entropy_loss,
                    "cov": alpha_cov * out.cov_loss}[term]
            loss.backward()
            grads[term].append(torch.cat([model.encoder.bias.grad[:, None], model.encoder.weight.grad], 1).clone())
    table = {}
    for term, g in grads.items():
        g = torch.stack(g).double()
        mean, rms = g.mean(0).abs(), g.pow(2).mean(0).sqrt()
        table[term] = {"b_in": (float(mean[:, 0].median()), float(rms[:, 0].median())),
                       "W_in": (float(mean[:, 1:].median()), float(rms[:, 1:].median()))}
    return table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--max-batches", type=int, default=0, help="0: the whole epoch")
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "bench/results/bae_gradients"))
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    cfg, model = load_trained(a.checkpoint)
    data = random_direction_data(a.rank, a.dim, seed=cfg.seed)
    with torch.no_grad():
        p_on = (model.preactivation(data.x) > 0).double().mean(0)
    row = {"checkpoint": a.checkpoint, "rank": a.rank, "ste": cfg.ste, "alpha_entropy": cfg.alpha_entropy,
           "alpha_cov": cfg.alpha_cov, "epochs": cfg.epochs, "weight_decay": getattr(cfg, "weight_decay", 0.0),
           "center_offset": float((model.input_center.double() - data.train.double().mean(0)).norm()),
           "p_min": float(p_on.min()), "p_max": float(p_on.max()),
           "varying_latents": int(((p_on > 0) & (p_on < 1)).sum()),
           "W_in_row_norm_median": float(model.encoder.weight.detach().norm(dim=1).median()),
           "grad": gradient_table(model, data, cfg.alpha_entropy, cfg.alpha_cov, cfg.batch_size,
                                  max_batches=a.max_batches),
           "command": "python bench/bae_gradients.py --checkpoint " + a.checkpoint + f" --rank {a.rank}"}
    print(json.dumps(row))
    out = Path(a.out)
    rows = json.loads(out.with_suffix(".json").read_text())["rows"] if out.with_suffix(".json").exists() else []
    rows.append(row)
    out.with_suffix(".json").write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    lines = ["Gradient sources of trained BAEs (`python bench/bae_gradients.py`; commands in bae_gradients.json): "
             "median over latents of |epoch mean| / RMS per batch\n",
             "| rank | estimator | α_e / α_c | weight decay | epochs | ‖centre − training mean‖ | firing rates | varying latents | median ‖W_in row‖ "
             "| recon → b_in | recon → W_in | entropy → b_in | entropy → W_in | cov → W_in |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        g = r["grad"]
        cell = lambda t, k: f"{g[t][k][0]:.1e} / {g[t][k][1]:.1e}"  # noqa: E731
        lines.append(f"| {r['rank']} | {r['ste']} | {r['alpha_entropy']:g} / {r['alpha_cov']:g} | {r['weight_decay']:g} | "
                     f"{r['epochs']} | {r['center_offset']:.1e} | {r['p_min']:.3f}–{r['p_max']:.3f} | {r['varying_latents']} | "
                     f"{r['W_in_row_norm_median']:.2f} | {cell('recon', 'b_in')} | {cell('recon', 'W_in')} | "
                     f"{cell('entropy', 'b_in')} | {cell('entropy', 'W_in')} | {cell('cov', 'W_in')} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
