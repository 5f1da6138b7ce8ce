#!/usr/bin/env python
"""The authors' own BAE code on fastattn's synthetic random-direction data: is our entropy
benchmark's result theirs too?

    python bench/bae_official_synthetic.py --official /work/.mirror/hc495+Binary_Autoencoder/repo \\
        --rank 16 --epochs 2000                       # the paper's defaults (appendix A)
    python bench/bae_official_synthetic.py --official DIR --rank 8 --epochs 100 --start 25 \\
        --alpha-e 1e-5 --alpha-c 1e-5                 # the settings of bench/bench_bae_entropy.py

--official: a checkout of github.com/hc495/Binary_Autoencoder, or its bare git directory (the three
files used are extracted with ``git show`` into a temporary directory). Nothing of it is copied
into this repository. Used verbatim from it: ``module/binarized_autoencoder.py`` (the model:
nn.Linear encoder with bias, ``SignBinarization_sigmoid`` = "sign_s", their default, whose
backward passes g·(1 − g)), ``module/binarization.py`` and ``train/training_objective.py``
(``self_regression_loss``, ``entropy_of_binary_hidden``, ``covarience_of_binary_hidden``). The loop
is theirs (``train/trainer.py: auto_encoder_trainer``) step for step: shuffled batches of --batch
with the last one partial, zero_grad, loss = MSE + α_e·H (α_e = 0 before --start) + α_c·cov,
backward, Adam step; without its per-step wandb logging and per-sample DataLoader collation, which
change no number. Data: :func:`fastattn.sae.entropy.random_direction_data` (d = --dim, 65,536
samples, the first 52,428 for training, the authors' 80 % split), fed uncentred as their code does.

Every --every epochs one JSON line: estimated bits (Σ_j h2(p_j) over all 65,536 samples, the
paper's appendix A), the authors' own validation entropy (``entropy_eval`` per held-out batch of
--batch, averaged, as their trainer logs it), held-out FVU of their decoder and of a least-squares
decoder refitted on the training codes (≈ 1e-15 when the code is lossless), latents that vary.
The last line is the final row; --out appends it to a JSON file.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fastattn.sae.entropy import binary_entropy_bits, random_direction_data

OFFICIAL_FILES = ("module/binarization.py", "module/binarized_autoencoder.py", "train/training_objective.py")


def official_dir(src: str) -> str:
    """A directory holding the authors' files: ``src`` itself, or an extraction of a bare repo."""
    if (Path(src) / "module" / "binarized_autoencoder.py").exists():
        return src
    tmp = Path(tempfile.mkdtemp(prefix="bae_official_"))
    for f in OFFICIAL_FILES:
        (tmp / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp / f).write_text(subprocess.run(["git", "-C", src, "show", f"HEAD:{f}"], check=True,
                                            capture_output=True, text=True).stdout)
    return str(tmp)


def markdown(rows: list) -> str:
    head = ("The authors' BAE code (hc495/Binary_Autoencoder: model, estimator \"sign_s\", loss terms) on fastattn's "
            "random-direction data (d = 64, d' = 256, 65,536 samples, 52,428 for training; Adam, batch 512); "
            "`python bench/bae_official_synthetic.py`, each row's command in bae_entropy_official.json\n\n"
            "| rank | start | data | α_e / α_c | lr | epochs (α_e = 0 before) | estimated bits | authors' val entropy "
            "| held-out FVU | refit FVU | varying latents | note |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    return head + "".join(
        f"| {r['rank']} | {'lossless r-bit code' if r.get('start_at_optimum') is not None else 'nn.Linear init'} | "
        f"{'centred' if r.get('center_data') else 'uncentred'} | {r['alpha_e']:g} / {r['alpha_c']:g} | {r['lr']:g} | "
        f"{r['epoch']}{' of ' + str(r['epochs']) if r['epoch'] != r['epochs'] else ''} ({r['start']}) | "
        f"{r['estimated_bits']:.2f} | {fmt(r.get('val_entropy_authors'), '.2f')} | {r['test_fvu']:.2e} | "
        f"{r['test_fvu_refit']:.1e} | {fmt(r.get('varying_latents'), 'd')} | {r.get('note', '')} |\n" for r in rows)


