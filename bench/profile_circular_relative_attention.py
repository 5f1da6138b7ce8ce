#!/usr/bin/env python
"""Per-phase CPU profile of the cpp circular relative attention kernels (forward + backward).

    python bench/profile_circular_relative_attention.py                     # L = 1024 2048, 1 thread
    python bench/profile_circular_relative_attention.py --label after --out bench/results/profile_circular_relative_attention.csv
    python bench/profile_circular_relative_attention.py --report bench/results/profile_circular_relative_attention.csv
    python bench/profile_circular_relative_attention.py --decode --L 4096 --time-modes quotient   # decoding steps
    python bench/profile_circular_relative_attention.py --decode --cold --L 4096   # ... each from cold caches

Runs forward+backward of the benchmark's configuration (B=2, H=8, D=32, causal, index + time +
pitch, Hadamard, paper tables; bench_circular_relative_attention.make_inputs) with the kernels'
phase timers on (``torch.ops.fastattn.cra_cpu_profile``) and reports each phase's CPU time per
call, summed over threads: thread CPU time, not wall time, so the profile holds on a shared
machine. Rows: q·E products (qE), QKᵀ (qk), relative-score gathers and masking (gather), online
softmax (softmax), P·V (pv), and in the backward dP, the softmax gradient, the dV/dQ/dK GEMMs, the
dS scatter (scatter), the q·E gradients (qE_grad) and partial sums (merge). "total" is the
process CPU time of the call (including Python and autograd), "sdpa" the same for
F.scaled_dot_product_attention without relative terms.

To profile another build (e.g. the commit before an optimisation), point ``--checkout`` at a
built checkout; rows carry --label and that checkout's commit when it has one.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COLUMNS = ("label", "commit", "date", "device", "threads", "load1", "time_mode", "B", "H", "L", "D", "phase", "ms",
           "mode")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--L", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--time-modes", nargs="+", choices=("quotient", "fields"), default=["quotient", "fields"])
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest on a shared machine)")
    p.add_argument("--repeats", type=int, default=3, help="profiled calls per configuration")
    p.add_argument("--decode", action="store_true",
                   help="profile decoding steps instead (B=2, one query over L keys through a KV cache: the "
                        "benchmark's cached cpp path; 'total' is the whole step, 'sdpa' SDPA's step on the same "
                        "cache; --repeats x 100 steps)")
    p.add_argument("--cold", action="store_true",
                   help="decoding: read a 64 MiB buffer before every step (outside the timing), so that each "
                        "step starts from cold caches as in bench_targets' rotation of contenders (mode "
                        "'decode-cold')")
    p.add_argument("--checkout", type=Path, default=REPO, help="built fastattn checkout to profile")
    p.add_argument("--label", default="", help="free text stored with the rows (e.g. before/after)")
    p.add_argument("--out", type=Path, default=None, help="CSV to append rows to")
    p.add_argument("--report", type=Path, default=None,
                   help="print a markdown table of the rows in this CSV (one column per label, L and "
                        "time mode; the last row per key) instead of profiling")
    return p.parse_args(argv)


def _ms(v: float) -> str:
    return f"{v:.1f}" if v >= 1 else f"{v:.3f}"  # decoding phases are fractions of a millisecond


def report(path: Path) -> str:
    """Markdown table: phase rows, one column per (label, L, time mode) of the CSV's rows."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    cols, cells, phases = [], {}, []
    for r in rows:
        col = (r["label"], int(r["L"]), r["time_mode"] + (f", {r['mode']}" if r.get("mode") else ""))
        if col not in cols:
            cols.append(col)
        if r["phase"] not in phases:
            phases.append(r["phase"])
        cells[(col, r["phase"])] = float(r["ms"])
    order = {c: i for i, c in enumerate(cols)}
    cols.sort(key=lambda c: (c[1], c[2] != "quotient", order[c]))
    lines = ["| phase | " + " | ".join(f"{lab}, L={L}, {tm}" for lab, L, tm in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for ph in phases:
        lines.append(f"| {ph} | " + " | ".join(_ms(cells[(c, ph)]) if (c, ph) in cells else "" for c in cols) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.report:
        print(report(args.report))
        return
    sys.path.insert(0, str(args.checkout))
    sys.path.insert(1, str(REPO / "bench"))
    import torch
    import torch.nn.functional as F

    import fastattn
    from bench_circular_relative_attention import OPTIONS, Config, append_rows, device_name, make_inputs

    torch.set_num_threads(args.threads)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=args.checkout, text=True,
                                capture_output=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    meta = dict(label=args.label, commit=commit,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                device=device_name("cpu"), threads=args.threads, load1=f"{os.getloadavg()[0]:.1f}")
    print(f"fastattn from {Path(fastattn.__file__).parent}; {meta}")
    rows = []
    for L in args.L:
        for mode in args.time_modes:
            if args.decode:
                rows += profile_decode(L, mode, args, meta)
                continue
            cfg = Config("cpp", "fwd_bwd", B=2, H=8, Lq=L, Lk=L, D=32)
            inp = make_inputs(cfg, requires_grad=True)
            tables, opts = dict(inp.tables), dict(OPTIONS)
            if mode == "fields":  # the authors' convention: per-token bar and position
                opts.update(time_mode="fields", bar=inp.onset // OPTIONS["bar_res"],
                            position=inp.onset % OPTIONS["bar_res"])
                tables["pos_table"] = torch.randn(2 * OPTIONS["bar_res"] - 1, cfg.D, requires_grad=True)
            grad = torch.randn(cfg.B, cfg.H, L, cfg.D)

            def cpp():
                fastattn.circular_relative_attention(inp.q, inp.k, inp.v, inp.onset, inp.pitch, backend="cpp",
                                                     **tables, **opts).backward(grad)

            def sdpa():
                F.scaled_dot_product_attention(inp.q, inp.k, inp.v, is_causal=True).backward(grad)

            cpp(), sdpa()
            phases = profiled_phases(cpp, sdpa, args.repeats)
            print(f"\nL={L} time_mode={mode} (ms of CPU per forward+backward, {args.threads} thread(s))")
            for name, ms in phases.items():
                print(f"  {name:<11}{ms:9.2f}")
                rows.append({**meta, "time_mode": mode, "B": cfg.B, "H": cfg.H, "L": L, "D": cfg.D,
                             "phase": name, "ms": f"{ms:.3f}", "mode": "fwd_bwd"})
    if args.out:
        append_rows(args.out, rows, COLUMNS)
        print(f"\n{len(rows)} rows appended to {args.out}")


def profiled_phases(cpp, sdpa, n: int, before=None) -> dict:
    """ms of CPU per call: the cpp kernel's phases (profiled over n calls), their sum, the median
    call of cpp and of sdpa (timed after profiling stops, so the hooks cost sdpa nothing).
    ``before()``, when given, runs untimed before every call."""
    import torch
    profile = torch.ops.fastattn.cra_cpu_profile
    before = before or (lambda: None)
    totals, sdpas = [], []
    profile(True)
    for _ in range(n):
        before()
        t0 = time.process_time()
        cpp()
        totals.append(time.process_time() - t0)
    secs, names = profile(False)
    for _ in range(n):
        before()
        t0 = time.process_time()
        sdpa()
        sdpas.append(time.process_time() - t0)
    phases = {name: s / n * 1e3 for name, s in zip(names, secs) if s > 0}
    phases["kernel sum"] = sum(phases.values())
    phases["total"] = statistics.median(totals) * 1e3
    phases["sdpa"] = statistics.median(sdpas) * 1e3
    return phases


def profile_decode(Lk: int, mode: str, args, meta: dict) -> list:
    """Phase rows of decoding steps (ms of CPU per step) over a KV cache of Lk keys."""
    import torch
    from bench_circular_relative_attention import DECODE_STEPS, Config, make_inputs
    steps = {}
    for provider in ("cpp", "sdpa"):
        cfg = Config(provider, "decode", B=2, H=8, Lq=1, Lk=Lk, D=32, time_mode=mode)
        steps[provider] = DECODE_STEPS[provider](cfg, make_inputs(cfg, False))
    evict = None
    if args.cold:
        junk = torch.ones(16 << 20)  # 64 MiB: twice the L3 of the machine we measure on
        evict = junk.sum
    with torch.no_grad():
        steps["cpp"](), steps["sdpa"]()
        phases = profiled_phases(steps["cpp"], steps["sdpa"], (20 if args.cold else 100) * args.repeats, evict)
    kind = "decode-cold" if args.cold else "decode"
    print(f"\n{kind} Lk={Lk} time_mode={mode} (ms of CPU per step, {args.threads} thread(s))")
    for name, ms in phases.items():
        print(f"  {name:<11}{ms:9.3f}")
    return [{**meta, "time_mode": mode, "B": 2, "H": 8, "L": Lk, "D": 32, "phase": name, "ms": f"{ms:.4f}",
             "mode": kind} for name, ms in phases.items()]


if __name__ == "__main__":
    main()
