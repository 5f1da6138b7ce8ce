#!/usr/bin/env python
"""The op-level cases of issue 14 (classes 1 and 3), each run in its own subprocess, as a table.

Every case prints one line of outcome; a case that kills its process is reported with the
signal. Run it against a checkout to see that checkout's behaviour (the closing note's "before"
column came from the main branch at 85301e4, the "after" column from this branch):

    PYTHONPATH=/work/main python bench/hardening_ops_cases.py --out before.md
    PYTHONPATH=$PWD python bench/hardening_ops_cases.py --before before.md --out bench/results/hardening_ops_cases.md
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import textwrap

PRELUDE = """
import os, warnings
os.environ.setdefault("TRITON_INTERPRET", "1")
import torch, fastattn
from fastattn.ops import _cra_terms
torch.manual_seed(0)
def say(s): print("RESULT:", s, flush=True)
def first(e): return type(e).__name__ + ": " + str(e).splitlines()[0][:110]
def raw_fwd(q, table, coords, terms, causal=True):
    return torch.ops.fastattn.circular_relative_attention(q, q, q, table, coords, terms, 1.0, 1.0, causal, None, 0.0, 0)
def attempt(fn):
    try:
        return fn(), None
    except Exception as e:
        return None, first(e)
FULL = dict(rel_index_table=None, bar_table=None, pos_table=None, octave_table=None, pitch_class_table=None,
            time_table=None, pitch_table=None, bar=None, position=None, bar_res=48, bar_min=0, octave_min=-11,
            rel_index_min=0, time_min=0, pitch_min=-127)
def problem(D=16, L=6, nan=None, big=False):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, L, D, generator=g) for _ in range(3))
    if nan == "q":
        q[0, 0, 2, 3] = float("nan")
    if big:
        q, k = q * 1e20, k * 1e20
    onset = torch.arange(L).view(1, L) * 12
    pitch = torch.randint(40, 80, (1, L), generator=g)
    kw = dict(bar_table=torch.randn(4, D, generator=g) * 0.3, pos_table=torch.randn(48, D, generator=g) * 0.3,
              octave_table=torch.randn(22, D, generator=g) * 0.3, pitch_class_table=torch.randn(12, D, generator=g) * 0.3)
    if nan == "table":
        kw["bar_table"][1, 0] = float("nan")  # row of bar difference 1 (minus bar_min 0)
    return q, k, v, onset, pitch, kw
def nan_report(o, ref):
    return f"{int(torch.isnan(o).sum())}/{o.numel()} NaN (reference {int(torch.isnan(ref).sum())})"
def backends_nan(case):
    q, k, v, onset, pitch, kw = problem(nan=case if case != "big" else None, big=case == "big")
    ref = fastattn.circular_relative_attention(q, k, v, onset, pitch, backend="reference", **kw)
    parts = []
    for b in ("cpp", "triton"):
        o, err = attempt(lambda: fastattn.circular_relative_attention(q, k, v, onset, pitch, backend=b, **kw))
        parts.append(f"{b}: " + (err or nan_report(o, ref)))
    try:
        from fastattn import _cuda_emu
        emu = _cuda_emu.load("circular_relative_attention")
        asm = _cra_terms.assemble(q, q.shape[2], onset, pitch, {**FULL, **kw}, "hadamard", "quotient")
        o, _ = emu.forward(q, k, v, asm.table, asm.coords, asm.terms, 1.0, 0.25, True, None, 0.0, 0)
        parts.append("cuda_emu: " + nan_report(o, ref))
    except Exception as e:
        parts.append("cuda_emu: " + first(e))
    say("; ".join(parts))
def hvp(fn, inputs, seed=0):
    # Hessian-vector product of <fn(*inputs), g> with random g and direction u (create_graph=True).
    g = torch.Generator().manual_seed(seed)
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    f = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outs if o.is_floating_point())
    grads = torch.autograd.grad(f, inputs, create_graph=True, allow_unused=True)
    s = sum((gr * torch.randn(gr.shape, generator=g, dtype=gr.dtype)).sum() for gr in grads if gr is not None)
    if not s.requires_grad:
        return [torch.zeros_like(x) for x in inputs]
    h = torch.autograd.grad(s, inputs, allow_unused=True)
    return [torch.zeros_like(x) if y is None else y for x, y in zip(inputs, h)]
