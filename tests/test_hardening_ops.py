"""Issue 14, class 3 at the op level: the public op's integer arguments are range-checked,
NaN and overflow are never hidden by a backend, a NaN row of the encoder weights does not stall
TopK, and double backward through every fused op is exact (or raises).
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before fastattn.triton is imported

import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import fastattn  # noqa: E402
import fastattn.ops.sae as S  # noqa: E402
from fastattn import _cuda_emu, _ext  # noqa: E402
from fastattn.backends import triton_interpreting  # noqa: E402
from fastattn.ops import _cra_terms  # noqa: E402
from helpers import assert_close, make_problem, run  # noqa: E402


def _triton_ok():
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return triton_interpreting()


needs_cpp = pytest.mark.skipif(not (_ext.has_backend("cpp") and S.HAVE_COMPILED), reason="C++ ops not built")
needs_triton = pytest.mark.skipif(not _triton_ok(), reason="triton missing or TRITON_INTERPRET unset")
_EMU_WHY = {n: _cuda_emu.available(n) for n in ("circular_relative_attention", "sae")}


def _needs_emu(name):
    return pytest.mark.skipif(_EMU_WHY[name] is not None, reason=f"CUDA emulator unavailable: {_EMU_WHY[name]}")




# ----------------------------------------------------------------------------- integer arguments

def _tables(name, g, D=8):
    def t(n):
        return torch.randn(n, D, generator=g, dtype=torch.float64)
    return {"rel_index_min": dict(rel_index_table=t(9)),
            "bar_min": dict(bar_table=t(5), pos_table=t(48)),
            "octave_min": dict(octave_table=t(22), pitch_class_table=t(12)),
            "time_min": dict(time_table=t(200)),
            "pitch_min": dict(pitch_table=t(255))}[name]


def _small_call(name, value, backend, **extra):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 8, generator=g, dtype=torch.float64) for _ in range(3))
    onset = torch.arange(6).view(1, 6) * 30
    pitch = torch.arange(6).view(1, 6) * 7 + 40
    kw = {**_tables(name, g), name: value, **extra}
    return fastattn.circular_relative_attention(q, k, v, onset, pitch, backend=backend, **kw)


@pytest.mark.parametrize("name", _cra_terms.MIN_ARGS)
@pytest.mark.parametrize("value", [2**30, -2**30, 2**32 - 2, -2**40])
def test_min_argument_out_of_int32_range_raises(name, value):
    """Before: the C++ kernels truncated these to int32 (cpp differed from the reference by up to 1.7)."""
    with pytest.raises(ValueError, match=rf"{name} must be in \[-\(2\*\*30 - 1\), 2\*\*30 - 1\], got {value}"):
        _small_call(name, value, "reference")


@needs_cpp
@pytest.mark.parametrize("name", _cra_terms.MIN_ARGS)
def test_min_argument_at_its_limits_matches_reference(name):
    for value in (2**30 - 1, -(2**30 - 1), 7):
        assert_close(f"{name}={value}", _small_call(name, value, "cpp"), _small_call(name, value, "reference"), 1e-10)


def test_other_int_arguments_range_checked():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 3, 1, generator=g)
    onset = torch.tensor([[0, 5, 2**30 + 1]])
    with pytest.raises(ValueError, match=r"bar_res must be in \[1, 2\*\*30\]"):
        fastattn.circular_relative_attention(q, q, q, onset, bar_table=torch.randn(2, 1), pos_table=torch.randn(3, 1),
                                             bar_res=2**30 + 1)
    with pytest.raises(ValueError, match="onset has values above 1073741824"):
        fastattn.circular_relative_attention(q, q, q, onset, time_table=torch.randn(4, 1))
    # a combined Hadamard table of 2^20 x 2^12 rows would not fit int32 (4 MB of inputs)
    with pytest.raises(ValueError, match=r"bar_table rows x pos_table rows = 1048576 x 4096"):
        fastattn.circular_relative_attention(q, q, q, torch.zeros(1, 3, dtype=torch.long),
                                             bar_table=torch.randn(2**20, 1), pos_table=torch.randn(4096, 1),
                                             bar_res=4096)


# ----------------------------------------------------------------------------- NaN and overflow: attention

NAN_CASES = ("nan_q", "overflow_qk", "nan_table_row")


def _nan_problem(case):
    prob = make_problem(B=1, H=2, Lq=6, Lk=6, D=16, terms="all", missing=False, seed=3)
    q, k, v, onset, pitch, kw, leaves = prob
    with torch.no_grad():
        if case == "nan_q":
            q[0, 0, 2, 3] = float("nan")
        elif case == "overflow_qk":  # q·k ≈ 1e40: inf in fp32, then inf - inf in the softmax
            q.mul_(1e20)
            k.mul_(1e20)
        else:  # the bar_table row that bar difference 0 - bar_min selects
            kw["bar_table"][1, 0] = float("nan")
    return prob


def _assert_divergence_visible(got_out, got_grads, want_out, want_grads):
    """The output is non-finite exactly where the reference's is; every gradient that has a
    non-finite element in the reference has one too (the placement of NaN inside a gradient
    depends on summation order: 0·NaN terms), and none is non-finite where the reference is not."""
    bad_g, bad_w = ~torch.isfinite(got_out), ~torch.isfinite(want_out)
    assert bad_w.any(), "the case does not diverge in the reference"
    assert torch.equal(bad_g, bad_w), f"out: {int(bad_g.sum())} non-finite, reference {int(bad_w.sum())}"
    fin = ~bad_w
    assert_close("finite out", got_out[fin], want_out[fin], 1e-4)
    for i, (g, w) in enumerate(zip(got_grads, want_grads)):
        assert bool((~torch.isfinite(g)).any()) == bool((~torch.isfinite(w)).any()), \
            f"gradient {i}: non-finite {int((~torch.isfinite(g)).sum())}, reference {int((~torch.isfinite(w)).sum())}"


def _emu_attention():
    from test_circular_relative_attention import _emu_cra  # the emulated CUDA op pair (autograd)
    return _emu_cra


def _nan_params():
    marks = {"cpp": [needs_cpp], "triton": [needs_triton], "cuda_emu": [_needs_emu("circular_relative_attention")]}
    return [pytest.param(b, c, marks=marks[b], id=f"{b}-{c}") for b in marks for c in NAN_CASES]


@pytest.mark.parametrize("backend,case", _nan_params())
def test_attention_divergence_is_never_hidden(backend, case):
    prob = _nan_problem(case)
    want_out, want_grads = run("reference", *prob)
    got_out, got_grads = run(_emu_attention() if backend == "cuda_emu" else backend, *prob)
    _assert_divergence_visible(got_out, got_grads, want_out, want_grads)


# ----------------------------------------------------------------------------- NaN: SAE ops

def _sae_backends(op):
    out = [pytest.param("cpp", marks=needs_cpp), pytest.param("triton", marks=needs_triton)]
    return out + [pytest.param("cuda_emu", marks=[_needs_emu("sae")])]


def _sae(backend, op, *args, **kw):
    if backend == "cuda_emu":
        return getattr(_cuda_emu.load("sae"), op)(*args)
    return getattr(S, op)(*args, backend=backend, **kw)


def _nan_weights():
    g = torch.Generator().manual_seed(0)
    x, W, b = torch.randn(5, 16, generator=g), torch.randn(40, 16, generator=g), torch.randn(40, generator=g)
    W[7] = float("nan")
    return x, W, b


@pytest.mark.parametrize("backend", _sae_backends("topk_w"))
def test_topk_nan_weight_row_is_selected_like_torch_sort(backend):
    """A NaN pre-activation ranks first (torch.sort order): before, the cpp kernel's running
    top-k stopped accepting values once a NaN sat at its k-th place."""
    x, W, b = _nan_weights()
    want = S.topk_encode(x, W, b, 4, backend="reference")
    got = _sae(backend, "topk_encode", x, W, b, 4)
    assert torch.equal(got[1], want.indices), f"{got[1].tolist()} vs {want.indices.tolist()}"
    assert_close("values", got[0], want.values, 1e-5)
    assert bool(torch.isnan(got[0][:, 0]).all())


@pytest.mark.parametrize("backend", _sae_backends("topk_x"))
def test_topk_nan_input_row(backend):
    """check_finite=False lets a NaN row through: every pre-activation of it is NaN."""
    x, W, b = _nan_weights()
    W[7] = 1.0
    x[2] = float("nan")
    want = S.topk_encode(x, W, b, 4, backend="reference", check_finite=False)
    got = _sae(backend, "topk_encode", x, W, b, 4) if backend == "cuda_emu" else \
        S.topk_encode(x, W, b, 4, backend=backend, check_finite=False)
    assert torch.equal(got[1], want.indices)
    assert_close("values", got[0], want.values, 1e-5)


@pytest.mark.parametrize("backend", _sae_backends("decode"))
def test_sparse_decode_nan_weight_propagates(backend):
    x, W, b = _nan_weights()
    idx = torch.tensor([[7, 1], [2, 3], [0, 7], [4, 5], [6, 8]])
    vals = torch.randn(5, 2, generator=torch.Generator().manual_seed(1))
    want = S.sparse_decode(vals, idx, W, b[:16], backend="reference")
    assert_close("out", _sae(backend, "sparse_decode", vals, idx, W, b[:16]), want, 1e-5)


@pytest.mark.parametrize("backend", _sae_backends("binary"))
def test_binary_encode_nan_weight_like_reference(backend):
    """1[NaN > 0] = 0, as in the reference (torch's comparison)."""
    x, W, b = _nan_weights()
    want = S.binary_encode(x, W, b, backend="reference")
    got = _sae(backend, "binary_encode", x, W, b, True, 0) if backend == "cuda_emu" else \
        S.binary_encode(x, W, b, backend=backend)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.parametrize("backend", _sae_backends("covariance"))
def test_covariance_penalty_nan_is_not_hidden(backend):
    h = (torch.rand(6, 10, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    h[3, 4] = float("nan")
    want = S.binary_covariance_penalty(h, backend="reference", check_finite=False)
    hh = h.clone().requires_grad_()
    if backend == "cuda_emu":
        value, grad = _cuda_emu.load("sae").binary_covariance_penalty(h, True)
    else:
        value = S.binary_covariance_penalty(hh, backend=backend, check_finite=False)
        (grad,) = torch.autograd.grad(value, hh)
    hr = h.clone().requires_grad_()
    (grad_ref,) = torch.autograd.grad(S.binary_covariance_penalty(hr, backend="reference", check_finite=False), hr)
    assert torch.isnan(want) and torch.isnan(value)
    assert bool(torch.isnan(grad).any()) == bool(torch.isnan(grad_ref).any())


# ----------------------------------------------------------------------------- double backward

def _tiny_attention(dtype=torch.float64, D=2, L=3, H=2, seed=0):
    """Leaves and a function of them: index, decomposed time and direct pitch terms (one of them
    per head), small enough for gradgradcheck."""
    g = torch.Generator().manual_seed(seed)

    def leaf(*s):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * 0.7).to(dtype).requires_grad_()
    q, k, v = leaf(1, H, L, D), leaf(1, H, L + 1, D), leaf(1, H, L + 1, D)
    tables = dict(rel_index_table=leaf(3, D), bar_table=leaf(2, D), pos_table=leaf(2, D), pitch_table=leaf(H, 5, D))
    onset = torch.tensor([[0, 1, 4, 5, 7, 9]])[:, :L + 1]
    pitch = torch.tensor([[60, 62, -1, 59, 64, 61]])[:, :L + 1]
    names = list(tables)

    def fn(backend, **extra):
        def f(q, k, v, *ts):
            return fastattn.circular_relative_attention(q, k, v, onset, pitch, bar_res=2, bar_min=-1, pitch_min=-2,
                                                        rel_index_min=-1, backend=backend,
                                                        **dict(zip(names, ts)), **extra)
        return f
    return [q, k, v] + list(tables.values()), fn


def _hvp(f, inputs, seed=0):
    """(first derivatives, Hessian-vector product) of <f(inputs), g> with random g and direction u."""
    g = torch.Generator().manual_seed(seed)
    out = f(*inputs)
    out = out if isinstance(out, tuple) else (out,)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype)).sum()
               for o in out if o.is_floating_point())
    first = torch.autograd.grad(loss, inputs, create_graph=True)
    s = sum((d * torch.randn(d.shape, generator=g, dtype=torch.float64).to(d.dtype)).sum() for d in first)
    second = torch.autograd.grad(s, inputs, allow_unused=True)
    return first, [torch.zeros_like(x) if h is None else h for x, h in zip(inputs, second)]


