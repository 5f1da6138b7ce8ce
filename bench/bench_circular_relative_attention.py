#!/usr/bin/env python
"""Benchmark circular relative attention providers (SPEC §7).

    python bench/bench_circular_relative_attention.py                       # CPU, L = 1024 2048
    python bench/bench_circular_relative_attention.py --device cuda --L 1024 2048 4096 8192
    python bench/bench_circular_relative_attention.py --quick --out /tmp/cra.csv   # smoke run

Configuration (the paper's): causal, all three terms (index + decomposed time + decomposed
pitch), combine="hadamard", alpha=0.1, tables N_idx = Lk, N_bar = 16, bar_res = 48, N_oct = 22,
12 pitch classes; onsets are sorted ticks (cumulative steps in {0, 6, 12, 24}), pitches are
21..108 with ~2% missing (-1).

Providers: each ``setup_<provider>(cfg, inp)`` returns ``(fwd_fn, bwd_fn)`` or ``Skip(reason)``;
``fwd_fn()`` runs the forward pass on ``inp`` and returns out, ``bwd_fn(out, grad)`` runs the
backward pass of one ``out``. Every provider is checked against the fp64 reference at a small
L before it is timed; a provider that cannot run or fails the check is skipped with its reason.

Modes: fwd (forward under no_grad), bwd (backward only: one forward with grad, then time
``out.backward(grad, retain_graph=True)``), fwd_bwd (both), decode (one generation step under
no_grad: append the newest token's k/v/coordinates to a ``fastattn.nn.KVCache`` holding the
other Lk − 1 tokens, attend with that one query over all Lk keys, drop the token again; for
B in --decode-B). The cpp provider decodes through the cache path the music model uses
(``ops.circular_relative_attention.cached_decode``: the new token's coordinate channels only,
the assembled table reused, one kernel call); the others run their op on the cache's views.

--time-modes fields adds rows for the authors' convention (per-token bar and position,
pos_table of 2·bar_res − 1 rows) beside the default quotient mode (materialized: quotient only).

Timing: CPU wall clock (torch threads untouched; --clock cpu: the process's CPU time instead, for
single-thread runs on a machine shared with other work, where wall time measures the others),
--warmup runs then up to --repeats runs (fewer when --max-seconds runs out, at least 3), median; CUDA ``triton.testing.do_bench`` quantiles
[0.5, 0.2, 0.8]. Peak memory: on CPU every (provider, mode, shape) runs in a fresh subprocess,
which primes torch on a tiny problem, creates the inputs, resets the kernel's peak-RSS mark
(``/proc/self/clear_refs``) and reports how far the peak RSS (VmHWM) rises above the RSS of that
moment during the first run (for bwd and fwd_bwd: forward + backward); on CUDA
``torch.cuda.max_memory_allocated`` above the allocation after the inputs exist.

Rows are appended to --out (a long-format CSV, created with a header when missing).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import gc
import importlib
import importlib.metadata
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, NamedTuple, Optional

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # benchmark the checkout this script belongs to

import fastattn  # noqa: E402
from fastattn.reference.materialized import circular_relative_attention_materialized  # noqa: E402

# The module, not the function that fastattn.reference re-exports under the same name.
_REF = importlib.import_module("fastattn.reference.circular_relative_attention")

OP = "circular_relative_attention"
MODES = ("fwd", "bwd", "fwd_bwd", "decode")
CSV_COLUMNS = ("op", "provider", "mode", "time_mode", "B", "H", "Lq", "Lk", "D", "dtype", "ms",
               "peak_mem_mb", "device", "threads", "load1", "clock", "torch", "triton", "commit", "date")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}
# Correctness check against the fp64 reference: (forward, backward) tolerance, used as both
# absolute and relative tolerance.
CHECK_TOL = {"float64": (1e-9, 1e-9), "float32": (1e-4, 1e-3), "float16": (1e-2, 3e-2),
             "bfloat16": (3e-2, 1e-1)}
CHECK_L = 64
# --skip-slow: the largest L (= Lq; decode rows always run) per provider.
SLOW_MAX_L = {"cpu": {"materialized": 1024, "reference": 2048},
              "cuda": {"materialized": 4096, "reference": 8192}}

# The paper's configuration.
OPTIONS = dict(bar_res=48, bar_min=0, octave_min=-11, rel_index_min=0, combine="hadamard",
               alpha=0.1, causal=True)
N_BAR, N_OCT, N_PC = 16, 22, 12
ONSET_STEPS = (0, 6, 12, 24)
PITCH_MISSING = 0.02


@dataclass(frozen=True)
class Config:
    provider: str
    mode: str
    B: int
    H: int
    Lq: int
    Lk: int
    D: int
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0
    time_mode: str = "quotient"


class Inputs(NamedTuple):
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    onset: torch.Tensor           # [B, Lk] int64
    pitch: torch.Tensor           # [B, Lk] int64, -1 = missing
    tables: Dict[str, torch.Tensor]
    options: dict                 # OPTIONS plus, for time_mode="fields", time_mode/bar/position

    def leaves(self):
        return [self.q, self.k, self.v, *self.tables.values()]


def make_inputs(cfg: Config, requires_grad: bool, dtype: Optional[torch.dtype] = None) -> Inputs:
    """Deterministic inputs for cfg (the same on every provider and process)."""
    g = torch.Generator().manual_seed(cfg.seed)
    dtype = dtype or DTYPES[cfg.dtype]
    B, H, Lq, Lk, D = cfg.B, cfg.H, cfg.Lq, cfg.Lk, cfg.D

    def rand(*shape):
        t = torch.randn(*shape, generator=g).to(device=cfg.device, dtype=dtype)
        return t.requires_grad_(requires_grad)

    q, k, v = rand(B, H, Lq, D), rand(B, H, Lk, D), rand(B, H, Lk, D)
    rows = {"rel_index_table": Lk, "bar_table": N_BAR, "pos_table": OPTIONS["bar_res"],
            "octave_table": N_OCT, "pitch_class_table": N_PC}
    tables = {name: rand(n, D) for name, n in rows.items()}
    steps = torch.tensor(ONSET_STEPS)[torch.randint(0, len(ONSET_STEPS), (B, Lk), generator=g)]
    onset = steps.cumsum(1) - steps[:, :1]
    pitch = torch.randint(21, 109, (B, Lk), generator=g)
    pitch[torch.rand(B, Lk, generator=g) < PITCH_MISSING] = -1
    onset, pitch = onset.to(cfg.device), pitch.to(cfg.device)
    options = dict(OPTIONS)
    if cfg.time_mode == "fields":  # the authors' convention: per-token bar and position
        R = OPTIONS["bar_res"]
        tables["pos_table"] = rand(2 * R - 1, D)
        options.update(time_mode="fields", bar=onset // R, position=onset % R)
    return Inputs(q, k, v, onset, pitch, tables, options)


# ----------------------------------------------------------------------------- providers

class Skip(NamedTuple):
    reason: str


def autograd_bwd(out: torch.Tensor, grad: torch.Tensor) -> None:
    out.backward(grad, retain_graph=True)


def _fastattn(backend: str):
    """Provider for ``fastattn.circular_relative_attention(backend=...)``; skips with the
    op's own capability reason when that backend cannot run the inputs."""
    def setup(cfg: Config, inp: Inputs):
        from fastattn.ops.circular_relative_attention import REASONS
        why = REASONS[backend](inp.q)
        if why is not None:
            return Skip(why)

        def fwd():
            return fastattn.circular_relative_attention(
                inp.q, inp.k, inp.v, inp.onset, inp.pitch, backend=backend, **inp.tables, **inp.options)
        return fwd, autograd_bwd
    setup.__name__ = f"setup_{backend}"
    return setup


