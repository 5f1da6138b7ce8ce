#!/usr/bin/env python
"""fastattn's TopK SAE against EleutherAI's sparsify (SparseCoder) at equal steps, on CPU.

    python -m fastattn analyze collect --hf minilm --layers 3 --context 64 --stride 8 --normalize \
        --out runs/analyze/minilm
    python bench/bench_topk_vs_sparsify.py --data runs/analyze/minilm/layer_03 [--steps 600]

Same data, same order, same shapes (n latents, k), Adam at the same learning rate
(2e-4·sqrt(16384/n), the formula both use), AuxK with coefficient 1/32 and sparsify's and our
default dead threshold (10M tokens: no latent counts as dead within these runs, in either).
sparsify is driven by the body of its trainer's hook for loss_fn="fvu": on step 0 b_dec = the
batch mean; decoder rows renormalised before every forward; loss = fvu + auxk_alpha·auxk;
remove_gradient_parallel_to_decoder_directions; optimizer step (its own Adam option, without the
warm-up schedule). fastattn runs train.py's step (forward, backward, before_step, Adam, after_step,
record_firing) after TopKSAE.init_from_data on the first 4096 rows. Variants:

  sparsify                          SparseCoder(d, n, k), its own initialisation (encoder:
                                    nn.Linear's, rows of norm ≈ 0.58; decoder: its rows normalised)
  fastattn gm + unit                b_pre at the geometric median, encoder = decoderᵀ scaled as
                                    Gao et al.'s code (TopKSAE.init_from_data)
  fastattn gm + data                the default: ... encoder factor by least squares on the sample
  fastattn mean + unit              sparsify's b_pre statistic
  fastattn zeros + none             the previous behaviour (b_pre = 0, encoder = decoderᵀ, unit rows)
  fastattn from sparsify init       TopKSAE loaded with sparsify's step-0 weights (must agree)

Per variant: median step time (steps of the variants interleaved round-robin, so contention
hits all alike), peak memory of one training step (RSS growth in a fresh subprocess after two
warm-up steps and malloc_trim, so the step's own allocations count), training FVU (mean of the last 50 steps), held-out FVU (20 % of the rows),
never-firing latents (no firing in the last 100 steps; and on the held-out rows).
Writes bench/results/topk_vs_sparsify.{json,md}.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # its Triton decoder needs a GPU
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402

from bench_circular_relative_attention import _peak_rss_start  # noqa: E402
from fastattn.sae.modules import TopKSAE, fvu  # noqa: E402

INIT_ROWS, LAST = 4096, 100


class Sparsify:
    """sparsify's SparseCoder under the body of its trainer's fvu hook."""

    def __init__(self, d, n, k, lr, aux_coef, dead_tokens, seed):
        from sparsify import SparseCoder, SparseCoderConfig

        torch.manual_seed(seed)
        self.sae = SparseCoder(d, SparseCoderConfig(num_latents=n, k=k))
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=lr)
        self.aux, self.dead_tokens, self.n = aux_coef, dead_tokens, n
        self.since = torch.zeros(n, dtype=torch.long)
        self.step_no = 0

    def step(self, x):
        sae = self.sae
        if self.step_no == 0:
            sae.b_dec.data = x.mean(0)
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x, dead_mask=self.since > self.dead_tokens)
        (out.fvu + self.aux * out.auxk_loss).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        self.opt.step()
        self.opt.zero_grad()
        fired = torch.zeros(self.n, dtype=torch.bool)
        fired[out.latent_indices.flatten()] = True
        self.since += x.shape[0]
        self.since[fired] = 0
        self.step_no += 1
        return out.fvu.item(), fired

    @torch.no_grad()
    def evaluate(self, x):
        out = self.sae(x)
        fired = torch.zeros(self.n, dtype=torch.bool)
        fired[out.latent_indices[out.latent_acts > 0]] = True
        return float(fvu(x, out.sae_out)), fired


class Ours:
    """TopKSAE with train.py's step sequence."""

    def __init__(self, d, n, k, lr, aux_coef, dead_tokens, seed, init=None, scale=None, sample=None,
                 from_sparsify=None):
        torch.manual_seed(seed)
        self.sae = TopKSAE(d, n, k, aux_coef=aux_coef, dead_tokens=dead_tokens)
        self.sae.set_decoder_norm_to_unit_norm()
        if from_sparsify is not None:  # sparsify's weights after its step-0 b_dec
            s = from_sparsify.sae
            with torch.no_grad():
                self.sae.W_enc.copy_(s.encoder.weight)
                self.sae.b_enc.copy_(s.encoder.bias)
                self.sae.W_dec.copy_(s.W_dec)
                self.sae.b_pre.copy_(sample.mean(0))
        else:
            self.sae.init_from_data(sample, b_pre=init, scale=scale)
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=lr)

    def step(self, x):
        sae = self.sae
        out = sae(x)
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        sae.before_step()
        self.opt.step()
        sae.after_step()
        fired = sae.fired_mask(out)
        sae.record_firing(fired, x.shape[0])
        return out.fvu.item(), fired

    @torch.no_grad()
    def evaluate(self, x):
        self.sae.eval()
        out = self.sae(x)
        self.sae.train()
        return float(out.fvu), self.sae.fired_mask(out)