def compare_hvp(make, backend, ref_backend="reference"):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got, err = attempt(lambda: hvp(lambda *a: make(backend, *a), leaves()))
    if err:
        return err
    want = hvp(lambda *a: make(ref_backend, *a), leaves())
    diff = max(float((a - b).abs().max()) for a, b in zip(got, want))
    warned = [str(x.message)[:40] for x in w if issubclass(x.category, UserWarning)]
    return f"max |H·u - reference| = {diff:.2g}" + (f", UserWarning ({warned[0]}...)" if warned else "")
"""

Q1 = "q = torch.randn(1, 1, 4, 4, dtype=torch.float64)\n"
CASES = [
    ("1", "raw attention forward: Hadamard term 65536 × 65536 rows, 8-row table", Q1 + """
coords = torch.tensor([[[0, 100, 200, 300], [0, 0, 0, 0]]], dtype=torch.int32)
o, err = attempt(lambda: raw_fwd(q, torch.randn(1, 8, 4, dtype=torch.float64), coords, [2, 0, 0, 1, 48, 0, 65536, 65536, 0]))
say(err or "accepted")
"""),
    ("1", "raw attention backward: the same term", Q1 + """
coords = torch.tensor([[[0, 100, 200, 300], [0, 0, 0, 0]]], dtype=torch.int32)
z = torch.zeros(1, 1, 4, dtype=torch.float64)
r, err = attempt(lambda: torch.ops.fastattn.circular_relative_attention_backward(
    torch.ones_like(q), q, q, q, torch.zeros_like(q), z, torch.randn(1, 8, 4, dtype=torch.float64), coords,
    [2, 0, 0, 1, 48, 0, 65536, 65536, 0], 1.0, 1.0, True, None, 0.0, 0))
say(err or "accepted")
"""),
    ("1", "raw attention: direct term with lo channel 2^30", Q1 + """
coords = torch.zeros(1, 1, 4, dtype=torch.int32)
o, err = attempt(lambda: raw_fwd(q, torch.randn(1, 5, 4, dtype=torch.float64), coords, [1, 0, 0, 1 << 30, 0, 0, 5, 1, 0]))
say(err or "accepted")
"""),
    ("1", "raw attention: direct term with lo channel C (one past the last)", Q1 + """
coords = torch.zeros(1, 1, 4, dtype=torch.int32)
o, err = attempt(lambda: raw_fwd(q, torch.randn(1, 5, 4, dtype=torch.float64), coords, [1, 0, 0, 1, 0, 0, 5, 1, 0]))
say(err or "accepted (reads coords past the tensor)")
"""),
    ("1", "raw attention: index term hi_min = 2^32 - 2 (int32 wraps to -2)", Q1 + """
coords = torch.zeros(1, 0, 4, dtype=torch.int32)
table = torch.randn(1, 8, 4, dtype=torch.float64)
o, err = attempt(lambda: raw_fwd(q, table, coords, [0, 0, -1, -1, 0, 2**32 - 2, 8, 1, 0]))
o2 = raw_fwd(q, table, coords, [0, 0, -1, -1, 0, -2, 8, 1, 0])
say(err or f"accepted, result {'equals' if torch.equal(o[0], o2[0]) else 'differs from'} hi_min = -2's")
"""),
    ("1", "raw attention: direct term n_hi = 2^32 + 3 on a 3-row table", Q1 + """
coords = torch.arange(4, dtype=torch.int32).view(1, 1, 4)
o, err = attempt(lambda: raw_fwd(q, torch.randn(1, 3, 4, dtype=torch.float64), coords, [1, 0, 0, -1, 0, 0, 2**32 + 3, 1, 0]))
say(err or "accepted (n_hi read as 3)")
"""),
    ("1", "raw attention: coordinate 2^31 - 1 with hi_min = -(2^30 - 1) (difference wraps in int32)", Q1 + """