def fmt(v, spec: str) -> str:
    return "" if v is None else format(v, spec)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--official", required=True)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--expand", type=int, default=4, help="their --inner_expand_rate")
    p.add_argument("--epochs", type=int, default=2000)
    p.add_argument("--start", type=int, default=500, help="their --entropy_start_epoch")
    p.add_argument("--alpha-e", type=float, default=1e-7)
    p.add_argument("--alpha-c", type=float, default=1e-7)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--weight-decay", type=float, default=0.0, help="their --weight_decay (Adam, coupled)")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--binarization", default="sign_s", choices=("sign", "sign_s"))
    p.add_argument("--no-bias", action="store_true", help="their CLI default; their README's usage passes --bias")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--start-at-optimum", type=float, default=None, metavar="S",
                   help="diagnostic (not the authors'): start at the lossless r-bit code, encoder rows "
                        "k < r = S·m_k with bias −S/2 (0 with --center-data), the others 0 with bias −S (never on), decoder "
                        "columns m_k, to see whether training keeps it")
    p.add_argument("--center-data", action="store_true",
                   help="not the authors': subtract the training mean from all data before training "
                        "(what fastattn's default --bae-center mean does inside the model)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)

    sys.path.insert(0, official_dir(a.official))
    from module import binarized_autoencoder  # noqa: E402  (the authors' code)
    from train.training_objective import (  # noqa: E402
        covarience_of_binary_hidden, entropy_of_binary_hidden, self_regression_loss)

    torch.set_num_threads(1)
    torch.manual_seed(a.seed)
    data = random_direction_data(a.rank, a.dim, seed=a.seed)
    model = binarized_autoencoder.BinarizedAutoencoder(
        a.dim, a.expand * a.dim, a.dim, bias=not a.no_bias, binarization_type=a.binarization,
        output_activation="none")
    if a.start_at_optimum is not None:
        with torch.no_grad():
            sc, r = a.start_at_optimum, a.rank
            for prm in model.parameters():
                prm.zero_()
            model.encoder.weight[:r] = sc * data.basis
            model.encoder.bias[:r] = 0.0 if a.center_data else -sc / 2
            model.encoder.bias[r:] = -sc
            model.decoder.weight[:, :r] = data.basis.t()
    opt = torch.optim.Adam(model.parameters(), lr=a.lr, weight_decay=a.weight_decay)
    if a.center_data:
        data = data._replace(x=data.x - data.train.mean(0))
    x_train, test = data.train, data.test

    @torch.no_grad()
    def measure(epoch: int) -> dict:
        y, h = model(data.x)
        p_on = h.double().mean(0)
        yt = y[data.n_train:]
        design = torch.cat([h.double(), torch.ones(len(h), 1, dtype=torch.float64)], 1)
        sol = torch.linalg.lstsq(design[: data.n_train], x_train.double(), driver="gelsd").solution
        var = (test.double() - test.double().mean(0)).pow(2).sum()
        val = [float(binary_entropy_bits(hb.double().mean(0)).sum()) for hb in h[data.n_train:].split(a.batch)]
        return {"epoch": epoch, "estimated_bits": round(float(binary_entropy_bits(p_on).sum()), 3),
                "val_entropy_authors": round(sum(val) / len(val), 3),
                "test_fvu": float((yt - test).pow(2).sum() / (test - test.mean(0)).pow(2).sum()),
                "test_fvu_refit": float((design[data.n_train:] @ sol - test.double()).pow(2).sum() / var),
                "varying_latents": int(((p_on > 0) & (p_on < 1)).sum())}

    t0, row = time.time(), None
    for epoch in range(a.epochs):
        w_e = a.alpha_e if epoch >= a.start else 0
        for idx in torch.randperm(len(x_train)).split(a.batch):
            inputs = x_train[idx]
            opt.zero_grad()
            outputs, hidden = model(inputs)
            loss = (self_regression_loss(inputs, outputs) + w_e * entropy_of_binary_hidden(hidden, threshold=0)
                    + a.alpha_c * covarience_of_binary_hidden(hidden))
            loss.backward()
            opt.step()
        if (epoch + 1) % a.every == 0 or epoch + 1 == a.epochs:
            row = measure(epoch + 1)
            print(json.dumps({**row, "s": round(time.time() - t0)}), flush=True)
    final = {"code": "official", **{k: v for k, v in vars(a).items() if k not in ("official", "out", "every")},
             **row, "true_bits": a.rank, "wall_s": round(time.time() - t0, 1),
             "command": "python bench/bae_official_synthetic.py " + " ".join(
                 shlex.quote(x) for x in (sys.argv[1:] if argv is None else argv))}
    print(json.dumps(final), flush=True)
    if a.out:
        out = Path(a.out)
        rows = json.loads(out.read_text())["rows"] if out.exists() else []
        out.write_text(json.dumps({"rows": rows + [final]}, indent=1) + "\n")
        out.with_suffix(".md").write_text(markdown(rows + [final]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
