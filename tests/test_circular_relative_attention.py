"""circular_relative_attention: every backend against the reference, semantics, bad input."""
from __future__ import annotations

import functools
import importlib.util
import math
import os
import re

# Triton kernels run on CPU tensors through the interpreter (set before they are imported).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import fastattn
from fastattn import _cuda_emu, _ext
from fastattn.reference import relative_scores
from helpers import TOL, assemble, assert_close, grad_names, lowp_compare, make_problem, run

HAVE_CPP = _ext.has_backend("cpp")
needs_cpp = pytest.mark.skipif(not HAVE_CPP, reason=f"cpp backend not built: {_ext.extension_error()}")
HAVE_TRITON = importlib.util.find_spec("triton") is not None and os.environ["TRITON_INTERPRET"] == "1"
needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="triton missing or TRITON_INTERPRET != 1")
FUSED = [pytest.param("cpp", marks=needs_cpp), pytest.param("triton", marks=needs_triton)]
CPP = [pytest.param("cpp", marks=needs_cpp)]  # tests that need fp64 (the Triton kernels have none)

SHAPES = [(1, 1), (7, 7), (129, 129), (1, 9), (5, 33), (20, 150)]


def compare(backend, dtype, **cfg):
    if backend == "triton":  # fp32 kernels: judged at fp32 tolerances
        dtype = torch.float32
    extra = {k: cfg.pop(k) for k in ("causal", "combine", "alpha", "dropout_p", "dropout_seed") if k in cfg}
    prob = make_problem(dtype=dtype, **cfg)
    out_r, grads_r = run("reference", *prob, **extra)
    out_f, grads_f = run(backend, *prob, **extra)
    fwd_tol, bwd_tol = TOL[dtype]
    assert_close("out", out_f, out_r, fwd_tol)
    names = grad_names(prob[5])
    for name, gf, gr in zip(names, grads_f, grads_r):
        assert_close(name, gf, gr, bwd_tol)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("terms", ["none", "index", "time", "pitch", "all", "direct", "fields"])
@pytest.mark.parametrize("combine", ["hadamard", "add"])
@pytest.mark.parametrize("causal", [True, False])
def test_terms_grid_fp64(backend, terms, combine, causal):
    compare(backend, torch.float64, terms=terms, combine=combine, causal=causal, Lq=7, Lk=11,
            alpha=0.8, kpm=True)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("Lq,Lk", SHAPES)
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shapes(backend, Lq, Lk, per_head, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels have no fp64: the fp32 case covers them")
    compare(backend, dtype, terms="all", Lq=Lq, Lk=Lk, per_head=per_head, causal=True, kpm=Lk > 3,
            D=16 if Lk < 100 else 32, seed=Lq * 1000 + Lk)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("seed", range(12))
def test_random_configs_fp32(backend, seed):
    """Unit-scale random inputs over random configurations: fp32 errors <= 1e-5 / 1e-4."""
    rng = torch.Generator().manual_seed(1234 + seed)
    pick = lambda xs: xs[int(torch.randint(len(xs), (1,), generator=rng))]  # noqa: E731
    Lk = pick([1, 2, 7, 33, 64, 65, 129])
    Lq = pick([1, 5, Lk]) if Lk >= 5 else Lk
    compare(backend, torch.float32, terms=pick(list(["index", "time", "pitch", "all", "direct", "fields"])),
            combine=pick(["hadamard", "add"]), causal=pick([True, False]), kpm=pick([True, False]),
            per_head=pick([True, False]), Lq=Lq, Lk=Lk, D=pick([16, 32, 64]), H=pick([1, 2]),
            B=pick([1, 3]), alpha=pick([0.1, 1.0]), seed=seed, scale_tables=1.0)


@pytest.mark.parametrize("backend", FUSED)
def test_dropout_matches_reference(backend):
    """The counter-based mask is the same function in Python and C++: outputs agree exactly."""
    compare(backend, torch.float64, terms="all", Lq=9, Lk=40, dropout_p=0.3, dropout_seed=77,
            causal=False, kpm=True)


def test_dropout_statistics_and_seed():
    from fastattn.ops._dropout import dropout_keep_mask
    keep = dropout_keep_mask(5, 2, 4, 64, 64, 0.25)
    assert abs(keep.float().mean().item() - 0.75) < 0.01
    assert not torch.equal(keep, dropout_keep_mask(6, 2, 4, 64, 64, 0.25))
    # different (b, h) and rows see different masks
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0, 0], keep[0, 0, 1])


@pytest.mark.parametrize("backend", ["reference"] + FUSED)
def test_dropout_seed_reproducible(backend):
    q, k, v, onset, pitch, kw, _ = make_problem(terms="all", Lq=16, Lk=16, grad=False)
    f = lambda seed: fastattn.circular_relative_attention(  # noqa: E731
        q, k, v, onset, pitch, dropout_p=0.5, dropout_seed=seed, backend=backend, **kw)
    assert torch.equal(f(3), f(3))
    assert not torch.equal(f(3), f(4))
    torch.manual_seed(0)
    a = fastattn.circular_relative_attention(q, k, v, onset, pitch, dropout_p=0.5, backend=backend, **kw)
    torch.manual_seed(0)
    b = fastattn.circular_relative_attention(q, k, v, onset, pitch, dropout_p=0.5, backend=backend, **kw)
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", CPP)
@pytest.mark.parametrize("terms,combine", [("all", "hadamard"), ("all", "add"), ("direct", "add"),
                                           ("fields", "hadamard")])