def load_rows(path: str) -> torch.Tensor:
    from fastattn.sae.stores import open_store

    store = open_store(path)
    return torch.cat(list(store.iter_rows(8192))).float()


def make(name, args, d, first_batch, sample, sparsify_ref=None):
    kw = dict(d=d, n=args.latents, k=args.k, lr=2e-4 * (16384 / args.latents) ** 0.5, aux_coef=1 / 32,
              dead_tokens=10_000_000, seed=args.seed)
    if name == "sparsify":
        return Sparsify(**kw)
    if name == "fastattn from sparsify init":
        return Ours(**kw, sample=first_batch, from_sparsify=sparsify_ref)
    b_pre, scale = VARIANTS[name]
    return Ours(**kw, init=b_pre, scale=scale, sample=sample)


VARIANTS = {"sparsify": None, "fastattn gm + unit": ("geometric_median", "unit"),
            "fastattn gm + data": ("geometric_median", "data"), "fastattn mean + unit": ("mean", "unit"),
            "fastattn zeros + none": ("zeros", "none"), "fastattn from sparsify init": None}


def batches(train, batch, steps, seed):
    g = torch.Generator().manual_seed(seed)
    out, perm, pos = [], torch.randperm(train.shape[0], generator=g), 0
    while len(out) < steps:
        if pos + batch > perm.numel():
            perm, pos = torch.randperm(train.shape[0], generator=g), 0
        out.append(perm[pos:pos + batch])
        pos += batch
    return out


