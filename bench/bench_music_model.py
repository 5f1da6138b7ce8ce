#!/usr/bin/env python
"""Whole-model benchmark of the music Transformer: training steps per second and generated notes
per second for each attention variant, beside vanilla attention in the same model.

    python bench/bench_music_model.py                                  # 4 x 256, batch 8, 1024 notes
    python bench/bench_music_model.py --layers 2 --width 128 --heads 4 --notes 256 --quick

Model: ``fastattn.music.model`` (note-based, pre-LN, FF 4·width, --dropout 0.2, alpha 0.1) built
here from a config; data: random note tokens with non-decreasing onsets (steps of 0, 3, 6 or 12
ticks, so bars advance) and pitches 21..108 — no dataset is needed to time steps.

Rows per variant (Attn, RelAttn, RIPO, CirRelAttn, CirRelAttn-H through fastattn's op, and
"Attn-sdpa": the same model with vanilla attention by F.scaled_dot_product_attention):
- train: one optimizer step (forward, the six field losses, backward, AdamW), median of --steps,
  the variants' steps interleaved round-robin;
- generate: --gen-notes new notes after a --gen-prompt note prompt, one note per forward (greedy
  over each field's logits), with the per-layer KV cache and without it (every step re-runs the
  whole sequence); notes/s for both.
Rows are appended to --out with the device, thread count, load average, clock, commit and date
(--clock cpu: process CPU time instead of wall time, for single-thread runs on a shared machine).
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fastattn.music import tokens as T  # noqa: E402
from fastattn.music.model import ModelConfig, MusicTransformer, loss_from_parts  # noqa: E402
from fastattn.nn import VARIANTS  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
from bench_circular_relative_attention import append_rows, device_name, interleave, versions  # noqa: E402

COLUMNS = ("variant", "what", "layers", "width", "heads", "batch", "notes", "dropout", "convention", "value", "unit", "ms",
           "device", "threads", "load1", "clock", "commit", "date")
SDPA = "Attn-sdpa"


class SDPAAttention(nn.Module):
    """Vanilla causal multi-head attention by F.scaled_dot_product_attention, with the interface
    of CircularRelativeAttention as the music model calls it (KV cache included)."""

    def __init__(self, like: nn.Module):
        super().__init__()
        self.num_heads, self.head_dim = like.num_heads, like.head_dim
        self.in_proj, self.out_proj, self.dropout = like.in_proj, like.out_proj, like.dropout
        self.new_kv_cache = like.new_kv_cache

    def forward(self, x, onset=None, pitch=None, key_padding_mask=None, kv_cache=None, bar=None, position=None):
        B, L, E = x.shape
        q, k, v = self.in_proj(x).view(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        mask, causal = None, True
        if kv_cache is not None:
            kv_cache.append(k, v)
            k, v = kv_cache.k, kv_cache.v
            Lk = k.shape[2]
            causal = L == Lk
            if not causal and L > 1:
                mask = torch.arange(Lk, device=x.device) <= torch.arange(Lk - L, Lk, device=x.device)[:, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, E))


def build(variant: str, args) -> MusicTransformer:
    torch.manual_seed(0)
    cfg = ModelConfig(representation="note", variant="Attn" if variant == SDPA else variant, n_layer=args.layers,
                      d_model=args.width, n_head=args.heads, d_ff=4 * args.width, dropout=args.dropout,
                      max_len=max(args.notes, args.gen_prompt + args.gen_notes), convention=args.convention)
    model = MusicTransformer(cfg)
    if variant == SDPA:
        for block in model.blocks:
            block.attn = SDPAAttention(block.attn)
    return model


def coords(onset, pitch) -> dict:
    """Every coordinate the attention may read (each convention takes its own)."""
    return dict(onset=onset, pitch=pitch, bar=onset // T.BAR_RES, position=onset % T.BAR_RES)


def random_notes(B: int, L: int, seed: int = 0):
    """tokens [B, L, 6], onset [B, L], pitch [B, L] of random notes with increasing onsets."""
    g = torch.Generator().manual_seed(seed)
    steps = torch.tensor([0, 3, 6, 12])[torch.randint(0, 4, (B, L), generator=g)]
    onset = steps.cumsum(1) - steps[:, :1]
    pitch = torch.randint(21, 109, (B, L), generator=g)
    tok = torch.stack([torch.full((B, L), T.TYPE_NOTE), (onset // T.BAR_RES) % T.N_BARS, onset % T.BAR_RES,
                       torch.randint(0, T.FIELD_SIZES[3], (B, L), generator=g), pitch,
                       torch.randint(0, T.FIELD_SIZES[5], (B, L), generator=g)], dim=-1)
    return tok, onset, pitch


def now(args) -> float:
    return time.process_time() if args.clock == "cpu" else time.perf_counter()


def training_step(model, args):
    """One optimizer step of ``model`` on fixed random notes (a closure)."""
    tok, onset, pitch = random_notes(args.batch, args.notes + 1)
    x, y = tok[:, :-1], tok[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        model.train()
        opt.zero_grad(set_to_none=True)
        loss = loss_from_parts(model.loss_parts(x, y, **coords(onset[:, :-1], pitch[:, :-1])))
        loss.backward()
        opt.step()
    return step


def time_training(models: dict, args) -> dict:
    """variant -> [ms per step]: the variants' steps interleaved round-robin."""
    return interleave({v: training_step(m, args) for v, m in models.items()}, args.steps, args.clock,
                      warmup=args.warmup)