def test_gradcheck(backend, terms, combine):
    q, k, v, onset, pitch, kw, leaves = make_problem(B=1, H=2, Lq=4, Lk=6, D=4, terms=terms,
                                                     per_head=True, dtype=torch.float64, kpm=False)
    tables = {n: t for n, t in kw.items() if isinstance(t, torch.Tensor) and t.is_floating_point()}
    rest = {n: t for n, t in kw.items() if n not in tables}
    names = list(tables)

    def f(q, k, v, *tabs):
        return fastattn.circular_relative_attention(q, k, v, onset, pitch, combine=combine,
                                                    backend=backend, **dict(zip(names, tabs)), **rest)

    assert torch.autograd.gradcheck(f, (q, k, v, *tables.values()), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference"] + FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fully_masked_rows_give_zeros(backend, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels have no fp64")
    q, k, v, onset, pitch, kw, leaves = make_problem(B=2, Lq=5, Lk=9, terms="all", dtype=dtype)
    kpm = torch.zeros(2, 9, dtype=torch.bool)
    kpm[0, :] = True          # batch 0: no key at all
    kpm[1, :7] = True         # batch 1: causal queries 0..2 (positions 4..6) see nothing
    kw["key_padding_mask"] = kpm
    out, grads = run(backend, q, k, v, onset, pitch, kw, leaves)
    assert torch.isfinite(out).all()
    assert (out[0] == 0).all() and (out[1, :, :3] == 0).all() and (out[1, :, 3:] != 0).any()
    for g in grads:
        assert torch.isfinite(g).all()
    assert (grads[0][0] == 0).all() and (grads[0][1, :, :3] == 0).all()


@pytest.mark.parametrize("backend", FUSED)
def test_decode_equals_full_pass(backend):
    """Queries = the last Lq keys: decoding rows equal the corresponding rows of a full pass."""
    q, k, v, onset, pitch, kw, _ = make_problem(Lq=40, Lk=40, terms="all", grad=False, kpm=True)
    full = fastattn.circular_relative_attention(q, k, v, onset, pitch, backend=backend, **kw)
    for lq in (1, 5, 17):
        part = fastattn.circular_relative_attention(q[:, :, -lq:], k, v, onset, pitch, backend=backend, **kw)
        assert_close(f"decode Lq={lq}", part, full[:, :, -lq:], 1e-6)
    # k/v as slices of a larger KV-cache buffer (strided over batch and head) need no copy
    cap = torch.zeros(k.shape[0], k.shape[1], 64, k.shape[3])
    kc, vc = cap.clone(), cap.clone()
    kc[:, :, :40], vc[:, :, :40] = k, v
    part = fastattn.circular_relative_attention(q[:, :, -3:], kc[:, :, :40], vc[:, :, :40], onset, pitch,
                                                backend=backend, **kw)
    assert_close("strided k/v", part, full[:, :, -3:], 1e-6)


@pytest.mark.parametrize("backend", FUSED)
def test_backward_deterministic(backend):
    L = 100 if backend == "cpp" else 40  # the Triton interpreter is slow
    prob = make_problem(B=2, H=4, Lq=L, Lk=L, terms="all", per_head=False)
    _, g1 = run(backend, *prob)
    _, g2 = run(backend, *prob)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", CPP)
@pytest.mark.parametrize("threads", [1, 3, 8])
def test_backward_split_over_query_blocks(backend, threads):
    """Fewer (batch, head) pairs than threads: query blocks are split into chunks whose dK/dV
    partials are summed in order. Same gradients as the reference, deterministic per count."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        compare(backend, torch.float64, terms="all", B=1, H=1, Lq=300, Lk=300, kpm=True)
        prob = make_problem(B=1, H=2, Lq=200, Lk=260, terms="all")
        _, g1 = run(backend, *prob)
        _, g2 = run(backend, *prob)
        assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    finally:
        torch.set_num_threads(before)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cfg", [
    dict(terms="all", Lq=7, Lk=7, kpm=True),
    dict(terms="direct", Lq=20, Lk=70, per_head=True, combine="add"),
    dict(terms="fields", Lq=1, Lk=150, causal=False),  # split-key decoding
], ids=["all", "direct", "decode"])
def test_triton_low_precision(dtype, cfg):
    """16-bit inputs (fp32 accumulation): error <= 2x the PyTorch reference's own at that dtype."""
    lowp_compare("triton", dtype, D=32, seed=3, **cfg)


@needs_triton
@pytest.mark.parametrize("D", [16, 32, 64, 128])
def test_triton_head_dims(D):
    compare("triton", torch.float32, terms="all", Lq=5, Lk=21, D=D, per_head=D == 64, kpm=True)