def memory_child(args) -> int:
    torch.set_num_threads(args.threads)
    x = load_rows(args.data)
    train = x[: int(0.8 * x.shape[0])]
    idx = batches(train, args.batch, 3, args.seed)
    ref = make("sparsify", args, x.shape[1], None, None) if "sparsify" in args.memory_of else None
    m = ref if args.memory_of == "sparsify" else make(args.memory_of, args, x.shape[1], train[idx[0]],
                                                      train[:INIT_ROWS], ref)
    m.step(train[idx[0]])
    m.step(train[idx[1]])
    # Give freed blocks back to the OS so that the high-water mark sees the step's own allocations.
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    growth = _peak_rss_start()
    m.step(train[idx[2]])
    print(json.dumps({"peak_step_mb": growth()}))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="activation store (a collected layer)")
    p.add_argument("--latents", type=int, default=6144)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(REPO / "bench/results/topk_vs_sparsify"))
    p.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_of:
        return memory_child(args)
    torch.set_num_threads(args.threads)
    x = load_rows(args.data)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(args.seed))
    x = x[perm]
    n_train = int(0.8 * x.shape[0])
    train, held = x[:n_train], x[n_train:]
    idx = batches(train, args.batch, args.steps, args.seed + 1)
    ref = make("sparsify", args, x.shape[1], None, None)
    sample = train[torch.cat(idx[: -(-INIT_ROWS // args.batch)])[:INIT_ROWS]]  # the first rows, as train.py
    models = {"sparsify": ref}
    for name in list(VARIANTS)[1:]:  # "from sparsify init": sparsify's weights before its first step
        models[name] = make(name, args, x.shape[1], train[idx[0]], sample, ref)
    times = {k: [] for k in models}
    fvus = {k: [] for k in models}
    recent = {k: [] for k in models}
    t_start = time.time()
    for s, i in enumerate(idx):
        xb = train[i]
        for name, m in models.items():
            t0 = time.perf_counter()
            f, fired = m.step(xb)
            times[name].append(time.perf_counter() - t0)
            fvus[name].append(f)
            recent[name] = (recent[name] + [fired])[-LAST:]
        if (s + 1) % 100 == 0:
            print(f"step {s + 1}: " + ", ".join(f"{k}: fvu {fvus[k][-1]:.4f}" for k in models), flush=True)
    rows = []
    for name, m in models.items():
        held_fvu, held_fired = m.evaluate(held)
        last_fired = torch.stack(recent[name]).any(0)
        mem = subprocess.run([sys.executable, __file__, "--data", args.data, "--latents", str(args.latents),
                              "--k", str(args.k), "--batch", str(args.batch), "--seed", str(args.seed),
                              "--threads", str(args.threads), "--memory-of", name],
                             capture_output=True, text=True)
        peak = json.loads(mem.stdout.strip().splitlines()[-1])["peak_step_mb"] if mem.returncode == 0 else None
        rows.append({"variant": name, "step_ms_median": 1e3 * statistics.median(times[name]),
                     "peak_step_mb": peak, "train_fvu_last50": statistics.mean(fvus[name][-50:]),
                     "heldout_fvu": held_fvu,
                     "never_fired_last100_frac": float((~last_fired).double().mean()),
                     "never_fired_heldout_frac": float((~held_fired).double().mean())})
    ref_fvu = torch.tensor(fvus["sparsify"])
    same = torch.tensor(fvus["fastattn from sparsify init"])
    meta = {"data": args.data, "rows": x.shape[0], "d": x.shape[1], "latents": args.latents, "k": args.k,
            "batch": args.batch, "steps": args.steps, "threads": args.threads, "torch": torch.__version__,
            "max_train_fvu_gap_same_init": float((ref_fvu - same).abs().max()),
            "wall_s": round(time.time() - t_start, 1)}
    try:
        import importlib.metadata as md

        meta["sparsify"] = md.version("eai-sparsify")
    except Exception:
        pass
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    sp = rows[0]
    lines = [f"TopK SAE vs sparsify {meta.get('sparsify', '')} at equal steps ({args.steps} steps, batch "
             f"{args.batch}, d={x.shape[1]}, n={args.latents}, k={args.k}, {args.threads} thread(s), shared CPU); "
             f"command: `python bench/bench_topk_vs_sparsify.py --data {args.data} --steps {args.steps}`", "",
             "| variant | step ms (median) | step time vs sparsify | peak step MB | train FVU (last 50) | "
             "held-out FVU | never fired, last 100 steps | never fired, held-out |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mem = f"{r['peak_step_mb']:.0f}" if r["peak_step_mb"] is not None else "n/a"
        lines.append(f"| {r['variant']} | {r['step_ms_median']:.1f} | {sp['step_ms_median'] / r['step_ms_median']:.2f}× | "
                     f"{mem} | {r['train_fvu_last50']:.4f} | {r['heldout_fvu']:.4f} | "
                     f"{r['never_fired_last100_frac']:.1%} | {r['never_fired_heldout_frac']:.1%} |")
    lines.append("")
    lines.append(f"Same initial weights (fastattn loaded with sparsify's step-0 weights): max |FVU gap| over "
                 f"{args.steps} steps = {meta['max_train_fvu_gap_same_init']:.2e}.")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
