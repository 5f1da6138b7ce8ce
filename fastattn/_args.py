"""argparse types for the CLIs' counts, sizes, probabilities and weights, and the handler runner.

A bad value is an argparse error: one line naming the option, exit code 2. Integers are also
bounded to int64 so that they fit every tensor and NumPy call they reach. ``run(args)`` calls the
chosen handler and turns the errors a user can fix (``fastattn._io.UserError``: a corrupt file, a
locked directory, a refused resume) into one line with exit code 1 (``UsageError``, a bad
combination of options: 2), and Ctrl-C into one line with exit code 130.
"""
from __future__ import annotations

import argparse
import math
import signal
import sys
from typing import Callable, Optional

from fastattn._io import UserError

INT64_MAX = 2 ** 63 - 1


class UsageError(UserError):
    """A combination of options that cannot work (exit code 2, like argparse's own errors)."""


def int_range(lo: Optional[int] = None, hi: int = INT64_MAX, what: str = "") -> Callable[[str], int]:
    """An argparse type: an integer in [lo, hi]."""
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
        if (lo is not None and v < lo) or v > hi:
            raise argparse.ArgumentTypeError(f"must be {what or _range(lo, hi)}, got {v}")
        return v
    parse.__name__ = "integer"
    return parse


def _range(lo, hi) -> str:
    if hi != INT64_MAX:
        return f"in {lo}…{hi}" if lo is not None else f"≤ {hi}"
    return "a positive integer" if lo == 1 else f"≥ {lo}"


def float_range(lo: Optional[float] = None, hi: Optional[float] = None, *, lo_open: bool = False,
                hi_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite float in the interval (NaN and ±inf are refused)."""
    if lo is None and hi is None:
        interval = "a finite number"
    else:
        interval = (f"a finite number in {'(' if lo_open or lo is None else '['}"
                    f"{'-inf' if lo is None else format(lo, 'g')}, "
                    f"{'inf' if hi is None else format(hi, 'g')}{')' if hi_open or hi is None else ']'}")

    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
        bad = not math.isfinite(v)
        bad |= lo is not None and (v <= lo if lo_open else v < lo)
        bad |= hi is not None and (v >= hi if hi_open else v > hi)
        if bad:
            raise argparse.ArgumentTypeError(f"must be {interval}, got {s}")
        return v
    parse.__name__ = "number"
    return parse


positive_int = int_range(1)
nonneg_int = int_range(0)
seed = int_range(0, INT64_MAX, "an integer in 0…2^63 − 1")
finite_float = float_range()
nonneg_float = float_range(0.0)
positive_float = float_range(0.0, lo_open=True)
probability = float_range(0.0, 1.0, lo_open=True)          # (0, 1]
dropout_rate = float_range(0.0, 1.0, hi_open=True)         # [0, 1)


def int_list(lo: int = 0) -> Callable[[str], list]:
    """An argparse type: comma-separated integers, each ≥ lo, at least one."""
    item = int_range(lo)

    def parse(s: str) -> list:
        vals = [item(x.strip()) for x in s.split(",") if x.strip()]
        if not vals:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}")
        return vals
    parse.__name__ = "integer list"
    return parse


def threads(s: str):
    """An argparse type: a CPU thread count N >= 1, "auto" or "auto:N" (``fastattn._threads``)."""
    from fastattn._threads import resolve_threads
    try:
        fixed, adaptive = resolve_threads(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return s.strip().lower() if adaptive else fixed


def float_list(s: str) -> list:
    """An argparse type: comma-separated finite numbers, at least one."""
    vals = [finite_float(x.strip()) for x in s.split(",") if x.strip()]
    if not vals:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}")
    return vals


def run(args) -> int:
    """Call ``args.func(args)``; user errors and Ctrl-C become one line and an exit code."""
    try:
        return args.func(args)
    except UsageError as e:
        print(f"fastattn: error: {e}", file=sys.stderr)
        return 2
    except UserError as e:
        print(f"fastattn: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        # A trainer's TrainingInterrupted says where its checkpoint is; a bare Ctrl-C (a second
        # one, or outside training) stops without saving, and every file written so far is whole.
        print(f"fastattn: {e or 'aborted (files written so far are complete)'}", file=sys.stderr)
        return 130


def exit_process(code: int) -> None:
    """``sys.exit(code)`` for ``python -m ...`` entry points, ignoring SIGINT from here on: the
    work is done, and a Ctrl-C during interpreter shutdown would only print a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(code)
