"""SAE ops (topk_encode, sparse_decode, binary_encode, binary_covariance_penalty): every backend
against the reference, exactness, gradients, odd sizes, bad input, registration."""
from __future__ import annotations

import os

# Triton kernels run on CPU tensors through the interpreter; the flag is read when a kernel is
# defined, so it must be set before fastattn.triton.sae is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import re  # noqa: E402
from fractions import Fraction  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from fastattn.ops import sae as ops  # noqa: E402
from fastattn.reference import sae as ref  # noqa: E402
from helpers import assert_close  # noqa: E402

needs_cpp = pytest.mark.skipif(not ops.HAVE_COMPILED, reason="extension without SAE kernels")


def _triton_ok():
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return ops.triton_interpreting()


needs_triton = pytest.mark.skipif(not _triton_ok(), reason="triton missing or TRITON_INTERPRET unset")
FUSED = [pytest.param("cpp", marks=needs_cpp), pytest.param("triton", marks=needs_triton)]
# (forward atol, gradient atol) at each dtype, fused vs reference at the same dtype.
TOL = {torch.float64: (1e-10, 1e-9), torch.float32: (2e-5, 2e-4)}


def dtypes_for(backend):
    return [torch.float32] if backend == "triton" else [torch.float32, torch.float64]


def rnd(*shape, dtype=torch.float64, seed=0, grad=True, scale=1.0):
    t = (torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale)
    return t.to(dtype).requires_grad_(grad)


def grads(out, leaves, seed=1):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out.dtype)
    res = torch.autograd.grad(out, leaves, g, allow_unused=True)
    return [torch.zeros_like(x) if r is None else r for x, r in zip(leaves, res)]


# ----------------------------------------------------------------------------- topk_encode

# (N, d, n, k): N = 1, n not a multiple of 8/32/the 256-wide tile, k = n, k = 1.
TOPK_SHAPES = [(1, 8, 5, 5), (7, 16, 33, 4), (65, 24, 300, 16), (3, 5, 257, 1), (130, 32, 64, 32),
               (2, 1, 40, 7)]
# The interpreter is slow on the bitonic top-k: fewer row blocks, still several latent tiles.
TOPK_SHAPES_TRITON = [(1, 8, 5, 5), (7, 16, 33, 4), (9, 8, 150, 16), (3, 5, 257, 1), (2, 1, 40, 7)]
TOPK_CASES = ([pytest.param("cpp", s, marks=needs_cpp, id=f"cpp-{s}") for s in TOPK_SHAPES]
              + [pytest.param("triton", s, marks=needs_triton, id=f"triton-{s}") for s in TOPK_SHAPES_TRITON])


@pytest.mark.parametrize("backend,shape", TOPK_CASES)
def test_topk_encode_matches_reference(backend, shape):
    N, d, n, k = shape
    for dtype in dtypes_for(backend):
        x, W, b = rnd(N, d, dtype=dtype, seed=1), rnd(n, d, dtype=dtype, seed=2), rnd(n, dtype=dtype, seed=3)
        vr, ir = ops.topk_encode(x, W, b, k, backend="reference")
        vf, i_f = ops.topk_encode(x, W, b, k, backend=backend)
        fwd, bwd = TOL[dtype]
        assert torch.equal(i_f, ir), f"indices differ in {int((i_f != ir).sum())} places"
        assert_close("values", vf, vr, fwd)
        for name, gf, gr in zip(("dx", "dW", "db"), grads(vf, [x, W, b]), grads(vr, [x, W, b])):
            assert_close(name, gf, gr, bwd)


