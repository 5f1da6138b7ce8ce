#!/usr/bin/env python
"""How much one busy core slows the cpp attention down: decoding steps and small-model training
steps timed on an idle machine and with a spinning competitor process on one core, which this
script starts and stops itself.

    python bench/bench_contention.py                       # torch's thread count (all cores)
    python bench/bench_contention.py --rounds 3 --threads 2 --out bench/results/contention.csv

Workloads (each beside its plain-attention counterpart):
- decode: one decoding step (KV cache of --decode-Lk keys, B=2, H=8, D=32, the paper's terms)
  by the cached cpp path, and by SDPA on the same cache;
- train: one optimizer step of a small music Transformer (the demo's: 2 layers x 128, 4 heads, dropout 0.1, batch 8,
  --train-notes notes, note-based) with CirRelAttn-H, and with vanilla SDPA attention; each at the
  fixed thread count and with ``--threads auto``'s governor ("cpp+auto", "sdpa+auto").
Rounds alternate idle and busy blocks (the competitor, ``python -c "while True: pass"``, runs
only during busy blocks); each block times --steps steps; medians over blocks. The ratio
busy/idle is the slowdown (the issue's target: at most 2.5 for decode and training steps).
The load average before the run is stored with the rows: on a machine that is already shared,
"idle" is not idle, so say so when reporting.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_circular_relative_attention import (Config, DECODE_STEPS, append_rows, device_name,  # noqa: E402
                                               make_inputs, versions)
from fastattn._threads import ThreadGovernor  # noqa: E402

COLUMNS = ("workload", "provider", "state", "ms", "p20", "p80", "slowdown", "threads", "device", "load1",
           "commit", "date")


class Competitor:
    """A process spinning on one core while the context is active."""

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(0.2)  # let the scheduler place it
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()


def decode_workloads(args):
    out = {}
    for provider in ("cpp", "sdpa"):
        cfg = Config(provider, "decode", B=2, H=8, Lq=1, Lk=args.decode_Lk, D=32)
        step = DECODE_STEPS[provider](cfg, make_inputs(cfg, requires_grad=False))

        def run(step=step, threads=torch.get_num_threads()):
            torch.set_num_threads(threads)  # a "+auto" training block may have lowered it
            with torch.no_grad():
                step()
        out[("decode", provider)] = run
    return out


def train_workloads(args):
    from bench_music_model import SDPA, build, coords, random_notes
    from fastattn.music.model import loss_from_parts
    shape = argparse.Namespace(layers=2, width=128, heads=4, notes=args.train_notes, gen_prompt=1, gen_notes=1,
                               dropout=0.1, convention="authors")
    tok, onset, pitch = random_notes(8, args.train_notes + 1)
    out = {}
    threads = torch.get_num_threads()
    for variant, provider in (("CirRelAttn-H", "cpp"), (SDPA, "sdpa")):
        model = build(variant, shape).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        # "+auto": the training loops' --threads auto (fastattn._threads.ThreadGovernor), ticked
        # once per step as music/sae train do; the plain rows keep the fixed count.
        for policy in ("fixed", "auto"):
            gov = ThreadGovernor(threads) if policy == "auto" else None

            def run(model=model, opt=opt, gov=gov):
                torch.set_num_threads(gov.tick() if gov is not None else threads)
                opt.zero_grad(set_to_none=True)
                loss_from_parts(model.loss_parts(tok[:, :-1], tok[:, 1:],
                                                 **coords(onset[:, :-1], pitch[:, :-1]))).backward()
                opt.step()
            out[("train", provider + ("+auto" if gov is not None else ""))] = run
    return out


def block(fn, steps):
    fn()  # warm-up (also after the competitor starts)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", nargs="+", choices=("decode", "train"), default=["decode", "train"])
    p.add_argument("--rounds", type=int, default=3, help="idle/busy block pairs")
    p.add_argument("--steps", type=int, default=20, help="timed steps per block (training: a quarter)")
    p.add_argument("--decode-Lk", type=int, default=4096)
    p.add_argument("--train-notes", type=int, default=256)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "contention.csv")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = {**versions(), "device": device_name("cpu"), "threads": torch.get_num_threads(),
            "load1": f"{os.getloadavg()[0]:.1f}",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    print(f"contention benchmark: {meta['device']}, load average {meta['load1']} before the run")
    fns = {}
    if "decode" in args.workloads:
        fns.update(decode_workloads(args))
    if "train" in args.workloads:
        fns.update(train_workloads(args))
    times = {(key, state): [] for key in fns for state in ("idle", "busy")}
    for r in range(args.rounds):
        for state in ("idle", "busy"):
            ctx = Competitor() if state == "busy" else None
            if ctx:
                ctx.__enter__()
            try:
                for key, fn in fns.items():
                    steps = args.steps if key[0] == "decode" else max(args.steps // 4, 2)
                    times[(key, state)] += block(fn, steps)
            finally:
                if ctx:
                    ctx.__exit__(None, None, None)
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    rows = []
    torch.set_num_threads(meta["threads"])
    for key in fns:
        med = {s: statistics.median(times[(key, s)]) for s in ("idle", "busy")}
        for state in ("idle", "busy"):
            t = times[(key, state)]
            q = statistics.quantiles(t, n=5, method="inclusive")
            rows.append({"workload": key[0], "provider": key[1], "state": state, "ms": f"{med[state]:.3f}",
                         "p20": f"{q[0]:.3f}", "p80": f"{q[3]:.3f}",
                         "slowdown": f"{med['busy'] / med['idle']:.2f}" if state == "busy" else "",
                         **{k: meta[k] for k in ("threads", "device", "load1", "commit", "date")}})
        print(f"{key[0]:<7}{key[1]:<6} idle {med['idle']:9.3f} ms   busy {med['busy']:9.3f} ms   "
              f"slowdown {med['busy'] / med['idle']:.2f}x")
    append_rows(args.out, rows, COLUMNS)
    print(f"{len(rows)} rows appended to {args.out}")


if __name__ == "__main__":
    main()