table = torch.randn(1, 8, 4, dtype=torch.float64)
terms = [1, 0, 0, -1, 0, -(1 << 30) + 1, 8, 1, 0]
far = torch.tensor([[[0, 2**31 - 1, 0, 0]]], dtype=torch.int32)
near = torch.tensor([[[0, 100, 0, 0]]], dtype=torch.int32)  # the same clamped row (7) in exact arithmetic
o, err = attempt(lambda: raw_fwd(q, table, far, terms))
o2 = raw_fwd(q, table, near, terms)
say(err or f"accepted, query 1 {'agrees' if torch.allclose(o[0][0, 0, 1], o2[0][0, 0, 1]) else 'disagrees'} with exact arithmetic")
"""),
] + [
    ("3", f"public op: {name} = 2^32 - 2 (cpp vs reference)", f"""
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, 2, 6, 8, generator=g, dtype=torch.float64) for _ in range(3))
onset = torch.arange(6).view(1, 6) * 30
pitch = torch.arange(6).view(1, 6) * 7 + 40
kw = {tables}
kw["{name}"] = 2**32 - 2
r, err = attempt(lambda: fastattn.circular_relative_attention(q, k, v, onset, pitch, backend="reference", **kw))
c, err2 = attempt(lambda: fastattn.circular_relative_attention(q, k, v, onset, pitch, backend="cpp", **kw))
say(err or err2 or f"max |cpp - reference| = {{float((c - r).abs().max()):.3g}}")
""") for name, tables in (
        ("rel_index_min", "dict(rel_index_table=torch.randn(9, 8, generator=g, dtype=torch.float64))"),
        ("bar_min", "dict(bar_table=torch.randn(5, 8, generator=g, dtype=torch.float64), "
                    "pos_table=torch.randn(48, 8, generator=g, dtype=torch.float64))"),
        ("octave_min", "dict(octave_table=torch.randn(22, 8, generator=g, dtype=torch.float64), "
                       "pitch_class_table=torch.randn(12, 8, generator=g, dtype=torch.float64))"),
        ("time_min", "dict(time_table=torch.randn(200, 8, generator=g, dtype=torch.float64))"),
        ("pitch_min", "dict(pitch_table=torch.randn(255, 8, generator=g, dtype=torch.float64))"),
    )
] + [
    ("3", "attention, NaN in q (out NaN count per backend)", 'backends_nan("q")'),
    ("3", "attention, q and k ≈ 1e20 (logits overflow)", 'backends_nan("big")'),
    ("3", "attention, NaN in one bar_table row", 'backends_nan("table")'),
    ("3", "topk_encode, NaN row in W (per backend)", """
import fastattn.ops.sae as S
g = torch.Generator().manual_seed(0)
x, W, b = torch.randn(5, 16, generator=g), torch.randn(40, 16, generator=g), torch.randn(40, generator=g)
W[7] = float("nan")
rv, ri = S.topk_encode(x, W, b, 4, backend="reference")
parts = []
for name in ("cpp", "triton", "cuda_emu"):
    def run():
        if name == "cuda_emu":
            from fastattn import _cuda_emu
            return _cuda_emu.load("sae").topk_encode(x, W, b, 4)
        return tuple(S.topk_encode(x, W, b, 4, backend=name))
    r, err = attempt(run)
    parts.append(f"{name}: " + (err or ("matches reference (NaN first, index 7)" if torch.equal(r[1], ri) else
                                       f"indices differ (row 0: {r[1][0].tolist()} vs {ri[0].tolist()})")))
say("; ".join(parts))
"""),
] + [
    ("3", f"double backward (create_graph=True): {label}", body) for label, body in (
        ("cpp attention", """
