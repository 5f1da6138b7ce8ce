"""Real SIGINTs at random times during `fastattn music train` and `fastattn sae train`, each
interrupted run resumed by running the same command again, and the result compared bit for bit
with an uninterrupted run: weights, optimizer state, RNG state, counters, early-stopping state,
validation history and logs (wall-clock fields excepted).

    python bench/sigint_resume.py --trials 20 --out bench/results/sigint_resume.json

Each trial starts the command as a subprocess, waits until training has begun (its first log
record appears), sleeps a random time drawn from [0, T] (T: the reference run's time from there
to the end of training), sends SIGINT, waits for the process to exit (exit code 130 expected), resumes
it, and compares. A trial whose process finished before the signal is redrawn (counted as
"missed", also when it exits with 0: the signal came after the work, and `python -m fastattn`
ignores SIGINT once its command returned). Two uninterrupted runs are compared first: without that, equality would prove nothing.
tests/test_sigint_resume.py runs a small version (2 interrupts each) in CI.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's fastattn, in this process and (PYTHONPATH) its children
# Wall-clock fields, and the output directory (each run has its own): not part of the result.
IGNORED = {"time_s", "elapsed_s", "out_dir"}
LOCK = "fastattn.lock"  # exists while `train` runs


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e["OMP_NUM_THREADS"] = "1"  # the C++ kernels are deterministic for a fixed thread count
    return e


def default_sigint() -> None:
    """Children get SIGINT's default action even when this script runs as a background job of
    a non-interactive shell, which starts it with SIGINT ignored (and children inherit that)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


# ---------------------------------------------------------------------------------------------
# the two commands
def music_cmd(out: Path, steps: int = 120) -> list:
    """A tiny CirRelAttn-H on the synthetic corpus; dropout on (the RNG state matters), a
    validation every 10 steps (signals land in validations too), a log record every step."""
    return [sys.executable, "-m", "fastattn", "music", "train", "--layers", "1", "--dim", "32",
            "--heads", "2", "--ff", "64", "--dropout", "0.2", "--max-len", "128", "--lr", "3e-3",
            "--warmup", "5", "--decay-steps", "100", "--batch-size", "4", "--steps", str(steps),
            "--eval-every", "10", "--eval-windows", "16", "--patience", "0", "--log-every", "1",
            "--no-progress", "--device", "cpu", "--out", str(out)]


def sae_data(directory: Path, n: int = 4096, d: int = 16) -> Path:
    """Low-rank activations in four safetensors shards (written once)."""
    import torch

    from fastattn.sae.stores import write_shards

    acts = directory / "acts"
    if not acts.exists():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, 4, generator=g) @ torch.randn(4, d, generator=g) + 0.1 * torch.randn(n, d, generator=g)
        write_shards(x, acts, shard_rows=n // 4)
    return acts


def sae_cmd(out: Path, data: Path, model: str = "topk", epochs: int = 8) -> list:
    """A small TopK SAE or BAE: 64 steps per epoch, a checkpoint every 25 steps, a metrics
    record every 5 (so resumes restart from mid-window and mid-epoch positions)."""
    cmd = [sys.executable, "-m", "fastattn", "sae", "train", "--data", str(data), "--model", model,
           "--latents", "64", "--batch-size", "64", "--epochs", str(epochs), "--lr", "3e-3",
           "--log-every", "5", "--checkpoint-every", "25", "--no-progress", "--out-dir", str(out)]
    if model == "topk":
        return cmd + ["--k", "4", "--dead-tokens", "600"]
    return cmd + ["--ste", "sigmoid", "--alpha-entropy", "1e-3", "--alpha-cov", "1e-4",
                  "--entropy-off-epochs", "1"]


# ---------------------------------------------------------------------------------------------
# comparing two runs
def load_result(kind: str, out: Path) -> dict:
    """Everything a run leaves that must not depend on interruptions."""
    import torch

    from fastattn._io import read_jsonl

    def load(p):
        return torch.load(p, map_location="cpu", weights_only=True)

    if kind == "music":
        res = {"last.pt": load(out / "last.pt"), "log.jsonl": read_jsonl(out / "log.jsonl")}
        if (out / "best.pt").exists():
            res["best.pt"] = load(out / "best.pt")
        return res
    return {"checkpoint.pt": load(out / "checkpoint.pt"), "metrics.jsonl": read_jsonl(out / "metrics.jsonl")}


def differences(a, b, where: str = "") -> list:
    """Where two nested results differ (tensors bit for bit, floats exactly, NaN = NaN)."""
    import torch

    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            if k in IGNORED:
                continue
            if k not in a or k not in b:
                out.append(f"{where}/{k}: only in {'the reference' if k in a else 'the resumed run'}")
            else:
                out += differences(a[k], b[k], f"{where}/{k}")
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: length {len(a)} vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        def bits(t):
            return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        same = a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))
        return [] if same else [f"{where}: tensors differ"]
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return []
    return [] if type(a) is type(b) and a == b else [f"{where}: {a!r} vs {b!r}"]


