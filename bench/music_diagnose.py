"""Why does circular relative attention not show its effect? Candidate causes, one run each.

Every run trains one attention variant on the embedded synthetic corpus (4/8-bar repetition)
with ``fastattn.music.diagnose.train_with_probes`` and logs, every ``--probe-every`` steps, the
per-field accuracy/NLL of the next note split by whether it repeats a note 4 or 8 bars back, and
the attention mass on the keys 4/8 bars back (``diagnose.probe``). At the end it continues
``--continuations`` validation prompts (4 → 16 bars; top-k 8, the authors' top-p 0.2, greedy) and
records rep@k; the final weights go next to the log (NAME-sSEED.pt).

    python bench/music_diagnose.py --list
    nohup nice -n 10 python bench/music_diagnose.py --run base-CirRelAttn-H --seed 0 &
    python bench/music_diagnose.py --summary     # -> bench/results/music_diagnosis.{json,md}

Runs append to ``--logs`` (default /tmp/music_diagnose/NAME-sSEED.jsonl); a finished run (one with
a "final" record) is skipped, and so is a run another live process holds (NAME-sSEED.lock), so
several queues can share one list.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import List, Optional

import numpy as np

BASE_MODEL = dict(representation="note", n_layer=2, d_model=64, n_head=4, d_ff=256, dropout=0.1,
                  max_len=320, alpha=0.1, linear=True, convention="slides")
# The logged runs (bench/results/music_diagnosis.*) were made in the slides' convention, before
# the authors' preset existed; ``--convention authors`` reruns a grid entry in theirs.
BASE_TRAIN = dict(lr=1e-3, warmup_frac=0.1, batch_size=8, steps=1200, max_shift=5)
VARIANTS = ("Attn", "RelAttn", "RIPO", "CirRelAttn", "CirRelAttn-H")


def _grid() -> dict:
    """name -> (variant, model overrides, train overrides, ablation overrides)."""
    g = {}
    for v in VARIANTS:
        g[f"base-{v}"] = (v, {}, {}, {})
    for v in ("Attn", "RIPO", "CirRelAttn-H"):
        g[f"long-{v}"] = (v, {}, {"steps": 4000}, {})
        g[f"event-{v}"] = (v, {"representation": "event", "max_len": 1400}, {"steps": 600}, {})
        g[f"hidefields-{v}"] = (v, {}, {}, {"hide_fields": ("bar", "position")})
        g[f"lr3e-3-{v}"] = (v, {}, {"lr": 3e-3}, {})
        g[f"lr3e-4-{v}"] = (v, {}, {"lr": 3e-4}, {})
        g[f"nodropout-{v}"] = (v, {"dropout": 0.0}, {}, {})
    for v in ("RIPO", "CirRelAttn", "CirRelAttn-H"):
        g[f"alpha1-{v}"] = (v, {"alpha": 1.0}, {}, {})
        g[f"tables8x-{v}"] = (v, {}, {}, {"table_scale": 8.0})
        g[f"nolinear-{v}"] = (v, {"linear": False}, {}, {})
        g[f"alpha1-tables4x-{v}"] = (v, {"alpha": 1.0}, {}, {"table_scale": 4.0})
    # The authors' initial scales at D = 16 (see diagnose.Ablation.index_scale), and the
    # index and factor tables scaled apart.
    g["authorsinit-CirRelAttn-H"] = ("CirRelAttn-H", {}, {}, {"table_scale": 1.155, "index_scale": 4.0})
    g["authorsinit-RelAttn"] = ("RelAttn", {}, {}, {"index_scale": 4.0})
    g["factors8x-CirRelAttn-H"] = ("CirRelAttn-H", {}, {}, {"table_scale": 8.0, "index_scale": 1.0})
    g["index8x-CirRelAttn-H"] = ("CirRelAttn-H", {}, {}, {"index_scale": 8.0})
    for v in ("CirRelAttn", "CirRelAttn-H"):
        g[f"fields-{v}"] = (v, {}, {}, {"time_mode": "fields"})
        g[f"nbar9-{v}"] = (v, {}, {}, {"n_bar": 9})
    g["warmup0-CirRelAttn-H"] = ("CirRelAttn-H", {}, {"warmup_frac": 0.0}, {})
    g["warmup0-Attn"] = ("Attn", {}, {"warmup_frac": 0.0}, {})
    g["warmup30-CirRelAttn-H"] = ("CirRelAttn-H", {}, {"warmup_frac": 0.3}, {})
    g["warmup30-Attn"] = ("Attn", {}, {"warmup_frac": 0.3}, {})
    return g


GRID = _grid()


def run(name: str, seed: int, logs: Path, probe_every: int, probe_windows: int,
        continuations: int, threads: int, steps: int = 0) -> None:
    import torch

    from fastattn.music import diagnose as G
    from fastattn.music.generate import SamplingConfig
    from fastattn.music.model import ModelConfig
    from fastattn.music.repetition import continue_windows
    from fastattn.music.synthetic import SyntheticConfig, synthetic_corpus
    from fastattn.music.train import TrainConfig

    torch.set_num_threads(threads)
    variant, mo, to, ao = GRID[name]
    log = logs / f"{name}-s{seed}.jsonl"
    if log.exists() and any('"final"' in line for line in log.read_text().splitlines()):
        print(f"{log} is finished; skipping", flush=True)
        return
    lock = log.with_suffix(".lock")
    if lock.exists() and _alive(int(lock.read_text() or 0)):
        print(f"{name} seed {seed} is being run by process {lock.read_text()}; skipping", flush=True)
        return
    lock.write_text(str(os.getpid()))
    if log.exists():
        log.unlink()  # an unfinished run starts over (its probes would be mixed otherwise)
    mc = ModelConfig(variant=variant, **{**BASE_MODEL, **mo})
    t = {**BASE_TRAIN, **to, **({"steps": steps} if steps else {})}
    tc = TrainConfig(lr=t["lr"], warmup_steps=max(int(t["warmup_frac"] * t["steps"]), 1),
                     decay_steps=t["steps"], batch_size=t["batch_size"], max_steps=t["steps"],
                     max_shift=t["max_shift"], seed=seed, progress=False)
    ab = G.Ablation(**ao)
    corpus = synthetic_corpus(SyntheticConfig())
    n_probe = probe_windows if mc.representation == "note" else max(probe_windows // 3, 4)
    ps = G.probe_set(corpus, "valid", np.linspace(0, corpus.n_windows("valid") - 1, n_probe).round(),
                     mc.representation, mc.max_len, convention=mc.convention)
    tag = {"name": name, "seed": seed, "variant": variant, "model": {**BASE_MODEL, **mo},
           "train": t, "ablation": G.ablation_dict(ab)}
    t0 = time.time()
    model, _ = G.train_with_probes(mc, tc, corpus, ps, ablation=ab, probe_every=probe_every,
                                   log_path=log, tag=tag)
    train_s = time.time() - t0
    final = {**tag, "final": True, "train_seconds": round(train_s, 1)}
    torch.save(model.state_dict(), logs / f"{name}-s{seed}.pt")
    # top-k 8: the demo's sampler; top-p 0.2: the authors' (generate.py, per field); greedy.
    for label, sampling in (("topk8", SamplingConfig(top_k=8)), ("topp02", SamplingConfig(top_p=0.2)),
                            ("greedy", SamplingConfig(top_k=1))):
        c = continue_windows(model, corpus, "valid", continuations, sampling=sampling, seed=seed)
        final[f"rep_{label}"] = {str(k): v[:2] for k, v in c.rep().items()}
        final["rep_truth"] = {str(k): v[:2] for k, v in c.rep_true().items()}
    final["seconds"] = round(time.time() - t0, 1)
    with open(log, "a") as f:
        f.write(json.dumps(G.nan_to_none(final)) + "\n")
    lock.unlink()
    print(json.dumps(final), flush=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    return pid > 0


# ---------------------------------------------------------------------------------------------
def _records(logs: Path) -> dict:
    """log stem -> its records, every log of the directory read once."""
    from fastattn._io import read_jsonl
    return {p.stem: read_jsonl(p) for p in sorted(logs.glob("*.jsonl"))}


def _load(logs: Path, records: Optional[dict] = None) -> dict:
    runs = {}
    for stem, recs in (records or _records(logs)).items():
        fin = [r for r in recs if r.get("final")]
        if fin:
            runs[stem] = {"probes": [r for r in recs if not r.get("final")], "final": fin[-1]}
    return runs


def _curves_all(logs: Path, records: Optional[dict] = None) -> dict:
    """name-sSEED -> compact curve, for every log, finished or not (a run killed part-way still
    says how far it got at each step)."""
    out = {}
    for stem, recs in (records or _records(logs)).items():
        probes = [r for r in recs if "nll_per_note" in r]
        if len(probes) > 1:
            out[stem] = {"curve": _summ(probes), "finished": any(r.get("final") for r in recs)}
    return out


def matched_steps(logs: Path, at=(600, 1200), copy_level: float = 0.9,
                  records: Optional[dict] = None) -> List[str]:
    """Markdown rows: per log, NLL per note and note accuracy on notes repeated 4 bars back at
    the probe nearest below each step of ``at``, and the first step at which that accuracy
    reaches ``copy_level`` (the speed of learning to copy)."""
    rows = []
    for stem, r in _curves_all(logs, records).items():
        c = r["curve"]
        cells = []
        for s in at:
            below = [x for x in c if x["step"] <= s]
            x = below[-1] if below and below[-1]["step"] > 0 else None
            cells.append("–" if x is None or x["step"] < s * 0.8 else
                         f"{x['nll']:.3f} / " + ("–" if x["note_acc_lag4"] is None else f"{x['note_acc_lag4']:.2f}") + ("" if x["step"] == s else f" (step {x['step']})"))
        hit = next((x["step"] for x in c if (x["note_acc_lag4"] or 0) >= copy_level), None)
        last = c[-1]["step"]
        rows.append(f"| {stem} | {last}{'' if r['finished'] else ' (stopped)'} | " + " | ".join(cells)
                    + f" | {hit if hit is not None else f'> {last}'} |")
    return rows


def _summ(probes: list) -> list:
    """Compact curve: per probe step the numbers the report uses."""
    out = []
    for r in probes:
        a = r["acc"]
        row = {"step": r["step"], "nll": round(r["nll_per_note"], 4),
               "pitch_acc_lag4": a.get("lag4", {}).get("pitch"),
               "pitch_acc_none": a.get("none", {}).get("pitch"),
               "pitch_acc_head": a.get("head", {}).get("pitch"),
               "pitch_nll_lag4": r["nll"].get("lag4", {}).get("pitch"),
               "pitch_nll_none": r["nll"].get("none", {}).get("pitch"),
               "note_acc_lag4": a.get("lag4", {}).get("note"),
               "note_acc_none": a.get("none", {}).get("note")}
        for cls, per_track in r.get("pitch_acc_by_track", {}).items():
            for trk, v in per_track.items():
                row[f"pitch_acc_{cls}_{trk}"] = v
        for li, layer in enumerate(r.get("attn", [])):
            for key in ("source4", "source4_best_head", "source4_chance", "same4",
                        "same4_best_head", "same4_chance", "source8_best_head", "source8_chance"):
                if key in layer:
                    row[f"L{li}_{key}"] = round(layer[key], 4)
        out.append(row)
    return out


def summary(logs: Path, out_json: Path, out_md: Path) -> None:
    records = _records(logs)
    runs = _load(logs, records)
    by_name: dict = {}
    for key, r in runs.items():
        by_name.setdefault(r["final"]["name"], []).append(r)
    doc = {"base_model": BASE_MODEL, "base_train": BASE_TRAIN, "runs": {}}
    rows = []
    for name in [n for n in GRID if n in by_name] + sorted(set(by_name) - set(GRID)):
        rs = sorted(by_name[name], key=lambda r: r["final"]["seed"])
        curves = [_summ(r["probes"]) for r in rs]
        last = [c[-1] for c in curves]
        f = [r["final"] for r in rs]

        def ms(vals, d=3):
            x = np.array([v for v in vals if v is not None], dtype=float)
            if not len(x):
                return "–"
            return f"{x.mean():.{d}f}" + (f" ± {x.std(ddof=1):.{d}f}" if len(x) > 1 else "")

        best_src = [max(l.get(f"L{i}_source4_best_head", 0) for i in range(4)) for l in last]
        chance = [l.get("L0_source4_chance") for l in last]

        def rep(label):
            return ms([x[f"rep_{label}"]["4"][0] for x in f if f"rep_{label}" in x], 2)

        rows.append(
            f"| {name} | {len(rs)} | {rs[0]['final']['train']['steps']} | {ms([l['nll'] for l in last])} "
            f"| {ms([l.get('pitch_acc_lag4_MELODY') for l in last])} "
            f"| {ms([l.get('pitch_acc_head_MELODY') for l in last])} "
            f"| {ms([l['pitch_acc_lag4'] for l in last])} | {ms([l['pitch_acc_head'] for l in last])} "
            f"| {ms([l['note_acc_lag4'] for l in last])} "
            f"| {ms(best_src)} ({ms(chance)}) "
            f"| {rep('topk8')} | {rep('topp02')} | {rep('greedy')} | {rep('truth')} "
            f"| {ms([x['train_seconds'] / 60 for x in f], 0)} |")
        doc["runs"][name] = {"seeds": [x["seed"] for x in f], "final": f, "curves": curves}
    head = ("| run | seeds | steps | NLL/note | melody pitch acc, repeated at lag 4 | melody pitch "
            "acc, bars 0–3 | pitch acc, repeated at lag 4 | pitch acc, bars 0–3 | note acc (5 "
            "fields), repeated | attention on the lag-4 source, best head (chance) | rep@4 top-k 8 "
            "| rep@4 top-p 0.2 | rep@4 greedy | rep@4 truth | train min |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    md = ["# Music diagnosis: does the model copy the bar 4 bars back?", "",
          f"Base: {json.dumps(BASE_MODEL)}; {json.dumps(BASE_TRAIN)}; synthetic corpus, "
          "probes on evenly spread validation windows; values at the last step (mean ± std over "
          "seeds). Generated by `python bench/music_diagnose.py --summary`.", "", head, *rows, "",
          "## Matched steps (every log, finished or stopped)", "",
          "NLL per note / accuracy of all five fields on notes repeated 4 bars back, at the "
          "probe nearest below the step; last column: first probe step at which that accuracy "
          "reaches 0.9.", "",
          "| log | last step | step 600 | step 1200 | copies ≥ 0.9 from step |",
          "|---|---:|---:|---:|---:|", *matched_steps(logs, records=records), ""]
    out_json.write_text(json.dumps(doc, indent=1) + "\n")
    out_md.write_text("\n".join(md))
    print("\n".join(md))
    plot_curves(doc, out_json.with_suffix(".png"))


def plot_curves(doc: dict, path: Path, prefixes=("base-", "long-", "hidefields-", "event-")) -> None:
    """Learning curves of the runs whose names start with ``prefixes`` (seed 0): NLL per note,
    note accuracy on notes repeated 4 bars back, best head's attention on their source. Colour
    = variant, line style = experiment (solid base, dashed long, dotted others)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("nll", "valid NLL per note (nats)"), ("note_acc_lag4", "all 5 fields right, notes repeated 4 bars back"),
              ("src", "best head's attention mass on the note 4 bars back"))
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
    for name, run in doc["runs"].items():
        if not name.startswith(prefixes):
            continue
        curve = run["curves"][0]
        steps = [r["step"] for r in curve]
        style = "-" if name.startswith("base-") else "--" if name.startswith("long-") else ":"
        colour = f"C{VARIANTS.index(run['final'][0]['variant'])}"
        for ax, (key, title) in zip(axes, panels):
            if key == "src":
                y = [max(r.get(f"L{i}_source4_best_head", 0) for i in range(4)) for r in curve]
            else:
                y = [r.get(key) for r in curve]
            if any(v is not None for v in y):
                ax.plot(steps, [float("nan") if v is None else v for v in y], style, color=colour,
                        label=name)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("step")
    axes[2].axhline(curve[-1].get("L0_source4_chance", 0), color="0.5", lw=0.8, label="chance")
    axes[0].set_yscale("log")
    axes[2].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", nargs="*", default=[], help="grid entries to run (in order)")
    p.add_argument("--seed", type=int, nargs="+", default=[0])
    p.add_argument("--list", action="store_true")
    p.add_argument("--summary", action="store_true")
    p.add_argument("--logs", default="/tmp/music_diagnose")
    p.add_argument("--probe-every", type=int, default=200)
    p.add_argument("--probe-windows", type=int, default=24)
    p.add_argument("--continuations", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=0, help="override the run's steps (smoke tests)")
    p.add_argument("--out", default="bench/results/music_diagnosis")
    a = p.parse_args(argv)
    if a.list:
        for k, v in GRID.items():
            print(k, v)
    logs = Path(a.logs)
    logs.mkdir(parents=True, exist_ok=True)
    for name in a.run:
        if name not in GRID:
            raise SystemExit(f"unknown run {name!r}; see --list")
        for s in a.seed:
            run(name, s, logs, a.probe_every, a.probe_windows, a.continuations, a.threads, a.steps)
    if a.summary:
        summary(logs, Path(a.out + ".json"), Path(a.out + ".md"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