@needs_triton
def test_triton_split_key_decoding():
    """Decoding splits the keys over programs and merges partial softmaxes: the same result as
    one pass for any split count, with masks, fully masked rows and dropout."""
    from fastattn.triton import circular_relative_attention as tri
    assert tri.decode_splits(programs=8, Lk=4096, BN=32) > 1 and tri.decode_splits(512, 4096, 32) == 1
    q, k, v, onset, pitch, kw, _ = make_problem(B=2, H=2, Lq=3, Lk=300, terms="all", grad=False, kpm=True)
    kpm = kw["key_padding_mask"]
    kpm[1] = True  # batch 1: no key at all
    asm = assemble(q, 300, onset, pitch, kw)
    for dropout_p in (0.0, 0.3):
        want = fastattn.circular_relative_attention(q, k, v, onset, pitch, backend="reference",
                                                    dropout_p=dropout_p, dropout_seed=5, **kw)
        for splits in (1, 2, 7, 10):
            out, lse = tri.forward(q, k, v, asm.table, asm.coords, asm.terms, 1.0, q.shape[-1] ** -0.5,
                                   True, kpm, dropout_p, 5, splits=splits)
            assert_close(f"splits={splits} p={dropout_p}", out, want, 1e-5)
            assert (out[1] == 0).all() and torch.isinf(lse[1]).all() and torch.isfinite(lse[0]).all()


def test_relative_index_semantics():
    """Hand-worked values of SPEC §2: query-minus-key differences, floor and non-negative mod."""
    D = 4
    e0 = torch.zeros(D, dtype=torch.float64)
    e0[0] = 1.0
    q = e0.view(1, 1, 1, D).expand(1, 1, 2, D).contiguous()
    ramp = lambda n: torch.arange(n, dtype=torch.float64).view(n, 1) * e0  # noqa: E731  row r -> r·e0
    onset = torch.tensor([[0, 100]])
    pitch = torch.tensor([[60, 59]])
    # time: Δt = 100 = 2 bars + 4 -> bar row 2, pos row 4 -> 2 * 4 (Hadamard), 2 + 4 (add)
    kw = dict(bar_table=ramp(16), pos_table=ramp(48))
    assert relative_scores(q, onset, pitch, 2, **kw)[0, 0, 1, 0].item() == 8.0
    assert relative_scores(q, onset, pitch, 2, combine="add", **kw)[0, 0, 1, 0].item() == 6.0
    # reversed: Δt = -100 -> floor(-100/48) = -3 -> clamp(-3 - 0) = 0; remainder 44
    assert relative_scores(q, onset.flip(1), pitch, 2, combine="add", **kw)[0, 0, 1, 0].item() == 44.0
    # pitch: Δp = -1 -> octave -1 (row -1 + 11 = 10), class 11 (query minus key)
    kw = dict(octave_table=ramp(22), pitch_class_table=ramp(12))
    assert relative_scores(q, onset, pitch, 2, **kw)[0, 0, 1, 0].item() == 110.0
    # index: Δn = 1 -> row 1 - rel_index_min
    assert relative_scores(q, onset, pitch, 2, rel_index_table=ramp(5), rel_index_min=-2)[0, 0, 1, 0].item() == 3.0
    # a missing coordinate zeroes its term
    assert relative_scores(q, torch.tensor([[0, -1]]), pitch, 2, bar_table=ramp(16),
                           pos_table=ramp(48))[0, 0, 1, 0].item() == 0.0


@pytest.mark.parametrize("backend", ["reference"] + FUSED)
def test_plain_attention_matches_sdpa(backend):
    q, k, v, *_ = make_problem(Lq=9, Lk=9, terms="none", grad=False)
    out = fastattn.circular_relative_attention(q, k, v, backend=backend)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert_close("out", out, want, 1e-5)


def test_auto_backend_choice():
    x = torch.zeros(1, 1, 1, 8)
    from fastattn.ops.circular_relative_attention import REASONS
    from fastattn.backends import select
    assert select("op", "auto", x, REASONS) == ("cpp" if HAVE_CPP else "reference")
    assert select("op", "auto", x.bfloat16(), REASONS) == "reference"
    # the policy on top of capabilities: no interpreter, no GPU backend before it is validated
    from fastattn.backends import UNVALIDATED_ON_GPU, auto_reason
    can_all = {name: (lambda q: None) for name in REASONS}
    assert "CUDA tensors only" in auto_reason("triton", x, can_all)
    assert select("op", "auto", x, can_all) == ("cpp" if "cuda" in UNVALIDATED_ON_GPU else "cuda")
    if "cuda" in UNVALIDATED_ON_GPU:
        assert "backend='cuda' explicitly" in auto_reason("cuda", x, can_all)


# --- on a GPU (skipped without one): the fused GPU backends at real sizes -----------------

HAVE_CUDA = torch.cuda.is_available()


def _gpu_backend(name):
    from fastattn.ops.circular_relative_attention import REASONS
    why = REASONS[name](torch.zeros(1, device="cuda", dtype=torch.float16)) if HAVE_CUDA else "no GPU"
    return pytest.param(name, marks=pytest.mark.skipif(why is not None, reason=str(why)))


GPU = [_gpu_backend("triton"), _gpu_backend("cuda")]


@pytest.mark.parametrize("backend", GPU)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("terms", ["all", "direct", "fields", "index"])
@pytest.mark.parametrize("Lq,Lk,D", [(1, 1, 32), (7, 7, 64), (129, 129, 32), (1, 4096, 64), (1024, 1024, 64),
                                     (300, 2000, 128)])
def test_gpu_low_precision(backend, dtype, terms, Lq, Lk, D):
    lowp_compare(backend, dtype, device="cuda", terms=terms, Lq=Lq, Lk=Lk, D=D, B=2, H=4, kpm=Lk > 1,
                 per_head=terms == "direct", seed=Lk)


