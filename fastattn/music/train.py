"""Training loop for the music Transformer (SPEC §4, §8).

nanoGPT-style: a plain learning-rate function, AdamW, autocast (bf16) on GPU and nullcontext on
CPU, checkpoints as a dict of state dicts. Reliability:

- batches are a pure function of (seed, step) (``data.batch_indices``) and the torch RNG state
  is checkpointed, so a resumed run continues bit-for-bit (dropout included);
- checkpoints are written atomically (temp file + ``os.replace``) and loaded with
  ``weights_only=True``; Ctrl-C saves one before returning;
- multi-process training with ``torchrun`` (DDP; NCCL on GPU, gloo on CPU): the global batch is
  split over ranks and every rank divides its summed loss by the *global* target count, so the
  averaged gradient equals the single-process gradient of the same global batch.

Outputs in ``out_dir``: ``last.pt`` (resume point), ``best.pt`` (best validation loss),
``log.jsonl`` (one JSON object per log/validation event).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from fastattn.music import data as D
from fastattn.music.model import (LossParts, ModelConfig, MusicTransformer, config_dict,
                                  loss_from_parts)


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping (defaults: the authors' schedule)."""
    lr: float = 8e-5
    """Peak learning rate of AdamW."""
    warmup_steps: int = 5000
    """Linear warm-up from 0 to ``lr`` over these steps."""
    decay_steps: int = 50000
    """Step at which the learning rate has decayed linearly to ``final_lr_ratio``·lr (then held)."""
    final_lr_ratio: float = 0.1
    """Learning rate after decay, relative to ``lr``."""
    weight_decay: float = 0.01
    """AdamW weight decay (matrices only; biases, norms and embeddings are not decayed)."""
    betas: tuple = (0.9, 0.98)
    """AdamW betas."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    batch_size: int = 32
    """Global batch (windows per step, summed over all ranks)."""
    max_steps: int = 50000
    """Stop after this many optimizer steps."""
    eval_every: int = 500
    """Validate (and checkpoint) every this many steps."""
    eval_windows: int = 0
    """Validation windows used (the first ones of the split; 0 = all)."""
    patience: int = 20
    """Early stopping: stop after this many validations without improvement (0 disables)."""
    max_shift: int = 5
    """Random transposition of training windows by −max_shift…max_shift semitones."""
    seed: int = 0
    """Seed of initialisation, batches, transpositions and dropout."""
    log_every: int = 50
    """Write the training loss to the log every this many steps."""
    out_dir: str = "runs/music"
    """Directory of checkpoints and the log."""
    device: str = "auto"
    """"auto" (CUDA when available, else CPU), "cpu", "cuda", "cuda:1", …"""
    progress: bool = True
    """Show a tqdm progress bar (rank 0 only)."""


class TrainResult(NamedTuple):
    """What ``train`` did: the last step, best and last validation loss, why it stopped
    ("max_steps", "early_stopping" or "interrupted") and the validation history."""
    step: int
    best_val: float
    last_val: float
    stopped: str
    out_dir: Path
    history: List[dict]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, linear decay."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(cfg.decay_steps - cfg.warmup_steps, 1)
    frac = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.lr * (1.0 - frac * (1.0 - cfg.final_lr_ratio))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_for(device: torch.device):
    """bf16 autocast on GPU; nothing on CPU (fp32 keeps the fused C++ kernel)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def atomic_save(obj, path: Path) -> None:
    """torch.save to a temp file in the same folder, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path, map_location="cpu") -> dict:
    """A checkpoint dict, loaded with ``weights_only=True`` (no pickled code runs)."""
    return torch.load(path, map_location=map_location, weights_only=True)


def load_model(path, device="cpu") -> MusicTransformer:
    """A MusicTransformer from ``last.pt`` / ``best.pt``, in eval mode."""
    ck = load_checkpoint(path, device)
    # Checkpoints written before the convention option were trained in the slides' convention.
    model = MusicTransformer(ModelConfig(**{"convention": "slides", **ck["model_config"]}))
    model.load_state_dict(ck["model"])
    return model.to(device).eval()


class _LossModule(nn.Module):
    """Wraps the model so that DDP's forward returns the loss parts (DDP hooks run on forward)."""

    def __init__(self, model: MusicTransformer):
        super().__init__()
        self.model = model

    def forward(self, batch: D.Batch) -> LossParts:
        return self.model.loss_parts(batch.inputs, batch.targets, **batch.coordinates())


