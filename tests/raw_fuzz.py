"""Fuzzer of the raw ops (torch.ops.fastattn.*) against the Python validation and references.

Every case is an argument vector drawn from a seeded generator (so a case is named by its
(family, seed, index)); a worker subprocess runs the cases and prints one JSON line per case, so
a segfault or a sanitizer abort kills only the worker: the parent records the crash, names the
case, and starts a new worker after it. Families:

- ``raw``: attention op arguments as the kernels take them (term integers, channel indices,
  coordinate values, shapes, mask, dropout), hostile values mixed in. The oracle is
  ``fastattn.reference.raw_terms``: ``check_raw_args`` (the C++ check's rules) and
  ``circular_relative_attention_raw`` (int64 index arithmetic). Both reject, or both accept and
  agree on the output and on the four gradients of the backward op.
- ``public``: user-level attention arguments (``*_min``, ``bar_res``, coordinates, tables) through
  the public function's validation and reference, and the raw op on the assembled arguments. If
  the public function accepts, the raw op must accept and agree; if it rejects, the raw op must
  reject or agree with the unvalidated reference.
- ``sae``: the SAE ops and their backward ops (shapes, k, indices, ste, bias), against the public
  functions' validation with the reference backend and the differentiable formulas of
  ``fastattn.ops._sae_glue``.

Used by tests/test_raw_ops.py (a fixed seed, a few hundred cases) and bench/fuzz_raw_ops.py
(long runs, optionally under AddressSanitizer).
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

HERE = Path(__file__).resolve().parent
FAMILIES = ("raw", "public", "sae")

# Integers that break int32 arithmetic one way or another.
HOSTILE = [-2**63, -2**62, -2**32 - 1, -2**31 - 1, -2**31, -2**30 - 1, -2**30, -(2**30 - 1), -65537, -2, -1,
           0, 1, 2, 3, 12, 48, 65535, 65536, 2**30 - 1, 2**30, 2**30 + 1, 2**31 - 1, 2**31, 2**32 - 2, 2**32,
           2**32 + 3, 2**62, 2**63 - 1]
COORD_HOSTILE = [-2**31, -2**30, -(2**30 - 1), -2, 2**30, 2**30 + 1, 2**31 - 1]


# ----------------------------------------------------------------------------- case generation

def _rng(family: str, seed: int, index: int) -> random.Random:
    return random.Random(f"{family}:{seed}:{index}")


def _maybe(r: random.Random, p: float, good, bad):
    """``good`` most of the time, a hostile alternative with probability p (callables are called)."""
    v = bad if r.random() < p else good
    return v() if callable(v) else v


def raw_case(r: random.Random) -> dict:
    """Integers and shapes of one raw attention call (tensors are made by the worker)."""
    B, H = r.choice([1, 2]), r.choice([1, 2])
    Lk = r.randint(1, 12)
    Lq = _maybe(r, 0.04, r.randint(1, Lk), Lk + 1)
    D = r.choice([1, 2, 3, 4, 8])
    C = r.randint(0, 3)
    terms, rows = [], 0
    for _ in range(_maybe(r, 0.02, r.randint(0, 3), 9)):
        kind = _maybe(r, 0.03, r.randint(0, 3) if C else 0, lambda: r.choice(HOSTILE))
        dec = kind in (2, 3)
        part = _maybe(r, 0.1, r.randint(0, 2) if dec else 0, lambda: r.choice([1, 2, 3, -1] + HOSTILE))
        ch_hi = _maybe(r, 0.1, -1 if kind == 0 else r.randint(0, max(C - 1, 0)),
                       lambda: r.choice([C, C + 1, -2, 2**30] + HOSTILE))
        ch_lo = _maybe(r, 0.1, r.randint(0, max(C - 1, 0)) if dec else -1,
                       lambda: r.choice([C, C + 1, -2, 0, 2**30] + HOSTILE))
        param = {2: r.randint(1, 50), 3: r.randint(-10, 10)}.get(kind, 0)
        param = _maybe(r, 0.1, param, lambda: r.choice(HOSTILE))
        hi_min = _maybe(r, 0.1, r.randint(-20, 20), lambda: r.choice(HOSTILE))
        n_hi = _maybe(r, 0.08, r.randint(1, 8), lambda: r.choice(HOSTILE))
        n_lo = _maybe(r, 0.08, r.randint(1, 6) if dec else 1, lambda: r.choice(HOSTILE))
        want = n_hi if kind in (0, 1) or part == 1 else (n_lo if part == 2 else n_hi * n_lo)
        want = want if isinstance(want, int) and 0 < want <= 200 else r.randint(1, 8)
        off = _maybe(r, 0.1, rows, lambda: r.choice([rows + 1, rows - 1, -1] + HOSTILE))
        rows += want
        terms += [kind, part, ch_hi, ch_lo, param, hi_min, n_hi, n_lo, off]
    if r.random() < 0.02:
        terms = terms[:-1]
    N = rows + r.randint(0, 3)
    Ht = _maybe(r, 0.03, r.choice([1, H]), H + 1)
    extremes = [(r.randrange(B), r.randrange(C), r.randrange(Lk), r.choice(COORD_HOSTILE))
                for _ in range(r.choice([0, 0, 0, 1, 2]))] if C else []
    return dict(B=B, H=H, Lq=Lq, Lk=Lk, D=D, C=C, N=N, Ht=Ht, terms=terms, extremes=extremes,
                dtype=r.choice(["float32", "float64"]), causal=r.random() < 0.5, alpha=r.choice([1.0, 0.5, -2.0]),
                scale=r.choice([0.3, 1.0]), kpm=_maybe(r, 0.05, r.random() < 0.3, "bad"),
                dropout_p=_maybe(r, 0.03, r.choice([0.0, 0.0, 0.0, 0.3]), lambda: r.choice([1.0, -0.1, 2.0])),
                seed=r.choice(HOSTILE), tensor_seed=r.randrange(2**31))


def public_case(r: random.Random) -> dict:
    """User-level arguments of one public call (tables and coordinates are made by the worker)."""
    mins = {n: _maybe(r, 0.15, r.randint(-30, 30), lambda: r.choice(HOSTILE))
            for n in ("rel_index_min", "bar_min", "octave_min", "time_min", "pitch_min")}
    bar_res = _maybe(r, 0.1, r.choice([1, 4, 12, 48]), lambda: r.choice([0, -1, 2**30, 2**30 + 1, 2**31]))
    terms = r.sample(["index", "time", "time_fields", "time_direct", "pitch", "pitch_direct"], r.randint(1, 3))
    if "time_direct" in terms:  # exclusive with the decomposed time terms
        terms = [t for t in terms if t not in ("time", "time_fields")]
    if "time" in terms and "time_fields" in terms:
        terms.remove("time_fields")
    if "pitch" in terms and "pitch_direct" in terms:
        terms.remove("pitch_direct")
    Lk = r.randint(1, 10)
    extremes = [(r.choice(["onset", "pitch", "bar", "position"]), r.randrange(Lk),
                 r.choice(COORD_HOSTILE + [-1, 127, 128, 2**30 - 1]))
                for _ in range(r.choice([0, 0, 1, 2]))]
    return dict(Lk=Lk, Lq=r.randint(1, Lk), D=r.choice([2, 4]), terms=terms, mins=mins, bar_res=bar_res,
                combine=r.choice(["hadamard", "add"]), causal=r.random() < 0.5, extremes=extremes,
                rows={t: r.randint(1, 30) for t in ("index", "bar", "octave", "time", "pitch")},
                tensor_seed=r.randrange(2**31))


def sae_case(r: random.Random) -> dict:
    op = r.choice(["topk_encode", "topk_encode_backward", "sparse_decode", "sparse_decode_backward",
                   "binary_encode", "binary_encode_backward", "binary_covariance_penalty"])
    N, d, n = r.choice([0, 1, 2, 5, 17]), r.choice([0, 1, 3, 8]), r.choice([0, 1, 4, 9, 300])
    return dict(op=op, N=N, d=d, n=n, k=_maybe(r, 0.15, r.randint(1, max(n, 1)), lambda: r.choice(HOSTILE)),
                bias=r.choice([None, "ok", "short"]) if r.random() < 0.1 else r.choice([None, "ok"]),
                bad_index=_maybe(r, 0.15, None, lambda: r.choice(HOSTILE)), ste=_maybe(r, 0.1, r.randint(0, 2),
                lambda: r.choice(HOSTILE)), return_code=r.random() < 0.8,
                dtype=r.choice(["float32", "float64", "float64"]), tensor_seed=r.randrange(2**31))


GENERATORS = {"raw": raw_case, "public": public_case, "sae": sae_case}


def make_case(family: str, seed: int, index: int) -> dict:
    return GENERATORS[family](_rng(family, seed, index))


# ----------------------------------------------------------------------------- running one case (worker side)

def _close(got, want, dtype, scale=1.0) -> float:
    """Largest error beyond tolerance (0.0 when within); NaN placement must match."""
    import torch
    if got.shape != want.shape:
        return float("inf")
    if not torch.equal(torch.isnan(got), torch.isnan(want)):
        return float("inf")
    tol = (1e-9 if dtype == torch.float64 else 2e-4) * max(1.0, scale)
    ref = want.double().nan_to_num(0.0)
    err = (got.double().nan_to_num(0.0) - ref).abs() - tol * (1 + ref.abs())
    return max(0.0, float(err.max())) if err.numel() else 0.0


def _attempt(fn):
    try:
        return fn(), None
    except (RuntimeError, ValueError, TypeError, IndexError, OverflowError) as e:
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"


def _verdict(py_err, op_err, errors: List[float], judged: bool = True, strict: bool = True) -> dict:
    """Both reject, or both accept and agree (errors all 0). ``strict``: the Python side mirrors
    the op's rules exactly, so a Python-only rejection is a failure too; otherwise (public
    family) the op may accept what the public function rejects if it agrees with the
    unvalidated reference (``judged``: that reference could compute)."""
    if py_err and op_err:
        kind = "both_reject"
    elif py_err:
        kind = "py_reject_op_accept" + ("" if judged else "_unjudged")
    elif op_err:
        kind = "op_reject_py_accept"
    else:
        kind = "both_accept"
    bad = kind == "op_reject_py_accept" or (strict and kind.startswith("py_reject")) or (
        kind != "both_reject" and judged and any(e > 0 for e in errors))
    return dict(kind=kind, ok=not bad, py=py_err, op=op_err, err=max(errors, default=0.0))


def run_raw(c: dict) -> dict:
    import torch

    from fastattn.reference import raw_terms as R

    g = torch.Generator().manual_seed(c["tensor_seed"])
    dt = getattr(torch, c["dtype"])
    B, H, Lq, Lk, D = c["B"], c["H"], c["Lq"], c["Lk"], c["D"]
    q, k, v = (torch.randn(*s, generator=g, dtype=torch.float64).to(dt) for s in
               ((B, H, Lq, D), (B, H, Lk, D), (B, H, Lk, D)))
    table = (torch.randn(c["Ht"], c["N"], D, generator=g, dtype=torch.float64) * 0.5).to(dt)
    coords = torch.randint(-1, 31, (B, c["C"], Lk), generator=g, dtype=torch.int32)
    for b, ch, j, val in c["extremes"]:
        coords[b, ch, j] = val
    kpm = None
    if c["kpm"] == "bad":
        kpm = torch.zeros(B, Lk + 1, dtype=torch.bool)
    elif c["kpm"]:
        kpm = torch.rand(B, Lk, generator=g) < 0.3
    args = (table, coords, c["terms"], c["alpha"], c["scale"], c["causal"], kpm, c["dropout_p"], c["seed"])
    _, py_err = _attempt(lambda: R.check_raw_args(q, k, v, *args))
    res, op_err = _attempt(lambda: torch.ops.fastattn.circular_relative_attention(q, k, v, *args))
    grad = torch.randn(B, H, Lq, D, generator=g, dtype=torch.float64).to(dt)
    out, lse = res if res is not None else (torch.zeros_like(q), torch.zeros(B, H, Lq, dtype=dt))
    bwd, bwd_err = _attempt(lambda: torch.ops.fastattn.circular_relative_attention_backward(
        grad, q, k, v, out, lse, *args))
    if (op_err is None) != (bwd_err is None):
        return dict(kind="forward_backward_disagree", ok=False, py=py_err, op=op_err or bwd_err, err=0.0)
    dec, dec_err = None, None
    if c["dropout_p"] == 0.0:  # the decoding op takes the forward's arguments (table transposed), no dropout
        dec, dec_err = _attempt(lambda: torch.ops.fastattn.circular_relative_attention_decode(
            q, k, v, table.transpose(1, 2).contiguous(), coords, c["terms"], c["alpha"], c["scale"], c["causal"], kpm))
        if (op_err is None) != (dec_err is None):
            return dict(kind="forward_decode_disagree", ok=False, py=py_err, op=op_err or dec_err, err=0.0)
    errors = []
    if py_err is None and op_err is None:
        leaves = [t.clone().requires_grad_() for t in (q, k, v, table)]
        want = R.circular_relative_attention_raw(*leaves, *args[1:])
        wants = torch.autograd.grad(want, leaves, grad, allow_unused=True)
        wants = [torch.zeros_like(x) if w is None else w for x, w in zip(leaves, wants)]
        scale = max(1.0, float(table.abs().max()) if table.numel() else 1.0)
        errors = [_close(out, want.detach(), dt)] + [_close(a, b, dt, scale * Lk) for a, b in zip(bwd, wants)]
        if dec is not None:
            errors.append(_close(dec, want.detach(), dt))
    return _verdict(py_err, op_err, errors)


def run_public(c: dict) -> dict:
    import torch

    import fastattn
    from fastattn.ops import _cra_terms
    from fastattn.reference import circular_relative_attention as reference

    g = torch.Generator().manual_seed(c["tensor_seed"])
    Lk, Lq, D, rows = c["Lk"], c["Lq"], c["D"], c["rows"]

    def rnd(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64) * 0.5

    q, k, v = rnd(1, 2, Lq, D), rnd(1, 2, Lk, D), rnd(1, 2, Lk, D)
    onset = torch.cumsum(torch.randint(0, 30, (1, Lk), generator=g), 1)
    pitch = torch.randint(0, 128, (1, Lk), generator=g)
    R = c["bar_res"]
    r_ok = isinstance(R, int) and 1 <= R <= 200
    coords = dict(onset=onset, pitch=pitch, bar=onset // (R if r_ok else 48), position=onset % (R if r_ok else 48))
    for name, j, val in c["extremes"]:
        coords[name][0, j] = val
    kw = dict(bar_res=R, **c["mins"])
    pos_rows = R if r_ok else 5
    for t in c["terms"]:
        if t == "index":
            kw["rel_index_table"] = rnd(rows["index"], D)
        elif t in ("time", "time_fields"):
            kw.update(bar_table=rnd(rows["bar"], D), pos_table=rnd(pos_rows if t == "time" else 2 * pos_rows - 1, D))
            if t == "time_fields":
                kw.update(time_mode="fields", bar=coords["bar"], position=coords["position"])
        elif t == "time_direct":
            kw["time_table"] = rnd(rows["time"], D)
        elif t == "pitch":
            kw.update(octave_table=rnd(rows["octave"], D), pitch_class_table=rnd(12, D))
        else:
            kw["pitch_table"] = rnd(rows["pitch"], D)
    common = dict(combine=c["combine"], causal=c["causal"], scale=0.5)
    on, pi = coords["onset"], coords["pitch"]
    want, py_err = _attempt(lambda: fastattn.circular_relative_attention(q, k, v, on, pi, backend="reference", **common, **kw))
    judged = py_err is None
    # pos_table has bar_res rows only for a small bar_res: otherwise the tables contradict
    # bar_res and the unvalidated reference computes nothing meaningful to compare with
    consistent = r_ok or not {"time", "time_fields"} & set(c["terms"])
    if py_err is not None and consistent:  # the oracle without the validation, where it can compute at all
        want, ref_err = _attempt(lambda: reference(q, k, v, on, pi, alpha=1.0, **common, **kw))
        judged = ref_err is None
    time_mode = kw.pop("time_mode", "quotient")
    full = {n: None for n in _cra_terms.TABLE_ARGS + ("bar", "position")}
    full.update(kw)

    def raw():
        asm = _cra_terms.assemble(q, Lk, on, pi, full, c["combine"], time_mode)
        return torch.ops.fastattn.circular_relative_attention(q, k, v, asm.table, asm.coords, asm.terms, 1.0, 0.5,
                                                               c["causal"], None, 0.0, 0)[0]
    got, op_err = _attempt(raw)
    errors = [_close(got, want, torch.float64)] if got is not None and judged else []
    return _verdict(py_err, op_err, errors, judged, strict=False)


def _sae_inputs(c: dict):
    import torch
    g = torch.Generator().manual_seed(c["tensor_seed"])
    dt = getattr(torch, c["dtype"])
    N, d, n = c["N"], c["d"], c["n"]

    def rnd(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64).to(dt)
    k = c["k"]
    kk = k if isinstance(k, int) and 0 <= k <= 64 else max(min(n, 3), 1)
    idx = torch.randint(0, max(n, 1), (N, kk), generator=g)
    if c["bad_index"] is not None and idx.numel():
        idx.view(-1)[0] = c["bad_index"]
    bias_len = {"topk_encode": n, "binary_encode": n, "binary_encode_backward": n}.get(c["op"], d)
    bias = None if c["bias"] is None else rnd(bias_len + (1 if c["bias"] == "short" else 0))
    return dict(x=rnd(N, d), W=rnd(n, d), b=bias, k=k, idx=idx, vals=rnd(N, kk), gk=rnd(N, kk), gd=rnd(N, d),
                gn=rnd(N, n), h=rnd(N, n), dt=dt)


def run_sae(c: dict) -> dict:
    import torch

    import fastattn.ops.sae as S
    from fastattn.ops import _sae_glue as G

    t = _sae_inputs(c)
    x, W, b, k, idx, dt = t["x"], t["W"], t["b"], t["k"], t["idx"], t["dt"]
    op, ops = c["op"], torch.ops.fastattn
    n_rows = W.shape[0]

    def idx_ok():
        if idx.numel() and not (0 <= int(idx.min()) and int(idx.max()) < n_rows):
            raise ValueError("indices out of range")

    def d_scale(*ts):
        return max([1.0] + [float(a.abs().max()) for a in ts if a.numel()]) ** 2 * max(1, x.shape[1])

    if op == "topk_encode":
        want, py_err = _attempt(lambda: tuple(S.topk_encode(x, W, b, k, backend="reference")))
        got, op_err = _attempt(lambda: ops.topk_encode(x, W, b, k))
        errs = []
        if want and got:  # indices may differ only at ties: z at the op's indices must be the values
            z = x @ W.t() + (b if b is not None else 0)
            errs = [_close(got[0], want[0], dt), _close(z.gather(1, got[1]), want[0], dt, d_scale(x, W))]
    elif op == "sparse_decode":
        want, py_err = _attempt(lambda: S.sparse_decode(t["vals"], idx, W, b, backend="reference"))
        got, op_err = _attempt(lambda: ops.sparse_decode(t["vals"], idx, W, b))
        errs = [_close(got, want, dt)] if want is not None and got is not None else []
    elif op == "binary_encode":
        ste = c["ste"]
        name = S.STE_MODES[ste] if 0 <= ste < len(S.STE_MODES) else f"code {ste}"
        want, py_err = _attempt(lambda: tuple(S.binary_encode(x, W, b, ste=name, backend="reference",
                                                              return_code=c["return_code"])))
        got, op_err = _attempt(lambda: ops.binary_encode(x, W, b, c["return_code"], ste))
        errs = [float(not all(torch.equal(a, b_) for a, b_ in zip(got, want)))] if want and got else []
    elif op == "binary_covariance_penalty":
        want, py_err = _attempt(lambda: S.binary_covariance_penalty(t["h"], backend="reference"))
        got, op_err = _attempt(lambda: ops.binary_covariance_penalty(t["h"], True))
        errs = []
        if want is not None and got is not None:
            errs = [_close(got[0], want, dt, d_scale(t["h"]) * n_rows),
                    _close(got[1], G.covariance_grad_graph(t["h"]), dt, d_scale(t["h"]) * n_rows)]
    else:  # backward ops: the Python side is the shape/index rules plus the differentiable formulas
        if op == "topk_encode_backward":
            def py():
                S._check_linear(x, W, None, True)
                if t["gk"].shape != idx.shape:
                    raise ValueError("grad/indices shapes")
                idx_ok()
                return G.topk_backward_graph(t["gk"], x, W, idx)
            got, op_err = _attempt(lambda: ops.topk_encode_backward(t["gk"], x, W, idx))
        elif op == "sparse_decode_backward":
            def py():
                idx_ok()
                if W.dim() != 2 or t["gd"].shape[1] != W.shape[1]:
                    raise ValueError("grad_out must be [N, d]")
                return G.decode_backward_graph(t["gd"], t["vals"], idx, W)
            got, op_err = _attempt(lambda: ops.sparse_decode_backward(t["gd"], t["vals"], idx, W))
        else:
            ste = c["ste"]

            def py():
                S._check_linear(x, W, b, True)
                if not 0 <= ste <= 2:
                    raise ValueError("ste")
                return G.binary_backward_graph(t["gn"], x, W, b, ste)
            got, op_err = _attempt(lambda: ops.binary_encode_backward(t["gn"], x, W, b, ste))
        want, py_err = _attempt(py)
        scale = max([1.0] + [float(a.abs().max()) for a in (x, W, t["gk"], t["gd"], t["vals"]) if a.numel()]) ** 2
        errs = [_close(a, w_, dt, scale * max(1, x.shape[0], n_rows)) for a, w_ in zip(got, want)] if want and got else []
    return _verdict(py_err, op_err, errs)


RUNNERS = {"raw": run_raw, "public": run_public, "sae": run_sae}


def worker(family: str, seed: int, start: int, stop: int) -> None:
    """Runs cases [start, stop) of a family, one JSON line each; a START line before each case
    names the case a crash interrupts."""
    import torch
    torch.set_num_threads(1)  # the kernels' threading is covered elsewhere; keep runs cheap
    import fastattn  # noqa: F401  (registers the ops)
    for i in range(start, stop):
        print(f"START {i}", flush=True)
        case = make_case(family, seed, i)
        try:
            res = RUNNERS[family](case)
        except Exception as e:  # noqa: BLE001 - an oracle failure is a finding too
            res = dict(kind="harness_error", ok=False, py=None, op=f"{type(e).__name__}: {e}"[:200], err=0.0)
        print("CASE " + json.dumps(dict(i=i, **res)), flush=True)


# ----------------------------------------------------------------------------- parent side

@dataclass
class Report:
    family: str
    seed: int
    cases: int = 0
    crashes: List[dict] = field(default_factory=list)
    failures: List[dict] = field(default_factory=list)
    kinds: Dict[str, int] = field(default_factory=dict)
    sanitizer_reports: int = 0

    def summary(self) -> dict:
        return dict(family=self.family, seed=self.seed, cases=self.cases, crashes=len(self.crashes),
                    sanitizer_reports=self.sanitizer_reports, failures=len(self.failures), outcomes=self.kinds,
                    crash_cases=self.crashes[:20], failure_cases=self.failures[:20])


def _worker_env(env: Optional[dict]) -> dict:
    """The worker imports fastattn from FASTATTN_FUZZ_PATH: by default the checkout this process
    imported it from (an ASan run points it at an instrumented copy instead)."""
    env = dict(os.environ if env is None else env)
    if "FASTATTN_FUZZ_PATH" not in env:
        import fastattn
        env["FASTATTN_FUZZ_PATH"] = str(Path(fastattn.__file__).resolve().parent.parent)
    return env


def run(family: str, seed: int, count: int, env: Optional[dict] = None, timeout: float = 3600.0) -> Report:
    """Runs ``count`` cases in worker subprocesses (restarted after a crash)."""
    rep = Report(family, seed)
    start = 0
    while start < count:
        cmd = [sys.executable, str(HERE / "raw_fuzz.py"), "worker", family, str(seed), str(start), str(count)]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_worker_env(env))
        last = start - 1
        for line in p.stdout.splitlines():
            if line.startswith("START "):
                last = int(line.split()[1])
            elif line.startswith("CASE "):
                res = json.loads(line[5:])
                rep.cases += 1
                rep.kinds[res["kind"]] = rep.kinds.get(res["kind"], 0) + 1
                if not res["ok"]:
                    rep.failures.append(dict(res, case=make_case(family, seed, res["i"])))
        finished = last >= count - 1 and p.returncode == 0
        if finished:
            break
        if last < start:  # the worker died before its first case: an environment problem
            raise RuntimeError(f"fuzz worker failed to start (exit {p.returncode}): {p.stderr[-2000:]}")
        lines = p.stderr.splitlines()
        asan = [i for i, ln in enumerate(lines) if "ERROR: AddressSanitizer" in ln]
        rep.sanitizer_reports += bool(asan)
        rep.cases += 1
        excerpt = "\n".join(lines[asan[0]:asan[0] + 8]) if asan else "\n".join(lines[-12:])
        rep.crashes.append(dict(i=last, returncode=p.returncode, case=make_case(family, seed, last), stderr=excerpt))
        start = last + 1
    return rep


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "worker":
        if os.environ.get("FASTATTN_FUZZ_PATH"):
            sys.path.insert(0, os.environ["FASTATTN_FUZZ_PATH"])
        worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    else:
        sys.exit("usage: raw_fuzz.py worker FAMILY SEED START STOP (see bench/fuzz_raw_ops.py)")
