"""`fastattn music prepare | train | generate | evaluate | demo | reproduce` (also `python -m fastattn.music`).

``register(subparsers)`` adds the ``music`` command to the main ``fastattn`` parser; every
heavy import happens inside the handlers.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fastattn._threads import THREADS_HELP
from fastattn._args import (UsageError, dropout_rate, finite_float, int_range, nonneg_float,
                            nonneg_int, positive_float, positive_int, probability, run, seed, threads)
from fastattn.music.corpus import load_corpus  # (callers that imported it from here still can)

PAPER_WINDOWS = {"train": 35452, "valid": 4749, "test": 4137}


def _add_data_args(p):
    p.add_argument("--data", default=None, help="POP909 folder or folder of MIDI files "
                   "(default: the embedded synthetic corpus)")
    p.add_argument("--songs", type=nonneg_int, default=0, help="use only the first N songs (0 = all)")
    p.add_argument("--data-seed", type=seed, default=0, help="seed of the song split / corpus")
    p.add_argument("--cache", default=None, help="cache folder for prepared data "
                   "(default $FASTATTN_CACHE or ~/.cache/fastattn)")


def _add_sampling_args(p):
    p.add_argument("--temperature", type=nonneg_float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=nonneg_int, default=8, help="0 = no top-k cut")
    p.add_argument("--top-p", type=probability, default=1.0, help="nucleus mass in (0, 1]")


def _sampling(args):
    from fastattn.music.generate import SamplingConfig
    return SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)


def _corpus(args):
    return load_corpus(args.data, seed=args.data_seed, songs=args.songs, cache_dir=args.cache)


# ---------------------------------------------------------------------------------------------
def _prepare(args) -> int:
    from collections import Counter
    c = _corpus(args)
    print(f"data: {args.data or 'embedded synthetic corpus'}")
    print(c.summary())
    if c.stats:
        print("stats: " + ", ".join(f"{k}={v:,}" for k, v in c.stats.items()))
    if c.skipped:
        reasons = Counter(r.split(" (")[0].split(":")[0] for r in c.skipped.values())
        print("skipped: " + "; ".join(f"{n} × {r}" for r, n in reasons.items()))
        for name, why in list(c.skipped.items())[:10]:
            print(f"  {name}: {why}")
    if args.data is not None and not args.songs and c.stats.get("bars", 0) > 50000:
        total = sum(c.n_windows(s) for s in PAPER_WINDOWS)
        print("split   ours     paper    diff")
        for s, ref in PAPER_WINDOWS.items():
            n = c.n_windows(s)
            print(f"{s:<6} {n:>7,}  {ref:>7,}  {100 * (n - ref) / ref:+.1f}%")
        ref = sum(PAPER_WINDOWS.values())
        print(f"{'total':<6} {total:>7,}  {ref:>7,}  {100 * (total - ref) / ref:+.1f}%")
    return 0


def _split_windows(c, split: str) -> int:
    n = c.n_windows(split)
    if n == 0:
        raise UsageError(f"the {split} split has no windows ({c.summary()}); choose another --split")
    return n


def _train(args) -> int:
    import math

    from fastattn.music.model import ModelConfig
    from fastattn.music.train import TrainConfig, train
    if args.dim % args.heads:
        raise UsageError(f"--dim {args.dim} is not divisible by --heads {args.heads}")
    c = _corpus(args)
    mc = ModelConfig(representation=args.representation, variant=args.variant,
                     n_layer=args.layers, d_model=args.dim, n_head=args.heads, d_ff=args.ff,
                     dropout=args.dropout, max_len=args.max_len, alpha=args.alpha,
                     convention=args.convention)
    tc = TrainConfig(lr=args.lr, warmup_steps=args.warmup, decay_steps=args.decay_steps,
                     batch_size=args.batch_size, max_steps=args.steps, eval_every=args.eval_every,
                     eval_windows=args.eval_windows, patience=args.patience, seed=args.seed,
                     max_shift=args.max_shift, log_every=args.log_every, out_dir=args.out,
                     device=args.device, progress=not args.no_progress, threads=args.threads)
    print(f"{c.summary()}; training {mc.variant} ({mc.representation}-based) into {tc.out_dir}")
    r = train(mc, tc, c, resume=not args.fresh)
    if c.n_windows("valid") == 0:
        val = ("no validation set (0 validation windows): no validation, no early stopping, "
               f"no best.pt; checkpoint {r.out_dir / 'last.pt'}")
    elif not math.isfinite(r.best_val):
        val = f"no validation yet; checkpoint {r.out_dir / 'last.pt'}"
    else:
        val = (f"best valid loss {r.best_val:.4f}; checkpoints {r.out_dir / 'last.pt'}, "
               f"{r.out_dir / 'best.pt'}")
    print(f"stopped ({r.stopped}) at step {r.step}: {val}; log {r.out_dir / 'log.jsonl'}")
    return 130 if r.stopped == "interrupted" else 0


def _generate(args) -> int:
    import numpy as np
    import torch
    from fastattn.music import tokens as T
    from fastattn.music.evaluate import continue_piece
    from fastattn.music.metrics import plot_self_similarity, repetition_scores, self_similarity
    from fastattn.music.train import load_model
    if args.prompt_bars >= args.bars:
        raise UsageError(f"--prompt-bars {args.prompt_bars} must be below --bars {args.bars}")
    model = load_model(args.checkpoint)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.prompt:
        prompts = [T.read_midi(args.prompt)]
    else:
        c = _corpus(args)
        n = _split_windows(c, args.split)
        prompts = [c.window(args.split, int(i)) for i in np.linspace(0, n - 1, args.n).round()]
    gen = torch.Generator().manual_seed(args.seed)
    mats = {}
    for k, w in enumerate(prompts):
        notes = continue_piece(model, w, prompt_bars=args.prompt_bars, total_bars=args.bars,
                               sampling=_sampling(args), generator=gen)
        path = out / f"generated_{k}.mid"
        T.write_midi(notes, path)
        S = self_similarity(notes, args.bars)
        mats[f"piece {k}"] = S
        rep = repetition_scores(S)
        print(f"{path}: {len(notes)} notes, repetition@4/8/12 = "
              + "/".join(f"{rep[l]:.2f}" for l in (4, 8, 12)))
    png = out / "self_similarity.png"
    plot_self_similarity(dict(list(mats.items())[:4]), png, f"{model.cfg.variant}")
    print(f"self-similarity: {png}")
    return 0


def _evaluate(args) -> int:
    from fastattn.music.evaluate import evaluate_model
    from fastattn.music.metrics import plot_self_similarity
    from fastattn.music.train import load_model
    import numpy as np
    model = load_model(args.checkpoint)
    c = _corpus(args)
    _split_windows(c, args.split)
    s = evaluate_model(model, c, args.out, name=args.name, split=args.split,
                       nll_windows=args.nll_windows, next_bar_windows=args.next_bar_windows,
                       n_continuations=args.continuations, sampling=_sampling(args),
                       seed=args.seed)
    nll = s["nll"]
    print(f"{args.split} NLL {nll['nll']:.4f} nats/token (ppl {nll['ppl']:.2f}, "
          f"{nll['tokens']:,} tokens); per field: "
          + ", ".join(f"{k[4:]} {v:.3f}" for k, v in nll.items() if k.startswith("nll_")))
    print("next-bar test: " + ", ".join(f"{k} {v:.3f}" for k, v in s["next_bar"].items()))
    print("repetition@4/8/12: " + "/".join(f"{v:.2f}" for v in s["repetition"].values()))
    png = Path(args.out) / f"{args.name}_self_similarity.png"
    plot_self_similarity({args.name: np.array(s["continuations"].S)}, png)
    print(f"self-similarity: {png}")
    print(f"MIDI: {', '.join(s['midi'])}\nmetrics: {Path(args.out) / (args.name + '_metrics.json')}")
    return 0


def _demo(args) -> int:
    from fastattn.music.demo import DemoConfig, run_demo
    from fastattn.music.model import VARIANTS
    bad = [v for v in args.variants.split(",") if v not in VARIANTS]
    if bad or not args.variants:
        raise UsageError(f"--variants: unknown {bad}; choose from {','.join(VARIANTS)}")
    cfg = DemoConfig(data=args.data, out_dir=args.out, steps=args.steps, d_model=args.dim,
                     dropout=args.dropout, top_p=args.top_p, continuations=args.continuations,
                     convention=args.convention,
                     representation=args.representation, variants=tuple(args.variants.split(",")),
                     seed=args.seed, songs=args.songs)
    run_demo(cfg)
    return 0


def _reproduce(args) -> int:
    from fastattn.music import reproduce as R
    out = Path(args.out)
    budget = R.budget_from("paper" if args.paper else args.budget, steps=args.steps,
                           device=args.device, threads=args.threads)
    if args.dry_run:
        import json
        from dataclasses import asdict
        print(json.dumps({"budget": asdict(budget), "convention": args.convention,
                          "corpora": args.corpora.split(","), "variants": args.variants.split(","),
                          "seeds": args.seeds, "out": str(out)}, indent=1))
        return 0
    if not args.report_only:
        R.reproduce(out, corpora=args.corpora.split(","), variants=args.variants.split(","),
                    seeds=args.seeds, budget=budget, data=args.data, songs=args.songs,
                    convention=args.convention, cache_dir=args.cache)
    R.write_report(out)
    print((out / "results.md").read_text())
    print(f"results: {out / 'results.json'}, {out / 'results.md'}; runs: {out / 'runs.jsonl'}")
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``music`` with its subcommands to an argparse subparsers object."""
    from fastattn.music.tokens import N_BARS
    SPLITS = ("train", "valid", "test")
    music = subparsers.add_parser("music", help="music Transformer: prepare | train | generate | "
                                  "evaluate | demo", description=__doc__)
    sub = music.add_subparsers(dest="music_command", required=True)

    p = sub.add_parser("prepare", help="prepare (and cache) POP909 / a MIDI folder; print counts")
    _add_data_args(p)
    p.set_defaults(func=_prepare)

    p = sub.add_parser("train", help="train one attention variant (resumes from OUT/last.pt)")
    _add_data_args(p)
    p.add_argument("--representation", choices=["note", "event"], default="note")
    p.add_argument("--variant", default="CirRelAttn-H",
                   choices=["Attn", "RelAttn", "RIPO", "CirRelAttn", "CirRelAttn-H"])
    p.add_argument("--layers", type=positive_int, default=4)
    p.add_argument("--dim", type=positive_int, default=256)
    p.add_argument("--heads", type=positive_int, default=8)
    p.add_argument("--ff", type=positive_int, default=1024)
    p.add_argument("--dropout", type=dropout_rate, default=0.2, help="in [0, 1)")
    p.add_argument("--max-len", type=nonneg_int, default=0, help="0 = 1024 (note) / 4096 (event)")
    p.add_argument("--alpha", type=finite_float, default=0.1)
    p.add_argument("--convention", choices=["authors", "slides"], default="authors",
                   help="relative-attention rules and event coordinates: the paper authors' code "
                        "(default) or the slides / SPEC §2")
    p.add_argument("--lr", type=positive_float, default=8e-5)
    p.add_argument("--warmup", type=nonneg_int, default=5000)
    p.add_argument("--decay-steps", type=nonneg_int, default=50000)
    p.add_argument("--batch-size", type=positive_int, default=32, help="global batch")
    p.add_argument("--steps", type=positive_int, default=50000)
    p.add_argument("--eval-every", type=positive_int, default=500)
    p.add_argument("--eval-windows", type=nonneg_int, default=0, help="0 = whole valid split")
    p.add_argument("--patience", type=nonneg_int, default=20, help="0 = no early stopping")
    p.add_argument("--log-every", type=positive_int, default=50, help="steps per training-loss record")
    p.add_argument("--max-shift", type=int_range(0, 127), default=5,
                   help="random transposition range (semitones)")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=threads, default=None, help=THREADS_HELP)
    p.add_argument("--out", default="runs/music")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--fresh", "--no-resume", dest="fresh", action="store_true",
                   help="start over (delete OUT's last.pt, best.pt and log) instead of resuming")
    p.set_defaults(func=_train)

    p = sub.add_parser("generate", help="continue prompts (4 → 16 bars) and write MIDI")
    _add_data_args(p)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--prompt", default=None, help="MIDI file to continue (else windows of --split)")
    p.add_argument("--split", default="test", choices=SPLITS)
    p.add_argument("--n", type=positive_int, default=3, help="prompts taken from the split")
    p.add_argument("--prompt-bars", type=int_range(1, N_BARS - 1), default=4)
    p.add_argument("--bars", type=int_range(2, N_BARS), default=16)
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--out", default="runs/music/generated")
    _add_sampling_args(p)
    p.set_defaults(func=_generate)

    p = sub.add_parser("evaluate", help="test NLL, next-bar test, continuations, self-similarity")
    _add_data_args(p)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--split", default="test", choices=SPLITS)
    p.add_argument("--name", default="model")
    p.add_argument("--nll-windows", type=nonneg_int, default=0, help="0 = all windows of the split")
    p.add_argument("--next-bar-windows", type=nonneg_int, default=100)
    p.add_argument("--continuations", type=nonneg_int, default=3)
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--out", default="runs/music/eval")
    _add_sampling_args(p)
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("demo", help="train Attn and CirRelAttn-H briefly on CPU: copy accuracy and "
                       "attention on the bar 4 back, rep@k vs ground truth, MIDI, piano-roll and "
                       "self-similarity PNGs (about 3 minutes)")
    _add_data_args(p)
    p.add_argument("--out", default="runs/music-demo")
    p.add_argument("--steps", type=positive_int, default=1000, help="training steps per variant")
    p.add_argument("--dim", type=positive_int, default=64, help="model width (2 layers, 4 heads)")
    p.add_argument("--dropout", type=dropout_rate, default=0.0, help="in [0, 1)")
    p.add_argument("--top-p", type=probability, default=0.2,
                   help="nucleus sampling of every field (the authors': 0.2)")
    p.add_argument("--continuations", type=positive_int, default=8,
                   help="prompts continued per variant (rep@k is mean ± std over them)")
    p.add_argument("--convention", choices=["authors", "slides"], default="slides",
                   help="attention convention of the models (default: the slides', where this "
                        "budget shows the copying; see the README)")
    p.add_argument("--representation", choices=["note", "event"], default="note")
    p.add_argument("--variants", default="Attn,CirRelAttn-H")
    p.add_argument("--seed", type=seed, default=0)
    p.set_defaults(func=_demo)

    p = sub.add_parser("reproduce", help="the five variants × seeds on synthetic / POP909 / 1/8 "
                       "POP909: NLL, next-bar metrics, rep@k, paired verdicts (JSON + Markdown)")
    _add_data_args(p)
    p.add_argument("--corpora", default="synthetic",
                   help="comma-separated: synthetic, pop909, pop909-eighth")
    p.add_argument("--variants", default="Attn,RelAttn,RIPO,CirRelAttn,CirRelAttn-H")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--budget", choices=["tiny", "cpu", "paper"], default="cpu")
    p.add_argument("--paper", action="store_true", help="the authors' configuration (4 layers × "
                   "256, batch 32, 50k steps; for a GPU): same as --budget paper")
    p.add_argument("--steps", type=int, default=None, help="override the budget's steps")
    p.add_argument("--device", default=None, help="override the budget's device")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 2; "
                   "on 2 cores, two processes with --threads 1 on different --corpora are faster)")
    p.add_argument("--convention", choices=["authors", "slides"], default="authors",
                   help="relative-attention rules and event coordinates (default: the authors')")
    p.add_argument("--out", default="runs/music-reproduce")
    p.add_argument("--report-only", action="store_true", help="only rebuild the report")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved budget and the runs, train nothing")
    p.set_defaults(func=_reproduce)
    return music


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastattn")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["music", *(sys.argv[1:] if argv is None else argv)])
    return run(args)