@pytest.mark.parametrize("backend", GPU)
@pytest.mark.parametrize("terms,combine,causal", [("all", "hadamard", True), ("all", "add", False),
                                                  ("direct", "add", True), ("fields", "hadamard", False)])
def test_gpu_fp32(backend, terms, combine, causal):
    from helpers import cast_problem
    prob = make_problem(dtype=torch.float32, terms=terms, Lq=200, Lk=333, D=64, kpm=True, seed=9)
    out_r, grads_r = run("reference", *prob, combine=combine, causal=causal)
    out_g, grads_g = run(backend, *cast_problem(prob, torch.float32, "cuda"), combine=combine, causal=causal)
    fwd_tol, bwd_tol = TOL[torch.float32]
    assert_close("out", out_g.cpu(), out_r, fwd_tol)
    for i, (a, b) in enumerate(zip(grads_g, grads_r)):
        assert_close(f"grad {i}", a.cpu(), b, bwd_tol)


@pytest.mark.parametrize("backend", GPU)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_backward_deterministic_and_dropout(backend, dtype):
    from helpers import cast_problem
    prob = cast_problem(make_problem(B=2, H=4, Lq=777, Lk=777, D=64, terms="all", kpm=True), dtype, "cuda")
    _, g1 = run(backend, *prob, dropout_p=0.2, dropout_seed=3)
    _, g2 = run(backend, *prob, dropout_p=0.2, dropout_seed=3)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    if dtype == torch.float32:  # the counter-based mask is the CPU's: same output as the reference
        out = run(backend, *prob, dropout_p=0.2, dropout_seed=3)[0]
        want = run("reference", *make_problem(B=2, H=4, Lq=777, Lk=777, D=64, terms="all", kpm=True),
                   dropout_p=0.2, dropout_seed=3)[0]
        assert_close("dropout out", out.cpu(), want, 1e-5)


# --- bad input ---------------------------------------------------------------------------

def _base():
    q, k, v, onset, pitch, kw, _ = make_problem(B=2, H=2, Lq=4, Lk=6, D=8, terms="all", grad=False,
                                                missing=False)
    return q, k, v, onset, pitch, kw


def _call(**over):
    q, k, v, onset, pitch, kw = _base()
    args = dict(q=q, k=k, v=v, onset=onset, pitch=pitch)
    for name in list(over):
        if name in args:
            args[name] = over.pop(name)
    kw.update(over)
    return fastattn.circular_relative_attention(args["q"], args["k"], args["v"], args["onset"],
                                                args["pitch"], **kw)


