"""Training loop for TopK SAEs and BAEs over activation stores (SPEC §5).

    cfg = TrainConfig(model="topk", n_latents=4096, k=32, epochs=1, out_dir="runs/sae")
    model = train(cfg, open_store("acts/"))

- Adam; batches from the store's seeded per-epoch plan; checkpoints (model, optimizer, position
  in the data, logging window, RNG state, config) written atomically every ``checkpoint_every``
  steps and at the end; ``resume=True`` continues bit-for-bit from ``out_dir/checkpoint.pt`` and
  refuses a checkpoint whose settings or data differ (``RESUMABLE`` lists what may change).
- SIGINT/SIGTERM stop the run between whole steps (``fastattn._training``): the checkpoint is
  saved there and ``TrainingInterrupted`` (a KeyboardInterrupt) is raised; one run per output
  directory (lock file).
- Metrics every ``log_every`` steps to ``out_dir/metrics.jsonl`` (and the progress bar): loss
  terms, FVU, explained variance, L0, dead and dense fractions, BAE entropy bits; on resume the
  records after the checkpoint (and a partial last line) are dropped.
- ``torchrun --nproc_per_node P``: DistributedDataParallel (gloo on CPU, nccl on CUDA), each
  rank a disjoint slice of every epoch's batches; rank 0 logs and checkpoints.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
import torch.distributed as dist

from fastattn import _io
from fastattn._threads import thread_policy, valid_threads
from fastattn._training import (StopRequest, TrainingInterrupted, check_resume, rank0_lock,
                                rng_state, set_rng_state)
from fastattn.sae.modules import DEAD_TOKENS, DENSE_FREQUENCY, BinaryAutoencoder, TopKSAE, fvu
from fastattn.sae.stores import ActivationStore

CHECKPOINT = "checkpoint.pt"
INIT_SAMPLE_ROWS = 4096  # rows for the TopK initialisation statistics (b_pre, encoder scale)
METRICS = "metrics.jsonl"


@dataclass
class TrainConfig:
    model: str = "topk"
    """"topk" (TopKSAE) or "bae" (BinaryAutoencoder)."""
    n_latents: Optional[int] = None
    """Dictionary size n (TopK; default 32,768) or code width d' (BAE; default 4·d)."""
    k: int = 32
    """TopK: active latents per token."""
    normalize_input: bool = False
    """TopK: scale input rows to norm √d."""
    aux_k: Optional[int] = None
    """TopK: AuxK latents (default d // 2)."""
    aux_coef: float = 1 / 32
    """TopK: AuxK loss weight."""
    dead_tokens: int = DEAD_TOKENS
    """TopK: tokens without firing after which a latent is dead."""
    init_b_pre: str = "geometric_median"
    """TopK: before step 0, b_pre from the first INIT_SAMPLE_ROWS rows of the data ("geometric_median",
    Gao et al.; "mean", sparsify; "zeros") and encoder = decoderᵀ (TopKSAE.init_from_data)."""
    init_scale: str = "data"
    """TopK: the encoder's initial factor ("data": least squares on the sample; "unit": Gao et al.'s
    code; "none"). See TopKSAE.init_from_data and bench/results/topk_vs_sparsify.md."""
    ste: str = "reference"
    """BAE: straight-through estimator ("reference", "identity", "sigmoid")."""
    recon: str = "mse"
    """BAE: reconstruction loss ("mse" over elements, or "l2": mean per-sample norm)."""
    alpha_entropy: float = 1e-7
    """BAE: α_e, weight of Σ_j h2(p_j)."""
    alpha_cov: float = 1e-7
    """BAE: α_c, weight of Σ_{i≠j} |C_ij|."""
    bae_center: str = "mean"
    """BAE: before step 0, the encoder's input centre (and the decoder's bias) at the mean of every
    training row, one streamed pass ("mean"; "none" = the authors' uncentred model). Exact, not
    a sample's: every epoch's batches then average to zero input, and no constant residue of the
    centre is left for Adam to amplify into a steady drift of the encoder (BinaryAutoencoder)."""
    entropy_off_epochs: int = 0
    """BAE: epochs at the start with α_e = 0 (the authors: 500 of 2000)."""
    cov_off_too: bool = False
    """BAE: α_c = 0 as well during those epochs (the authors' code keeps α_c on throughout; with the
    reference estimator, ranks 16-32 of the entropy benchmark compress further with it off)."""
    lr: Optional[float] = None
    """Adam learning rate (default: BAE 5e-4; TopK 2e-4 · sqrt(16384 / n), Gao et al.)."""
    lr_decay: float = 0.0
    """Fraction of the run (by step, of epochs × steps per epoch) at its end over which the learning
    rate falls linearly to 0; 0 = constant (the authors). With the BAE reference estimator Adam
    turns the tiny gradients of a converged code into full-size steps, which move the hyperplanes."""
    weight_decay: float = 0.0
    """Adam's weight decay (coupled: wd·θ added to every parameter's gradient), the authors' trainer's
    --weight_decay (default 0). With the BAE reference estimator the reconstruction gradient on
    W_in does not vanish (the code ignores the pre-activation's scale), so without it the encoder
    rows grow without bound and the hyperplanes freeze (bench/results/bae_gradients.md)."""
    batch_size: int = 512
    epochs: int = 1
    max_steps: Optional[int] = None
    """Stop after this many optimizer steps in total (None: run all epochs)."""
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 1000
    dense_frequency: float = DENSE_FREQUENCY
    """A latent counts as dense when it fires on more than this fraction of a logging window."""
    out_dir: str = "runs/sae"
    backend: str = "auto"
    device: str = "cpu"
    progress: bool = True
    threads: Optional[Union[int, str]] = None
    """CPU threads: None leaves torch's setting; N fixes N; "auto" (or "auto:N") follows the cores
    other processes leave free, at the cost of bit-reproducibility (``fastattn/_threads.py``)."""

    def learning_rate(self, n_latents: int) -> float:
        if self.lr is not None:
            return self.lr
        return 5e-4 if self.model == "bae" else 2e-4 * math.sqrt(16384 / n_latents)


