"""Small CPU experiment: validation NLL of the five attention variants at equal steps.

Superseded by ``fastattn music reproduce`` (``fastattn.music.reproduce``: seeds, test NLL per
field, next-bar metrics, rep@k, paired verdicts); kept because the README's current five-variant
table was made with it.

``python -m fastattn.music.experiment --corpus synthetic --seeds 0 1 2 --steps 150``
trains every variant (Attn, RelAttn, RIPO, CirRelAttn, CirRelAttn-H) with the same small
configuration, seed by seed, and reports mean ± standard deviation (over seeds) of the
validation NLL (nats per note token) as a Markdown table. Results append to a JSONL file so an
interrupted run can be continued (finished (variant, seed) pairs are skipped).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from fastattn._io import append_jsonl, read_jsonl

VARIANTS = ("Attn", "RelAttn", "RIPO", "CirRelAttn", "CirRelAttn-H")


def run(corpus_name: str, data, songs: int, seeds, steps: int, out: Path, max_len: int,
        eval_windows: int, time_cap_s: float) -> None:
    import torch

    from fastattn.music.model import ModelConfig
    from fastattn.music.corpus import load_corpus
    from fastattn.music.train import TrainConfig, train

    torch.set_num_threads(2)
    corpus = load_corpus(data, songs=songs, progress=False)
    print(f"{corpus_name}: {corpus.summary()}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    log = out / f"{corpus_name}.jsonl"
    # read_jsonl drops a last line cut short by a kill (that run is redone).
    done = {(r["variant"], r["seed"]) for r in read_jsonl(log)}
    t_start = time.time()
    for seed in seeds:
        for variant in VARIANTS:
            if (variant, seed) in done:
                continue
            if time.time() - t_start > time_cap_s:
                print("time cap reached", flush=True)
                return
            t0 = time.time()
            mc = ModelConfig(representation="note", variant=variant, n_layer=2, d_model=64,
                             n_head=4, d_ff=256, dropout=0.1, max_len=max_len)
            tc = TrainConfig(lr=1e-3, warmup_steps=steps // 10, decay_steps=steps, batch_size=8,
                             max_steps=steps, eval_every=steps, eval_windows=eval_windows,
                             patience=0, seed=seed, out_dir=str(out / f"{corpus_name}-{variant}-{seed}"),
                             progress=False, log_every=steps)
            r = train(mc, tc, corpus, resume=False)
            h = r.history[-1]
            rec = {"corpus": corpus_name, "variant": variant, "seed": seed, "steps": steps,
                   "val_nll": h["val_nll"], "val_loss": h["val_loss"],
                   **{k: v for k, v in h.items() if k.startswith("val_nll_")},
                   "seconds": round(time.time() - t0, 1)}
            append_jsonl(log, rec)
            print(json.dumps(rec), flush=True)


def table(out: Path) -> str:
    """Markdown table of mean ± std validation NLL per corpus and variant."""
    rows = []
    for log in sorted(out.glob("*.jsonl")):
        recs = read_jsonl(log)
        for v in VARIANTS:
            x = np.array([r["val_nll"] for r in recs if r["variant"] == v])
            p = np.array([r["val_nll_pitch"] for r in recs if r["variant"] == v])
            if len(x):
                rows.append(f"| {log.stem} | {v} | {len(x)} | {x.mean():.3f} ± {x.std(ddof=1) if len(x) > 1 else 0:.3f} "
                            f"| {p.mean():.3f} ± {p.std(ddof=1) if len(p) > 1 else 0:.3f} |")
    head = ("| corpus | variant | seeds | valid NLL (nats/note) | of which pitch |\n"
            "|---|---|---:|---:|---:|")
    return head + "\n" + "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--corpus", default="synthetic", help="name of the result file")
    p.add_argument("--data", default=None)
    p.add_argument("--songs", type=int, default=0)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--time-cap", type=float, default=1800, help="seconds")
    p.add_argument("--out", default="runs/music-experiment")
    p.add_argument("--table-only", action="store_true")
    a = p.parse_args(argv)
    if not a.table_only:
        run(a.corpus, a.data, a.songs, a.seeds, a.steps, Path(a.out), a.max_len,
            a.eval_windows, a.time_cap)
    print(table(Path(a.out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