# ---------------------------------------------------------------------------------------------
# running
def _paths(cmd: list) -> tuple:
    """(lock file, the log that appears after the first step(s)) of a command's output directory."""
    music = "--out" in cmd
    out = Path(cmd[cmd.index("--out" if music else "--out-dir") + 1])
    return out / LOCK, out / ("log.jsonl" if music else "metrics.jsonl")


def run_to_end(cmd: list, timeout: float = 600) -> tuple:
    """(exit code, seconds from the first log record to the end of ``train`` (lock released),
    output)."""
    lock, first = _paths(cmd)
    p = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=default_sigint)
    started = _wait_for(p, first)
    ended = _wait_for(p, lock, present=False)
    stdout, stderr = p.communicate(timeout=timeout)
    return p.returncode, (ended or time.time()) - (started or time.time()), stdout + stderr


def _wait_for(p, path: Path, present: bool = True):
    """The time ``path`` appears (disappears), or None when the process exits first."""
    while p.poll() is None:
        if path.exists() == present:
            return time.time()
        time.sleep(0.002)
    return None


def interrupted_run(cmd: list, delay: float, timeout: float = 600) -> dict:
    """Start ``cmd``, send SIGINT ``delay`` seconds after its first log record; what happened.
    (Startup is not the interesting part: torch's first optimizer alone imports for seconds.)"""
    p = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=default_sigint)
    started = _wait_for(p, _paths(cmd)[1])
    sent = False
    if started is not None:
        while time.time() < started + delay and p.poll() is None:
            time.sleep(0.001)
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
            sent = True
    stdout, stderr = p.communicate(timeout=timeout)
    ran = time.time() - started if started is not None else 0.0
    text = stdout + stderr
    m = re.search(r"interrupted at step (\d+)( \(during validation\))?", text)
    return {"delay_s": round(delay, 3), "sent": sent, "rc": p.returncode, "ran_s": round(ran, 3),
            "step": int(m.group(1)) if m else None,
            "during": ("validation" if m.group(2) else "training") if m else
                      ("after training (aborted at exit)" if sent else None),
            "traceback": "Traceback" in text, "tail": text.strip().splitlines()[-1:] if text.strip() else []}


def trials(kind: str, name: str, make_cmd, reference: dict, train_s: float, n: int, work: Path,
           rng, log=print) -> tuple:
    """``n`` interrupted-and-resumed runs of ``make_cmd(out)``, each compared to ``reference``."""
    results, attempt, missed = [], 0, 0
    while len(results) < n:
        attempt += 1
        out = work / f"{name}_trial{attempt:03d}"
        cmd = make_cmd(out)
        r = interrupted_run(cmd, rng.uniform(0, train_s))
        if not r["sent"] or r["rc"] == 0:  # finished first, or exiting when the signal came
            missed += 1
            train_s = min(train_s, r["ran_s"])  # the machine got faster than the reference run
            log(f"{name} attempt {attempt}: finished before the signal (missed), redrawn")
            continue
        rc, _, text = run_to_end(cmd)
        r["resume_rc"] = rc
        diffs = differences(reference, load_result(kind, out)) if rc == 0 else [f"resume failed: {text[-300:]}"]
        r["identical"] = not diffs
        r["differences"] = diffs[:10]
        results.append(r)
        log(f"{name} trial {len(results)}/{n}: SIGINT after {r['delay_s']:.2f} s -> rc {r['rc']}, "
            f"step {r['step']} ({r['during']}); resumed rc {rc}; "
            f"{'bit-identical' if not diffs else 'DIFFERENT: ' + '; '.join(diffs[:3])}")
    return results, missed