@torch.no_grad()
def time_generation(model, args, use_cache: bool) -> float:
    """Notes per second generating args.gen_notes notes after a prompt (greedy per field)."""
    model.eval()
    tok, onset, pitch = random_notes(1, args.gen_prompt)
    toks, ons, pis = [tok], [onset], [pitch]
    caches = model.new_caches(1) if use_cache else None
    fed = 0
    t0 = None
    for i in range(args.gen_notes + 1):
        if i == 1:
            t0 = now(args)  # the prompt pass is not a generated note
        x, on, pi = torch.cat(toks, 1), torch.cat(ons, 1), torch.cat(pis, 1)
        if use_cache:
            x, on, pi = x[:, fed:], on[:, fed:], pi[:, fed:]
            fed = sum(t.shape[1] for t in toks)
        logits = model(x, caches=caches, **coords(on, pi))
        nxt = torch.stack([lg[:, -1].argmax(-1) for lg in logits], -1)[:, None]  # [1, 1, 6]
        nxt[..., 0] = T.TYPE_NOTE
        last = int(ons[-1][0, -1])
        new_on = last + 3 * int(nxt[0, 0, 2] % 4)
        nxt[..., 1], nxt[..., 2] = (new_on // T.BAR_RES) % T.N_BARS, new_on % T.BAR_RES
        toks.append(nxt)
        ons.append(torch.tensor([[new_on]]))
        pis.append(nxt[..., 4].clone())
    return args.gen_notes / (now(args) - t0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS) + [SDPA])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--notes", type=int, default=1024, help="training sequence length")
    p.add_argument("--dropout", type=float, default=0.2,
                   help="dropout everywhere, attention probabilities included (the paper's 0.2; with "
                        "dropout, CPU SDPA runs its unfused path)")
    p.add_argument("--steps", type=int, default=3, help="timed training steps")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--gen-prompt", type=int, default=256)
    p.add_argument("--gen-notes", type=int, default=64)
    p.add_argument("--no-uncached", action="store_true", help="skip generation without the KV cache")
    p.add_argument("--convention", choices=("authors", "slides"), default="authors",
                   help="the attention's convention (the model's default: authors, fields mode)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 step, 8 generated notes")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "music_model.csv")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.steps, args.warmup, args.gen_notes = 1, 0, 8
    meta = {**versions(), "device": device_name("cpu"), "threads": torch.get_num_threads(),
            "load1": f"{os.getloadavg()[0]:.1f}",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    shape = dict(layers=args.layers, width=args.width, heads=args.heads, batch=args.batch, notes=args.notes,
                 dropout=args.dropout, convention=args.convention)
    print(f"music model {shape}; {meta['device']}, commit {meta['commit']}, load {meta['load1']}")
    rows = []
    models = {v: build(v, args) for v in args.variants}
    train_times = time_training(models, args)
    for variant, model in models.items():
        ms = statistics.median(train_times[variant])
        gen = time_generation(model, args, True)
        row = {**shape, "variant": variant, "device": meta["device"], "threads": meta["threads"],
               "load1": meta["load1"], "clock": args.clock, "commit": meta["commit"], "date": meta["date"]}
        rows.append({**row, "what": "train", "value": f"{1e3 / ms:.3f}", "unit": "steps/s", "ms": f"{ms:.1f}"})
        rows.append({**row, "what": "generate_cached", "value": f"{gen:.2f}", "unit": "notes/s",
                     "ms": f"{1e3 / gen:.2f}"})
        line = f"{variant:<14} train {ms:9.1f} ms/step   generate {gen:8.1f} notes/s (KV cache)"
        if not args.no_uncached:
            slow = time_generation(model, args, False)
            rows.append({**row, "what": "generate_uncached", "value": f"{slow:.2f}", "unit": "notes/s",
                         "ms": f"{1e3 / slow:.2f}"})
            line += f", {slow:8.1f} without ({gen / slow:.1f}x)"
        print(line, flush=True)
    base = {r["variant"]: float(r["ms"]) for r in rows if r["what"] == "train"}
    ref = base.get(SDPA, base.get("Attn"))
    if ref:
        print("\ntraining step relative to " + (SDPA if SDPA in base else "Attn") + ": " +
              ", ".join(f"{v} {ms / ref:.2f}x" for v, ms in base.items()))
    append_rows(args.out, rows, COLUMNS)
    print(f"{len(rows)} rows appended to {args.out}")


if __name__ == "__main__":
    main()
