#!/usr/bin/env python
"""Turn a benchmark CSV into one PNG bar chart per mode (for the README).

    python bench/plot_results.py bench/results/circular_relative_attention.csv
    python bench/plot_results.py results.csv --metric peak_mem_mb --device "NVIDIA H100 80GB HBM3"

For each (provider, mode, shape) the most recent row of the chosen device is plotted: groups of
bars per shape, one bar per provider, log y axis. matplotlib is imported lazily; without it the
script says so and exits.
"""
from __future__ import annotations

import argparse
import csv
import re
from pathlib import Path


def latest_rows(path: Path, device: str | None, metric: str):
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get(metric)]
    if not rows:
        raise SystemExit(f"{path}: no rows with {metric}")
    device = device or max(rows, key=lambda r: r["date"])["device"]
    latest = {}
    for r in sorted((r for r in rows if r["device"] == device), key=lambda r: r["date"]):
        key = (r["op"], r["mode"], r.get("time_mode") or "quotient", r.get("clock") or "wall", r["provider"],
               r["B"], r["H"], r["Lq"], r["Lk"], r["D"], r["dtype"])
        latest[key] = r
    return device, list(latest.values())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("csv", type=Path)
    p.add_argument("--metric", choices=("ms", "peak_mem_mb"), default="ms")
    p.add_argument("--device", help="device column to plot (default: that of the newest row)")
    p.add_argument("--out-dir", type=Path, help="default: the CSV's folder")
    args = p.parse_args(argv)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed; no plots written (pip install matplotlib)")
        return
    device, rows = latest_rows(args.csv, args.device, args.metric)
    out_dir = args.out_dir or args.csv.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-").lower()
    groups = {}
    for r in rows:
        groups.setdefault((r["op"], r["mode"], r.get("time_mode") or "quotient", r.get("clock") or "wall",
                           r["dtype"]), []).append(r)
    for (op, mode, time_mode, clock, dtype), rs in sorted(groups.items()):
        shapes = sorted({(int(r["B"]), int(r["H"]), int(r["Lq"]), int(r["Lk"]), int(r["D"])) for r in rs},
                        key=lambda s: (s[3], s[2]))
        providers = sorted({r["provider"] for r in rs})
        # Log axis: a 0 MB peak is drawn as 0.001.
        value = {(r["provider"], (int(r["B"]), int(r["H"]), int(r["Lq"]), int(r["Lk"]), int(r["D"]))):
                 max(float(r[args.metric]), 1e-3) for r in rs}
        width = 0.8 / len(providers)
        fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(shapes) * max(1, len(providers) / 3), 4))
        for n, prov in enumerate(providers):
            offset = (n - (len(providers) - 1) / 2) * width
            xs = [i + offset for i, s in enumerate(shapes) if (prov, s) in value]
            ys = [value[(prov, s)] for s in shapes if (prov, s) in value]
            ax.bar(xs, ys, width, label=prov)
        ax.set_xticks(range(len(shapes)), [f"B={s[0]}\nLq={s[2]}\nLk={s[3]}" for s in shapes])
        ax.set_yscale("log")
        ax.set_ylabel({"ms": "time (ms, median)", "peak_mem_mb": "peak memory (MB)"}[args.metric])
        _, H, _, _, D = shapes[0]
        ax.set_title(f"{op} {mode} ({time_mode}, {clock} clock), H={H} D={D} {dtype}\n{device}", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        out = out_dir / f"{op}_{mode}_{time_mode}_{clock}_{args.metric}_{slug}.png"
        fig.savefig(out, dpi=120)
        plt.close(fig)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
