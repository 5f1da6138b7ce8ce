"""Worst fp32 error of the fused backends against the reference over random configurations.

    python bench/accuracy_circular_relative_attention.py [--configs 40] [--backend cpp]

Unit-scale random inputs (tests/helpers.make_problem): every term set, both combines, causal or
not, key padding, shared or per-head tables, decode shapes. Prints the max |error| of the output
and of every gradient (q, k, v, tables).
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import make_problem, run  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", type=int, default=40)
    ap.add_argument("--backend", default="cpp")
    args = ap.parse_args()
    worst_f = worst_g = 0.0
    for seed in range(args.configs):
        g = torch.Generator().manual_seed(seed)
        pick = lambda xs: xs[int(torch.randint(len(xs), (1,), generator=g))]  # noqa: E731
        Lk = pick([7, 33, 129, 256])
        cfg = dict(terms=pick(["all", "direct", "fields", "index", "time", "pitch"]),
                   per_head=pick([True, False]), kpm=pick([True, False]), Lq=pick([1, 5, Lk]), Lk=Lk,
                   D=pick([16, 32, 64]), B=2, H=2, seed=seed, scale_tables=1.0)
        extra = dict(causal=pick([True, False]), combine=pick(["hadamard", "add"]))
        prob = make_problem(dtype=torch.float32, **cfg)
        o1, g1 = run("reference", *prob, **extra)
        o2, g2 = run(args.backend, *prob, **extra)
        worst_f = max(worst_f, (o1 - o2).abs().max().item())
        worst_g = max(worst_g, max((a - b).abs().max().item() for a, b in zip(g1, g2)))
    print(f"fp32 {args.backend} vs reference, {args.configs} random configs: "
          f"max |out err| = {worst_f:.2e}, max |grad err| = {worst_g:.2e}")


if __name__ == "__main__":
    main()