class DecodeCache:
    """A KV cache holding the first Lk − 1 tokens of ``inp``; ``step(attend)`` appends the last
    token, returns ``attend(cache)`` and drops the token again (one generation step)."""

    def __init__(self, inp: Inputs):
        from fastattn.nn import KVCache
        B, H, Lk, D = inp.k.shape
        self.inp, self.Lk = inp, Lk
        self.cache = KVCache(B, H, D, capacity=Lk + 1, dtype=inp.k.dtype, device=inp.k.device)
        self.extra = {n: inp.options[n] for n in ("bar", "position") if n in inp.options}
        with torch.no_grad():
            self.cache.append(inp.k[:, :, :-1], inp.v[:, :, :-1], inp.onset[:, :-1], inp.pitch[:, :-1],
                              **{n: t[:, :-1] for n, t in self.extra.items()})

    def new_coords(self) -> dict:
        return {"onset": self.inp.onset[:, -1:], "pitch": self.inp.pitch[:, -1:],
                **{n: t[:, -1:] for n, t in self.extra.items()}}

    def step(self, attend):
        c, inp = self.cache, self.inp
        c.append(inp.k[:, :, -1:], inp.v[:, :, -1:], inp.onset[:, -1:], inp.pitch[:, -1:],
                 **{n: t[:, -1:] for n, t in self.extra.items()})
        try:
            return attend(c)
        finally:
            c.truncate(self.Lk - 1)


