#!/usr/bin/env python
"""The BAE synthetic entropy benchmark (SPEC §5): estimated bits and held-out FVU per rank and
straight-through estimator, through ``fastattn sae entropy-bench``.

    nohup nice python bench/bench_bae_entropy.py --jobs 2 > bae_entropy.log 2>&1 &
    python bench/bench_bae_entropy.py --ranks 8 --estimators reference --epochs 10   # a quick look

Every run: random-direction data (d = 64, 65,536 samples, 52,428 for training), d' = 256, Adam
lr 5e-4, batch 512, Adam weight decay --weight-decay (default 3e-6), α_e = α_c = --alpha (default
1e-6) with α_e = 0 for the first quarter of the --epochs (default 500), the data centred at the
mean of every training row, i.e. the authors' model
trained on centred data (``--center none``: their model on raw data, the cause of the lossy runs).
Rows: every (rank, estimator) for each of --seeds, then the
same without the entropy and covariance losses (the paper's red points: more bits). Reports the
estimate Σ_j h2(p_j) over all 65,536 samples, the held-out FVU of the model, and the held-out FVU of
a least-squares decoder refitted on the training codes (≈ 0 when the code is lossless).
Options for the convergence study (each changes the row's command): --cov-off-too (α_c = 0 with α_e),
--lr-decay F, --entropy-off E, --batch-size B, --alpha-cov, --weight-decay W.
Writes --out.json and --out.md (appending to existing rows unless --fresh).
"""
from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(rank: int, ste: str, epochs: int, alpha: float, alpha_cov: float, losses: bool, center: str, seed: int,
        out_dir: str, cov_off_too: bool = False, lr_decay: float = 0.0, entropy_off=None,
        batch_size: int = 512, weight_decay: float = 0.0) -> dict:
    cmd = [sys.executable, "-m", "fastattn", "sae", "entropy-bench", "--rank", str(rank), "--dim", "64",
           "--epochs", str(epochs), "--ste", ste, "--alpha-entropy", str(alpha), "--alpha-cov", str(alpha_cov),
           "--bae-center", center, "--seed", str(seed), "--no-progress", "--log-every", "1000000",
           "--out-dir", f"{out_dir}/r{rank}_{ste}_{center}_{'losses' if losses else 'nolosses'}_e{epochs}_s{seed}"]
    if not losses:
        cmd.append("--no-losses")
    if cov_off_too:
        cmd.append("--cov-off-too")
        cmd[cmd.index("--out-dir") + 1] += "_covoff"
    if batch_size != 512:
        cmd += ["--batch-size", str(batch_size)]
        cmd[cmd.index("--out-dir") + 1] += f"_b{batch_size}"
    if entropy_off is not None:
        cmd += ["--entropy-off-epochs", str(entropy_off)]
        cmd[cmd.index("--out-dir") + 1] += f"_off{entropy_off}"
    cmd += ["--weight-decay", str(weight_decay)]  # always: entropy-bench's default is not 0
    cmd[cmd.index("--out-dir") + 1] += f"_wd{weight_decay}"
    if lr_decay:
        cmd += ["--lr-decay", str(lr_decay)]
        cmd[cmd.index("--out-dir") + 1] += f"_decay{lr_decay}"
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if p.returncode != 0:
        return {"rank": rank, "ste": ste, "error": p.stderr[-2000:]}
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["wall_s"] = round(time.time() - t0, 1)
    res["command"] = "fastattn " + " ".join(a for i, a in enumerate(cmd[3:], 3)
                                            if a != "--out-dir" and cmd[i - 1] != "--out-dir")
    print(json.dumps(res), flush=True)
    return res


