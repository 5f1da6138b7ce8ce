"""Command line: `fastattn sae train | entropy-bench | stats` (also `python -m fastattn.sae ...`).

    fastattn sae train --data acts/ --model topk --latents 4096 --k 32 --epochs 1 --out-dir runs/sae
    fastattn sae entropy-bench --rank 8 --dim 64 [--epochs E] [--no-losses] [--ste S] [--seed S]
        (defaults: 500 epochs, α_e = α_c = 1e-6, α_e = 0 for the first epochs // 4, Adam weight
        decay 3e-6, the authors' "reference" STE, data centred at the training mean, d' = 4d)
    fastattn sae stats --checkpoint runs/sae/checkpoint.pt --data acts/ [--png freq.png]

``entropy-bench`` and ``stats`` print one JSON object as their last line.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fastattn._threads import THREADS_HELP
from fastattn._args import (UsageError, float_range, nonneg_float, nonneg_int, positive_float, positive_int,
                            probability, run, seed, threads)

BACKENDS = ("auto", "cuda", "triton", "cpp", "reference")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    from fastattn.sae.train import TrainConfig

    d = TrainConfig()
    p.add_argument("--model", choices=("topk", "bae"), default=d.model)
    p.add_argument("--latents", type=positive_int, default=None,
                   help="TopK: n (default 32768); BAE: d' (default 4·d)")
    p.add_argument("--k", type=positive_int, default=d.k)
    p.add_argument("--normalize-input", action="store_true")
    p.add_argument("--aux-k", type=positive_int, default=None)
    p.add_argument("--aux-coef", type=nonneg_float, default=d.aux_coef)
    p.add_argument("--dead-tokens", type=positive_int, default=d.dead_tokens)
    p.add_argument("--init-b-pre", choices=("geometric_median", "mean", "zeros"), default=d.init_b_pre,
                   help="TopK: b_pre before step 0 from a data sample (encoder = decoderᵀ)")
    p.add_argument("--init-scale", choices=("data", "unit", "none"), default=d.init_scale,
                   help="TopK: the encoder's initial factor (data: least squares on the sample; unit: Gao et al.'s code)")
    p.add_argument("--ste", choices=("reference", "identity", "sigmoid"), default=d.ste)
    p.add_argument("--bae-center", choices=("mean", "none"), default=d.bae_center,
                   help="BAE: centre the encoder's input at a data sample's mean (none: the authors' code)")
    p.add_argument("--recon", choices=("mse", "l2"), default=d.recon)
    p.add_argument("--alpha-entropy", type=nonneg_float, default=d.alpha_entropy)
    p.add_argument("--alpha-cov", type=nonneg_float, default=d.alpha_cov)
    p.add_argument("--entropy-off-epochs", type=nonneg_int, default=d.entropy_off_epochs)
    p.add_argument("--cov-off-too", action="store_true",
                   help="BAE: α_c = 0 as well during the entropy-off epochs (the authors keep it on)")
    p.add_argument("--lr", type=positive_float, default=None)
    p.add_argument("--lr-decay", type=float_range(0.0, 1.0), default=d.lr_decay,
                   help="fraction of the run at its end with the lr falling linearly to 0 (0: constant)")
    p.add_argument("--weight-decay", type=nonneg_float, default=d.weight_decay,
                   help="Adam's (coupled) weight decay on every parameter, as the authors' --weight_decay")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size)
    p.add_argument("--epochs", type=positive_int, default=d.epochs)
    p.add_argument("--max-steps", type=positive_int, default=None)
    p.add_argument("--seed", type=seed, default=d.seed)
    p.add_argument("--log-every", type=positive_int, default=d.log_every)
    p.add_argument("--checkpoint-every", type=positive_int, default=d.checkpoint_every)
    p.add_argument("--backend", choices=BACKENDS, default=d.backend)
    p.add_argument("--device", default=d.device)
    p.add_argument("--threads", type=threads, default=d.threads, help=THREADS_HELP)
    p.add_argument("--no-progress", action="store_true")


def _config(args, **over):
    from fastattn.sae.train import TrainConfig

    kw = dict(model=args.model, n_latents=args.latents, k=args.k, normalize_input=args.normalize_input,
                       aux_k=args.aux_k, aux_coef=args.aux_coef, dead_tokens=args.dead_tokens,
                       init_b_pre=args.init_b_pre, init_scale=args.init_scale, bae_center=args.bae_center,
                       ste=args.ste,
                       recon=args.recon, alpha_entropy=args.alpha_entropy, alpha_cov=args.alpha_cov,
                       entropy_off_epochs=args.entropy_off_epochs, cov_off_too=args.cov_off_too, lr=args.lr,
                       lr_decay=args.lr_decay, weight_decay=args.weight_decay, batch_size=args.batch_size,
                       epochs=args.epochs, max_steps=args.max_steps, seed=args.seed, log_every=args.log_every,
                       checkpoint_every=args.checkpoint_every, backend=args.backend, device=args.device,
                       progress=not args.no_progress, threads=args.threads)
    kw.update(over)
    if kw["model"] == "topk" and kw["n_latents"] is not None and kw["k"] > kw["n_latents"]:
        raise UsageError(f"--k {kw['k']} exceeds --latents {kw['n_latents']}")
    return TrainConfig(**kw)


def cmd_train(args) -> int:
    from fastattn.sae.stores import open_store
    from fastattn.sae.train import train

    cfg = _config(args, out_dir=args.out_dir)
    store = open_store(args.data, key=args.key)
    train(cfg, store, resume=not args.fresh)
    print(json.dumps({"out_dir": args.out_dir, "checkpoint": str(Path(args.out_dir) / "checkpoint.pt")}))
    return 0


def cmd_entropy_bench(args) -> int:
    import torch

    from fastattn.sae.entropy import estimate_entropy_bits, random_direction_data, refit_fvu
    from fastattn.sae.modules import fvu
    from fastattn.sae.stores import TensorStore
    from fastattn._training import starts_over
    from fastattn.sae.train import train

    if args.no_losses:
        args.alpha_entropy = args.alpha_cov = 0.0
    if args.entropy_off_epochs is None:
        args.entropy_off_epochs = args.epochs // 4  # the authors: 500 of 2000 epochs
    data = random_direction_data(args.rank, args.dim, samples=args.samples, seed=args.seed)
    out_dir = args.out_dir or f"runs/entropy-bench/r{args.rank}_d{args.dim}_s{args.seed}" + (
        "_nolosses" if args.no_losses else "")
    cfg = _config(args, out_dir=out_dir, checkpoint_every=10 ** 12)
    t0 = time.time()
    with starts_over("entropy-bench"):
        model = train(cfg, TensorStore(data.train), resume=False)
    model.eval()
    with torch.no_grad():
        est_all = estimate_entropy_bits(model, data.x.split(8192))
        est_train = estimate_entropy_bits(model, data.train.split(8192))
        est_test = estimate_entropy_bits(model, data.test.split(8192))
        out = model(data.test, alpha_entropy=0.0, alpha_cov=0.0)
        counts = model.encode_counts(data.x)
        refit = refit_fvu(model, data.train, data.test)
    p = counts.double() / data.x.shape[0]
    result = {
        "rank": args.rank, "dim": args.dim, "d_hidden": model.d_hidden, "epochs": args.epochs,
        "losses": not args.no_losses, "alpha_entropy": args.alpha_entropy, "alpha_cov": args.alpha_cov,
        "entropy_off_epochs": args.entropy_off_epochs, "cov_off_too": args.cov_off_too,
        "lr_decay": args.lr_decay, "weight_decay": args.weight_decay, "batch_size": args.batch_size, "ste": args.ste, "seed": args.seed,
        "true_bits": float(args.rank), "estimated_bits": round(est_all, 3),
        "estimated_bits_train": round(est_train, 3), "estimated_bits_test": round(est_test, 3),
        "ratio": round(est_all / args.rank, 4),
        "test_mse": float(out.recon_loss), "test_fvu": float(fvu(data.test, out.x_hat)), "test_fvu_refit": refit,
        "bae_center": args.bae_center,
        # rows written before 4d9f30a/b52ee4d centred the encoder's input only, at a 4,096-row mean
        "center_rule": "training mean, input and output" if args.bae_center == "mean" else "none",
        "varying_latents": int(((p > 0) & (p < 1)).sum()), "time_s": round(time.time() - t0, 1),
    }
    print(json.dumps(result))
    return 0


def cmd_stats(args) -> int:
    from fastattn.sae.entropy import estimate_entropy_bits
    from fastattn.sae.stats import feature_frequencies, frequency_histogram
    from fastattn.sae.stores import open_store

    from fastattn.sae.train import load_trained

    cfg, model = load_trained(args.checkpoint)
    store = open_store(args.data, key=args.key)
    summary = feature_frequencies(model, store.iter_rows(args.batch_size), args.dense_frequency)
    result = {"model": cfg.model, **summary.as_dict()}
    if cfg.model == "bae":
        result["entropy_bits"] = estimate_entropy_bits(model, store.iter_rows(args.batch_size))
    if args.png:
        frequency_histogram({cfg.model: summary}, args.png, title=f"{args.checkpoint}")
        result["png"] = args.png
    print(json.dumps(result))
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``sae`` command (with train | entropy-bench | stats) to a subparsers object."""
    sae = subparsers.add_parser("sae", help="sparse autoencoders: train, entropy benchmark, statistics",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = sae.add_subparsers(dest="sae_command", required=True)

    tr = sub.add_parser("train", help="train a TopK SAE or a BAE on an activation store")
    tr.add_argument("--data", required=True, help=".npy / .safetensors file or a directory of shards")
    tr.add_argument("--key", default="activations", help="tensor name inside .safetensors shards")
    tr.add_argument("--out-dir", default="runs/sae")
    tr.add_argument("--fresh", action="store_true", help="start over: delete --out-dir's checkpoint and metrics")
    _add_train_args(tr)
    tr.set_defaults(func=cmd_train)

    eb = sub.add_parser("entropy-bench", help="BAE entropy estimate on the synthetic random-direction data")
    eb.add_argument("--rank", type=positive_int, required=True, help="r: coins, i.e. true entropy in bits")
    eb.add_argument("--dim", type=positive_int, default=64, help="d: input width (d' = 4d)")
    eb.add_argument("--samples", type=positive_int, default=65536)
    eb.add_argument("--no-losses", action="store_true", help="α_e = α_c = 0")
    eb.add_argument("--out-dir", default=None)
    _add_train_args(eb)
    # The authors' estimator and trainer schedule shape, loss weights 1e-6 (the paper: 1e-7 for
    # 2,000 epochs), Adam weight decay 3e-6 (their --weight_decay; without it rank 32 never leaves
    # 256 balanced bits), 500 epochs, data centred: r bits and lossless at r = 4..32 in ~3-4 CPU
    # minutes each (README, "Entropy benchmark").
    eb.set_defaults(model="bae", epochs=500, ste="reference", alpha_entropy=1e-6, alpha_cov=1e-6, weight_decay=3e-6,
                    entropy_off_epochs=None, log_every=100, func=cmd_entropy_bench)

    st = sub.add_parser("stats", help="activation frequencies, dead/dense counts (and BAE entropy)")
    st.add_argument("--checkpoint", required=True)
    st.add_argument("--data", required=True)
    st.add_argument("--key", default="activations")
    st.add_argument("--batch-size", type=positive_int, default=8192)
    st.add_argument("--dense-frequency", type=probability, default=0.1)
    st.add_argument("--png", default=None, help="write an activation-frequency histogram here")
    st.set_defaults(func=cmd_stats)
    return sae


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastattn")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["sae"] + list(sys.argv[1:] if argv is None else argv))
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