def decode_cpp(cfg: Config, inp: Inputs):
    """The music model's decoding path: cached_decode over a KV cache (see the module docstring)."""
    from fastattn.ops import _cra_terms
    from fastattn.ops.circular_relative_attention import cached_decode
    dc = DecodeCache(inp)
    opts = {n: v for n, v in inp.options.items() if n not in ("bar", "position")}
    combine, time_mode = opts.pop("combine"), opts.pop("time_mode", "quotient")
    alpha, causal = opts.pop("alpha"), opts.pop("causal")
    kw = {**dict.fromkeys(_cra_terms.TABLE_ARGS), **inp.tables, **opts, "bar": None, "position": None}
    for n in ("time_min", "pitch_min"):
        kw.setdefault(n, 0 if n == "time_min" else -127)

    def attend(c):
        return cached_decode(inp.q, c, dc.new_coords(), kw, combine=combine, time_mode=time_mode, alpha=alpha,
                             causal=causal, backend="cpp")
    return lambda: dc.step(attend)


def decode_with(fwd_on):
    """A decoding step for a provider whose ``fwd_on(k, v, onset, pitch)`` runs its op on the
    cache's views (bar/position, when used, come from inp.options: all Lk tokens)."""
    def setup(cfg: Config, inp: Inputs):
        dc = DecodeCache(inp)
        return lambda: dc.step(lambda c: fwd_on(c.k, c.v, c.onset, c.pitch))
    return setup


setup_cuda = _fastattn("cuda")
setup_triton = _fastattn("triton")
setup_cpp = _fastattn("cpp")
setup_reference = _fastattn("reference")


def setup_materialized(cfg: Config, inp: Inputs):
    if cfg.time_mode != "quotient":
        return Skip("the materialising implementation has the quotient time mode only")

    def fwd():
        return circular_relative_attention_materialized(
            inp.q, inp.k, inp.v, inp.onset, inp.pitch, **inp.tables, **OPTIONS)
    return fwd, autograd_bwd


def _sdpa_mask(Lq: int, Lk: int, device):
    """SDPA's is_causal aligns the mask top-left; our queries are the *last* Lq positions."""
    if Lq == Lk:
        return None, True
    if Lq == 1:
        return None, False
    a = torch.arange(Lq, device=device) + (Lk - Lq)
    return torch.arange(Lk, device=device)[None, :] <= a[:, None], False


def setup_sdpa(cfg: Config, inp: Inputs):
    """The floor: plain attention without relative terms."""
    mask, is_causal = _sdpa_mask(cfg.Lq, cfg.Lk, inp.q.device)

    def fwd():
        return F.scaled_dot_product_attention(inp.q, inp.k, inp.v, attn_mask=mask, is_causal=is_causal)
    return fwd, autograd_bwd


