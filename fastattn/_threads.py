"""Training on a shared machine: a thread count that follows the cores other processes leave free.

Why: torch's parallel regions (linear layers, layer norm, the optimizer, our kernels) end in a
barrier. When another process keeps one of two cores busy, the thread that shares its core is
descheduled for whole time slices and every region waits for it: a small music model's training
step at 2 threads became 3-4x slower with one core busy, while at 1 thread it did not slow down
at all (``bench/bench_contention.py``). ``ThreadGovernor`` measures, every ``interval_s`` of wall
time, how many cores of this process's CPU set the *other* processes used (``/proc/stat`` minus
this process's own CPU time) and sets torch's intra-op threads to the cores left free (at least
1, at most ``max_threads``).

Not the default: a different thread count changes the order of float reductions inside torch's
ops, so a run whose thread count followed the machine's load is not bit-identical to a rerun, or
to an interrupted and resumed run. Fixed threads keep that guarantee.
"""
from __future__ import annotations

import math
import os
import time
from typing import Callable, Optional, Sequence, Tuple

import torch

THREADS_HELP = ("CPU threads: N, or auto (auto:N caps it at N) to use only the cores other processes "
                "leave free (faster on a shared machine; not bit-reproducible)")

# A competitor using ~2/3 of a core (what it gets beside our 2 spinning threads) must count as a
# busy core, and a few percent of background noise must not.
_ROUND_UP = 0.35


def read_cpu_ticks(cpus: Sequence[int], path: str = "/proc/stat") -> Optional[float]:
    """Busy CPU seconds (everything but idle and iowait) summed over ``cpus``, since boot; None
    where ``/proc/stat`` cannot be read (not Linux)."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    wanted = {f"cpu{c}" for c in cpus}
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    busy = 0
    for line in lines:
        fields = line.split()
        if fields and fields[0] in wanted:
            # user nice system idle iowait irq softirq steal (guest time is inside user already);
            # steal counts as busy: a hypervisor taking the core hurts like a process does.
            t = [int(x) for x in fields[1:9]]
            busy += sum(t) - t[3] - t[4]
    return busy / hz


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


class ThreadGovernor:
    """``gov = ThreadGovernor(); for step ...: gov.tick(); train_step()``.

    ``tick()`` costs a clock read; once per ``interval_s`` it also reads ``/proc/stat`` (tens of
    microseconds) and may call ``torch.set_num_threads``. Where ``/proc/stat`` is unreadable it
    does nothing. ``threads`` is the count it set last; ``changes`` counts its switches.
    ``reader``/``own``/``clock``/``set_threads`` exist for tests.
    """

    def __init__(self, max_threads: Optional[int] = None, interval_s: float = 0.25, *,
                 cpus: Optional[Sequence[int]] = None,
                 reader: Callable[[Sequence[int]], Optional[float]] = read_cpu_ticks,
                 own: Callable[[], float] = _own_cpu_seconds, clock: Callable[[], float] = time.monotonic,
                 set_threads: Callable[[int], None] = torch.set_num_threads):
        if cpus is None:
            cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
        self.cpus = list(cpus)
        self.max_threads = max(1, int(max_threads or torch.get_num_threads()))
        if interval_s <= 0 or not math.isfinite(interval_s):
            raise ValueError(f"interval_s must be a positive number of seconds, got {interval_s}")
        self.interval_s = interval_s
        self.reader, self.own, self.clock, self.set_threads = reader, own, clock, set_threads
        self.threads = self.max_threads
        self.changes = 0
        self.others = 0.0
        self._last: Optional[Tuple[float, float, float]] = self._sample()
        self.enabled = self._last is not None
        if self.enabled:
            self.set_threads(self.threads)

    def _sample(self) -> Optional[Tuple[float, float, float]]:
        busy = self.reader(self.cpus)
        return None if busy is None else (self.clock(), busy, self.own())

    def tick(self) -> int:
        if not self.enabled or self.clock() - self._last[0] < self.interval_s:
            return self.threads
        now = self._sample()
        if now is None:
            self.enabled = False
            return self.threads
        wall = now[0] - self._last[0]
        # Our own time can exceed what /proc/stat has ticked (different clocks): clamp at 0.
        self.others = max(0.0, (now[1] - self._last[1]) - (now[2] - self._last[2])) / wall
        self._last = now
        free = len(self.cpus) - self.others
        want = min(self.max_threads, max(1, math.floor(free + _ROUND_UP)))
        if want != self.threads:
            self.threads = want
            self.changes += 1
            self.set_threads(want)
        return self.threads


def resolve_threads(threads) -> Tuple[Optional[int], bool]:
    """``--threads`` as given (None, an int ≥ 1, "auto" or "auto:N") -> (fixed count or None,
    adaptive). "auto" caps the governor at torch's current count, "auto:N" at N."""
    if threads is None or isinstance(threads, int) and not isinstance(threads, bool):
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1 or 'auto', got {threads}")
        return threads, False
    s = str(threads).strip().lower()
    if s == "auto":
        return None, True
    if s.startswith("auto:") and s[5:].isdigit() and int(s[5:]) >= 1:
        return int(s[5:]), True
    if s.isdigit() and int(s) >= 1:
        return int(s), False
    raise ValueError(f"threads must be a positive integer, 'auto' or 'auto:N', got {threads!r}")


def valid_threads(threads) -> bool:
    try:
        resolve_threads(threads)
        return True
    except (ValueError, TypeError):
        return False


class thread_policy:
    """``with thread_policy(cfg.threads) as gov: ... if gov: gov.tick()`` — a fixed count is set
    for the block; "auto" yields the governor the loop ticks once per step; None leaves torch's
    setting alone. torch's previous thread count comes back on exit."""

    def __init__(self, threads, interval_s: float = 0.25):
        self.fixed, self.adaptive = resolve_threads(threads)
        self.interval_s = interval_s

    def __enter__(self) -> Optional[ThreadGovernor]:
        self.previous = torch.get_num_threads()
        if self.fixed is not None:
            torch.set_num_threads(self.fixed)
        return ThreadGovernor(self.fixed, self.interval_s) if self.adaptive else None

    def __exit__(self, *exc):
        torch.set_num_threads(self.previous)