g = torch.Generator().manual_seed(0)
base = [torch.randn(1, 2, 5, 8, generator=g, dtype=torch.float64) for _ in range(3)] + [torch.randn(20, 8, generator=g, dtype=torch.float64)]
onset = torch.arange(5).view(1, 5) * 3
def leaves(): return [t.clone().requires_grad_() for t in base]
def make(b, q, k, v, t): return fastattn.circular_relative_attention(q, k, v, onset, None, time_table=t, time_min=-10, backend=b)
say(compare_hvp(make, "cpp"))
"""),
        ("triton attention", """
g = torch.Generator().manual_seed(0)
base = [torch.randn(1, 2, 5, 16, generator=g) for _ in range(3)] + [torch.randn(20, 16, generator=g)]
onset = torch.arange(5).view(1, 5) * 3
def leaves(): return [t.clone().requires_grad_() for t in base]
def make(b, q, k, v, t): return fastattn.circular_relative_attention(q, k, v, onset, None, time_table=t, time_min=-10, backend=b)
say(compare_hvp(make, "triton"))
"""),
    ) + tuple((f"{op} ({backend})", f"""
import fastattn.ops.sae as S
g = torch.Generator().manual_seed(0)
dt = torch.float64 if "{backend}" == "cpp" else torch.float32
x, W, b = torch.randn(6, 5, generator=g, dtype=dt), torch.randn(12, 5, generator=g, dtype=dt), torch.randn(12, generator=g, dtype=dt)
idx = torch.randint(0, 12, (6, 3), generator=g)
vals = torch.randn(6, 3, generator=g, dtype=dt)
h = torch.randn(7, 9, generator=g, dtype=dt)
OPS = dict(
    topk_encode=(lambda be, x, W, b: S.topk_encode(x, W, b, 3, backend=be).values, [x, W, b]),
    sparse_decode=(lambda be, v, W, b: S.sparse_decode(v, idx, W, b[:5], backend=be), [vals, W, b]),
    binary_encode=(lambda be, x, W, b: S.binary_encode(x, W, b, ste="sigmoid", backend=be).code, [x, W, b]),
    binary_covariance_penalty=(lambda be, h: S.binary_covariance_penalty(h, backend=be), [h]),
)
fn, base = OPS["{op}"]
def leaves(): return [t.clone().requires_grad_() for t in base]
say(compare_hvp(fn, "{backend}"))
""") for backend in ("cpp", "triton") for op in ("topk_encode", "sparse_decode", "binary_encode",
                                                    "binary_covariance_penalty"))
]


def run_case(code: str, timeout: float) -> str:
    src = PRELUDE + textwrap.dedent(code)
    try:
        # -P: no current directory on sys.path, so PYTHONPATH alone picks the checkout under test
        r = subprocess.run([sys.executable, "-P", "-c", src], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"timeout after {timeout:.0f} s"
    lines = [ln[8:] for ln in r.stdout.splitlines() if ln.startswith("RESULT: ")]
    if r.returncode < 0:
        return f"**crash: {signal.Signals(-r.returncode).name}**"
    if r.returncode != 0 or not lines:
        tail = (r.stderr.strip().splitlines() or ["?"])[-1]
        return f"exit {r.returncode}: {tail[:120]}"
    return lines[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="also write the markdown table here")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("-k", default="", help="only cases whose description contains this")
    ap.add_argument("--before", help="a table this script wrote for another checkout: shown as a column")
    args = ap.parse_args()
    os.environ.setdefault("TRITON_INTERPRET", "1")
    before = {}
    if args.before:
        for line in open(args.before):
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            if len(cells) == 3 and cells[0] in ("1", "3"):
                before[cells[1]] = cells[2]
    head = "| class | case | " + ("before | after |" if before else "outcome |")
    rows = [head, "|---" * (head.count("|") - 1) + "|"]
    for cls, desc, code in CASES:
        if args.k and args.k not in desc:
            continue
        outcome = run_case(code, args.timeout).replace("|", "\\|")
        cells = [cls, desc] + ([before.get(desc, "(not run)")] if before else []) + [outcome]
        rows.append("| " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"Command: `{' '.join(sys.argv)}`\n\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