def setup_flex(cfg: Config, inp: Inputs):
    """FlexAttention with a score_mod gathering from precomputed q·E products [B, H, Lq, N]
    (the generic route: the index term's product is [B, H, Lq, Lk]). Table gradients flow
    through the captured products when the installed torch supports that."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as exc:
        return Skip(f"FlexAttention unavailable in torch {torch.__version__} ({exc})")
    if set(inp.tables) != {"rel_index_table", "bar_table", "pos_table", "octave_table", "pitch_class_table"}:
        return Skip("the flex provider implements the paper's three terms only")
    R, alpha, off = OPTIONS["bar_res"], OPTIONS["alpha"], cfg.Lk - cfg.Lq
    scale = 1.0 / math.sqrt(cfg.D)
    t = inp.tables
    n_idx, n_bar, n_oct = t["rel_index_table"].shape[0], t["bar_table"].shape[0], t["octave_table"].shape[0]
    onset, pitch = inp.onset, inp.pitch
    # Per-token quotient/remainder coordinates, so the score_mod needs no division.
    ob, orr = torch.div(onset, R, rounding_mode="floor"), torch.remainder(onset, R)
    pb, pc = torch.div(pitch, 12, rounding_mode="floor"), torch.remainder(pitch, 12)
    flex = flex_attention if inp.q.device.type == "cpu" else torch.compile(flex_attention)
    block_mask = None
    if OPTIONS["causal"]:
        block_mask = create_block_mask(lambda b, h, i, j: j <= i + off, None, None, cfg.Lq, cfg.Lk,
                                       device=inp.q.device)

    def fwd():
        q = inp.q
        qe_idx = q @ t["rel_index_table"].transpose(0, 1)
        qe_time = q @ (t["bar_table"][:, None] * t["pos_table"][None]).flatten(0, 1).transpose(0, 1)
        qe_pitch = q @ (t["octave_table"][:, None] * t["pitch_class_table"][None]).flatten(0, 1).transpose(0, 1)

        def score_mod(score, b, h, i, j):
            a = i + off
            rel = qe_idx[b, h, i, (a - j - OPTIONS["rel_index_min"]).clamp(0, n_idx - 1)]
            borrow = (orr[b, a] < orr[b, j]).to(torch.int64)
            bar = (ob[b, a] - ob[b, j] - borrow - OPTIONS["bar_min"]).clamp(0, n_bar - 1)
            pos = orr[b, a] - orr[b, j] + borrow * R
            ok_t = (onset[b, a] >= 0) & (onset[b, j] >= 0)
            rel = rel + torch.where(ok_t, qe_time[b, h, i, (bar * R + pos).clamp(0, n_bar * R - 1)], 0.0)
            borrow = (pc[b, a] < pc[b, j]).to(torch.int64)
            octv = (pb[b, a] - pb[b, j] - borrow - OPTIONS["octave_min"]).clamp(0, n_oct - 1)
            cls = pc[b, a] - pc[b, j] + borrow * 12
            ok_p = (pitch[b, a] >= 0) & (pitch[b, j] >= 0)
            rel = rel + torch.where(ok_p, qe_pitch[b, h, i, (octv * 12 + cls).clamp(0, n_oct * 12 - 1)], 0.0)
            return score + alpha * scale * rel

        return flex(q, inp.k, inp.v, score_mod=score_mod, block_mask=block_mask, scale=scale)
    return fwd, autograd_bwd


# Decoding steps (mode "decode"): name -> setup(cfg, inp) returning step_fn; providers without
# one are not run in decode mode.
DECODE_STEPS: Dict[str, Callable] = {
    "cpp": decode_cpp,
    "reference": lambda cfg, inp: decode_with(lambda k, v, o, p: fastattn.circular_relative_attention(
        inp.q, k, v, o, p, backend="reference", **inp.tables, **inp.options))(cfg, inp),
    "materialized": lambda cfg, inp: decode_with(lambda k, v, o, p: circular_relative_attention_materialized(
        inp.q, k, v, o, p, **inp.tables, **OPTIONS))(cfg, inp),
    "sdpa": lambda cfg, inp: decode_with(lambda k, v, o, p: F.scaled_dot_product_attention(inp.q, k, v))(cfg, inp),
}

# name -> setup_<name>(cfg, inp) returning (fwd_fn, bwd_fn) or Skip(reason).
# Add GPU providers here; providers listed but unavailable are skipped with their reason.
PROVIDERS: Dict[str, Callable] = {
    "cuda": setup_cuda,
    "triton": setup_triton,
    "flex": setup_flex,
    "cpp": setup_cpp,
    "reference": setup_reference,
    "materialized": setup_materialized,
    "sdpa": setup_sdpa,
}
DEFAULT_PROVIDERS = {"cpu": ["cpp", "reference", "materialized", "sdpa"],
                     "cuda": ["cuda", "triton", "flex", "reference", "materialized", "sdpa"]}


# ----------------------------------------------------------------------------- correctness

def _oracle(provider: str, inp: Inputs, Lq: int, Lk: int):
    """fp64 expected output for provider on inp (which must be fp64 leaves)."""
    if provider == "sdpa":  # SDPA has no relative terms: check it against its own formula
        mask, is_causal = _sdpa_mask(Lq, Lk, inp.q.device)
        if is_causal:
            mask = torch.ones(Lq, Lk, dtype=torch.bool, device=inp.q.device).tril()
        s = inp.q @ inp.k.transpose(-1, -2) / math.sqrt(inp.q.shape[-1])
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        return torch.softmax(s, -1) @ inp.v
    return _REF.circular_relative_attention(inp.q, inp.k, inp.v, inp.onset, inp.pitch,
                                            **inp.tables, **inp.options)


def _max_err(got: torch.Tensor, want: torch.Tensor, tol: float) -> Optional[str]:
    got = got.detach().to(want.dtype)
    if got.shape != want.shape:
        return f"shape {tuple(got.shape)} != {tuple(want.shape)}"
    if torch.isnan(got).any() != torch.isnan(want).any():
        return "NaN mismatch"
    err = (got - want).abs()
    bad = err > tol * (1 + want.abs())
    if bad.any():
        i = tuple(int(x) for x in torch.nonzero(bad)[0])
        return f"max abs err {err.max().item():.3g} (first bad index {i})"
    return None


def check(provider: str, cfg: Config) -> Optional[str]:
    """None if provider matches the fp64 oracle (forward and every gradient), else why not."""
    inp = make_inputs(cfg, requires_grad=True)
    ref = make_inputs(cfg, requires_grad=True, dtype=torch.float64)
    fwd_tol, bwd_tol = CHECK_TOL[cfg.dtype]
    try:
        fns = PROVIDERS[provider](cfg, inp)
        if isinstance(fns, Skip):
            return fns.reason
        fwd, bwd = fns
        out = fwd()
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
        bwd(out, grad)
    except Exception as exc:  # report any failure as the reason to skip this provider
        return f"raised {type(exc).__name__}: {exc}"
    want = _oracle(provider, ref, cfg.Lq, cfg.Lk)
    want.backward(grad.to(want.dtype))
    why = _max_err(out, want, fwd_tol)
    if why:
        return f"forward: {why}"
    names = ["q", "k", "v", *inp.tables]
    for name, x, x_ref in zip(names, inp.leaves(), ref.leaves()):
        if x_ref.grad is None:  # sdpa: no tables
            continue
        if x.grad is None:
            return f"no gradient for {name}"
        why = _max_err(x.grad, x_ref.grad, bwd_tol)
        if why:
            return f"grad {name}: {why}"
    return None


# ----------------------------------------------------------------------------- measurement

def cuda_peak_mb(fn) -> float:
    """Peak CUDA memory (MB) that one call of fn allocates beyond what was live before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _status_kb(field: str) -> int:
    """A ``/proc/self/status`` field in kB (VmRSS: resident now, VmHWM: peak resident)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


def _peak_rss_start() -> Callable[[], float]:
    """Start a peak-RSS measurement; returns a function giving the growth in MB since now.

    Preferred: reset the kernel's high-water mark (``/proc/self/clear_refs``, Linux >= 4.0) and
    read VmHWM - VmRSS. Not ``ru_maxrss``: after exec it also holds the peak of the *parent's*
    address space (the kernel keeps it in the signal struct, which clear_refs does not reset), so
    a child of a big process would report the parent's size. Fallback: growth of ru_maxrss above
    its value now (an underestimate when earlier peaks were higher).
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_kb("VmRSS")
        return lambda: max(0, _status_kb("VmHWM") - base) / 1024
    except OSError:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return lambda: max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024