def run_bench(kinds, n: int, work: Path, seed: int = 0, music_steps: int = 120, sae_epochs: int = 8,
              sae_models=("topk", "bae"), check_determinism: bool = True, log=print) -> dict:
    """``n`` interrupted-and-resumed runs per trainer in ``kinds`` ("music", "sae"); a summary."""
    rng = random.Random(seed)
    work.mkdir(parents=True, exist_ok=True)
    summary = {}
    for kind in kinds:
        if kind == "music":
            makers = {"music": lambda out: music_cmd(out, music_steps)}
        else:
            data = sae_data(work)
            makers = {f"sae-{m}": (lambda out, m=m: sae_cmd(out, data, m, sae_epochs)) for m in sae_models}
        per = {name: n // len(makers) + (i < n % len(makers)) for i, name in enumerate(makers)}
        rows = []
        for name, make in makers.items():
            ref_dirs = [work / f"{name}_reference", work / f"{name}_reference2"]
            rc, train_s, text = run_to_end(make(ref_dirs[0]))
            assert rc == 0, text[-2000:]
            ref, det = load_result(kind, ref_dirs[0]), None
            if check_determinism:
                rc, _, text = run_to_end(make(ref_dirs[1]))
                assert rc == 0, text[-2000:]
                det = differences(ref, load_result(kind, ref_dirs[1]))
            log(f"{name}: reference trains for {train_s:.2f} s; two uninterrupted runs "
                f"{'not compared' if det is None else 'bit-identical' if not det else 'DIFFER: ' + '; '.join(det[:3])}")
            res, missed = trials(kind, name, make, ref, train_s, per[name], work, rng, log)
            rows.append({"config": name, "command": " ".join(make(Path("OUT"))[1:]),
                         "train_s": round(train_s, 2),
                         "reference_deterministic": None if det is None else not det,
                         "missed": missed, "trials": res})
        got = [t for r in rows for t in r["trials"]]
        summary[kind] = {
            "sigints": len(got),
            "bit_identical": sum(t["identical"] for t in got),
            "exit_130": sum(t["rc"] == 130 for t in got),
            "tracebacks": sum(t["traceback"] for t in got),
            "during_validation": sum(t["during"] == "validation" for t in got),
            "runs": rows,
        }
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=20, help="SIGINTs per trainer")
    ap.add_argument("--which", nargs="+", default=["music", "sae"], choices=["music", "sae"])
    ap.add_argument("--work", default="/tmp/fastattn_sigint_resume")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random signal times")
    ap.add_argument("--out", default=None, help="JSON result file (e.g. bench/results/sigint_resume.json)")
    args = ap.parse_args(argv)
    t0 = time.time()
    summary = run_bench(args.which, args.trials, Path(args.work), args.seed)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    result = {"command": "python bench/sigint_resume.py " + " ".join(argv or sys.argv[1:]),
              "commit": commit, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "host": platform.node(),
              "cpus": os.cpu_count(), "wall_s": round(time.time() - t0, 1), **summary}
    for kind in args.which:
        s = summary[kind]
        print(f"{kind} train: {s['bit_identical']}/{s['sigints']} resumed runs bit-identical to the "
              f"uninterrupted run; exit code 130: {s['exit_130']}/{s['sigints']}; tracebacks: "
              f"{s['tracebacks']}; signals during validation: {s['during_validation']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    ok = all(summary[k]["bit_identical"] == summary[k]["sigints"] for k in args.which)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