BAD = {
    "batch mismatch": (dict(k=torch.randn(3, 2, 6, 8)), ValueError, "k has shape"),
    "head mismatch": (dict(v=torch.randn(2, 3, 6, 8)), ValueError, "v has shape"),
    "D mismatch": (dict(k=torch.randn(2, 2, 6, 4)), ValueError, "k has shape"),
    "v length": (dict(v=torch.randn(2, 2, 5, 8)), ValueError, "v has Lk"),
    "Lq > Lk": (dict(q=torch.randn(2, 2, 7, 8)), ValueError, "Lq=7 > Lk=6"),
    "3-D q": (dict(q=torch.randn(2, 4, 8)), ValueError, "q must be 4-D"),
    "int q": (dict(q=torch.ones(2, 2, 4, 8, dtype=torch.int64)), TypeError, "q must be a floating"),
    "dtype mix": (dict(k=torch.randn(2, 2, 6, 8, dtype=torch.float64)), TypeError, "k dtype"),
    "table width": (dict(rel_index_table=torch.randn(9, 5)), ValueError, "rel_index_table has width 5"),
    "table heads": (dict(bar_table=torch.randn(3, 5, 8)), ValueError, "bar_table must be"),
    "table dtype": (dict(octave_table=torch.randn(22, 8, dtype=torch.float64)), TypeError, "octave_table dtype"),
    "pitch class rows": (dict(pitch_class_table=torch.randn(11, 8)), ValueError, "pitch_class_table must have 12"),
    "pos rows": (dict(pos_table=torch.randn(47, 8)), ValueError, "pos_table must have 48"),
    "lonely factor": (dict(pos_table=None), ValueError, "bar_table and pos_table"),
    "both time forms": (dict(time_table=torch.randn(10, 8)), ValueError, "time_table"),
    "pitch 128": (dict(pitch=torch.full((2, 6), 128)), ValueError, "pitch has values above 127"),
    "pitch -2": (dict(pitch=torch.full((2, 6), -2)), ValueError, "pitch has values below -1"),
    "onset -2": (dict(onset=torch.full((2, 6), -2)), ValueError, "onset has values below -1"),
    "float onset": (dict(onset=torch.zeros(2, 6)), TypeError, "onset must be an integer"),
    "bool pitch": (dict(pitch=torch.zeros(2, 6, dtype=torch.bool)), TypeError, "pitch must be an integer"),
    "onset shape": (dict(onset=torch.zeros(2, 5, dtype=torch.long)), ValueError, "onset must have shape"),
    "missing onset": (dict(onset=None), ValueError, "onset [B, Lk] is required"),
    "missing pitch": (dict(pitch=None), ValueError, "pitch [B, Lk] is required"),
    "mask shape": (dict(key_padding_mask=torch.zeros(2, 5, dtype=torch.bool)), ValueError,
                   "key_padding_mask must have shape"),
    "mask dtype": (dict(key_padding_mask=torch.zeros(2, 6)), TypeError, "key_padding_mask must be a bool"),
    "combine": (dict(combine="concat"), ValueError, "combine must be"),
    "time_mode": (dict(time_mode="bars"), ValueError, "time_mode must be"),
    "backend": (dict(backend="fast"), ValueError, "backend must be"),
    "dropout": (dict(dropout_p=1.0), ValueError, "dropout_p must be"),
    "dropout seed 2**32": (dict(dropout_p=0.1, dropout_seed=2 ** 32), ValueError, "dropout_seed must be an integer in [0, 2**32)"),
    "dropout seed -1": (dict(dropout_p=0.1, dropout_seed=-1), ValueError, "dropout_seed must be"),
    "dropout seed float": (dict(dropout_p=0.1, dropout_seed=1.5), ValueError, "dropout_seed must be"),
    "bar_res": (dict(bar_res=0), ValueError, "bar_res must be"),
    "fields need coords": (dict(time_mode="fields"), ValueError, "pos_table must have 95"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(case):
    over, exc, msg = BAD[case]
    with pytest.raises(exc, match=re.escape(msg)):
        _call(**dict(over))


def test_backend_cannot_run():
    q, k, v, onset, pitch, kw = _base()
    if HAVE_TRITON:  # the kernels' dtypes are fp32, fp16 and bf16, in the interpreter too
        f64 = {n: (t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
               for n, t in kw.items()}
        with pytest.raises(RuntimeError, match="backend='triton' cannot run.*got float64"):
            fastattn.circular_relative_attention(q.double(), k.double(), v.double(), onset, pitch,
                                                 backend="triton", **f64)
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run"):
        fastattn.circular_relative_attention(q, k, v, onset, pitch, backend="cuda", **kw)
    if HAVE_CPP:
        with pytest.raises(RuntimeError, match="supports dtypes float32, float64, got bfloat16"):
            bf = {n: (t.bfloat16() if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
                  for n, t in kw.items()}
            fastattn.circular_relative_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), onset, pitch,
                                                 backend="cpp", **bf)


@needs_cpp
def test_raw_op_rejects_inconsistent_terms():
    """Direct torch.ops calls are checked in C++ too (no out-of-bounds reads)."""
    q = torch.randn(1, 1, 3, 4)
    table = torch.randn(1, 5, 4)
    coords = torch.zeros(1, 0, 3, dtype=torch.int32)
    bad_rows = [0, 0, -1, -1, 0, 0, 10, 1, 0]  # index term claiming 10 rows of a 5-row table
    with pytest.raises(RuntimeError, match="term rows exceed the table"):
        torch.ops.fastattn.circular_relative_attention(q, q, q, table, coords, bad_rows, 1.0, 1.0, True,
                                                       None, 0.0, 0)
    bad_channel = [1, 0, 3, -1, 0, 0, 5, 1, 0]  # direct term reading channel 3 of 0
    with pytest.raises(RuntimeError, match="bad hi channel"):
        torch.ops.fastattn.circular_relative_attention(q, q, q, table, coords, bad_channel, 1.0, 1.0, True,
                                                       None, 0.0, 0)


@needs_cpp
def test_fuzz_coordinates_never_out_of_bounds():
    """Arbitrary coordinate channels (beyond what the Python layer allows) stay in bounds."""
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        B, H, L, D = 1, 1, int(torch.randint(1, 40, (1,), generator=g)), 4
        q = torch.randn(B, H, L, D, generator=g)
        table = torch.randn(1, 3 * 4 + 7 + 5, D, generator=g)
        coords = torch.randint(-50, 50, (B, 2, L), generator=g, dtype=torch.int32)
        terms = [2, 0, 0, 1, 4, -3, 3, 4, 0,   # quotient, combined, 3x4 rows
                 3, 1, 0, 1, 2, 1, 7, 5, 12,   # fields, hi part
                 1, 0, 1, -1, 0, 2, 5, 1, 19]  # direct
        out, lse = torch.ops.fastattn.circular_relative_attention(q, q, q, table, coords, terms, 1.0, 0.5,
                                                                  bool(trial % 2), None, 0.0, 0)
        assert torch.isfinite(out).all()


@needs_cpp
def test_opcheck():
    q, k, v, onset, pitch, kw, _ = make_problem(B=1, H=2, Lq=3, Lk=5, D=8, terms="all")
    asm = assemble(q, 5, onset, pitch, kw)
    table = asm.table.detach().requires_grad_(True)
    args = (q, k, v, table, asm.coords, asm.terms, 0.5, 0.3, True, None, 0.0, 0)
    torch.library.opcheck(torch.ops.fastattn.circular_relative_attention.default, args)
    args = (q, k, v, table, asm.coords, asm.terms, 0.5, 0.3, False, torch.zeros(1, 5, dtype=torch.bool),
            0.2, 11)
    torch.library.opcheck(torch.ops.fastattn.circular_relative_attention.default, args)


@needs_cpp
def test_torch_compile_op():
    q, k, v, onset, pitch, kw, leaves = make_problem(B=1, H=2, Lq=8, Lk=8, D=8, terms="all")

    def f(q, k, v):
        return fastattn.circular_relative_attention(q, k, v, onset, pitch, backend="cpp", **kw)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out = compiled(q, k, v)
    assert_close("compiled", out, f(q, k, v), 1e-6)
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()

# --- CUDA kernels under the CPU emulator ---------------------------------------------------
# csrc/cuda/circular_relative_attention.cu compiled as host C++ (fastattn/_cuda_emu.py) and run
# on CPU tensors through csrc/emu/circular_relative_attention.cpp, which shares the real glue's
# checks, tile plan and launchers (csrc/include/cra_cuda_torch.h). Small B, H: the emulator runs
# every GPU thread as an OS thread.

_EMU_WHY = _cuda_emu.available("circular_relative_attention")
needs_emu = pytest.mark.skipif(_EMU_WHY is not None, reason=f"CUDA emulator unavailable: {_EMU_WHY}")
_A100_SMEM = 166912


def _emu():
    return _cuda_emu.load("circular_relative_attention")


class _EmuCRA(torch.autograd.Function):
    """The emulated CUDA op pair as an autograd function over (q, k, v, table)."""

    @staticmethod
    def forward(ctx, q, k, v, table, coords, terms, alpha, scale, causal, kpm, p, seed, smem, blocks):
        out, lse = _emu().forward(q, k, v, table, coords, terms, alpha, scale, causal, kpm, p, seed, smem, blocks)
        ctx.save_for_backward(q, k, v, out, lse, table, coords)
        ctx.args = (terms, alpha, scale, causal, kpm, p, seed, smem, blocks)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse, table, coords = ctx.saved_tensors
        terms, alpha, scale, causal, kpm, p, seed, smem, blocks = ctx.args
        dq, dk, dv, dt = _emu().backward(grad.contiguous(), q, k, v, out, lse, table, coords, terms, alpha, scale,
                                         causal, kpm, p, seed, smem, blocks)
        return (dq, dk, dv, dt) + (None,) * 10


def _emu_cra(q, k, v, onset=None, pitch=None, *, combine="hadamard", alpha=1.0, scale=None, causal=True,
             key_padding_mask=None, dropout_p=0.0, dropout_seed=0, time_mode="quotient", max_smem=_A100_SMEM,
             target_blocks=256, **tables):
    """circular_relative_attention through the emulated CUDA kernels (the public function's
    table assembly, then the op pair); differentiable w.r.t. q, k, v and every table."""
    asm = assemble(q, k.shape[2], onset, pitch, tables, combine, time_mode)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    kpm = None if key_padding_mask is None else key_padding_mask.contiguous()
    return _EmuCRA.apply(q.contiguous(), k, v, asm.table, asm.coords, asm.terms, float(alpha), scale, bool(causal),
                         kpm, float(dropout_p), int(dropout_seed), int(max_smem), int(target_blocks))


def _emu_compare_fp32(**cfg):
    """Emulated CUDA kernels vs the reference at fp32 tolerances (forward and every gradient)."""
    compare(_emu_cra, torch.float32, **cfg)


@needs_emu
@pytest.mark.parametrize("terms", ["none", "index", "time", "pitch", "all", "direct", "fields"])
@pytest.mark.parametrize("combine", ["hadamard", "add"])
@pytest.mark.parametrize("causal", [True, False])
def test_cuda_emu_terms_grid(terms, combine, causal):
    _emu_compare_fp32(terms=terms, combine=combine, causal=causal, B=1, H=2, Lq=7, Lk=11, alpha=0.8, kpm=True)


@needs_emu
@pytest.mark.parametrize("Lq,Lk", [(1, 1), (7, 7), (129, 129), (1, 9), (5, 33)])
@pytest.mark.parametrize("per_head", [False, True])
def test_cuda_emu_shapes(Lq, Lk, per_head):
    _emu_compare_fp32(terms="all", B=1, H=2, Lq=Lq, Lk=Lk, per_head=per_head, kpm=Lk > 3, D=16,
                      seed=Lq * 1000 + Lk)


@needs_emu
@pytest.mark.parametrize("D", [16, 32, 64, 128])
def test_cuda_emu_head_dims(D):
    _emu_compare_fp32(terms="all", B=1, H=1, Lq=20, Lk=40, D=D, kpm=True, per_head=D == 32)


@needs_emu
@pytest.mark.parametrize("max_smem,target_blocks", [(100000, 256), (_A100_SMEM, 1), (232448, 8)])
def test_cuda_emu_tile_plans(max_smem, target_blocks):
    """Smaller shared memory (BQ 16, BK 16/32), several query tiles per backward block
    (target_blocks=1: one block per (b, h)), and H100-sized tiles."""
    compare(functools.partial(_emu_cra, max_smem=max_smem, target_blocks=target_blocks), torch.float32,
            terms="all", B=1, H=2, Lq=70, Lk=90, D=32, kpm=True, causal=True)


@needs_emu
@pytest.mark.parametrize("Lq,Lk,causal", [(1, 300, True), (2, 260, True), (3, 300, False), (4, 200, True)])
def test_cuda_emu_decode(Lq, Lk, causal):
    """Lq << Lk: key tiles split over blocks (split-K) and combined; equals the reference."""
    q, k, v, onset, pitch, kw, _ = make_problem(B=1, H=2, Lq=Lq, Lk=Lk, terms="all", kpm=True)
    asm = assemble(q, Lk, onset, pitch, kw)
    assert _emu().plan(q.detach(), k.detach(), v.detach(), asm.table.detach(), asm.coords, asm.terms,
                       causal)["splits"] > 1
    _emu_compare_fp32(B=1, H=2, Lq=Lq, Lk=Lk, terms="all", kpm=True, causal=causal)


@needs_emu
def test_cuda_emu_strided_kv_cache():
    q, k, v, onset, pitch, kw, _ = make_problem(B=2, H=2, Lq=3, Lk=40, terms="all", grad=False, kpm=True)
    cap = torch.zeros(2, 2, 64, 16)
    kc, vc = cap.clone(), cap.clone()
    kc[:, :, :40], vc[:, :, :40] = k, v
    want = fastattn.circular_relative_attention(q, k, v, onset, pitch, backend="reference", **kw)
    assert_close("strided k/v", _emu_cra(q, kc[:, :, :40], vc[:, :, :40], onset, pitch, **kw), want, 1e-5)


@needs_emu
def test_cuda_emu_fully_masked_rows():
    q, k, v, onset, pitch, kw, leaves = make_problem(B=2, H=2, Lq=5, Lk=9, terms="all")
    kpm = torch.zeros(2, 9, dtype=torch.bool)
    kpm[0, :] = True
    kpm[1, :7] = True
    kw["key_padding_mask"] = kpm
    out, grads = run(_emu_cra, q, k, v, onset, pitch, kw, leaves)
    assert torch.isfinite(out).all()
    assert (out[0] == 0).all() and (out[1, :, :3] == 0).all() and (out[1, :, 3:] != 0).any()
    assert all(torch.isfinite(g).all() for g in grads)
    assert (grads[0][0] == 0).all() and (grads[0][1, :, :3] == 0).all()
    out_r, grads_r = run("reference", q, k, v, onset, pitch, kw, leaves)
    assert_close("out", out, out_r, 1e-5)
    for i, (a, b) in enumerate(zip(grads, grads_r)):
        assert_close(f"grad {i}", a, b, 1e-4)


@needs_emu
@pytest.mark.parametrize("Lq,Lk", [(9, 40), (2, 300)])
def test_cuda_emu_dropout_matches_cpp_and_reference(Lq, Lk):
    """The counter-based mask is the same function in CUDA, C++ and Python."""
    cfg = dict(terms="all", B=1, H=2, Lq=Lq, Lk=Lk, kpm=True)
    extra = dict(dropout_p=0.3, dropout_seed=77, causal=False)
    _emu_compare_fp32(**cfg, **extra)
    if HAVE_CPP:
        prob = make_problem(**cfg)
        out_c, grads_c = run(_emu_cra, *prob, **extra)
        out_p, grads_p = run("cpp", *prob, **extra)
        assert_close("out vs cpp", out_c, out_p, 1e-5)
        for i, (a, b) in enumerate(zip(grads_c, grads_p)):
            assert_close(f"grad {i} vs cpp", a, b, 1e-4)


@needs_emu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cfg", [
    dict(terms="all", Lq=7, Lk=11, D=16),
    dict(terms="all", Lq=40, Lk=70, D=32, per_head=True),
    dict(terms="direct", Lq=5, Lk=33, D=64, combine="add"),
    dict(terms="fields", Lq=1, Lk=150, D=32),
], ids=["all-7x11", "all-40x70-perhead", "direct-add-D64", "fields-decode"])
def test_cuda_emu_low_precision(dtype, cfg):
    """fp16/bf16 (tensor-core path): the kernel's error against the fp64 reference is at most
    twice PyTorch's own error at that dtype, plus a small floor relative to the magnitude."""
    lowp_compare(_emu_cra, dtype, B=1, H=2, kpm=True, **cfg)