def _runner(mode: str, fwd, bwd, inp: Inputs):
    """(first, again): ``first()`` runs the measured operation once from scratch; ``again()``
    is what gets timed (bwd: another backward through the graph ``first`` built)."""
    leaves = inp.leaves()

    def zero_grads():
        for t in leaves:
            t.grad = None

    if mode in ("fwd", "decode"):
        def f():
            with torch.no_grad():
                return fwd()
        return f, f
    state = {}

    def first():
        zero_grads()
        out = fwd()
        state["grad"] = torch.randn_like(out)
        bwd(out, state["grad"])
        state["out"] = out

    if mode == "bwd":
        def again():
            zero_grads()
            bwd(state["out"], state["grad"])
        return first, again

    def fwd_bwd():
        zero_grads()
        bwd(fwd(), state["grad"])
    return first, fwd_bwd


def measure(cfg: Config, repeats: int, warmup: int, max_seconds: float, clock: str = "wall") -> dict:
    """Time and peak memory of one (provider, mode, shape); {'skip': reason} if it cannot run."""
    needs_grad = cfg.mode in ("bwd", "fwd_bwd")
    # Prime torch and the provider's code paths on a tiny problem so that one-off
    # initialisation is not counted as the provider's memory.
    tiny = Config(**{**asdict(cfg), "Lq": min(cfg.Lq, 8), "Lk": 8})
    t_inp = make_inputs(tiny, needs_grad)
    fns = PROVIDERS[cfg.provider](tiny, t_inp)
    if isinstance(fns, Skip):
        return {"skip": fns.reason}
    _runner(cfg.mode, *fns, t_inp)[0]()
    del fns, t_inp

    inp = make_inputs(cfg, needs_grad)
    fns = PROVIDERS[cfg.provider](cfg, inp)
    if isinstance(fns, Skip):
        return {"skip": fns.reason}
    first, again = _runner(cfg.mode, *fns, inp)
    if cfg.mode == "decode":
        if cfg.provider not in DECODE_STEPS or cfg.device != "cpu":
            return {"skip": "no decoding step for this provider/device"}
        with torch.no_grad():
            want, step = fns[0](), DECODE_STEPS[cfg.provider](cfg, inp)
            got = step()
        if got is None:  # cached_decode declined (e.g. the KV cache stores no bar/position)
            return {"skip": "no cached decoding path for these terms"}
        if not torch.allclose(got, want, atol=1e-4, rtol=1e-4):
            return {"skip": "the decoding step does not match the provider's forward"}

        def again():
            with torch.no_grad():
                return step()
        first = again
    gc.collect()
    if cfg.device == "cuda":
        peak_mb = cuda_peak_mb(first)
        from triton.testing import do_bench  # lazily: CPU runs need no triton
        ms = do_bench(again, grad_to_none=inp.leaves(), quantiles=[0.5, 0.2, 0.8])
        return {"ms": ms[0], "p20": ms[1], "p80": ms[2], "peak_mem_mb": peak_mb, "runs": None}

    growth_mb = _peak_rss_start()
    first()
    peak_mb = growth_mb()
    for _ in range(warmup):
        again()
    times = []
    start = time.perf_counter()
    now = time.process_time if clock == "cpu" else time.perf_counter
    while len(times) < repeats and (len(times) < 3 or time.perf_counter() - start < max_seconds):
        t0 = now()
        again()
        times.append((now() - t0) * 1e3)
    q = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else times * 4
    return {"ms": statistics.median(times), "p20": q[0], "p80": q[3], "peak_mem_mb": peak_mb,
            "runs": len(times)}


