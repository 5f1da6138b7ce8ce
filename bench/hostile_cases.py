"""Hostile-user cases of issue 14 (interrupts, resource exhaustion, damaged files, bad arguments)
run as CLI subprocesses against one or more source trees; a before/after table.

    python bench/hostile_cases.py --tree BASE_TREE --tree . --out bench/results/hostile_cases.md
    (BASE_TREE: e.g. `git archive 85301e4 | tar -x -C BASE_TREE` plus a copy of the built _C*.so)

Each tree is put first on PYTHONPATH (it must hold a built ``fastattn/_C*.so``); each case
records the exit code, whether a traceback was printed and the last line of output, plus a check
of the behaviour the case asks for where one applies. ``--skip-memory`` (default on for trees
other than this checkout) leaves out the case that allocates gigabytes on old code.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINY = ["--layers", "1", "--dim", "16", "--heads", "2", "--ff", "16", "--max-len", "64",
        "--batch-size", "2", "--no-progress", "--device", "cpu"]
SAE = ["--model", "topk", "--latents", "32", "--k", "4", "--batch-size", "50", "--no-progress"]


class Tree:
    def __init__(self, tree: Path, work: Path):
        self.tree, self.work = tree.resolve(), work
        self.env = {**os.environ, "PYTHONPATH": str(self.tree), "PYTHONDONTWRITEBYTECODE": "1",
                    "OMP_NUM_THREADS": "1", "FASTATTN_CACHE": str(work / "cache")}

    def run(self, *args, timeout=300, background=False, show=None):
        cmd = [sys.executable, "-m", "fastattn", *map(str, args)]
        # SIGINT's default action in the child, also when this script runs as a background job
        # (started with SIGINT ignored, which children would inherit).
        kw = dict(env=self.env, cwd=self.work, text=True,
                  preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        if background:
            return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)
        p = subprocess.run(cmd, capture_output=True, timeout=timeout, **kw)
        return result(p.returncode, p.stdout + p.stderr, show)


def result(rc: int, text: str, show=None, **extra) -> dict:
    """Exit code, traceback or not, and the last line of output (the last one containing
    ``show`` when given and present)."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    picked = [ln for ln in lines if show and show in ln] or lines
    return {"rc": rc, "traceback": "Traceback (most recent call last)" in text,
            "last": picked[-1].strip()[:220] if picked else "", **extra}


# ---------------------------------------------------------------------------------------------
# shared inputs
def midi_folder(path: Path, n_songs: int = 4) -> Path:
    import numpy as np

    from fastattn.music import tokens as T

    path.mkdir(parents=True, exist_ok=True)
    for k in range(n_songs):
        T.write_midi(np.array([[b, 12 * (k % 4), 2, 60 + k, 12] for b in range(20)]), path / f"s{k}.mid")
    return path


def huge_midi(path: Path, delta: int = 0x0FFFFFFF, tpq: int = 1) -> None:
    """A ~37-byte MIDI file whose only note starts at tick ``delta``: at tpq 1, bar 67 million."""
    def vlq(n):
        out = [n & 0x7F]
        while n := n >> 7:
            out.append((n & 0x7F) | 0x80)
        return bytes(reversed(out))
    trk = vlq(delta) + bytes([0x90, 60, 100]) + vlq(1) + bytes([0x80, 60, 0]) + b"\x00\xff\x2f\x00"
    path.write_bytes(b"MThd" + (6).to_bytes(4, "big") + (0).to_bytes(2, "big") + (1).to_bytes(2, "big")
                     + tpq.to_bytes(2, "big") + b"MTrk" + len(trk).to_bytes(4, "big") + trk)


def acts(path: Path) -> Path:
    import torch

    from fastattn.sae.stores import write_shards

    if not path.exists():
        g = torch.Generator().manual_seed(0)
        write_shards(torch.randn(600, 16, generator=g), path, shard_rows=256)
    return path


# ---------------------------------------------------------------------------------------------
# the cases: (id, class, description, function(tree, work) -> result dict)
CASES = []


