"""CPU cost of one training step of the music Transformer, per attention variant and corpus.

Measures *process CPU time* (user + system) per optimizer step with one torch thread, variants
interleaved step by step, median over steps: on a shared machine CPU time moves far less than
wall time, and with one thread it is what a quiet core would take. Use it to size budgets:
wall time on an idle 2-core machine is roughly CPU time / 1.6 with two threads (measure that
factor with --threads 2 on a quiet machine).

    python bench/music_step_cost.py --corpus synthetic --sizes 2x64 2x128 --steps 6
    python bench/music_step_cost.py --corpus pop909 --data ../shared/data/pop909 --sizes 2x64

Appends rows to bench/results/music_step_cost.csv.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from fastattn.nn import VARIANTS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_circular_relative_attention import append_rows  # noqa: E402

COLUMNS = ("corpus", "representation", "size", "variant", "batch", "mean_len", "threads", "cpu_s_per_step",
           "wall_s_per_step", "loadavg", "steps")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default="synthetic", choices=["synthetic", "pop909"])
    p.add_argument("--data", default=None)
    p.add_argument("--representation", default="note", choices=["note", "event"])
    p.add_argument("--sizes", nargs="+", default=["2x64"], help="LAYERSxWIDTH (head dim 16)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", default="bench/results/music_step_cost.csv")
    a = p.parse_args(argv)

    import torch

    from fastattn.music import data as D
    from fastattn.music.model import ModelConfig, MusicTransformer, loss_from_parts
    from fastattn.music.reproduce import load

    torch.set_num_threads(a.threads)
    corpus = load(a.corpus, a.data)
    n_train = corpus.n_windows("train")
    models = {}
    for size in a.sizes:
        layers, width = (int(x) for x in size.split("x"))
        for v in a.variants.split(","):
            torch.manual_seed(0)
            m = MusicTransformer(ModelConfig(representation=a.representation, variant=v,
                                             n_layer=layers, d_model=width, n_head=width // 16,
                                             d_ff=4 * width, dropout=0.1, max_len=a.max_len))
            models[(size, v)] = (m, torch.optim.AdamW(m.parameters(), 1e-3), [], [])
    lengths = []
    for step in range(a.steps + 1):
        idx, shifts = D.batch_indices(n_train, a.batch_size, 0, step, 5)
        b = D.corpus_batch(corpus, "train", idx, a.representation, a.max_len, shifts)
        lengths.append(b.inputs.shape[1])
        for (m, opt, cpu, wall) in models.values():
            c0, w0 = time.process_time(), time.perf_counter()
            loss = loss_from_parts(m.loss_parts(b.inputs, b.targets, **b.coordinates()))
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step:  # step 0 warms up
                cpu.append(time.process_time() - c0)
                wall.append(time.perf_counter() - w0)
    rows = []
    for (size, v), (_, _, cpu, wall) in models.items():
        rows.append(dict(zip(COLUMNS, [a.corpus, a.representation, size, v, a.batch_size,
                                       round(float(np.mean(lengths[1:]))), a.threads, round(float(np.median(cpu)), 3),
                                       round(float(np.median(wall)), 3), round(os.getloadavg()[0], 1), a.steps])))
        print(rows[-1], flush=True)
    append_rows(Path(a.out), rows, COLUMNS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