def measure_in_subprocess(cfg: Config, args) -> dict:
    """measure() in a fresh interpreter, so that its peak RSS is this measurement's alone."""
    spec = json.dumps({"cfg": asdict(cfg), "repeats": args.repeats, "warmup": args.warmup,
                       "max_seconds": args.max_seconds, "clock": args.clock})
    try:
        proc = subprocess.run([sys.executable, __file__, "--single", spec], capture_output=True,
                              text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"skip": f"timed out after {args.timeout} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"skip": f"subprocess exited with {proc.returncode}: {' | '.join(tail)}"}


def run_single(spec: str) -> None:
    s = json.loads(spec)
    try:
        res = measure(Config(**s["cfg"]), s["repeats"], s["warmup"], s["max_seconds"], s.get("clock", "wall"))
    except Exception as exc:
        res = {"skip": f"raised {type(exc).__name__}: {exc}"}
    print("RESULT " + json.dumps(res), flush=True)


# ----------------------------------------------------------------------------- reporting

def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    name = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def versions() -> dict:
    try:
        triton = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton = ""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                                capture_output=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"torch": torch.__version__, "triton": triton, "commit": commit}


def interleave(contenders: dict, rounds: int, clock: str, max_seconds: float = math.inf,
               warmup: int = 1) -> dict:
    """name -> [ms per run]: one run of each contender per round, round-robin, so that load from
    other processes falls on all of them alike (``clock`` "cpu": process CPU time); after
    ``warmup`` untimed rounds; at least 3 rounds, then stops once ``max_seconds`` have passed."""
    now = time.process_time if clock == "cpu" else time.perf_counter
    for _ in range(warmup):
        for fn in contenders.values():
            fn()
    times = {n: [] for n in contenders}
    start = time.perf_counter()
    for r in range(rounds):
        for name, fn in contenders.items():
            t0 = now()
            fn()
            times[name].append((now() - t0) * 1e3)
        if r >= 2 and time.perf_counter() - start > max_seconds:
            break
    return times