def step_loss(net: nn.Module, batch: D.Batch, world: int) -> torch.Tensor:
    """Loss of one rank's share of a global batch, scaled so that DDP's gradient *average*
    over ``world`` ranks equals the gradient of (global NLL sum) / (global target count), i.e.
    exactly the single-process gradient of the whole batch. ``net`` is a ``_LossModule`` (or
    DDP around one); target counts are all-reduced when ``world`` > 1."""
    parts = net(batch)
    count = parts.count.detach().clone()
    if world > 1:
        dist.all_reduce(count)
    return loss_from_parts(parts, count) * world


def _param_groups(model: nn.Module, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        # Matrices of linear maps decay; biases, norms, embeddings and relative tables do not.
        (decay if p.dim() == 2 and "embed" not in name and "pos." not in name
         and not name.endswith("_table") else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def _dist_info():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def maybe_init_distributed(device_name: str = "auto") -> None:
    """Join the process group that ``torchrun`` describes in the environment (no-op otherwise)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if resolve_device(device_name).type == "cuda" else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


@torch.no_grad()
def evaluate_nll(model: MusicTransformer, corpus: D.WindowCorpus, split: str, *,
                 batch_size: int = 16, max_windows: int = 0, device="cpu") -> Dict[str, float]:
    """Teacher-forced NLL on a split (windows sharded over ranks and summed).

    Returns ``loss`` (sum over fields of each field's mean CE, the training objective),
    ``nll`` (nats per token: all fields' NLL summed per note token for note-based),
    ``ppl`` = exp(nll), and ``nll_<field>`` per field, plus ``tokens``.
    """
    rank, world = _dist_info()
    n = corpus.n_windows(split)
    n = min(n, max_windows) if max_windows else n
    was_training = model.training
    model.eval()
    device = torch.device(device)
    rep = model.cfg.representation
    sums = torch.zeros(len(model.fields), dtype=torch.float64, device=device)
    counts = torch.zeros(len(model.fields), dtype=torch.float64, device=device)
    mine = list(range(rank, n, world))
    for s in range(0, len(mine), batch_size):
        b = D.corpus_batch(corpus, split, mine[s:s + batch_size], rep, model.cfg.max_len,
                           convention=model.cfg.convention).to(device)
        with autocast_for(device):
            parts = model.loss_parts(b.inputs, b.targets, **b.coordinates())
        sums += parts.nll_sum.double()
        counts += parts.count.double()
    if world > 1:
        dist.all_reduce(sums)
        dist.all_reduce(counts)
    model.train(was_training)
    out = {"loss": float((sums / counts.clamp_min(1)).sum())}
    out["nll"] = float(sums.sum() / counts[0].clamp_min(1))  # per token (type field = tokens)
    out["ppl"] = math.exp(min(out["nll"], 50.0))
    out["tokens"] = int(counts[0])
    for f, name in enumerate(model.fields):
        out[f"nll_{name}"] = float(sums[f] / counts[f].clamp_min(1))
    return out


def _rng_state(device: torch.device) -> dict:
    st = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def _set_rng_state(st: dict, device: torch.device) -> None:
    torch.set_rng_state(st["torch"])
    if device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"], device)


def train(model_cfg: ModelConfig, cfg: TrainConfig, corpus: D.WindowCorpus, *,
          resume: bool = True) -> TrainResult:
    """Train (or resume from ``out_dir/last.pt``) until max_steps, early stopping or Ctrl-C.

    Under ``torchrun`` (or an initialised process group) each of the W ranks takes a contiguous
    batch_size / W slice of every global batch; only rank 0 writes files.
    """
    maybe_init_distributed(cfg.device)
    rank, world = _dist_info()
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by {world} ranks")
    if corpus.n_windows("train") == 0:
        raise ValueError("the corpus has no training windows")
    device = resolve_device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", torch.cuda.current_device())
    out_dir = Path(cfg.out_dir)
    last_path, best_path, log_path = out_dir / "last.pt", out_dir / "best.pt", out_dir / "log.jsonl"

    torch.manual_seed(cfg.seed)
    model = MusicTransformer(model_cfg).to(device)
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr,
                            betas=tuple(cfg.betas))
    step, best_val, last_val, bad_evals, history = 0, float("inf"), float("nan"), 0, []
    if resume and last_path.exists():
        ck = load_checkpoint(last_path, device)
        if ck["model_config"] != config_dict(model_cfg):
            raise ValueError(f"{last_path} was trained with model config {ck['model_config']}, "
                             f"not {config_dict(model_cfg)}; use another out_dir or resume=False")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        step, best_val, bad_evals = ck["step"], ck["best_val"], ck["bad_evals"]
        last_val, history = ck["last_val"], list(ck["history"])
        _set_rng_state(ck["rng"], device)
    # Same seed on every rank: identical initial weights (DDP also broadcasts them).
    net = _LossModule(model)
    if world > 1:
        net = nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)

    def checkpoint(path: Path) -> None:
        if rank == 0:
            atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                         "step": step, "best_val": best_val, "last_val": last_val,
                         "bad_evals": bad_evals, "history": history,
                         "model_config": config_dict(model_cfg),
                         "train_config": {k: (list(v) if isinstance(v, tuple) else v)
                                          for k, v in config_dict(cfg).items()},
                         "rng": _rng_state(device)}, path)

    def log(record: dict) -> None:
        if rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    bar = None
    if cfg.progress and rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=cfg.max_steps, initial=step, unit="step", dynamic_ncols=True,
                   desc=f"{model_cfg.variant}/{model_cfg.representation}")
    n_train = corpus.n_windows("train")
    per_rank = cfg.batch_size // world
    stopped = "max_steps"
    t0, running = time.time(), []
    model.train()
    try:
        while step < cfg.max_steps:
            idx, shifts = D.batch_indices(n_train, cfg.batch_size, cfg.seed, step, cfg.max_shift)
            sl = slice(rank * per_rank, (rank + 1) * per_rank)
            batch = D.corpus_batch(corpus, "train", idx[sl], model_cfg.representation,
                                   model_cfg.max_len, shifts[sl],
                                   convention=model_cfg.convention).to(device)
            lr = lr_at(step, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            with autocast_for(device):
                loss = step_loss(net, batch, world)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            running.append(loss.item() / world)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{running[-1]:.3f}", val=f"{last_val:.3f}")
            if step % cfg.log_every == 0:
                log({"step": step, "lr": lr, "train_loss": sum(running) / len(running),
                     "time_s": round(time.time() - t0, 2)})
                running = []
            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                val = evaluate_nll(model, corpus, "valid", batch_size=per_rank,
                                   max_windows=cfg.eval_windows, device=device)
                last_val = val["loss"]
                improved = last_val < best_val
                if improved:
                    best_val, bad_evals = last_val, 0
                else:
                    bad_evals += 1
                record = {"step": step, "lr": lr, **{f"val_{k}": v for k, v in val.items()},
                          "time_s": round(time.time() - t0, 2)}
                history.append(record)
                log(record)
                checkpoint(last_path)
                if improved:
                    checkpoint(best_path)
                if cfg.patience and bad_evals >= cfg.patience:
                    stopped = "early_stopping"
                    break
    except KeyboardInterrupt:
        stopped = "interrupted"
        checkpoint(last_path)
        if rank == 0:
            print(f"\ninterrupted at step {step}; checkpoint saved to {last_path}")
    finally:
        if bar is not None:
            bar.close()
    return TrainResult(step, best_val, last_val, stopped, out_dir, history)