@needs_emu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_emu_backward_bit_identical(dtype):
    """Deterministic reductions: two backward passes give bit-identical gradients."""
    prob = make_problem(B=1, H=2, Lq=70, Lk=70, D=16, terms="all", dtype=dtype, kpm=True)
    emu = functools.partial(_emu_cra, target_blocks=2)
    _, g1 = run(emu, *prob)
    _, g2 = run(emu, *prob)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


@needs_emu
def test_cuda_emu_rejects_bad_raw_arguments():
    emu = _emu()
    q = torch.randn(1, 1, 3, 16)
    table = torch.randn(1, 5, 16)
    coords = torch.zeros(1, 1, 3, dtype=torch.int32)
    ok = [0, 0, -1, -1, 0, 0, 5, 1, 0]
    emu.forward(q, q, q, table, coords, ok, 1.0, 1.0, True, None, 0.0, 0)
    cases = [
        ((q, q, q, table, coords, [0, 0, -1, -1, 0, 0, 10, 1, 0]), "term rows exceed the table"),
        ((q, q, q, table, coords, [1, 0, 3, -1, 0, 0, 5, 1, 0]), "bad hi channel"),
        ((q, q, q, table, coords, ok + [1, 0, 0, -1, 0, 0, 3, 1, 2]), "row blocks overlap"),
        ((q[..., :8].contiguous(),) * 3 + (table[..., :8].contiguous(), coords, ok),
         "head dim must be a multiple of 16"),
        ((q.double(), q.double(), q.double(), table.double(), coords, ok), "supports float32, float16, bfloat16"),
        ((q, q, q, table.half(), coords, ok), "must share a dtype"),
        ((q, q[:, :, :2], q, table, coords, ok), "v must have the shape of k"),
        ((q, q, q, table, coords.long(), ok), "coords must be contiguous int32"),
    ]
    for args, msg in cases:
        with pytest.raises(RuntimeError, match=re.escape(msg)):
            emu.forward(*args, 1.0, 1.0, True, None, 0.0, 0)
    with pytest.raises(RuntimeError, match="key_padding_mask must be contiguous bool"):
        emu.forward(q, q, q, table, coords, ok, 1.0, 1.0, True, torch.zeros(1, 3), 0.0, 0)
    with pytest.raises(RuntimeError, match="dropout_p must be in"):
        emu.forward(q, q, q, table, coords, ok, 1.0, 1.0, True, None, 1.0, 0)
    with pytest.raises(RuntimeError, match="too much shared memory"):
        emu.forward(q, q, q, table, coords, ok, 1.0, 1.0, True, None, 0.0, 0, 4096)
    out, lse = emu.forward(q, q, q, table, coords, ok, 1.0, 1.0, True, None, 0.0, 0)
    with pytest.raises(RuntimeError, match="lse must be float32"):
        emu.backward(out, q, q, q, out, lse.double(), table, coords, ok, 1.0, 1.0, True, None, 0.0, 0)
    with pytest.raises(RuntimeError, match="grad_out/out/lse shapes do not match q"):
        emu.backward(out[:, :, :2], q, q, q, out, lse, table, coords, ok, 1.0, 1.0, True, None, 0.0, 0)


