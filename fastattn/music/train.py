"""Training loop for the music Transformer (SPEC §4, §8).

nanoGPT-style: a plain learning-rate function, AdamW, autocast (bf16) on GPU and nullcontext on
CPU, checkpoints as a dict of state dicts. Reliability:

- batches are a pure function of (seed, step) (``data.batch_indices``); Ctrl-C/SIGTERM stop the
  run only between whole steps and save ``last.pt`` there, with the RNG states of that boundary
  (``fastattn._training``), so a resumed run continues bit-for-bit (dropout included), also when
  the signal came during validation (the checkpoint marks it pending and the resumed run does it
  first) or during a checkpoint write;
- checkpoints are written atomically (``fastattn._io``) and loaded with ``weights_only=True``; an
  unreadable one is reported by name; resuming with settings that change the result is refused;
- one run per output directory (a lock file naming the holder); ``log.jsonl`` is append-only and
  trimmed on resume to what the checkpoint covers;
- a corpus without validation windows trains without validation or early stopping (and writes
  no ``best.pt``) instead of reporting a loss of 0;
- multi-process training with ``torchrun`` (DDP; NCCL on GPU, gloo on CPU): the global batch is
  split over ranks and every rank divides its summed loss by the *global* target count, so the
  averaged gradient equals the single-process gradient of the same global batch.

Outputs in ``out_dir``: ``last.pt`` (resume point), ``best.pt`` (best validation loss),
``log.jsonl`` (one JSON object per log/validation event).
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from fastattn import _io
from fastattn._threads import thread_policy, valid_threads
from fastattn._training import (StopRequest, check_resume, rank0_lock, rng_state,
                                set_rng_state)
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
    threads: Optional[Union[int, str]] = None
    """CPU threads: None leaves torch's setting; N fixes N; "auto" (or "auto:N") follows the cores
    other processes leave free, at the cost of bit-reproducibility (``fastattn/_threads.py``)."""


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
    """torch.save to a temp file in the same folder, fsync, then rename over ``path``."""
    _io.atomic_torch_save(obj, path)


CHECKPOINT_KEYS = ("model", "optimizer", "step", "model_config")


def load_checkpoint(path, map_location="cpu") -> dict:
    """A checkpoint dict, loaded with ``weights_only=True`` (no pickled code runs); an unreadable
    file raises ``fastattn._io.CorruptFile`` naming it."""
    return _io.load_checkpoint(path, required=CHECKPOINT_KEYS, map_location=map_location,
                               fresh="--fresh")


def load_model(path, device="cpu") -> MusicTransformer:
    """A MusicTransformer from ``last.pt`` / ``best.pt``, in eval mode."""
    ck = _io.load_checkpoint(path, required=("model", "model_config"), map_location=device,
                             fresh="")
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


def optimizer_step(net: nn.Module, opt: torch.optim.Optimizer, batch: D.Batch, step: int,
                   cfg: TrainConfig, world: int = 1,
                   device: torch.device = torch.device("cpu")) -> Tuple[float, torch.Tensor]:
    """One training step on ``batch`` (``net``: a ``_LossModule`` or DDP around one): the
    learning rate of ``step``, forward, backward, clipping, AdamW update. Returns (lr, loss).
    The body of :func:`train`'s loop and of ``diagnose.train_with_probes``."""
    lr = lr_at(step, cfg)
    for g in opt.param_groups:
        g["lr"] = lr
    with autocast_for(device):
        loss = step_loss(net, batch, world)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip > 0:
        nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
    opt.step()
    return lr, loss


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
                 batch_size: int = 16, max_windows: int = 0, device="cpu",
                 stop: Optional[Callable[[], bool]] = None) -> Optional[Dict[str, float]]:
    """Teacher-forced NLL on a split (windows sharded over ranks and summed).

    Returns ``loss`` (sum over fields of each field's mean CE, the training objective),
    ``nll`` (nats per token: all fields' NLL summed per note token for note-based),
    ``ppl`` = exp(nll), and ``nll_<field>`` per field, plus ``tokens``; NaN losses (and
    ``tokens`` 0) for a split without windows. ``stop``: asked between batches (by every rank
    at the same points); when it returns True the evaluation is abandoned and None returned.
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
    per_rank = -(-n // world)  # the same number of iterations on every rank (for ``stop``)
    try:
        for s in range(0, per_rank, batch_size):
            if stop is not None and stop():
                return None
            if not mine[s:s + batch_size]:
                continue
            b = D.corpus_batch(corpus, split, mine[s:s + batch_size], rep, model.cfg.max_len,
                               convention=model.cfg.convention).to(device)
            with autocast_for(device):
                parts = model.loss_parts(b.inputs, b.targets, **b.coordinates())
            sums += parts.nll_sum.double()
            counts += parts.count.double()
    finally:
        model.train(was_training)
    if world > 1:
        dist.all_reduce(sums)
        dist.all_reduce(counts)
    if counts[0] == 0:
        nan = float("nan")
        return {"loss": nan, "nll": nan, "ppl": nan, "tokens": 0,
                **{f"nll_{name}": nan for name in model.fields}}
    out = {"loss": float((sums / counts.clamp_min(1)).sum())}
    out["nll"] = float(sums.sum() / counts[0].clamp_min(1))  # per token (type field = tokens)
    out["ppl"] = math.exp(min(out["nll"], 50.0))
    out["tokens"] = int(counts[0])
    for f, name in enumerate(model.fields):
        out[f"nll_{name}"] = float(sums[f] / counts[f].clamp_min(1))
    return out


def corpus_fingerprint(corpus: D.WindowCorpus) -> str:
    """A hash of the songs, names and windows: a resumed run must see the same data."""
    h = hashlib.sha256()
    for name, song in zip(corpus.names, corpus.songs):
        h.update(name.encode() + b"\0")
        h.update(np.ascontiguousarray(song, dtype="<i8").tobytes())
    for split in D.SPLITS:
        h.update(split.encode() + b"\0")
        h.update(np.ascontiguousarray(corpus.windows[split], dtype="<i8").tobytes())
    h.update(str(corpus.window_bars).encode())
    return h.hexdigest()[:16]


# Settings a resumed run may change: how long it runs and how it reports. Anything else (seed,
# learning-rate schedule, batch size, validation set, …) would make the result a different run.
RESUMABLE = ("max_steps", "patience", "log_every", "progress", "device", "out_dir", "threads")


def check_config(cfg: TrainConfig) -> None:
    """ValueError naming the first TrainConfig field out of range."""
    def finite(x):
        return isinstance(x, (int, float)) and math.isfinite(x)
    checks = [("lr", finite(cfg.lr) and cfg.lr > 0), ("warmup_steps", cfg.warmup_steps >= 0),
              ("decay_steps", cfg.decay_steps >= 0),
              ("final_lr_ratio", finite(cfg.final_lr_ratio) and cfg.final_lr_ratio >= 0),
              ("weight_decay", finite(cfg.weight_decay) and cfg.weight_decay >= 0),
              ("betas", len(cfg.betas) == 2 and all(finite(b) and 0 <= b < 1 for b in cfg.betas)),
              ("grad_clip", finite(cfg.grad_clip) and cfg.grad_clip >= 0),
              ("batch_size", cfg.batch_size >= 1), ("max_steps", cfg.max_steps >= 0),
              ("eval_every", cfg.eval_every >= 1), ("eval_windows", cfg.eval_windows >= 0),
              ("patience", cfg.patience >= 0), ("max_shift", 0 <= cfg.max_shift <= 127),
              ("seed", 0 <= cfg.seed < 2 ** 63), ("log_every", cfg.log_every >= 1),
              ("threads", valid_threads(cfg.threads))]
    for name, ok in checks:
        if not ok:
            raise ValueError(f"TrainConfig.{name} is out of range: {getattr(cfg, name)!r}")


def train(model_cfg: ModelConfig, cfg: TrainConfig, corpus: D.WindowCorpus, *,
          resume: bool = True) -> TrainResult:
    """Train (or resume from ``out_dir/last.pt``) until max_steps, early stopping or a signal.

    SIGINT/SIGTERM: the current training step finishes, ``last.pt`` is saved and the result says
    "interrupted"; a validation due at that step (or running) is left to the resumed run, which
    does it first. A second signal aborts at once (KeyboardInterrupt).
    ``resume=False`` starts over and deletes the previous run's ``last.pt``, ``best.pt`` and log.
    Under ``torchrun`` (or an initialised process group) each of the W ranks takes a contiguous
    batch_size / W slice of every global batch; only rank 0 writes files.
    """
    check_config(cfg)
    maybe_init_distributed(cfg.device)
    rank, world = _dist_info()
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by {world} ranks")
    if corpus.n_windows("train") == 0:
        raise _io.UserError("the corpus has no training windows (too few songs, or every song "
                            "was skipped: see `fastattn music prepare`)")
    device = resolve_device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", torch.cuda.current_device())
    out_dir = Path(cfg.out_dir)
    with rank0_lock(out_dir, rank, world, device), StopRequest(world, device) as stop, \
            thread_policy(cfg.threads) as governor:
        return _train(model_cfg, cfg, corpus, resume, rank, world, device, out_dir, stop, governor)


def _train(model_cfg, cfg, corpus, resume, rank, world, device, out_dir, stop, governor) -> TrainResult:
    last_path, best_path, log_path = out_dir / "last.pt", out_dir / "best.pt", out_dir / "log.jsonl"
    has_valid = corpus.n_windows("valid") > 0
    fingerprint = corpus_fingerprint(corpus)
    train_config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config_dict(cfg).items()}

    torch.manual_seed(cfg.seed)
    model = MusicTransformer(model_cfg).to(device)
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr,
                            betas=tuple(cfg.betas))
    step, best_val, last_val, bad_evals, history = 0, float("inf"), float("nan"), 0, []
    running, pending_eval, elapsed = [], False, 0.0
    if resume and last_path.exists():
        ck = load_checkpoint(last_path, device)
        if ck["model_config"] != config_dict(model_cfg):
            raise _io.UserError(
                f"cannot resume from {last_path}: trained with model config {ck['model_config']}, "
                f"not {config_dict(model_cfg)}; use another output directory or start fresh "
                "(--fresh)")
        saved = dict(ck.get("train_config", {}))
        if "corpus" in ck:
            saved["corpus_fingerprint"] = ck["corpus"]
        check_resume(last_path, saved, {**train_config, "corpus_fingerprint": fingerprint},
                     RESUMABLE)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        step, best_val, bad_evals = ck["step"], ck["best_val"], ck["bad_evals"]
        last_val, history = ck["last_val"], list(ck["history"])
        running, pending_eval = list(ck.get("running", [])), bool(ck.get("pending_eval", False))
        elapsed = float(ck.get("elapsed_s", 0.0))
        set_rng_state(ck["rng"], device)
    if rank == 0:
        _io.remove_stale_temps(out_dir)
        if step == 0:  # files of an earlier run would mix with this one's
            for p in (last_path, best_path, log_path):
                p.unlink(missing_ok=True)
        else:  # records after the checkpoint (a killed run's) are written again by this run;
            # so is the validation record of a pending validation
            _io.trim_jsonl(log_path, lambda r: r.get("step", 0) < step or r.get("step", 0) == step
                           and not (pending_eval and any(k.startswith("val_") for k in r)))
    if not has_valid and rank == 0 and step == 0:
        _io.notice("the corpus has no validation windows: no validation, no early stopping and "
                   f"no best.pt; last.pt is saved every {cfg.eval_every} steps")
    # Same seed on every rank: identical initial weights (DDP also broadcasts them).
    net = _LossModule(model)
    if world > 1:
        net = nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)
    t0, saved_at = time.time(), -1

    def save(path: Path) -> None:
        nonlocal saved_at
        saved_at = step
        if rank == 0:
            atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                         "step": step, "best_val": best_val, "last_val": last_val,
                         "bad_evals": bad_evals, "history": history, "running": running,
                         "pending_eval": pending_eval, "elapsed_s": elapsed + time.time() - t0,
                         "model_config": config_dict(model_cfg), "train_config": train_config,
                         "corpus": fingerprint, "rng": rng_state(device)}, path)

    def log(record: dict) -> None:
        if rank == 0:
            _io.append_jsonl(log_path, record)

    def validate_and_save() -> Optional[str]:
        """The end of an evaluation step: validation (if any), best.pt, last.pt, early stopping.
        Returns "interrupted" / "early_stopping" / None."""
        nonlocal best_val, last_val, bad_evals, pending_eval
        improved = False
        if has_valid:
            val = evaluate_nll(model, corpus, "valid", batch_size=per_rank,
                               max_windows=cfg.eval_windows, device=device, stop=stop.check)
            if val is None:  # the resumed run validates this step first
                pending_eval = True
                save(last_path)
                return "interrupted"
            pending_eval = False
            last_val = val["loss"]
            improved = last_val < best_val
            if improved:
                best_val, bad_evals = last_val, 0
            else:
                bad_evals += 1
            record = {"step": step, "lr": lr_at(step - 1, cfg),
                      **{f"val_{k}": v for k, v in val.items()},
                      "time_s": round(elapsed + time.time() - t0, 2)}
            history.append(record)
            log(record)
        if improved:  # before last.pt: a crash in between repeats this validation on resume
            save(best_path)
        save(last_path)
        if has_valid and cfg.patience and bad_evals >= cfg.patience:
            return "early_stopping"
        return None

    bar = None
    if cfg.progress and rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=cfg.max_steps, initial=step, unit="step", dynamic_ncols=True,
                   desc=f"{model_cfg.variant}/{model_cfg.representation}")
    n_train = corpus.n_windows("train")
    per_rank = cfg.batch_size // world
    stopped = validate_and_save() if pending_eval else None
    during = "during validation" if stopped == "interrupted" else ""
    model.train()
    try:
        while stopped is None:
            # A step boundary: everything of the previous step is done (and saved if due).
            if step >= cfg.max_steps:
                stopped = "max_steps"
                break
            if stop.check():
                if saved_at != step:
                    save(last_path)
                stopped = "interrupted"
                break
            if governor is not None:
                governor.tick()
            idx, shifts = D.batch_indices(n_train, cfg.batch_size, cfg.seed, step, cfg.max_shift)
            sl = slice(rank * per_rank, (rank + 1) * per_rank)
            batch = D.corpus_batch(corpus, "train", idx[sl], model_cfg.representation,
                                   model_cfg.max_len, shifts[sl],
                                   convention=model_cfg.convention).to(device)
            lr, loss = optimizer_step(net, opt, batch, step, cfg, world, device)
            step += 1
            running.append(loss.item() / world)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{running[-1]:.3f}", val=f"{last_val:.3f}")
            if step % cfg.log_every == 0:
                log({"step": step, "lr": lr, "train_loss": sum(running) / len(running),
                     "time_s": round(elapsed + time.time() - t0, 2),
                     **({"threads": governor.threads} if governor is not None else {})})
                running = []
            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                stopped = validate_and_save()
                if stopped == "interrupted":
                    during = "during validation"
    finally:
        if bar is not None:
            bar.close()
    if stopped == "interrupted" and rank == 0:
        where = f" ({during})" if during else ""
        print(f"\ninterrupted at step {step}{where}; checkpoint saved to {last_path}; run the "
              "same command again to resume")
    if not has_valid:
        best_val = float("nan")
    return TrainResult(step, best_val, last_val, stopped, out_dir, history)