def build_model(cfg: TrainConfig, d_in: int):
    """The module ``cfg`` describes, on cfg.device, initialised from torch's current RNG."""
    if cfg.model == "topk":
        return TopKSAE(d_in, cfg.n_latents or 32768, cfg.k, normalize_input=cfg.normalize_input,
                       aux_k=cfg.aux_k, aux_coef=cfg.aux_coef, dead_tokens=cfg.dead_tokens,
                       backend=cfg.backend, device=cfg.device)
    if cfg.model == "bae":
        return BinaryAutoencoder(d_in, cfg.n_latents, ste=cfg.ste, recon=cfg.recon,
                                 alpha_entropy=cfg.alpha_entropy, alpha_cov=cfg.alpha_cov,
                                 backend=cfg.backend, device=cfg.device)
    raise ValueError(f"model must be 'topk' or 'bae', got {cfg.model!r}")


def init_sample(store: ActivationStore, cfg: TrainConfig) -> torch.Tensor:
    """[<= INIT_SAMPLE_ROWS, d] the first rows of epoch 0's plan, the same on every rank."""
    rows = []
    for x in store.batches(cfg.batch_size, 0, cfg.seed, rank=0, world=1):
        rows.append(x)
        if sum(r.shape[0] for r in rows) >= INIT_SAMPLE_ROWS:
            break
    return torch.cat(rows)[:INIT_SAMPLE_ROWS].to(cfg.device)


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic: a uniquely named temp file next to ``path``, fsynced, renamed over ``path``."""
    _io.atomic_torch_save(state, path)


def load_checkpoint(path: Path, fresh: str = "--fresh") -> dict:
    """A checkpoint of :func:`train`; an unreadable one raises ``CorruptFile`` naming it."""
    return _io.load_checkpoint(path, required=("model", "config", "d_in"), fresh=fresh)


# Settings a resumed run may change: how long it runs, how it reports, where it runs.
RESUMABLE = ("epochs", "max_steps", "log_every", "checkpoint_every", "progress", "device",
             "backend", "out_dir", "threads")


def check_config(cfg: TrainConfig) -> None:
    """ValueError naming the first TrainConfig field out of range."""
    def finite(x, lo=0.0):
        return isinstance(x, (int, float)) and math.isfinite(x) and x >= lo
    checks = [("model", cfg.model in ("topk", "bae")),
              ("n_latents", cfg.n_latents is None or cfg.n_latents >= 1), ("k", cfg.k >= 1),
              ("k", cfg.model != "topk" or cfg.n_latents is None or cfg.k <= cfg.n_latents),
              ("aux_k", cfg.aux_k is None or cfg.aux_k >= 1), ("aux_coef", finite(cfg.aux_coef)),
              ("dead_tokens", cfg.dead_tokens >= 1), ("alpha_entropy", finite(cfg.alpha_entropy)),
              ("alpha_cov", finite(cfg.alpha_cov)),
              ("entropy_off_epochs", cfg.entropy_off_epochs >= 0),
              ("lr", cfg.lr is None or finite(cfg.lr) and cfg.lr > 0),
              ("lr_decay", finite(cfg.lr_decay) and cfg.lr_decay <= 1),
              ("weight_decay", finite(cfg.weight_decay)),
              ("batch_size", cfg.batch_size >= 1), ("epochs", cfg.epochs >= 1),
              ("max_steps", cfg.max_steps is None or cfg.max_steps >= 1),
              ("seed", 0 <= cfg.seed < 2 ** 63), ("log_every", cfg.log_every >= 1),
              ("checkpoint_every", cfg.checkpoint_every >= 1),
              ("dense_frequency", finite(cfg.dense_frequency) and cfg.dense_frequency <= 1),
              ("threads", valid_threads(cfg.threads))]
    for name, ok in checks:
        if not ok:
            raise ValueError(f"TrainConfig.{name} is out of range: {getattr(cfg, name)!r}")


class _Window:
    """Firing counts over a logging window (dense fraction, L0) on one rank."""

    def __init__(self, n: int, device):
        self.counts = torch.zeros(n, dtype=torch.long, device=device)
        self.tokens = 0
        self.sums = {}

    def add(self, counts, tokens, **values):
        self.counts += counts
        self.tokens += tokens
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)

    def summary(self, steps: int, dense_frequency: float) -> dict:
        freq = self.counts.double() / max(self.tokens, 1)
        out = {k: v / max(steps, 1) for k, v in self.sums.items()}
        out["l0"] = float(self.counts.sum()) / max(self.tokens, 1)
        out["dense_frac"] = float((freq > dense_frequency).double().mean())
        out["never_fired_frac"] = float((self.counts == 0).double().mean())
        return out

    def state_dict(self) -> dict:
        return {"counts": self.counts.clone(), "tokens": self.tokens, "sums": dict(self.sums)}

    def load_state_dict(self, st: dict) -> None:
        self.counts.copy_(st["counts"])
        self.tokens, self.sums = st["tokens"], dict(st["sums"])


def _distributed():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if world > 1:
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def train(cfg: TrainConfig, store: ActivationStore, *, resume: bool = True):
    """Train the model ``cfg`` describes on ``store``; returns the (unwrapped) model.

    ``resume=False`` starts over (deleting the directory's checkpoint and metrics). Raises
    ``TrainingInterrupted`` after saving a checkpoint when SIGINT/SIGTERM arrived.
    """
    check_config(cfg)
    rank, world = _distributed()
    out_dir = Path(cfg.out_dir)
    dev = torch.device(cfg.device)
    with rank0_lock(out_dir, rank, world, dev), StopRequest(world, dev) as stop, \
            thread_policy(cfg.threads) as governor:
        return _train(cfg, store, resume, rank, world, out_dir, stop, governor)


def _train(cfg, store, resume, rank, world, out_dir, stop, governor):
    ckpt_path, metrics_path = out_dir / CHECKPOINT, out_dir / METRICS
    config = dataclasses.asdict(cfg)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, store.d)
    n_latents = model.n_latents if cfg.model == "topk" else model.d_hidden
    base_lr = cfg.learning_rate(n_latents)
    opt = torch.optim.Adam(model.parameters(), lr=base_lr, weight_decay=cfg.weight_decay)
    window = _Window(n_latents, cfg.device)
    step, epoch, step_in_epoch, window_steps, elapsed, loaded = 0, 0, 0, 0, 0.0, False
    if resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path)
        saved = dict(state["config"], d_in=state["d_in"])
        if "shard_sizes" in state:
            saved["shard_sizes"] = state["shard_sizes"]
        check_resume(ckpt_path, saved, dict(config, d_in=store.d, shard_sizes=list(store.shard_sizes)),
                     RESUMABLE)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, epoch, step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
        if "window" in state:
            window.load_state_dict(state["window"])
            window_steps = state["window"]["steps"]
        if "rng" in state:
            set_rng_state(state["rng"], torch.device(cfg.device))
        elapsed, loaded = float(state.get("elapsed_s", 0.0)), True
    if rank == 0:
        _io.remove_stale_temps(out_dir)
        if step == 0:  # files of an earlier run would mix with this one's
            ckpt_path.unlink(missing_ok=True)
            metrics_path.unlink(missing_ok=True)
        else:  # records after the checkpoint (a killed run's) are written again by this run
            _io.trim_jsonl(metrics_path, lambda r: r.get("step", 0) <= step)
    if cfg.model == "topk" and not loaded:
        model.set_decoder_norm_to_unit_norm()
        model.init_from_data(init_sample(store, cfg), b_pre=cfg.init_b_pre, scale=cfg.init_scale)
    elif step == 0:
        model.set_center(store.mean() if cfg.bae_center == "mean" else None)
    wrapped = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # Buffers (the dead-latent counters) are kept in sync by all-reducing the firing masks
        # below, not by DDP's broadcast from rank 0.
        import inspect

        sync = ({"forward_sync_buffers": False}
                if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                else {"broadcast_buffers": False})  # torch < 2.13
        wrapped = DistributedDataParallel(model, **sync)
    t0, saved_at = time.time(), -1

    def checkpoint():
        nonlocal saved_at
        saved_at = step
        if rank == 0:
            save_checkpoint(ckpt_path, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                        "step": step, "epoch": epoch, "step_in_epoch": step_in_epoch,
                                        "window": {**window.state_dict(), "steps": window_steps},
                                        "rng": rng_state(torch.device(cfg.device)),
                                        "elapsed_s": elapsed + time.time() - t0,
                                        "config": config, "d_in": store.d,
                                        "shard_sizes": list(store.shard_sizes)})

    per_epoch = store.steps_per_epoch(cfg.batch_size, world, drop_last=world > 1)
    total = cfg.epochs * per_epoch if cfg.max_steps is None else min(cfg.max_steps, cfg.epochs * per_epoch)
    planned = cfg.epochs * per_epoch  # the schedule ignores max_steps: a cut-off run is a prefix
    decay_from = planned - cfg.lr_decay * planned

    def lr_at(s: int) -> float:
        return base_lr if s < decay_from else base_lr * (planned - s) / (planned - decay_from)

    bar = None
    if cfg.progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=step, desc=f"train {cfg.model}", dynamic_ncols=True)

    def one_step(x):
        nonlocal step, step_in_epoch, window, window_steps
        if governor is not None:
            governor.tick()
        x = x.to(cfg.device)
        if cfg.model == "bae":
            off = epoch < cfg.entropy_off_epochs
            out = wrapped(x, alpha_entropy=0.0 if off else cfg.alpha_entropy,
                          alpha_cov=0.0 if off and cfg.cov_off_too else cfg.alpha_cov)
            counts = out.counts
            extra = dict(recon_loss=out.recon_loss.item(), entropy_loss=out.entropy_loss.item(),
                         cov_loss=out.cov_loss.item(), entropy_bits=out.entropy_bits,
                         fvu=fvu(x, out.x_hat.detach()).item())
        else:
            out = wrapped(x)
            counts = torch.bincount(out.indices[out.values > 0], minlength=n_latents)
            extra = dict(fvu=out.fvu.item(), auxk_loss=out.auxk_loss.item())
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        if cfg.model == "topk":
            model.before_step()
        if cfg.lr_decay > 0:
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
        opt.step()
        if cfg.model == "topk":
            model.after_step()
            fired = counts > 0
            if world > 1:
                fired_i = fired.to(torch.int32)
                dist.all_reduce(fired_i, op=dist.ReduceOp.MAX)
                fired = fired_i > 0
            model.record_firing(fired, x.shape[0] * world)
        window.add(counts, x.shape[0], loss=out.loss.item(), **extra)
        step += 1
        step_in_epoch += 1
        window_steps += 1
        if bar is not None:
            bar.update(1)
        if step % cfg.log_every == 0 or step == total:
            rec = _log_record(cfg, model, window, window_steps, step, epoch, elapsed + time.time() - t0)
            if rank == 0:
                _io.append_jsonl(metrics_path, rec)
                if bar is not None:
                    bar.set_postfix(loss=f"{rec['loss']:.4g}", fvu=f"{rec['fvu']:.3f}", l0=f"{rec['l0']:.1f}")
            window, window_steps = _Window(n_latents, cfg.device), 0
        if step % cfg.checkpoint_every == 0:
            checkpoint()

    def run() -> bool:
        """Steps until the end (False) or a stop request at a step boundary (True)."""
        nonlocal epoch, step_in_epoch
        while epoch < cfg.epochs and step < total:
            if stop.check():
                return True
            for x in store.batches(cfg.batch_size, epoch, cfg.seed, skip=step_in_epoch, rank=rank,
                                   world=world, drop_last=world > 1):
                one_step(x)
                if step >= total:
                    return False
                if stop.check():
                    return True
            epoch, step_in_epoch = epoch + 1, 0
        return False

    try:
        interrupted = run()
    finally:
        if bar is not None:
            bar.close()
    if saved_at != step:
        checkpoint()
    if interrupted:
        raise TrainingInterrupted(step, ckpt_path)
    return model


def _log_record(cfg, model, window, window_steps, step, epoch, elapsed) -> dict:
    rec = {"step": step, "epoch": epoch, **window.summary(window_steps, cfg.dense_frequency)}
    rec["explained_variance"] = 1.0 - rec["fvu"]
    if cfg.model == "topk":
        rec["dead_frac"] = float(model.dead_mask().double().mean())
    else:
        rec["dead_frac"] = rec["never_fired_frac"]  # BAE: no long-horizon counter; none fired in the window
    rec["time_s"] = round(elapsed, 3)
    return rec


def load_trained(path, device: str = "cpu"):
    """(TrainConfig, model in eval mode) from a checkpoint written by :func:`train`."""
    state = load_checkpoint(Path(path), fresh="")
    cfg = TrainConfig(**{**state["config"], "device": device})
    model = build_model(cfg, state["d_in"])
    model.load_state_dict(state["model"])
    return cfg, model.to(device).eval()
