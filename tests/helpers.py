"""Shared test helpers: random problems for circular relative attention and a verbose compare."""
from __future__ import annotations

import functools
import importlib.util
import inspect
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

import fastattn
from fastattn.ops import _cra_terms

# (forward atol, gradient atol) per dtype, for fused-vs-reference at the same dtype.
TOL = {torch.float64: (1e-10, 1e-9), torch.float32: (1e-5, 1e-4)}

TERM_SETS = {
    "none": (),
    "index": ("index",),
    "time": ("time",),
    "pitch": ("pitch",),
    "all": ("index", "time", "pitch"),
    "direct": ("index", "time_direct", "pitch_direct"),
    "fields": ("time_fields", "pitch"),
}


def assert_close(name: str, got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float = 0.0):
    """assert_close that says where and by how much tensors differ, and checks NaN parity."""
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    nan_g, nan_w = torch.isnan(got), torch.isnan(want)
    assert torch.equal(nan_g, nan_w), f"{name}: NaN in {int(nan_g.sum())} vs {int(nan_w.sum())} places"
    err = (got.double() - want.double()).abs().nan_to_num(0.0)
    bound = atol + rtol * want.double().abs().nan_to_num(0.0)
    bad = err > bound
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(f"{name}: {int(bad.sum())} elements off; max abs err {err.max().item():.3g} "
                             f"(atol {atol:g}); first at {idx}: got {got[idx].item():.6g}, want {want[idx].item():.6g}")


def make_problem(B=2, H=3, Lq=7, Lk=7, D=16, terms="all", per_head=False, dtype=torch.float32,
                 kpm=False, missing=True, seed=0, bar_res=48, scale_tables=0.5, grad=True):
    """Random q/k/v, coordinates and tables. Returns (q, k, v, onset, pitch, kwargs, leaves)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=1.0):
        t = (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(dtype)
        return t.requires_grad_(grad)

    q, k, v = rnd(B, H, Lq, D), rnd(B, H, Lk, D), rnd(B, H, Lk, D)
    steps = torch.randint(0, 5, (B, Lk), generator=g) * 12
    onset = torch.cumsum(steps, 1) + torch.randint(0, bar_res, (B, 1), generator=g)
    pitch = torch.randint(0, 128, (B, Lk), generator=g)
    bar = onset // bar_res
    position = onset % bar_res
    if missing and Lk > 2:
        for t in (onset, pitch, bar, position):
            t[0, torch.randint(0, Lk, (2,), generator=g)] = -1
    kw = {}
    th = (H,) if per_head else ()
    names = TERM_SETS[terms] if isinstance(terms, str) else terms
    for term in names:
        if term == "index":
            kw["rel_index_table"] = rnd(*th, Lk + 3, D, s=scale_tables)
            kw["rel_index_min"] = -2
        elif term == "time":
            kw["bar_table"] = rnd(*th, 5, D, s=scale_tables)
            kw["pos_table"] = rnd(bar_res, D, s=scale_tables)
            kw["bar_min"] = -1
        elif term == "time_fields":
            kw["bar_table"] = rnd(*th, 4, D, s=scale_tables)
            kw["pos_table"] = rnd(2 * bar_res - 1, D, s=scale_tables)
            kw.update(time_mode="fields", bar=bar, position=position)
        elif term == "time_direct":
            kw["time_table"] = rnd(*th, 100, D, s=scale_tables)
            kw["time_min"] = -20
        elif term == "pitch":
            kw["octave_table"] = rnd(22, D, s=scale_tables)
            kw["pitch_class_table"] = rnd(*th, 12, D, s=scale_tables)
        elif term == "pitch_direct":
            kw["pitch_table"] = rnd(*th, 255, D, s=scale_tables)
        else:
            raise ValueError(term)
    kw["bar_res"] = bar_res
    if kpm:
        m = torch.rand(B, Lk, generator=g) < 0.25
        kw["key_padding_mask"] = m
    leaves = [q, k, v] + [t for t in kw.values() if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return q, k, v, onset, pitch, kw, leaves


def run(backend, q, k, v, onset, pitch, kw, leaves, seed=1, **extra):
    """Forward and the gradients of a random linear loss w.r.t. every leaf. ``backend``: a
    backend name, or a function with the public op's signature (e.g. the emulated CUDA kernels)."""
    op = backend if callable(backend) else functools.partial(fastattn.circular_relative_attention, backend=backend)
    out = op(q, k, v, onset, pitch, **kw, **extra)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out)
    grads = torch.autograd.grad(out, leaves, g, allow_unused=True)
    return out, [torch.zeros_like(x) if gr is None else gr for x, gr in zip(leaves, grads)]


