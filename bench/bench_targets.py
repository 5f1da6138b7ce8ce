#!/usr/bin/env python
"""The issue-18 speed targets of the attention op, measured interleaved in one process.

    OMP_NUM_THREADS=1 python bench/bench_targets.py --clock cpu --out bench/results/targets.csv

Each group times its contenders round-robin (A, B, C, A, B, C, ...) for --rounds rounds and
reports medians, so that load from other processes falls on all of them alike; ``--clock cpu``
times the process's CPU time (steady for one thread on a shared machine). Groups (fp32, H=8,
D=32, causal, index + time + pitch, Hadamard, paper tables; see bench_circular_relative_attention):

- decode B=2 / B=16, Lk=4096: one generation step through a KV cache holding Lk - 1 tokens
  (append, attend, truncate): cpp's cached path, SDPA (no relative terms) and the reference on
  the same cache, and "read_kv" (summing a cache-sized K and V: the memory-bandwidth floor of any
  step, as every contender reads them once). Targets: cpp <= 2x SDPA and >= 3x faster than the
  reference (B=2); B=16 cpp <= 2x SDPA.
- fwd_bwd L=1024 / 2048: forward + backward of cpp in quotient and fields mode and of SDPA.
  Targets: cpp <= 2x SDPA; fields within 10% of quotient.

Takes about 1 minute of CPU at one thread on the default settings (the reference's decode
steps and the L=2048 backward passes dominate).
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_circular_relative_attention import (DECODE_STEPS, PROVIDERS, Config, _runner, append_rows,  # noqa: E402
                                               device_name, interleave, make_inputs, versions)

COLUMNS = ("group", "contender", "ms", "p20", "p80", "rounds", "target", "ratio", "met", "threads", "clock",
           "device", "load1", "commit", "date")


def decode_step(provider: str, B: int, Lk: int, time_mode: str = "quotient"):
    cfg = Config(provider, "decode", B=B, H=8, Lq=1, Lk=Lk, D=32, time_mode=time_mode)
    inp = make_inputs(cfg, False)
    step = DECODE_STEPS[provider](cfg, inp)

    def run():
        with torch.no_grad():
            out = step()
        assert out is not None, f"{provider}: no decoding path"
    return run


def read_kv(B: int, Lk: int):
    """The bandwidth floor of a decoding step: read a cache-sized K and V once."""
    k, v = torch.randn(B, 8, Lk, 32), torch.randn(B, 8, Lk, 32)
    return lambda: (k.sum(), v.sum())


def fwd_bwd(provider: str, L: int, time_mode: str = "quotient"):
    cfg = Config(provider, "fwd_bwd", B=2, H=8, Lq=L, Lk=L, D=32, time_mode=time_mode)
    inp = make_inputs(cfg, True)
    first, again = _runner("fwd_bwd", *PROVIDERS[provider](cfg, inp), inp)
    first()
    return again


def groups(args):
    """(group, contenders {name: builder}, targets [(description, numerator, denominator, limit)]):
    a target is met when median(numerator) / median(denominator) <= limit."""
    Lk = args.decode_Lk
    yield (f"decode B=2 Lk={Lk}",
           {"cpp": lambda: decode_step("cpp", 2, Lk), "cpp_fields": lambda: decode_step("cpp", 2, Lk, "fields"),
            "sdpa": lambda: decode_step("sdpa", 2, Lk), "reference": lambda: decode_step("reference", 2, Lk),
            "read_kv": lambda: read_kv(2, Lk)},
           [("cpp <= 2x sdpa", "cpp", "sdpa", 2.0), ("fields cpp <= 2x sdpa", "cpp_fields", "sdpa", 2.0),
            ("reference >= 3x cpp", "cpp", "reference", 1 / 3)])
    yield (f"decode B=16 Lk={Lk}",
           {"cpp": lambda: decode_step("cpp", 16, Lk), "sdpa": lambda: decode_step("sdpa", 16, Lk)},
           [("cpp <= 2x sdpa", "cpp", "sdpa", 2.0)])
    for L in args.L:
        yield (f"fwd_bwd L={L}",
               {"cpp": lambda L=L: fwd_bwd("cpp", L), "cpp_fields": lambda L=L: fwd_bwd("cpp", L, "fields"),
                "sdpa": lambda L=L: fwd_bwd("sdpa", L)},
               [("cpp <= 2x sdpa", "cpp", "sdpa", 2.0), ("fields cpp <= 2x sdpa", "cpp_fields", "sdpa", 2.0),
                ("fields <= 1.1x quotient", "cpp_fields", "cpp", 1.1)])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7, help="round-robin rounds per group (medians)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    ap.add_argument("--L", type=int, nargs="+", default=[1024, 2048], help="fwd_bwd sequence lengths")
    ap.add_argument("--decode-Lk", type=int, default=4096)
    ap.add_argument("--max-seconds", type=float, default=120.0, help="stop a group's rounds after this long (3 rounds at least)")
    ap.add_argument("--only", nargs="*", help="run the groups whose name starts with one of these")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    load1 = os.getloadavg()[0]
    meta = dict(threads=torch.get_num_threads(), clock=args.clock, device=device_name("cpu"), load1=f"{load1:.1f}",
                commit=versions()["commit"], date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    rows = []
    print(f"{meta['device']}, clock {args.clock}, load average {load1:.1f}; medians of interleaved rounds (ms)")
    for group, builders, targets in groups(args):
        if args.only and not any(group.startswith(o) for o in args.only):
            continue
        times = interleave({n: b() for n, b in builders.items()}, args.rounds, args.clock, args.max_seconds)
        med = {n: statistics.median(t) for n, t in times.items()}
        print(f"\n{group}")
        for n, t in times.items():
            q = statistics.quantiles(t, n=5, method="inclusive") if len(t) > 1 else t * 4
            print(f"  {n:11s} {med[n]:10.3f}  (p20 {q[0]:.3f}, p80 {q[3]:.3f}, {len(t)} runs)")
            rows.append(dict(group=group, contender=n, ms=f"{med[n]:.4f}", p20=f"{q[0]:.4f}", p80=f"{q[3]:.4f}",
                             rounds=len(t), **meta))
        for desc, a, b, limit in targets:
            ratio = med[a] / med[b]
            met = ratio <= limit
            shown = f"{ratio:.2f}x" if limit >= 1 else f"{1 / ratio:.2f}x faster"
            print(f"  target {desc:26s} {shown:>14s}  {'met' if met else 'NOT met'}")
            rows.append(dict(group=group, contender="", target=desc, ratio=f"{ratio:.4f}", met=met, **meta))
    if args.out:
        append_rows(args.out, rows, COLUMNS)
        print(f"\n{len(rows)} rows appended to {args.out}")


if __name__ == "__main__":
    main()