def case(cls: str, what: str):
    def deco(fn):
        CASES.append((fn.__name__, cls, what, fn))
        return fn
    return deco


def _tiny(batch: int = 2, **extra) -> list:
    args = [a for a in TINY]
    args[args.index("--batch-size") + 1] = str(batch)
    return args + [x for k, v in extra.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def _arg_case(name, cls, what, *args):
    def fn(t, w):  # every case writes into its own directory
        return t.run(*[name if a == "OUT" else a for a in args])
    fn.__name__ = name
    case(cls, what)(fn)


for name, what, args in [
    ("music_eval_every_0", "music train --eval-every 0",
     ["music", "train", *TINY, "--steps", "2", "--eval-every", "0", "--out", "OUT"]),
    ("music_batch_size_0", "music train --batch-size 0", ["music", "train", *_tiny(batch=0, steps=2), "--out", "OUT"]),
    ("music_steps_neg", "music train --steps -5", ["music", "train", *TINY, "--steps", "-5", "--out", "OUT"]),
    ("music_top_p_0", "music generate --top-p 0", ["music", "generate", "--checkpoint", "ck.pt", "--top-p", "0"]),
    ("music_temperature_neg", "music generate --temperature -1",
     ["music", "generate", "--checkpoint", "ck.pt", "--temperature", "-1", "--n", "1", "--out", "OUT"]),
    ("music_unknown_split", "music generate --split validation",
     ["music", "generate", "--checkpoint", "ck.pt", "--split", "validation"]),
    ("sae_epochs_neg", "sae train --epochs -1",
     ["sae", "train", "--data", "acts", *SAE, "--epochs", "-1", "--out-dir", "OUT"]),
    ("sae_latents_0", "sae train --latents 0",
     ["sae", "train", "--data", "acts", "--latents", "0", "--no-progress", "--out-dir", "OUT"]),
    ("sae_alpha_nan", "sae train --model bae --alpha-entropy nan",
     ["sae", "train", "--data", "acts", "--model", "bae", "--alpha-entropy", "nan", "--no-progress",
      "--out-dir", "OUT"]),
    ("sae_k_gt_latents", "sae train --latents 8 --k 16",
     ["sae", "train", "--data", "acts", "--model", "topk", "--latents", "8", "--k", "16", "--no-progress",
      "--out-dir", "OUT"]),
    ("analyze_context_1", "analyze collect --context 1",
     ["analyze", "collect", "--music", "ck.pt", "--context", "1", "--out", "OUT"]),
]:
    _arg_case(name, "7", what, *args)


def _music_ckpt(t, w):
    if not (w / "ck.pt").exists():
        t.run("music", "train", *TINY, "--steps", "2", "--eval-every", "2", "--out", "ckrun")
        (w / "ck.pt").write_bytes((w / "ckrun" / "last.pt").read_bytes())


@case("7", "resume `music train` with another --seed / --lr / --batch-size")
def music_resume_changed(t, w):
    out = []
    for change in ({"seed": 1}, {"lr": 1e-3}, {"batch": 4}):
        t.run("music", "train", *_tiny(steps=2, eval_every=2), "--out", "rc", "--no-resume")
        out.append(t.run("music", "train", *_tiny(**{"steps": 4, "eval_every": 2, **change}), "--out", "rc"))
    return {"rc": [r["rc"] for r in out], "traceback": any(r["traceback"] for r in out),
            "last": out[0]["last"]}


def _sae(k: int = 4, batch: int = 50, **extra) -> list:
    return ["--data", "acts", "--model", "topk", "--latents", "32", "--k", str(k), "--batch-size",
            str(batch), "--no-progress"] + [x for a, v in extra.items() for x in (f"--{a.replace('_', '-')}", str(v))]


@case("7", "resume `sae train` with another --k / --seed / --batch-size")
def sae_resume_changed(t, w):
    acts(w / "acts")
    out = []
    for change in ({"k": 8}, {"seed": 1}, {"batch": 60}):
        t.run("sae", "train", *_sae(max_steps=3), "--out-dir", "sk", "--fresh")
        out.append(t.run("sae", "train", *_sae(**change), "--out-dir", "sk"))
    return {"rc": [r["rc"] for r in out], "traceback": any(r["traceback"] for r in out),
            "last": out[0]["last"]}


@case("3", "`music train` on 4 songs (no validation windows)")
def no_validation(t, w):
    midi_folder(w / "midi4")
    return t.run("music", "train", "--data", "midi4", *TINY, "--steps", "2", "--eval-every", "1",
                 "--out", "nv", show="stopped")


@case("5", "`music prepare` of a folder with four 37-byte MIDI files, a note at tick 2^28 − 1")
def huge_tick(t, w):
    d = w / "huge"
    d.mkdir(exist_ok=True)
    midi_folder(d, 1)
    for k in range(4):
        huge_midi(d / f"huge{k}.mid", 0x0FFFFFFF - k)
    return t.run("music", "prepare", "--data", "huge", "--cache", "hc", timeout=600, show="huge0")


@case("6", "`music prepare` after the prepared-data cache .npz was truncated")
def corrupt_cache(t, w):
    midi_folder(w / "midi8", 8)
    t.run("music", "prepare", "--data", "midi8", "--cache", "cc")
    f = next((w / "cc").glob("*.npz"))
    f.write_bytes(f.read_bytes()[:200])
    return t.run("music", "prepare", "--data", "midi8", "--cache", "cc", show="cache")


@case("6", "`sae train` resume after a partial last line in metrics.jsonl")
def partial_metrics(t, w):
    acts(w / "acts")
    t.run("sae", "train", "--data", "acts", *SAE, "--log-every", "1", "--max-steps", "3", "--out-dir", "pm")
    with open(w / "pm" / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 4, "lo')
    return t.run("sae", "train", "--data", "acts", *SAE, "--log-every", "1", "--out-dir", "pm",
                 show="metrics.jsonl")


@case("6", "`analyze collect` resume after meta.json was cut short")
def truncated_meta(t, w):
    _music_ckpt(t, w)
    t.run("analyze", "collect", "--music", "ck.pt", "--layers", "0,1", "--context", "16",
          "--max-contexts", "8", "--no-progress", "--out", "tm")
    m = w / "tm" / "meta.json"
    m.write_text(m.read_text()[:40])
    return t.run("analyze", "collect", "--music", "ck.pt", "--layers", "0,1", "--context", "16",
                 "--max-contexts", "8", "--no-progress", "--out", "tm", show="meta.json")


@case("6", "`sae train --data COLL/layer_01` with a truncated shard in a finished collection")
def truncated_shard(t, w):
    _music_ckpt(t, w)
    t.run("analyze", "collect", "--music", "ck.pt", "--layers", "1", "--context", "16",
          "--max-contexts", "8", "--contexts-per-shard", "4", "--no-progress", "--out", "ts")
    f = w / "ts" / "layer_01" / "shard_00001.safetensors"
    f.write_bytes(f.read_bytes()[:-64])
    r = t.run("sae", "train", "--data", "ts/layer_01", *SAE, "--out-dir", "tss")
    r["names_file"] = "shard_00001" in r["last"]
    return r


@case("6", "resume `music train` / `sae train` from a truncated checkpoint")
def corrupt_checkpoint(t, w):
    t.run("music", "train", *TINY, "--steps", "2", "--eval-every", "2", "--out", "cm")
    (w / "cm" / "last.pt").write_bytes((w / "cm" / "last.pt").read_bytes()[:3000])
    a = t.run("music", "train", *TINY, "--steps", "4", "--eval-every", "2", "--out", "cm")
    acts(w / "acts")
    t.run("sae", "train", "--data", "acts", *SAE, "--max-steps", "3", "--out-dir", "cs")
    (w / "cs" / "checkpoint.pt").write_bytes((w / "cs" / "checkpoint.pt").read_bytes()[:3000])
    b = t.run("sae", "train", "--data", "acts", *SAE, "--out-dir", "cs")
    return {"rc": [a["rc"], b["rc"]], "traceback": a["traceback"] or b["traceback"],
            "last": a["last"], "names_file": "last.pt" in a["last"] and "checkpoint.pt" in b["last"]}


@case("6", "a second `sae train` into the directory of a running one")
def two_runs(t, w):
    acts(w / "acts")
    first = t.run("sae", "train", "--data", "acts", *SAE, "--epochs", "100000", "--checkpoint-every",
                  "1", "--out-dir", "tr", background=True)
    while not (w / "tr" / "metrics.jsonl").exists() and first.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)
    r = t.run("sae", "train", "--data", "acts", *SAE, "--epochs", "2", "--out-dir", "tr")
    first.send_signal(signal.SIGINT)
    try:
        first.wait(60)
    except subprocess.TimeoutExpired:
        first.kill()
    r["names_holder"] = f"PID {first.pid}" in r["last"]
    return r


@case("2", "SIGINT to `sae train` mid-run")
def sae_sigint(t, w):
    acts(w / "acts")
    p = t.run("sae", "train", "--data", "acts", *SAE, "--epochs", "100000", "--log-every", "5",
              "--out-dir", "si", background=True)
    while not (w / "si" / "metrics.jsonl").exists() and p.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    try:
        out, _ = p.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        p.kill()
        out, _ = p.communicate()
        return result(p.returncode, out, still_running_after_120s=True)
    return result(p.returncode, out)


def run_tree(tree: Path, work: Path, skip_memory: bool) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    t = Tree(tree, work)
    acts(work / "acts")
    _music_ckpt(t, work)
    out = {}
    for name, cls, what, fn in CASES:
        if skip_memory and name == "huge_tick":
            out[name] = {"skipped": "allocates gigabytes on this tree"}
            continue
        t0 = time.time()
        try:
            out[name] = fn(t, work)
        except Exception as e:  # a case that cannot even be set up on this tree
            out[name] = {"error": f"{type(e).__name__}: {e}"[:200]}
        out[name]["s"] = round(time.time() - t0, 1)
        print(f"[{tree}] {name}: {out[name]}", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", action="append", default=[], help="source tree (repeat: before, after)")
    ap.add_argument("--work", default="/tmp/fastattn_hostile")
    ap.add_argument("--out", default=None, help="Markdown table (a .json with the raw results next to it)")
    ap.add_argument("--label", action="append", default=None, help="column title per --tree")
    ap.add_argument("--from-json", default=None, help="render the table of an earlier run's .json")
    args = ap.parse_args(argv)
    if args.from_json:
        res = json.loads(Path(args.from_json).read_text())
    else:
        res = {}
        for i, tree in enumerate(args.tree):
            tree = Path(tree)
            res[str(tree)] = run_tree(tree, Path(args.work) / f"tree{i}", skip_memory=tree.resolve() != ROOT)
    labels = args.label or [f"`{t}`" for t in res]
    head = "| class | case | " + " | ".join(labels) + " |"
    rows = [head, "|" + "---|" * (2 + len(res))]
    for name, cls, what, _ in CASES:
        cells = []
        for t in res:
            r = res[t][name]
            if "skipped" in r or "error" in r:
                cells.append(r.get("skipped") or r["error"])
                continue
            extra = "; ".join(f"{k} {v}" for k, v in r.items() if k not in ("rc", "traceback", "last", "s"))
            cells.append(f"exit {r['rc']}{', traceback' if r['traceback'] else ''}: "
                         f"{r['last'].replace('|', '/')}" + (f" ({extra})" if extra else ""))
        rows.append(f"| {cls} | {what} | " + " | ".join(cells) + " |")
    table = "\n".join(rows)
    print(table)
    if args.out:
        Path(args.out).write_text(f"<!-- python bench/hostile_cases.py {' '.join(argv or sys.argv[1:])} -->\n"
                                  + table + "\n")
        if not args.from_json:
            Path(args.out).with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