@needs_cpp
@pytest.mark.parametrize("extra", [{}, dict(causal=False, dropout_p=0.3, dropout_seed=5,
                                            key_padding_mask=torch.tensor([[False, True, False, False]]))],
                         ids=["causal", "dropout_kpm"])
def test_cpp_attention_gradgradcheck(extra):
    """Before: a UserWarning and second derivatives off by up to 8.6 (the backward kernel's
    outputs were treated as constants). Now the create_graph path differentiates the op's
    plain-PyTorch formulation; first derivatives still equal the kernel's."""
    inputs, fn = _tiny_attention(H=1 if extra else 2)
    f = fn("cpp", **extra)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert torch.autograd.gradgradcheck(f, inputs, eps=1e-6, atol=1e-6, fast_mode=True)
        first, hvp = _hvp(f, inputs)
    first_kernel = torch.autograd.grad(_hvp_loss(f, inputs), inputs)
    for a, b in zip(first, first_kernel):
        assert_close("first derivatives, create_graph vs kernel", a, b, 1e-10)
    _, hvp_ref = _hvp(fn("reference", **extra), inputs)
    for i, (a, b) in enumerate(zip(hvp, hvp_ref)):
        assert_close(f"H·u [{i}]", a, b, 1e-9)


def _hvp_loss(f, inputs, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = f(*inputs)
    return (out * torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)).sum()


