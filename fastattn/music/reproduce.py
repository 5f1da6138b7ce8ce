"""`fastattn music reproduce`: the paper's five attention variants, several seeds, paired verdicts.

For every corpus (``synthetic``, ``pop909``, ``pop909-eighth`` = the paper's 1/8 training data:
a seeded eighth of the training *songs*, validation and test unchanged), every seed and every
variant (Attn, RelAttn, RIPO, CirRelAttn, CirRelAttn-H), it trains one model with
``fastattn.music.train.train`` (resumable: an interrupted reproduction continues bit-for-bit),
then evaluates the best checkpoint: validation and test NLL (total and per field), the next-bar
test on the test split, and rep@k of continuations of test prompts next to the ground truth
(both sampled with the authors' top-p 0.2 per field).

Each finished run is one JSON line in ``OUT/runs.jsonl`` (skipped when rerun). ``report`` turns
them into ``OUT/results.json`` and ``OUT/results.md``: mean ± std over seeds per variant, and
for every baseline X a paired comparison with CirRelAttn-H on the same seeds —
"CirRelAttn-H better than X by d ± s, seeds agree k/n" (d = mean per-seed difference, oriented so
that positive favours CirRelAttn-H, s = its standard deviation over seeds).

A ``Budget`` fixes model size and training; ``BUDGETS["paper"]`` is the authors' configuration
(4 layers × 256, batch 32, 50k steps; for a GPU). ``convention`` selects the attention
convention of the model ("authors", the paper's code and the default, or "slides") and is
recorded with every run.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from fastattn._io import append_jsonl, atomic_write_json, atomic_write_text, read_jsonl
from fastattn.music.metrics import mean_std
from fastattn.nn import VARIANTS as _MODULE_VARIANTS

VARIANTS = tuple(_MODULE_VARIANTS)
REFERENCE = "CirRelAttn-H"
CORPORA = ("synthetic", "pop909", "pop909-eighth")
NEXT_BAR = ("note_f1", "pianoroll_f1", "chroma_sim", "grooving_sim", "pitch_range_sim",
            "note_density_sim")
LOWER_IS_BETTER = {"valid_nll", "test_nll"}


@dataclass(frozen=True)
class Budget:
    """Model size, training and evaluation effort of one run."""
    n_layer: int
    d_model: int
    n_head: int
    d_ff: int
    dropout: float
    max_len: int
    batch_size: int
    steps: int
    lr: float
    warmup: int
    decay_steps: int
    eval_every: int
    eval_windows: int
    """Validation windows used while training (0 = all)."""
    patience: int
    nll_windows: int
    """Windows of the final validation/test NLL (0 = the whole split)."""
    next_bar_windows: int
    continuations: int
    device: str = "cpu"
    threads: int = 2
    top_p: float = 0.2
    """Nucleus sampling of every field in the next-bar test and the continuations: 0.2 is the
    authors' setting (their generate.py / evaluate.py defaults)."""


BUDGETS: Dict[str, Budget] = {
    # Seconds, for tests of the pipeline.
    "tiny": Budget(n_layer=1, d_model=32, n_head=2, d_ff=64, dropout=0.1, max_len=1024,
                   batch_size=4, steps=3, lr=1e-3, warmup=1, decay_steps=3, eval_every=3,
                   eval_windows=4, patience=0, nll_windows=4, next_bar_windows=2,
                   continuations=2),
    # A 2-core CPU in the background (the configuration the diagnosis sized).
    "cpu": Budget(n_layer=2, d_model=64, n_head=4, d_ff=256, dropout=0.1, max_len=1024,
                  batch_size=8, steps=1200, lr=1e-3, warmup=120, decay_steps=1200,
                  eval_every=300, eval_windows=64, patience=0, nll_windows=256,
                  next_bar_windows=32, continuations=8),
    # The authors' configuration (SPEC §4), for a GPU.
    "paper": Budget(n_layer=4, d_model=256, n_head=8, d_ff=1024, dropout=0.2, max_len=1024,
                    batch_size=32, steps=50000, lr=8e-5, warmup=5000, decay_steps=50000,
                    eval_every=500, eval_windows=0, patience=20, nll_windows=0,
                    next_bar_windows=200, continuations=16, device="auto"),
}