@needs_emu
def test_cuda_emu_fuzz_coordinates_in_bounds():
    """Arbitrary coordinate values (beyond what the Python layer allows) stay in bounds."""
    g = torch.Generator().manual_seed(0)
    emu = _emu()
    for trial in range(6):
        L = int(torch.randint(1, 40, (1,), generator=g))
        q = torch.randn(1, 1, L, 16, generator=g)
        table = torch.randn(1, 3 * 4 + 7 + 5, 16, generator=g)
        coords = torch.randint(-50, 50, (1, 2, L), generator=g, dtype=torch.int32)
        terms = [2, 0, 0, 1, 4, -3, 3, 4, 0, 3, 1, 0, 1, 2, 1, 7, 5, 12, 1, 0, 1, -1, 0, 2, 5, 1, 19]
        out, _ = emu.forward(q, q, q, table, coords, terms, 1.0, 0.5, bool(trial % 2), None, 0.0, 0)
        assert torch.isfinite(out).all()
        if HAVE_CPP:
            want, _ = torch.ops.fastattn.circular_relative_attention(q, q, q, table, coords, terms, 1.0, 0.5,
                                                                     bool(trial % 2), None, 0.0, 0)
            assert_close("fuzz vs cpp", out, want, 1e-5)


def _emu_misaligned(t, shift):
    """A contiguous copy of t starting `shift` elements into its storage (a view with a storage
    offset, as slicing a larger buffer gives): not 16-byte aligned."""
    buf = torch.zeros(t.numel() + shift, dtype=t.dtype)
    view = buf[shift:].view(t.shape)
    view.copy_(t)
    assert view.is_contiguous() and view.data_ptr() % 16 != 0
    return view