@pytest.mark.parametrize("backend", ["reference"] + FUSED)
def test_topk_ties_go_to_lower_index(backend):
    """Integer data: every backend computes exactly the same pre-activations, with many ties."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-2, 3, (16, 6), generator=g).float()
    W = torch.randint(-1, 2, (90, 6), generator=g).float()
    W[50:60] = W[0:10]  # exact duplicates of latents 0..9
    b = torch.zeros(90)
    v, i = ops.topk_encode(x, W, b, 12, backend=backend)
    z = x @ W.t()
    for r in range(16):
        order = sorted(range(90), key=lambda j: (-z[r, j].item(), j))[:12]
        assert i[r].tolist() == order, f"row {r}: {i[r].tolist()} != {order}"
        assert torch.equal(v[r], z[r, order])


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=needs_cpp), "reference"])
def test_topk_encode_gradcheck(backend):
    x, W, b = rnd(4, 5, seed=1), rnd(9, 5, seed=2), rnd(9, seed=3)
    f = lambda x, W, b: ops.topk_encode(x, W, b, 3, backend=backend).values  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, W, b), eps=1e-6, atol=1e-7)


@needs_cpp
def test_topk_backward_touches_only_selected_latents():
    x, W, b = rnd(6, 4, seed=1), rnd(50, 4, seed=2), rnd(50, seed=3)
    v, i = ops.topk_encode(x, W, b, 3, backend="cpp")
    dW, db = torch.autograd.grad(v.sum(), [W, b])
    untouched = torch.ones(50, dtype=torch.bool)
    untouched[i.flatten()] = False
    assert untouched.any() and (dW[untouched] == 0).all() and (db[untouched] == 0).all()
    assert torch.equal(db, torch.bincount(i.flatten(), minlength=50).double())


# ----------------------------------------------------------------------------- sparse_decode

@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("N,k,n,d", [(1, 1, 1, 1), (9, 4, 33, 20), (40, 5, 150, 7), (5, 3, 4, 70)])
@pytest.mark.parametrize("bias", [True, False])
def test_sparse_decode_matches_reference(backend, N, k, n, d, bias):
    for dtype in dtypes_for(backend):
        vals = rnd(N, k, dtype=dtype, seed=1)
        idx = torch.randint(0, n, (N, k), generator=torch.Generator().manual_seed(2))  # duplicates allowed
        W = rnd(n, d, dtype=dtype, seed=3)
        b = rnd(d, dtype=dtype, seed=4) if bias else None
        leaves = [vals, W] + ([b] if bias else [])
        out_r = ops.sparse_decode(vals, idx, W, b, backend="reference")
        out_f = ops.sparse_decode(vals, idx, W, b, backend=backend)
        fwd, bwd = TOL[dtype]
        assert_close("out", out_f, out_r, fwd)
        for name, gf, gr in zip(("dvalues", "dW", "db"), grads(out_f, leaves), grads(out_r, leaves)):
            assert_close(name, gf, gr, bwd)


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=needs_cpp), "reference"])
def test_sparse_decode_gradcheck(backend):
    vals, W, b = rnd(5, 3, seed=1), rnd(7, 4, seed=2), rnd(4, seed=3)
    idx = torch.tensor([[0, 6, 6], [1, 2, 3], [4, 5, 0], [6, 5, 4], [2, 2, 2]])
    f = lambda v, W, b: ops.sparse_decode(v, idx, W, b, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(f, (vals, W, b), eps=1e-6, atol=1e-7)


@needs_cpp
def test_encode_decode_compose_with_embedding_bag():
    """The fused pair equals the plain PyTorch pipeline (linear + topk + embedding_bag)."""
    x, W, Wd = rnd(33, 16, seed=1, grad=False), rnd(100, 16, seed=2, grad=False), rnd(100, 16, seed=3, grad=False)
    v, i = ops.topk_encode(x, W, None, 8, backend="cpp")
    out = ops.sparse_decode(v, i, Wd, None, backend="cpp")
    want = torch.nn.functional.embedding_bag(i, Wd, per_sample_weights=v, mode="sum")
    assert_close("decode", out, want, 1e-10)


# ----------------------------------------------------------------------------- binary_encode

@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("N,d,n", [(1, 3, 1), (9, 16, 33), (70, 8, 300), (64, 12, 256), (5, 4, 13)])
def test_binary_encode_exact(backend, N, d, n):
    for dtype in dtypes_for(backend):
        x, W, b = rnd(N, d, dtype=dtype, seed=1), rnd(n, d, dtype=dtype, seed=2), rnd(n, dtype=dtype, seed=3)
        code, packed, counts = ops.binary_encode(x, W, b, backend=backend)
        z = (x.double() @ W.double().t() + b.double())
        want = (z > 0)
        # compare only where the fp32 kernel cannot round across zero
        safe = z.abs() > 1e-4
        assert torch.equal((code != 0)[safe], want[safe])
        np_packed = np.packbits(code.detach().numpy().astype(np.uint8), axis=1, bitorder="little")
        assert torch.equal(packed, torch.from_numpy(np_packed))
        assert torch.equal(ref.unpack_bits(packed, n), code.detach() != 0)
        assert torch.equal(counts, (code.detach() != 0).sum(0))
        assert packed.dtype == torch.uint8 and counts.dtype == torch.int64
        _, packed2, counts2 = ops.binary_encode(x, W, b, backend=backend, return_code=False)
        assert torch.equal(packed2, packed) and torch.equal(counts2, counts)


@pytest.mark.parametrize("backend", ["reference"] + FUSED)
def test_binary_encode_zero_maps_to_zero(backend):
    x = torch.tensor([[1.0, -1.0], [0.0, 0.0], [2.0, 2.0]])
    W = torch.tensor([[1.0, 1.0], [1.0, 0.0], [-1.0, 0.0]])
    code, packed, counts = ops.binary_encode(x, W, None, backend=backend)
    assert code.tolist() == [[0, 1, 0], [0, 0, 0], [1, 1, 0]]
    assert packed.flatten().tolist() == [2, 0, 3] and counts.tolist() == [1, 2, 0]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("ste", ops.STE_MODES)
def test_binary_encode_ste_gradients(backend, ste):
    for dtype in dtypes_for(backend):
        x, W, b = rnd(21, 10, dtype=dtype, seed=1), rnd(45, 10, dtype=dtype, seed=2), rnd(45, dtype=dtype, seed=3)
        # a non-linear use of the code, so g·(1 − g) differs from g
        f = lambda be: ops.binary_encode(x, W, b, ste=ste, backend=be).code  # noqa: E731
        gr = torch.autograd.grad((f("reference") * torch.linspace(-2, 3, 45, dtype=dtype)).sum() ** 2 / 1e3, [x, W, b])
        gf = torch.autograd.grad((f(backend) * torch.linspace(-2, 3, 45, dtype=dtype)).sum() ** 2 / 1e3, [x, W, b])
        for name, a, w in zip(("dx", "dW", "db"), gf, gr):
            assert_close(f"{ste} {name}", a, w, TOL[dtype][1])


def test_ste_formulas():
    z = torch.tensor([-1.0, 0.0, 2.0], requires_grad=True)
    g = torch.tensor([0.5, 2.0, -1.0])
    for ste, want in [("reference", g * (1 - g)), ("identity", g),
                      ("sigmoid", g * torch.sigmoid(z) * (1 - torch.sigmoid(z)))]:
        (dz,) = torch.autograd.grad(ref.binarize(z, ste), [z], g)
        assert torch.allclose(dz, want.detach()), ste


def test_pack_unpack_round_trip():
    g = torch.Generator().manual_seed(0)
    for n in (1, 7, 8, 9, 64, 333):
        h = torch.rand(11, n, generator=g) > 0.5
        p = ref.pack_bits(h)
        assert p.shape == (11, (n + 7) // 8)
        assert torch.equal(p, torch.from_numpy(np.packbits(h.numpy(), axis=1, bitorder="little")))
        assert torch.equal(ref.unpack_bits(p, n), h)


# ----------------------------------------------------------------------------- covariance penalty

def _exact_penalty(h: torch.Tensor) -> Fraction:
    """Σ_{i≠j} |C_ij| of an integer matrix in exact rational arithmetic."""
    H = h.long()
    B = H.shape[0]
    c = H.sum(0)
    num = B * (H.t() @ H) - torch.outer(c, c)
    off = num.abs().sum() - num.diagonal().abs().sum()
    return Fraction(int(off), B * (B - 1))


@pytest.mark.parametrize("backend", ["reference"] + FUSED)
@pytest.mark.parametrize("B,n", [(2, 1), (2, 3), (37, 129), (64, 300), (5, 256)])
def test_covariance_penalty_exact_on_binary(backend, B, n):
    g = torch.Generator().manual_seed(B * 1000 + n)
    h = (torch.rand(B, n, generator=g) < torch.rand(n, generator=g)).float()
    h[:, :1] = 1.0  # a constant column: exactly zero covariance with everything
    got = ops.binary_covariance_penalty(h, backend=backend)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert got.item() == float(np.float32(float(_exact_penalty(h)))), (got.item(), float(_exact_penalty(h)))
    want = ref.covariance_penalty_torch_cov(h.double())
    assert abs(got.double().item() - want.item()) <= 1e-6 * max(1.0, want.item())


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("B,n", [(2, 5), (30, 129), (40, 200)])
def test_covariance_penalty_gradient(backend, B, n):
    g = torch.Generator().manual_seed(n)
    for dtype in dtypes_for(backend):
        h = (torch.rand(B, n, generator=g) > 0.4).to(dtype).requires_grad_()
        (gr,) = torch.autograd.grad(ops.binary_covariance_penalty(h, backend="reference") * 3, [h])
        (gf,) = torch.autograd.grad(ops.binary_covariance_penalty(h, backend=backend) * 3, [h])
        assert_close("dh", gf, gr, TOL[dtype][1])
    # continuous inputs (no exact zeros): agrees with autograd through torch.cov
    h = rnd(B, n, seed=5, dtype=dtypes_for(backend)[-1])
    (gc,) = torch.autograd.grad(ref.covariance_penalty_torch_cov(h), [h])
    (gf,) = torch.autograd.grad(ops.binary_covariance_penalty(h, backend=backend), [h])
    assert_close("dh vs torch.cov", gf, gc, 1e-8 if h.dtype == torch.float64 else 1e-3)


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=needs_cpp), "reference"])
def test_covariance_penalty_gradcheck(backend):
    h = rnd(6, 5, seed=3)
    assert torch.autograd.gradcheck(lambda h: ops.binary_covariance_penalty(h, backend=backend), (h,),
                                    eps=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- registration

@needs_cpp
def test_opcheck():
    x, W, b = rnd(5, 4, seed=1, dtype=torch.float32), rnd(9, 4, seed=2, dtype=torch.float32), rnd(9, seed=3, dtype=torch.float32)
    torch.library.opcheck(torch.ops.fastattn.topk_encode.default, (x, W, b, 3))
    v, i = torch.ops.fastattn.topk_encode(x.detach(), W.detach(), b.detach(), 3)
    torch.library.opcheck(torch.ops.fastattn.sparse_decode.default, (v.requires_grad_(), i, W, b[:4]))
    torch.library.opcheck(torch.ops.fastattn.binary_encode.default, (x, W, b, True, 2))
    h = (torch.rand(6, 10) > 0.5).float().requires_grad_()
    torch.library.opcheck(torch.ops.fastattn.binary_covariance_penalty.default, (h, True))


@needs_cpp
def test_torch_compile():
    x, W, b = rnd(8, 6, seed=1, dtype=torch.float32), rnd(20, 6, seed=2, dtype=torch.float32), rnd(20, seed=3, dtype=torch.float32)

    def f(x, W, b):
        v, i = ops.topk_encode(x, W, b, 4, backend="cpp", check_finite=False)
        return ops.sparse_decode(v, i, W, None, backend="cpp", check_indices=False)

    out = torch.compile(f, backend="aot_eager", fullgraph=True)(x, W, b)
    assert_close("compiled", out, f(x, W, b), 1e-6)
    out.sum().backward()
    assert W.grad is not None and torch.isfinite(W.grad).all()


def test_auto_backend_choice():
    x = torch.zeros(2, 3)
    want = "cpp" if ops.HAVE_COMPILED else "reference"
    assert ops.choose_backend("topk_encode", "auto", x) == want  # never the interpreter under auto
    assert ops.choose_backend("topk_encode", "auto", x.bfloat16()) == "reference"
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run these inputs: no CUDA kernels"):
        ops.choose_backend("topk_encode", "cuda", x)
    with pytest.raises(RuntimeError, match="backend='triton' cannot run"):
        ops.choose_backend("topk_encode", "triton", x.double())
    if ops.HAVE_COMPILED:
        with pytest.raises(RuntimeError, match="supports dtypes float32, float64, got bfloat16"):
            ops.topk_encode(x.bfloat16(), torch.zeros(4, 3, dtype=torch.bfloat16), None, 2, backend="cpp")


# ----------------------------------------------------------------------------- bad input

X, W4, B4 = torch.randn(3, 5), torch.randn(4, 5), torch.randn(4)
NAN_X = X.clone()
NAN_X[1, 2] = float("nan")
INF_X = X.clone()
INF_X[0, 0] = float("inf")
BAD = {
    "k > n": (lambda: ops.topk_encode(X, W4, B4, 5), ValueError, "k must be in [1, n = 4], got 5"),
    "k = 0": (lambda: ops.topk_encode(X, W4, B4, 0), ValueError, "k must be in [1, n = 4], got 0"),
    "k < 0": (lambda: ops.topk_encode(X, W4, B4, -2), ValueError, "k must be in [1, n = 4], got -2"),
    "k float": (lambda: ops.topk_encode(X, W4, B4, 2.0), TypeError, "k must be an int"),
    "x 1-D": (lambda: ops.topk_encode(X[0], W4, B4, 2), ValueError, "x must be 2-D"),
    "width": (lambda: ops.topk_encode(X, torch.randn(4, 6), B4, 2), ValueError, "weight must be [n, d] with d = 5"),
    "bias shape": (lambda: ops.topk_encode(X, W4, torch.randn(5), 2), ValueError, "bias must be [n] with n = 4"),
    "int x": (lambda: ops.topk_encode(X.long(), W4, B4, 2), TypeError, "x must be a floating-point tensor"),
    "dtype mix": (lambda: ops.topk_encode(X, W4.double(), B4, 2), TypeError, "weight dtype float64 does not match float32"),
    "nan x": (lambda: ops.topk_encode(NAN_X, W4, B4, 2), ValueError, "x contains non-finite values"),
    "inf x bae": (lambda: ops.binary_encode(INF_X, W4, B4), ValueError, "x contains non-finite values"),
    "ste": (lambda: ops.binary_encode(X, W4, B4, ste="tanh"), ValueError, "ste must be one of"),
    "decode idx dtype": (lambda: ops.sparse_decode(X[:, :2], torch.zeros(3, 2, dtype=torch.int32), W4), TypeError,
                         "indices must be an int64 tensor, got int32"),
    "decode idx range": (lambda: ops.sparse_decode(X[:, :2], torch.full((3, 2), 4), W4), ValueError,
                         "indices must be in [0, 4), got values in [4, 4]"),
    "decode idx negative": (lambda: ops.sparse_decode(X[:, :2], torch.full((3, 2), -1), W4), ValueError,
                            "indices must be in [0, 4)"),
    "decode idx shape": (lambda: ops.sparse_decode(X[:, :2], torch.zeros(3, 3, dtype=torch.long), W4), ValueError,
                         "indices must have the shape of values"),
    "decode bias": (lambda: ops.sparse_decode(X[:, :2], torch.zeros(3, 2, dtype=torch.long), W4, torch.randn(4)),
                    ValueError, "bias must be [d] with d = 5"),
    "cov one row": (lambda: ops.binary_covariance_penalty(torch.ones(1, 4)), ValueError, "at least 2 rows"),
    "cov 3-D": (lambda: ops.binary_covariance_penalty(torch.ones(2, 2, 2)), ValueError, "h must be 2-D"),
    "cov nan": (lambda: ops.binary_covariance_penalty(NAN_X), ValueError, "h contains non-finite values"),
    "backend": (lambda: ops.topk_encode(X, W4, B4, 2, backend="fast"), ValueError, "backend must be"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(case):
    fn, exc, msg = BAD[case]
    with pytest.raises(exc, match=re.escape(msg)):
        fn()


@needs_cpp
def test_raw_ops_check_arguments():
    """Direct torch.ops calls are checked in C++ too (no out-of-bounds reads)."""
    with pytest.raises(RuntimeError, match=re.escape("k must be in [1, n = 4], got 9")):
        torch.ops.fastattn.topk_encode(X, W4, B4, 9)
    with pytest.raises(RuntimeError, match=re.escape("indices must be in [0, 4)")):
        torch.ops.fastattn.sparse_decode(X[:, :2].contiguous(), torch.full((3, 2), 7), W4, None)
    with pytest.raises(RuntimeError, match="weight must be"):
        torch.ops.fastattn.binary_encode(X, torch.randn(4, 3), None, True, 0)
    with pytest.raises(RuntimeError, match="ste must be"):
        torch.ops.fastattn.binary_encode(X, W4, None, True, 5)
    with pytest.raises(RuntimeError, match="at least 2 rows"):
        torch.ops.fastattn.binary_covariance_penalty(torch.ones(1, 3), False)


@needs_triton
def test_triton_opcheck():
    """The Triton custom ops' fake and autograd registrations are sound (tiny shapes: interpreter)."""
    from fastattn.triton import sae as tsae  # noqa: F401  (registers torch.ops.fastattn_triton)

    x, W, b = rnd(3, 4, seed=1, dtype=torch.float32), rnd(6, 4, seed=2, dtype=torch.float32), rnd(6, seed=3, dtype=torch.float32)
    torch.library.opcheck(torch.ops.fastattn_triton.topk_encode.default, (x, W, b, 2))
    idx = torch.tensor([[0, 5], [2, 2], [1, 3]])
    torch.library.opcheck(torch.ops.fastattn_triton.sparse_decode.default, (rnd(3, 2, seed=4, dtype=torch.float32), idx, W, b[:4]))
    torch.library.opcheck(torch.ops.fastattn_triton.binary_encode.default, (x, W, b, True, 1))
    h = (torch.rand(5, 7, generator=torch.Generator().manual_seed(0)) > 0.5).float().requires_grad_()
    torch.library.opcheck(torch.ops.fastattn_triton.binary_covariance_penalty.default, (h, True))