# ---------------------------------------------------------------------------------------------
def load(corpus: str, data: Optional[str] = None, *, seed: int = 0, songs: int = 0,
         cache_dir=None):
    """The WindowCorpus of ``corpus``: "synthetic" (embedded), "pop909" (folder ``data``,
    first ``songs`` songs when > 0) or "pop909-eighth" (``eighth`` of "pop909")."""
    if corpus == "synthetic":
        from fastattn.music.corpus import load_corpus
        return load_corpus(None, seed=seed)
    if corpus not in CORPORA:
        raise ValueError(f"corpus must be one of {list(CORPORA)}, got {corpus!r}")
    if data is None:
        raise ValueError(f"corpus {corpus!r} needs --data (the POP909 folder)")
    from fastattn.music.corpus import load_corpus
    c = load_corpus(data, seed=seed, songs=songs, cache_dir=cache_dir, progress=False)
    return eighth(c, seed) if corpus == "pop909-eighth" else c


def eighth(corpus, seed: int = 0, fraction: float = 1 / 8):
    """A copy of ``corpus`` whose training windows are those of a seeded ``fraction`` of the
    training songs (at least one song); validation and test windows are unchanged."""
    from fastattn.music.data import WindowCorpus
    train = corpus.windows["train"]
    songs = np.unique(train[:, 0])
    keep = np.random.default_rng([int(seed), 8]).permutation(songs)[:max(1, round(fraction * len(songs)))]
    windows = dict(corpus.windows)
    windows["train"] = train[np.isin(train[:, 0], keep)]
    return WindowCorpus(corpus.songs, corpus.names, windows, corpus.window_bars,
                        dict(corpus.skipped), {**corpus.stats, "train_songs": int(len(keep))})


def model_config(variant: str, budget: Budget, convention: str = "authors",
                 representation: str = "note"):
    """ModelConfig of one run (``convention``: "authors", the paper's code, or "slides")."""
    from fastattn.music.model import ModelConfig
    return ModelConfig(representation=representation, variant=variant, n_layer=budget.n_layer,
                       d_model=budget.d_model, n_head=budget.n_head, d_ff=budget.d_ff,
                       dropout=budget.dropout, max_len=budget.max_len, convention=convention)