def off_note(r: dict) -> str:
    off = r.get("entropy_off_epochs", r["epochs"] // 4)
    note = "" if off == r["epochs"] // 4 else f" (α_e = 0 for {off})"
    return note + ("" if r.get("batch_size", 512) == 512 else f", batch {r['batch_size']}")


def input_label(r: dict) -> str:
    if r.get("bae_center") != "mean":
        return "uncentred"
    # rows without "center_rule" predate centring the output too, at the exact training mean
    return f"centred ({r.get('center_rule', '4,096-row mean, input only')})"


def markdown(rows: list) -> str:
    lines = ["| rank | estimator | input | α_e / α_c | epochs | seed | estimated bits | bits / rank | held-out FVU | "
             "held-out FVU, refitted decoder |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (not r.get("losses", True), "center_rule" not in r, input_label(r), r["ste"],
                                         r["rank"], r.get("seed", 0))):
        if "error" in r:
            lines.append(f"| {r['rank']} | {r['ste']} | error | | | | | | | |")
            continue
        lines.append(f"| {r['rank']} | {r['ste']} | {input_label(r)} | "
                     f"{r['alpha_entropy']:g} / {r['alpha_cov']:g}{' (α_c off too)' if r.get('cov_off_too') else ''}"
                     f"{', lr decay ' + format(r['lr_decay'], 'g') if r.get('lr_decay') else ''}"
                     f"{', weight decay ' + format(r['weight_decay'], 'g') if r.get('weight_decay') else ''} | "
                     f"{r['epochs']}{off_note(r)} | {r.get('seed', 0)} | {r['estimated_bits']:.2f} | "
                     f"{r['ratio']:.3f} | {r['test_fvu']:.2e} | {r['test_fvu_refit']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", default="4,8,16,32")
    p.add_argument("--estimators", default="reference,sigmoid")
    p.add_argument("--epochs", type=int, default=500)
    p.add_argument("--alpha", type=float, default=1e-6, help="α_e (and α_c unless --alpha-cov)")
    p.add_argument("--alpha-cov", type=float, default=None)
    p.add_argument("--center", default="mean", choices=("mean", "none"))
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--entropy-off", type=int, default=None, help="epochs with α_e = 0 (default: a quarter)")
    p.add_argument("--lr-decay", type=float, default=0.0, help="last fraction of the run with lr -> 0 linearly")
    p.add_argument("--weight-decay", type=float, default=3e-6, help="Adam's coupled weight decay (the authors')")
    p.add_argument("--cov-off-too", action="store_true", help="α_c = 0 too in the first quarter (not the authors')")
    p.add_argument("--no-losses-rows", action="store_true", help="also run every rank with α_e = α_c = 0")
    p.add_argument("--only-no-losses", action="store_true")
    p.add_argument("--seeds", default="0", help="comma list: every row once per seed")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--run-dir", default="runs/entropy-bench")
    p.add_argument("--out", default=str(REPO / "bench/results/bae_entropy"))
    p.add_argument("--fresh", action="store_true")
    args = p.parse_args(argv)
    ranks = [int(r) for r in args.ranks.split(",")]
    stes = args.estimators.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    plan = [] if args.only_no_losses else [(r, s, True, sd) for sd, s, r in itertools.product(seeds, stes, ranks)]
    if args.no_losses_rows or args.only_no_losses:
        plan += [(r, s, False, sd) for sd, s, r in itertools.product(seeds, stes, ranks)]
    with ThreadPoolExecutor(args.jobs) as ex:
        a_c = args.alpha if args.alpha_cov is None else args.alpha_cov
        new = list(ex.map(lambda t: run(t[0], t[1], args.epochs, args.alpha, a_c, t[2], args.center, t[3],
                                        args.run_dir, args.cov_off_too,
                                        args.lr_decay, args.entropy_off,
                                        args.batch_size, args.weight_decay), plan))
    out = Path(args.out)
    old = [] if args.fresh or not out.with_suffix(".json").exists() else \
        json.loads(out.with_suffix(".json").read_text())["rows"]
    rows = old + new
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    out.with_suffix(".md").write_text(
        "BAE synthetic entropy benchmark (d = 64, d' = 256, 65,536 samples; `python bench/bench_bae_entropy.py`; "
        "each row's exact command is in bae_entropy.json)\n\n" + markdown(rows))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