def append_rows(path: Path, rows, columns=CSV_COLUMNS) -> None:
    """Append dict rows to a long-format CSV, writing the header for a new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with open(path, newline="") as f:
            old = list(csv.DictReader(f))
            f.seek(0)
            header = next(csv.reader(f), None)
        if tuple(header or ()) != tuple(columns):
            if not set(header or ()) <= set(columns):
                raise SystemExit(f"{path} has columns {header}, expected {list(columns)}")
            with open(path, "w", newline="") as f:  # an older layout: add the new columns, blank
                w = csv.DictWriter(f, fieldnames=columns)
                w.writeheader()
                w.writerows(old)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        if new:
            w.writeheader()
        w.writerows(rows)


def attn_flops(cfg: Config) -> float:
    """q·k and p·v FLOPs only (relative terms not counted); causal halves the square."""
    f = 4.0 * cfg.B * cfg.H * cfg.Lq * cfg.Lk * cfg.D
    if OPTIONS["causal"] and cfg.Lq == cfg.Lk:
        f /= 2
    return f * {"fwd": 1.0, "decode": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}[cfg.mode]


def print_table(results) -> None:
    """results: list of (cfg, res). One block per (mode, Lq, Lk)."""
    blocks: Dict[tuple, list] = {}
    for cfg, res in results:
        blocks.setdefault((cfg.mode, cfg.time_mode, cfg.B, cfg.Lq, cfg.Lk), []).append((cfg, res))
    head = (f"{'provider':<13}{'ms':>10}{'p20-p80 ms':>18}{'peak MB':>10}{'TFLOP/s':>9}"
            f"{'t/t_sdpa':>10}{'t_mat/t':>9}  note")
    for (mode, time_mode, B, Lq, Lk), rows in blocks.items():
        cfg0 = rows[0][0]
        print(f"\n{mode} {time_mode}  B={B} H={cfg0.H} Lq={Lq} Lk={Lk} D={cfg0.D} {cfg0.dtype}")
        print(head)
        ms_of = {c.provider: r["ms"] for c, r in rows if "ms" in r}
        for cfg, res in rows:
            if "skip" in res:
                print(f"{cfg.provider:<13}{'-':>10}{'':>56}  skipped: {res['skip']}")
                continue
            ms = res["ms"]
            vs_sdpa = f"{ms / ms_of['sdpa']:.1f}x" if "sdpa" in ms_of else "-"
            vs_mat = f"{ms_of['materialized'] / ms:.2f}x" if "materialized" in ms_of else "-"
            spread = f"{res['p20']:.3f}-{res['p80']:.3f}"
            note = f"{res['runs']} runs" if res.get("runs") else ""
            print(f"{cfg.provider:<13}{ms:>10.3f}{spread:>18}{res['peak_mem_mb']:>10.1f}"
                  f"{attn_flops(cfg) / ms / 1e9:>9.3g}{vs_sdpa:>10}{vs_mat:>9}  {note}")
    print("\nt/t_sdpa: time relative to SDPA without relative terms (the floor); "
          "t_mat/t: speed-up over the materialising implementation; "
          "TFLOP/s counts q·k and p·v only.")


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--L", type=int, nargs="+", default=[1024, 2048], help="sequence lengths (Lq = Lk)")
    p.add_argument("--B", type=int, default=2)
    p.add_argument("--H", type=int, default=8)
    p.add_argument("--D", type=int, default=32)
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--providers", nargs="+", choices=list(PROVIDERS), default=None,
                   help="default: " + "; ".join(f"{d}: {' '.join(v)}" for d, v in DEFAULT_PROVIDERS.items()))
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--repeats", type=int, default=10, help="timed runs on CPU (at least 3)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs on CPU")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="CPU timing: wall clock, or the process's CPU time (steadier for one thread on a busy machine)")
    p.add_argument("--max-seconds", type=float, default=30.0,
                   help="stop a CPU measurement's repeats after this long (3 runs at least)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per measurement subprocess")
    p.add_argument("--decode-Lk", type=int, nargs="+", default=[4096], help="keys in decode mode")
    p.add_argument("--decode-B", type=int, nargs="+", default=[2, 16],
                   help="batch sizes in decode mode (16: batched decoding of 16 sequences)")
    p.add_argument("--time-modes", nargs="+", choices=("quotient", "fields"), default=["quotient"],
                   help="time term conventions to run (fields: the authors' per-token bar/position)")
    p.add_argument("--max-L", nargs="+", default=[], metavar="PROVIDER=L",
                   help="largest Lq to run per provider, e.g. materialized=2048")
    p.add_argument("--skip-slow", action="store_true",
                   help="apply default limits: " + "; ".join(f"{d}: {v}" for d, v in SLOW_MAX_L.items()))
    p.add_argument("--in-process", action="store_true",
                   help="measure in this process (default on CUDA; CPU peak RSS is then not per-measurement)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / f"{OP}.csv")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (L=128, decode Lk=256, 3 repeats)")
    p.add_argument("--single", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.L, args.decode_Lk, args.decode_B, args.repeats, args.warmup = [128], [256], [2], 3, 1
    if args.providers is None:
        args.providers = DEFAULT_PROVIDERS[args.device]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.single:
        return run_single(args.single)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False")
    max_l = dict(SLOW_MAX_L[args.device]) if args.skip_slow else {}
    for item in args.max_L:
        name, _, value = item.partition("=")
        if name not in PROVIDERS or not value.isdigit():
            raise SystemExit(f"--max-L expects PROVIDER=L with PROVIDER in {list(PROVIDERS)}, got {item!r}")
        max_l[name] = int(value)
    meta = {**versions(), "device": device_name(args.device), "threads": torch.get_num_threads(),
            "load1": f"{os.getloadavg()[0]:.1f}"}
    print(f"{OP}: {meta['device']}, torch {meta['torch']}, triton {meta['triton'] or '-'}, "
          f"commit {meta['commit'] or '-'}; B={args.B} H={args.H} D={args.D} {args.dtype}, "
          f"causal, hadamard, index+time+pitch, alpha={OPTIONS['alpha']}")
    if args.device == "cpu":
        load, cpus = os.getloadavg()[0], os.cpu_count() or 1
        if load > 0.5 * cpus:
            print(f"warning: load average {load:.1f} on {cpus} CPUs: other processes compete for "
                  "the cores, so OpenMP regions stall and CPU timings are noisy "
                  "(OMP_NUM_THREADS=1 gives steadier single-thread numbers)")
    base = dict(B=args.B, H=args.H, D=args.D, dtype=args.dtype, device=args.device)

    usable = []
    checks = [(CHECK_L, CHECK_L)] + ([(1, CHECK_L)] if "decode" in args.modes else [])
    print("\ncorrectness vs the fp64 reference at (Lq, Lk) = " + ", ".join(map(str, checks)))
    for provider in args.providers:
        why = None
        for Lq, Lk in checks:
            why = why or check(provider, Config(provider, "fwd_bwd", Lq=Lq, Lk=Lk, **base))
        print(f"  {provider:<13}" + ("ok" if why is None else f"skipped: {why}"))
        if why is None:
            usable.append(provider)

    shapes = [(m, L, L, args.B, tm) for tm in args.time_modes for m in args.modes if m != "decode"
              for L in args.L]
    shapes += [("decode", 1, Lk, B, tm) for tm in args.time_modes for B in args.decode_B
               for Lk in args.decode_Lk] if "decode" in args.modes else []
    in_process = args.in_process or args.device == "cuda"
    results, written = [], 0
    for mode, Lq, Lk, B, time_mode in shapes:
        for provider in usable:
            cfg = Config(provider, mode, Lq=Lq, Lk=Lk, time_mode=time_mode, **{**base, "B": B})
            if provider in max_l and Lq > max_l[provider]:
                res = {"skip": f"Lq={Lq} > max L {max_l[provider]} for {provider}"}
            elif in_process:
                try:
                    res = measure(cfg, args.repeats, args.warmup, args.max_seconds, args.clock)
                except torch.cuda.OutOfMemoryError:
                    res = {"skip": "out of memory"}
                finally:
                    gc.collect()
                    if args.device == "cuda":
                        torch.cuda.empty_cache()
            else:
                res = measure_in_subprocess(cfg, args)
            status = res["skip"] if "skip" in res else f"{res['ms']:.3f} ms, {res['peak_mem_mb']:.1f} MB"
            print(f"  {mode:<8}{time_mode:<9}{provider:<13}B={B:<3}Lq={Lq:<6}Lk={Lk:<6}{status}", flush=True)
            results.append((cfg, res))
            if "ms" in res:
                date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
                append_rows(args.out, [{
                    "op": OP, "provider": provider, "mode": mode, "time_mode": time_mode, "B": cfg.B,
                    "H": cfg.H, "Lq": Lq, "Lk": Lk, "D": cfg.D, "dtype": cfg.dtype, "ms": f"{res['ms']:.4f}",
                    "peak_mem_mb": f"{res['peak_mem_mb']:.1f}", "device": meta["device"],
                    "threads": meta["threads"], "load1": meta["load1"], "clock": args.clock, "torch": meta["torch"],
                    "triton": meta["triton"], "commit": meta["commit"], "date": date}])
                written += 1
    print_table(results)
    print(f"\n{written} rows appended to {args.out}")


if __name__ == "__main__":
    main()