@needs_triton
def test_triton_attention_double_backward():
    inputs, fn = _tiny_attention(torch.float32, D=16, L=4)
    _, hvp = _hvp(fn("triton"), inputs)
    _, want = _hvp(fn("reference"), inputs)
    for i, (a, b) in enumerate(zip(hvp, want)):
        assert_close(f"H·u [{i}]", a, b, 2e-4 * max(1.0, float(b.abs().max())))


def _sae_case(op, dtype):
    g = torch.Generator().manual_seed(0)

    def leaf(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    x, W, b = leaf(6, 5), leaf(12, 5), leaf(12)
    idx = torch.randint(0, 12, (6, 3), generator=g)
    if op == "topk_encode":
        return (lambda be: lambda x, W, b: S.topk_encode(x, W, b, 3, backend=be).values), [x, W, b]
    if op == "sparse_decode":
        return (lambda be: lambda v, W, b: S.sparse_decode(v, idx, W, b, backend=be)), [leaf(6, 3), W, leaf(5)]
    if op.startswith("binary_encode"):
        ste = op.split(":")[1]
        return (lambda be: lambda x, W, b: S.binary_encode(x, W, b, ste=ste, backend=be).code), [x, W, b]
    return (lambda be: lambda h: S.binary_covariance_penalty(h, backend=be)), [leaf(7, 9)]


SAE_DOUBLE = ["topk_encode", "sparse_decode", "binary_encode:sigmoid", "binary_encode:reference",
              "binary_covariance_penalty"]


@needs_cpp
@pytest.mark.parametrize("op", SAE_DOUBLE)
def test_cpp_sae_gradgradcheck(op):
    make, inputs = _sae_case(op, torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert torch.autograd.gradgradcheck(make("cpp"), inputs, eps=1e-6, atol=1e-6, fast_mode=True)
        _, hvp = _hvp(make("cpp"), inputs)
    _, want = _hvp(make("reference"), inputs)
    for i, (a, b) in enumerate(zip(hvp, want)):
        assert_close(f"H·u [{i}]", a, b, 1e-9)


@needs_triton
@pytest.mark.parametrize("op", SAE_DOUBLE)
def test_triton_sae_double_backward(op):
    """Exact, or a clear error: the Triton TopK and decoder backward kernels are custom ops
    without an autograd formula, and torch raises for them (h15 may wire
    fastattn.ops._sae_glue.topk_backward_with / decode_backward_with to support them)."""
    make, inputs = _sae_case(op, torch.float32)
    try:
        _, hvp = _hvp(make("triton"), inputs)
    except RuntimeError as e:
        assert op in ("topk_encode", "sparse_decode") and "no autograd formula was registered" in str(e), str(e)
        return
    _, want = _hvp(make("reference"), inputs)
    for i, (a, b) in enumerate(zip(hvp, want)):
        assert_close(f"H·u [{i}]", a, b, 1e-4 * max(1.0, float(b.abs().max())))
