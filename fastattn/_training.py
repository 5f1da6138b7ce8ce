"""The step protocol shared by the music and SAE trainers: stop only between whole steps.

A training step (batch, forward, backward, optimizer update, step counter, logging, and the
validation and checkpoint that belong to it) is never cut in half by a signal:

- ``StopRequest`` turns SIGINT/SIGTERM into a flag; the loop reads it (``check()``) only at step
  boundaries, saves a checkpoint there and returns. A second signal raises KeyboardInterrupt at
  once (abort without saving: every file is written atomically, so the previous checkpoint and
  the logs stay usable, and resuming from them is exact too);
- the checkpoint holds everything the next step depends on: weights, optimizer, counters,
  early-stopping state, logging windows and the RNG states *at the boundary* (after the step's
  dropout draws), so a resumed run repeats nothing and skips nothing;
- validation checks the flag between batches; an interrupted validation is not recorded, and the
  checkpoint says it is pending so that the resumed run does it first.

With several ranks ``check()`` is all-reduced, so every rank stops at the same step.
Also here: RNG state capture, the resume-time config comparison, and the lock taken by rank 0.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
from pathlib import Path
from typing import Iterable, Optional

import torch

from fastattn._io import DirLock, UserError, notice


class TrainingInterrupted(KeyboardInterrupt):
    """Raised by a trainer after it saved a checkpoint because of SIGINT/SIGTERM. A
    KeyboardInterrupt, so callers that do not know it stop as on Ctrl-C."""

    def __init__(self, step: int, checkpoint: Path, during: str = ""):
        self.step, self.checkpoint = step, Path(checkpoint)
        where = f" ({during})" if during else ""
        super().__init__(f"interrupted at step {step}{where}; checkpoint saved to {checkpoint}; "
                         "run the same command again to resume")


class ResumeMismatch(UserError, ValueError):
    """A resume whose settings differ from the checkpoint's in ways that change the result."""


class StopRequest:
    """``with StopRequest() as stop: ... if stop.check(): save; return``.

    Handlers are installed only in the main thread (elsewhere signals keep their defaults), not
    for signals that are ignored, and the previous ones come back on exit. ``world`` > 1: ``check()`` all-reduces the flag
    (``device``: where the reduction tensor lives; NCCL needs CUDA).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, world: int = 1, device: Optional[torch.device] = None):
        self.world, self.device = world, device
        self.signum: Optional[int] = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        # os.write, not print: the handler may run while the main thread is inside a write to
        # sys.stderr (a progress bar), and a buffered stream is not reentrant.
        os.write(2, f"\nfastattn: {signal.Signals(signum).name} received: stopping after the "
                    "current step and saving a checkpoint (send it again to abort without "
                    "saving)\n".encode())

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                # A signal the process was started with ignored (a background job of a script,
                # `nohup`-style wrappers) stays ignored, as Python itself leaves it.
                if signal.getsignal(s) is not signal.SIG_IGN:
                    self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        """This process got a signal (no communication)."""
        return self.signum is not None

    def check(self) -> bool:
        """True when some rank got a signal. Every rank must call it at the same points."""
        flag = self.requested
        if self.world > 1:
            import torch.distributed as dist

            t = torch.tensor([int(flag)], device=self.device or "cpu")
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
        return flag


def rng_state(device: torch.device) -> dict:
    """Every RNG a training step draws from: torch's CPU generator (dropout, the attention op's
    dropout seeds) and, on CUDA, the device's generator. Batches and data order are pure
    functions of (seed, step/epoch) and need no state."""
    st = {"torch": torch.get_rng_state()}
    if torch.device(device).type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def set_rng_state(st: dict, device: torch.device) -> None:
    torch.set_rng_state(st["torch"])
    if torch.device(device).type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"], device)


def check_resume(path, saved: dict, current: dict, may_change: Iterable[str],
                 fresh: str = "--fresh") -> None:
    """Refuse to resume from ``path`` when a setting outside ``may_change`` differs from the
    checkpoint's (``ResumeMismatch`` listing each); note the ones that may change and did.
    Keys missing from an older checkpoint are not compared."""
    may_change = set(may_change)
    diff = {k: (saved[k], v) for k, v in current.items() if k in saved and saved[k] != v}
    refused = {k: d for k, d in diff.items() if k not in may_change}
    if refused:
        lines = ", ".join(f"{k}: {a!r} in the checkpoint, {b!r} now" for k, (a, b) in refused.items())
        raise ResumeMismatch(f"cannot resume from {path}: {lines}. Resume with the checkpoint's "
                             f"settings, use another output directory, or start fresh ({fresh})")
    for k, (a, b) in diff.items():
        notice(f"resuming from {path} with {k} changed from {a!r} to {b!r}")


@contextlib.contextmanager
def starts_over(command: str):
    """For commands that train with ``resume=False``: an interrupted training's message says the
    command starts over (not that running it again resumes)."""
    try:
        yield
    except TrainingInterrupted as e:
        raise KeyboardInterrupt(f"interrupted at step {e.step} of {e.checkpoint.parent}; "
                                f"`{command}` starts over when run again") from None


@contextlib.contextmanager
def rank0_lock(directory, rank: int, world: int, device=None):
    """``DirLock(directory)`` on rank 0; with several ranks every rank learns whether it was
    taken (so that a refused lock does not leave the other ranks waiting in a collective)."""
    lock, error = None, None
    if rank == 0:
        try:
            lock = DirLock(directory).acquire()
        except Exception as e:
            error = e
    if world > 1:
        import torch.distributed as dist

        t = torch.tensor([int(error is not None)], device=device or "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if t.item() and error is None:
            raise UserError(f"rank 0 could not lock {directory}")
    if error is not None:
        raise error
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
