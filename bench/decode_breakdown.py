#!/usr/bin/env python
"""Where a cpp decoding step's time goes, warm and cache-cold (issue 18's decode target).

    OMP_NUM_THREADS=1 python bench/decode_breakdown.py --out bench/results/decode_breakdown.csv

One process, fp32, B=2, H=8, D=32, Lk=4096, index + time + pitch, Hadamard (bench_targets'
decode configuration). Contenders, timed round-robin by the process's CPU time:

- step: the benchmark's cpp decoding step (append to the KV cache, cached_decode, truncate);
- python: the same step with the decoding op replaced by a no-op (everything but the kernel);
- kernel: the decoding op alone on the full cache (arguments prepared once);
- read_kv: summing the cache's K and V (the bandwidth floor of any step);
- reference: the pure-PyTorch reference op on the same cache (the target's denominator).

"warm" repeats each contender --inner times in a row (caches hold its data, as in the profile);
"cold" reads a 64 MiB buffer before every call (as bench_targets' rotation of five contenders
leaves the caches: no contender finds its 17 MB of K and V in the 32 MiB L3).
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_circular_relative_attention import (DECODE_STEPS, Config, DecodeCache, append_rows,  # noqa: E402
                                               device_name, make_inputs, versions)

COLUMNS = ("state", "contender", "ms", "p20", "p80", "rounds", "threads", "device", "load1", "commit", "date")


def contenders(Lk: int) -> dict:
    from fastattn.ops import _cra_terms
    ops = importlib.import_module("fastattn.ops.circular_relative_attention")
    cfg = Config("cpp", "decode", B=2, H=8, Lq=1, Lk=Lk, D=32)
    inp = make_inputs(cfg, False)
    step = DECODE_STEPS["cpp"](cfg, inp)
    python_step = DECODE_STEPS["cpp"](cfg, inp)

    def python_only():
        real = ops.decode_op
        ops.decode_op = lambda q, *args: q
        try:
            python_step()
        finally:
            ops.decode_op = real

    dc = DecodeCache(inp)  # a full cache for the kernel alone
    c = dc.cache
    c.append(inp.k[:, :, -1:], inp.v[:, :, -1:], inp.onset[:, -1:], inp.pitch[:, -1:])
    kw = {**dict.fromkeys(_cra_terms.TABLE_ARGS), **inp.tables, "bar": None, "position": None, "time_min": 0,
          "pitch_min": -127, **{n: inp.options[n] for n in ("bar_res", "bar_min", "octave_min", "rel_index_min")}}
    lay = _cra_terms.layout(kw, inp.options["combine"], "quotient", cfg.H)
    table_t = _cra_terms.tables(lay, inp.q, transposed=True)["table_t"]
    coords = c.derived("breakdown", lambda cc, n: _cra_terms.token_channels(lay, cc, cfg.B, n, inp.q.device))
    k, v = c.k, c.v
    alpha = inp.options["alpha"]

    def kernel():
        ops.decode_op(inp.q, k, v, table_t, coords, lay.terms, alpha, cfg.D ** -0.5, True, None)

    ref = DECODE_STEPS["reference"](cfg, make_inputs(Config("reference", "decode", B=2, H=8, Lq=1, Lk=Lk, D=32), False))
    kv = (torch.randn(2, 8, Lk, 32), torch.randn(2, 8, Lk, 32))
    return {"step": step, "python": python_only, "kernel": kernel, "read_kv": lambda: (kv[0].sum(), kv[1].sum()),
            "reference": ref}


def measure(fns: dict, rounds: int, inner: int, evict) -> dict:
    times = {n: [] for n in fns}
    for f in fns.values():
        f()
    for _ in range(rounds):
        for name, f in fns.items():
            total = 0.0
            for _ in range(inner):
                if evict is not None:
                    evict()
                t0 = time.process_time()
                f()
                total += time.process_time() - t0
            times[name].append(total / inner * 1e3)
    return times


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--Lk", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--inner", type=int, default=10, help="calls per contender per round")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    meta = dict(threads=torch.get_num_threads(), device=device_name("cpu"), load1=f"{os.getloadavg()[0]:.1f}",
                commit=versions()["commit"], date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    fns = contenders(args.Lk)
    junk = torch.ones(16 << 20)
    rows = []
    with torch.no_grad():
        for state, evict in (("warm", None), ("cold", junk.sum)):
            times = measure(fns, args.rounds, args.inner, evict)
            print(f"{state} (ms of CPU per call, medians of {args.rounds} rounds)")
            for name, t in times.items():
                q = statistics.quantiles(t, n=5, method="inclusive")
                print(f"  {name:10s} {statistics.median(t):7.3f}  (p20 {q[0]:.3f}, p80 {q[3]:.3f})")
                rows.append(dict(state=state, contender=name, ms=f"{statistics.median(t):.4f}", p20=f"{q[0]:.4f}",
                                 p80=f"{q[3]:.4f}", rounds=len(t), **meta))
    if args.out:
        append_rows(args.out, rows, COLUMNS)
        print(f"{len(rows)} rows appended to {args.out}")


if __name__ == "__main__":
    main()