@needs_emu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_emu_views_with_storage_offsets(dtype):
    """q, k, v, table, grad_out as views with storage offsets, and a KV cache whose batch stride is
    not a multiple of 16 bytes: the kernels must fall back to scalar copies (16-byte vector copies
    fault on a GPU, and in the emulator) and give bit-identical results."""
    emu = _emu()
    q, k, v, onset, pitch, kw, _ = make_problem(B=2, H=2, Lq=5, Lk=21, D=32, terms="all", kpm=True, dtype=dtype,
                                                grad=False)
    asm = assemble(q, 21, onset, pitch, kw)
    kpm, table = kw["key_padding_mask"].contiguous(), asm.table.detach().contiguous()
    go = torch.randn(q.shape, generator=torch.Generator().manual_seed(3)).to(dtype)

    def both(q, k, v, table, go):
        out, lse = emu.forward(q, k, v, table, asm.coords, asm.terms, 0.9, 0.2, True, kpm, 0.0, 0)
        grads = emu.backward(go, q, k, v, out, lse, table, asm.coords, asm.terms, 0.9, 0.2, True, kpm, 0.0, 0)
        return (out, lse) + tuple(grads)

    def odd_batch_stride(t):  # dense [Lk, D] rows, batch stride H·Lk·D + 1 elements
        B, H, Lk, D = t.shape
        view = torch.zeros(B * (H * Lk * D + 1), dtype=dtype).as_strided(t.shape, (H * Lk * D + 1, Lk * D, D, 1))
        view.copy_(t)
        return view

    want = both(q, k, v, table, go)
    assert emu.plan(q, k, v, table, asm.coords, asm.terms)["vec"]
    cases = [("odd k/v batch stride", (q, odd_batch_stride(k), odd_batch_stride(v), table, go), False)]
    for i, name in enumerate(("q", "k", "v", "table", "grad_out")):  # one misaligned tensor at a time
        args = [q, k, v, table, go]
        args[i] = _emu_misaligned(args[i], 1)
        cases.append((f"offset {name}", tuple(args), name == "grad_out"))  # (the plan does not see grad_out)
    for name, args, vec in cases:
        assert emu.plan(*args[:4], asm.coords, asm.terms)["vec"] == vec, name
        for i, (a, b) in enumerate(zip(want, both(*args))):
            assert torch.equal(a, b), f"{name}: output {i}"