def grad_names(kw) -> list:
    """Names of run()'s gradients for a make_problem() kw: dq, dk, dv, then d<table>."""
    return ["dq", "dk", "dv"] + [f"d{n}" for n, t in kw.items() if isinstance(t, torch.Tensor) and t.is_floating_point()]


def cast_problem(prob, dtype, device="cpu"):
    """A make_problem() result with every float tensor cast to ``dtype`` on ``device`` (new leaves)."""
    q, k, v, onset, pitch, kw, leaves = prob

    def cast(t):
        if not isinstance(t, torch.Tensor):
            return t
        t = t.detach().to(device)
        return t.to(dtype).requires_grad_(leaves[0].requires_grad) if t.is_floating_point() else t

    q, k, v = cast(q), cast(k), cast(v)
    kw = {n: cast(t) for n, t in kw.items()}
    leaves = [q, k, v] + [t for t in kw.values() if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return q, k, v, cast(onset), cast(pitch), kw, leaves


def lowp_compare(backend, dtype, device="cpu", floor=1e-3, **cfg):
    """The low-precision rule: the kernel's error at ``dtype`` is at most twice the error of the
    PyTorch reference run at ``dtype``, both measured against the fp64 reference on the same
    (rounded) inputs, plus ``floor`` × max(1, largest fp64 magnitude) for outputs where the
    reference happens to be exact. Returns {name: (kernel error, reference error)}."""
    extra = {k: cfg.pop(k) for k in ("causal", "combine", "alpha") if k in cfg}
    prob = cast_problem(make_problem(dtype=torch.float64, **cfg), dtype, device)
    out64, grads64 = run("reference", *cast_problem(prob, torch.float64), **extra)
    out_r, grads_r = run("reference", *prob, **extra)
    out_k, grads_k = run(backend, *prob, **extra)
    names = ["out"] + grad_names(prob[5])
    errors = {}
    for name, gold, ref, got in zip(names, [out64] + grads64, [out_r] + grads_r, [out_k] + grads_k):
        gold = gold.double()
        e_ref = (ref.double().cpu() - gold).abs().max().item()
        e_k = (got.double().cpu() - gold).abs().max().item()
        bound = 2 * e_ref + floor * max(1.0, gold.abs().max().item())
        assert e_k <= bound, f"{name}: {backend} {dtype} error {e_k:.3g} > 2 x reference error {e_ref:.3g} (+floor)"
        errors[name] = (e_k, e_ref)
    return errors


# Defaults of the public op's term arguments, for calling _cra_terms.assemble directly.
_TERM_DEFAULTS = {n: prm.default for n, prm in inspect.signature(fastattn.circular_relative_attention).parameters.items()
                  if n in _cra_terms.TABLE_ARGS + ("bar", "position", "bar_res", "bar_min", "octave_min",
                                                   "rel_index_min", "time_min", "pitch_min")}


def assemble(q, Lk, onset, pitch, kw, combine="hadamard", time_mode="quotient"):
    """The kernels' inputs (table, coordinate channels, term integers) for a make_problem() kw."""
    full = {**_TERM_DEFAULTS, **{n: t for n, t in kw.items() if n in _TERM_DEFAULTS}}
    return _cra_terms.assemble(q, Lk, onset, pitch, full, combine, kw.get("time_mode", time_mode))


@pytest.fixture
def default_sigint():
    """SIGINT raises KeyboardInterrupt (Python's default) for the test, also when the runner was
    started with SIGINT ignored (a background job), which the trainers then leave ignored."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


def n(*rows):
    """Notes as an int64 [N, 5] array (one row per note)."""
    return np.array(rows, dtype=np.int64).reshape(-1, 5)


def load_bench(name: str):
    """A bench/ script imported as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