def train_config(budget: Budget, seed: int, out_dir: str):
    from fastattn.music.train import TrainConfig
    return TrainConfig(lr=budget.lr, warmup_steps=budget.warmup, decay_steps=budget.decay_steps,
                       batch_size=budget.batch_size, max_steps=budget.steps,
                       eval_every=budget.eval_every, eval_windows=budget.eval_windows,
                       patience=budget.patience, seed=seed, out_dir=out_dir,
                       device=budget.device, progress=False, log_every=max(budget.steps // 20, 1))


def run_one(corpus, corpus_name: str, variant: str, seed: int, budget: Budget, out: Path,
            convention: str = "authors", representation: str = "note") -> dict:
    """Train (or resume) one run and evaluate its best checkpoint; returns its record."""
    from fastattn.music.evaluate import next_bar_test
    from fastattn.music.generate import SamplingConfig
    from fastattn.music.repetition import continue_windows
    from fastattn.music.train import evaluate_nll, load_model, resolve_device, train

    t0 = time.time()
    mc = model_config(variant, budget, convention, representation)
    run_dir = out / "runs" / corpus_name / f"{variant}-s{seed}"
    r = train(mc, train_config(budget, seed, str(run_dir)), corpus, resume=True)
    if r.stopped == "interrupted":
        raise KeyboardInterrupt
    device = resolve_device(budget.device)
    model = load_model(run_dir / "best.pt", device)
    rec = {"corpus": corpus_name, "variant": variant, "seed": seed, "convention": convention,
           "representation": representation, "budget": asdict(budget), "steps": r.step,
           "stopped": r.stopped, "train_windows": corpus.n_windows("train")}
    for split in ("valid", "test"):
        nll = evaluate_nll(model, corpus, split, max_windows=budget.nll_windows, device=device)
        rec[f"{split}_nll"] = nll["nll"]
        rec[f"{split}_nll_fields"] = {k[4:]: v for k, v in nll.items() if k.startswith("nll_")}
    model = model.cpu()  # sampling runs token by token: CPU is fine and deterministic
    sampling = SamplingConfig(top_p=budget.top_p)
    rec["next_bar"] = next_bar_test(model, corpus, "test", n_windows=budget.next_bar_windows,
                                    sampling=sampling, seed=seed)
    c = continue_windows(model, corpus, "test", budget.continuations, sampling=sampling,
                         seed=seed)
    rec["rep"] = {str(k): v[0] for k, v in c.rep().items()}
    rec["rep_truth"] = {str(k): v[0] for k, v in c.rep_true().items()}
    rec["seconds"] = round(time.time() - t0, 1)
    return rec


def reproduce(out, corpora: Sequence[str] = ("synthetic",), variants: Sequence[str] = VARIANTS,
              seeds: Sequence[int] = (0, 1, 2), budget: Budget = BUDGETS["cpu"], *,
              data: Optional[str] = None, songs: int = 0, convention: str = "authors",
              representation: str = "note", cache_dir=None, log=print) -> List[dict]:
    """Run every (corpus, seed, variant) not yet in ``out/runs.jsonl``; returns all records."""
    import torch
    torch.set_num_threads(budget.threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "runs.jsonl"
    done = {(r["corpus"], r["variant"], r["seed"]) for r in read_runs(path)}
    for name in corpora:
        corpus = None
        for seed in seeds:
            for variant in variants:
                if (name, variant, seed) in done:
                    continue
                if corpus is None:
                    corpus = load(name, data, songs=songs, cache_dir=cache_dir)
                    log(f"{name}: {corpus.summary()}")
                rec = run_one(corpus, name, variant, seed, budget, out, convention, representation)
                append_jsonl(path, rec)
                log(f"{name} {variant} seed {seed}: valid NLL {rec['valid_nll']:.4f}, test NLL "
                    f"{rec['test_nll']:.4f}, note F1 {rec['next_bar']['note_f1']:.3f} "
                    f"({rec['seconds'] / 60:.1f} min)")
    return read_runs(path)


def read_runs(path) -> List[dict]:
    return read_jsonl(path)  # a last line cut short by a kill is dropped: that run is redone


# ---------------------------------------------------------------------------------------------
def _metrics(rec: dict) -> Dict[str, float]:
    """The comparable numbers of one run, flat."""
    m = {"valid_nll": rec["valid_nll"], "test_nll": rec["test_nll"]}
    m.update({f"test_nll_{k}": v for k, v in rec["test_nll_fields"].items()})
    m.update({k: rec["next_bar"][k] for k in NEXT_BAR if k in rec["next_bar"]})
    m.update({f"rep@{k}": v for k, v in rec["rep"].items()})
    return m


def paired(ref: Dict[int, float], other: Dict[int, float], lower_is_better: bool) -> Optional[dict]:
    """Paired comparison on the seeds both have: d_s = other − ref (NLL) or ref − other
    (similarities), so d > 0 favours ``ref``. Returns mean d, its std over seeds, the seeds that
    agree with the sign of the mean, n, and a verdict: "better"/"worse" when every seed agrees
    and |mean| > 2 standard errors, else "no clear difference"."""
    seeds = sorted(set(ref) & set(other))
    if not seeds:
        return None
    d = np.array([(other[s] - ref[s]) if lower_is_better else (ref[s] - other[s]) for s in seeds])
    mean = float(d.mean())
    std = float(d.std(ddof=1)) if len(d) > 1 else 0.0
    n = len(d)
    agree = int((d > 0).sum()) if mean >= 0 else int((d < 0).sum())
    clear = n > 1 and agree == n and abs(mean) > 2 * std / math.sqrt(n)
    verdict = ("better" if mean > 0 else "worse") if clear else "no clear difference"
    return {"d": mean, "std": std, "agree": agree, "n": n, "seeds": seeds, "verdict": verdict}


def report(records: Sequence[dict], reference: str = REFERENCE) -> dict:
    """Aggregate runs: per corpus, per variant mean ± std over seeds of every metric, and per
    baseline the paired comparison with ``reference`` on every metric. A run recorded twice (two
    processes sharing one log) counts once: its last record."""
    records = list({(r["corpus"], r["variant"], r["seed"]): r for r in records}.values())
    out: dict = {}
    for corpus in sorted({r["corpus"] for r in records}, key=lambda c: (c not in CORPORA, c)):
        rs = [r for r in records if r["corpus"] == corpus]
        by_var = {v: {r["seed"]: _metrics(r) for r in rs if r["variant"] == v}
                  for v in VARIANTS if any(r["variant"] == v for r in rs)}
        keys = sorted({k for per_seed in by_var.values() for m in per_seed.values() for k in m})
        summary = {v: {k: mean_std([m[k] for m in per_seed.values() if k in m]) for k in keys}
                   for v, per_seed in by_var.items()}
        truth = [r["rep_truth"] for r in rs]
        pairs = {}
        if reference in by_var:
            for v, per_seed in by_var.items():
                if v == reference:
                    continue
                pairs[v] = {}
                for k in keys:
                    ref = {s: m[k] for s, m in by_var[reference].items() if k in m}
                    oth = {s: m[k] for s, m in per_seed.items() if k in m}
                    lower = k in LOWER_IS_BETTER or k.startswith("test_nll_")
                    if k.startswith("rep@"):
                        continue  # more repetition is not "better": reported, not judged
                    p = paired(ref, oth, lower)
                    if p is not None:
                        pairs[v][k] = p
        order = sorted(summary, key=lambda v: summary[v]["test_nll"][0])
        out[corpus] = {"variants": summary, "pairs": pairs, "order_by_test_nll": order,
                       "rep_truth": {k: mean_std([t[k] for t in truth]) for k in truth[0]} if truth else {},
                       "train_windows": rs[0].get("train_windows"), "budget": rs[0]["budget"],
                       "convention": rs[0].get("convention")}
    return out


def verdict_line(corpus: str, other: str, metric: str, p: dict, reference: str = REFERENCE) -> str:
    word = {"better": "better than", "worse": "worse than",
            "no clear difference": "not clearly different from"}[p["verdict"]]
    return (f"{corpus}: {reference} {word} {other} on {metric} by {p['d']:+.4f} ± {p['std']:.4f}, "
            f"seeds agree {p['agree']}/{p['n']}")


def markdown(rep: dict, reference: str = REFERENCE) -> str:
    """The report as Markdown: one table per corpus, then the verdict lines."""
    lines = []
    for corpus, r in rep.items():
        b = r["budget"]
        lines += [f"### {corpus}", "",
                  f"{b['n_layer']} layers × {b['d_model']}, {b['n_head']} heads, batch "
                  f"{b['batch_size']}, {b['steps']} steps, lr {b['lr']}; {r['train_windows']:,} "
                  f"training windows; convention {r['convention']}; mean ± std over seeds "
                  f"(NLL in nats per note token; next-bar metrics on the test split and rep@k "
                  f"of test continuations, sampled with top-p {b.get('top_p', 0.2)}; rep@k of the "
                  f"true windows "
                  + " / ".join(f"{m:.2f}" for m, _, _ in r["rep_truth"].values()) + ").", "",
                  "| variant | seeds | valid NLL | test NLL | pitch | position | duration | "
                  "note F1 | roll F1 | chroma | groove | rep@4 | rep@8 | rep@12 |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        cols = ("valid_nll", "test_nll", "test_nll_pitch", "test_nll_position",
                "test_nll_duration", "note_f1", "pianoroll_f1", "chroma_sim", "grooving_sim",
                "rep@4", "rep@8", "rep@12")
        for v, s in r["variants"].items():
            cells = []
            for c in cols:
                if c in s:
                    m, sd, _ = s[c]
                    d = 2 if c.startswith("rep@") else 3
                    cells.append(f"{m:.{d}f} ± {sd:.{d}f}")
                else:
                    cells.append("–")
            lines.append(f"| {v} | {s['test_nll'][2]} | " + " | ".join(cells) + " |")
        lines += ["", "Order by test NLL (best first): " + " < ".join(r["order_by_test_nll"])
                  + f" (paper: {reference} best).", ""]
        for other, ps in r["pairs"].items():
            for metric in ("test_nll", "valid_nll", "note_f1", "pianoroll_f1", "chroma_sim",
                           "grooving_sim"):
                if metric in ps:
                    lines.append("- " + verdict_line(corpus, other, metric, ps[metric], reference))
        lines.append("")
    return "\n".join(lines)


def write_report(out) -> dict:
    """Read ``out/runs.jsonl`` and write ``out/results.json`` and ``out/results.md``."""
    out = Path(out)
    rep = report(read_runs(out / "runs.jsonl"))
    atomic_write_json(out / "results.json", rep, indent=1)
    atomic_write_text(out / "results.md", markdown(rep) + "\n")
    return rep


def budget_from(name: str, **overrides) -> Budget:
    """A named budget with fields replaced (None values ignored). A new ``steps`` keeps the
    schedule's shape: warm-up and decay scale with it, evaluations stay within it."""
    if name not in BUDGETS:
        raise ValueError(f"budget must be one of {list(BUDGETS)}, got {name!r}")
    b = BUDGETS[name]
    kw = {k: v for k, v in overrides.items() if v is not None}
    steps = kw.get("steps")
    if steps is not None and steps != b.steps:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        kw.setdefault("warmup", round(b.warmup * steps / b.steps))
        kw.setdefault("decay_steps", max(round(b.decay_steps * steps / b.steps), 1))
        kw.setdefault("eval_every", min(b.eval_every, steps))
    return replace(b, **kw)
