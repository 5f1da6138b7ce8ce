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

from fastattn.backends import triton_interpreting  # noqa: E402
from fastattn.ops import sae as ops  # noqa: E402
from fastattn.reference import sae as ref  # noqa: E402
from helpers import assert_close  # noqa: E402

needs_cpp = pytest.mark.skipif(not ops.HAVE_COMPILED, reason="extension without SAE kernels")


def _triton_ok():
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return triton_interpreting()


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


# --- CUDA kernels under the CPU emulator ---
# csrc/cuda/sae.cu runs on CPU tensors through fastattn/_cuda_emu.py: csrc/emu/sae.cpp exposes the
# torch ops' argument lists and goes through the same tensor glue as the CUDA build
# (csrc/include/sae_cuda_glue.h). Select with `-k cuda_emu`. fp32 runs the SIMT paths and is held
# to fp32 tolerances; fp16/bf16 run the WMMA paths and must be within 2x PyTorch's own error at
# that dtype (both against fp64 on the same rounded inputs) plus one rounding step (EMU_ULP).

from fastattn import _cuda_emu  # noqa: E402

_EMU_WHY = _cuda_emu.available("sae")
EMU_LOW = (torch.float16, torch.bfloat16)
EMU_DTYPES = (torch.float32,) + EMU_LOW
EMU_ULP = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}  # half an ulp, relative


@pytest.fixture(scope="module")
def emu():
    if _EMU_WHY is not None:
        pytest.skip(_EMU_WHY)
    m = _cuda_emu.load("sae")  # a compile error fails the tests instead of skipping them
    m.set_num_sms(4)
    yield m
    m.set_num_sms(4)


def _emu_rnd(*shape, dtype=torch.float32, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale).to(dtype)


def _dtype_id(dtype):
    return str(dtype).replace("torch.", "")


def _emu_lowp(name, got, truth, torch_at_dtype):
    """got (kernel) and torch_at_dtype (PyTorch at the same low precision) against fp64 truth."""
    truth = truth.double()
    err_k = (got.double() - truth).abs().max().item() if got.numel() else 0.0
    err_t = (torch_at_dtype.double() - truth).abs().max().item() if got.numel() else 0.0
    floor = EMU_ULP[got.dtype] * max(1.0, truth.abs().max().item() if truth.numel() else 1.0)
    assert err_k <= 2 * err_t + floor, (f"{name}: kernel error {err_k:.3g} > 2 x PyTorch's {err_t:.3g} "
                                        f"+ {floor:.3g} ({_dtype_id(got.dtype)})")


def _emu_check_topk(v, i, z, k, tol):
    """A valid top-k of z [N, n] (fp64): indices in range and distinct, values = z at them within tol,
    sorted descending, and no unselected entry beats the k-th selected one by more than tol."""
    N, n = z.shape
    assert v.shape == (N, k) and i.shape == (N, k) and i.dtype == torch.int64
    assert bool(((i >= 0) & (i < n)).all()), "index out of range"
    assert all(len(set(row)) == k for row in i.tolist()), "repeated index in a row"
    vd = v.double()
    assert_close("values vs z[indices]", vd, z.gather(1, i), tol)
    assert bool((vd[:, :-1] >= vd[:, 1:]).all()), "values not sorted descending"
    kth = z.topk(k, dim=1).values[:, -1:]
    assert bool((z.gather(1, i) >= kth - 2 * tol).all()), "a selected latent is not among the top k"


EMU_TOPK_SHAPES = [(1, 8, 5, 5), (7, 16, 33, 4), (129, 24, 300, 16), (3, 5, 257, 1), (2, 1, 40, 7),
                   (9, 8, 400, 100), (5, 16, 150, 150), (4, 0, 10, 3)]


@pytest.mark.parametrize("num_sms", [1, 64])
@pytest.mark.parametrize("shape", EMU_TOPK_SHAPES, ids=str)
def test_cuda_emu_topk_encode_fp32(emu, shape, num_sms):
    """fp32 (SIMT): indices equal the fp64 reference's except at near-ties; one split or many."""
    N, d, n, k = shape
    emu.set_num_sms(num_sms)
    x, W, b = _emu_rnd(N, d, seed=1), _emu_rnd(n, d, seed=2), _emu_rnd(n, seed=3)
    v, i = emu.topk_encode(x, W, b, k)
    z = x.double() @ W.double().t() + b.double()
    tol = 1e-5 * max(1.0, d ** 0.5)
    _emu_check_topk(v, i, z, k, tol)
    vr, ir = ref.topk_encode(x.double(), W.double(), b.double(), k)
    differ = i != ir
    assert bool(((z.gather(1, i) - z.gather(1, ir)).abs()[differ] <= 2 * tol).all()), "indices differ beyond near-ties"
    assert_close("values", v, vr, tol)
    v2, i2 = emu.topk_encode(x, W, None, k)  # no bias
    _emu_check_topk(v2, i2, x.double() @ W.double().t(), k, tol)


@pytest.mark.parametrize("dtype", EMU_DTYPES, ids=_dtype_id)
def test_cuda_emu_topk_ties_go_to_lower_index(emu, dtype):
    """Small integers: every dtype computes exactly the same pre-activations, with many ties."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-2, 3, (16, 6), generator=g).to(dtype)
    W = torch.randint(-1, 2, (300, 6), generator=g).to(dtype)
    W[150:170] = W[0:20]  # exact duplicates of latents 0..19, in another column tile
    z = x.double() @ W.double().t()
    for num_sms in (1, 64):
        emu.set_num_sms(num_sms)
        v, i = emu.topk_encode(x, W, torch.zeros(300, dtype=dtype), 12)
        for r in range(16):
            order = sorted(range(300), key=lambda j: (-z[r, j].item(), j))[:12]
            assert i[r].tolist() == order, f"row {r}: {i[r].tolist()} != {order}"
            assert torch.equal(v[r].double(), z[r, order])


@pytest.mark.parametrize("dtype", EMU_LOW, ids=_dtype_id)
def test_cuda_emu_topk_encode_low_precision(emu, dtype):
    """WMMA path: sorted values (rank by rank, where near-ties may swap indices) within 2x
    PyTorch's error at the dtype; every selected latent truly among the top k within that bound."""
    N, d, n, k = 33, 40, 200, 8
    x, W, b = _emu_rnd(N, d, seed=1, dtype=dtype), _emu_rnd(n, d, seed=2, dtype=dtype), _emu_rnd(n, seed=3, dtype=dtype)
    v, i = emu.topk_encode(x, W, b, k)
    assert v.dtype == dtype
    z = x.double() @ W.double().t() + b.double()
    truth = z.topk(k, dim=1).values
    vt, _ = ref.topk_encode(x, W, b, k)
    _emu_lowp("values by rank", v, truth, vt)
    bound = 2 * (vt.double() - truth).abs().max().item() + EMU_ULP[dtype] * truth.abs().max().item()
    _emu_check_topk(v, i, z, k, bound)


@pytest.mark.parametrize("dtype", EMU_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("shape", [(1, 3, 5, 1), (40, 20, 150, 5), (6, 300, 9, 4), (3, 7, 2, 2)], ids=str)
def test_cuda_emu_topk_encode_backward(emu, dtype, shape):
    """dx, dW, db for given indices (duplicates across rows) vs fp64 formulas."""
    N, d, n, k = shape
    g = torch.Generator().manual_seed(N * d)
    x, W, gv = _emu_rnd(N, d, seed=1, dtype=dtype), _emu_rnd(n, d, seed=2, dtype=dtype), _emu_rnd(N, k, seed=3, dtype=dtype)
    idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(N)])
    dx, dW, db = emu.topk_encode_backward(gv, x, W, idx)

    def formulas(gv, x, W):
        dx = (gv.unsqueeze(-1) * W[idx]).sum(1)
        dW = torch.zeros_like(W).index_add_(0, idx.flatten(), (gv.unsqueeze(-1) * x.unsqueeze(1)).reshape(-1, d))
        db = torch.zeros(n, dtype=W.dtype).index_add_(0, idx.flatten(), gv.flatten())
        return dx, dW, db

    want = formulas(gv.double(), x.double(), W.double())
    at_dtype = formulas(gv, x, W)
    for name, got, w, t in zip(("dx", "dW", "db"), (dx, dW, db), want, at_dtype):
        assert got.dtype == dtype
        if dtype == torch.float32:
            assert_close(name, got, w, 2e-5 * max(1.0, d ** 0.5))
        else:
            _emu_lowp(name, got, w, t)
    untouched = torch.ones(n, dtype=torch.bool)
    untouched[idx.flatten()] = False
    assert (dW[untouched] == 0).all() and (db[untouched] == 0).all()
    again = emu.topk_encode_backward(gv, x, W, idx)
    assert all(torch.equal(a, b) for a, b in zip((dx, dW, db), again)), "backward is not deterministic"


@pytest.mark.parametrize("dtype", EMU_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("N,k,n,d", [(1, 1, 1, 1), (9, 4, 33, 20), (40, 5, 150, 7), (5, 3, 4, 70), (3, 2, 10, 300)])
def test_cuda_emu_sparse_decode(emu, dtype, N, k, n, d):
    g = torch.Generator().manual_seed(2)
    vals, W, b = _emu_rnd(N, k, seed=1, dtype=dtype), _emu_rnd(n, d, seed=3, dtype=dtype), _emu_rnd(d, seed=4, dtype=dtype)
    idx = torch.randint(0, n, (N, k), generator=g)  # duplicates allowed
    go = _emu_rnd(N, d, seed=5, dtype=dtype)
    for bias in (b, None):
        out = emu.sparse_decode(vals, idx, W, bias)
        want = ref.sparse_decode(vals.double(), idx, W.double(), None if bias is None else bias.double())
        if dtype == torch.float32:
            assert_close("out", out, want, 2e-5)
        else:
            _emu_lowp("out", out, want, ref.sparse_decode(vals, idx, W, bias))
    dv, dW, db = emu.sparse_decode_backward(go, vals, idx, W)

    def formulas(go, vals, W):
        dv = (go.unsqueeze(1) * W[idx]).sum(-1)
        dW = torch.zeros_like(W).index_add_(0, idx.flatten(), (vals.unsqueeze(-1) * go.unsqueeze(1)).reshape(-1, d))
        return dv, dW, go.sum(0)

    for name, got, w, t in zip(("dvalues", "dW", "db"), (dv, dW, db), formulas(go.double(), vals.double(), W.double()),
                               formulas(go, vals, W)):
        if dtype == torch.float32:
            assert_close(name, got, w, 2e-5 * max(1.0, d ** 0.5))
        else:
            _emu_lowp(name, got, w, t)


def test_cuda_emu_encode_decode_compose_with_embedding_bag(emu):
    x, W, Wd = _emu_rnd(33, 16, seed=1), _emu_rnd(100, 16, seed=2), _emu_rnd(100, 16, seed=3)
    v, i = emu.topk_encode(x, W, None, 8)
    out = emu.sparse_decode(v, i, Wd, None)
    want = torch.nn.functional.embedding_bag(i, Wd, per_sample_weights=v, mode="sum")
    assert_close("decode", out, want, 1e-5)


@pytest.mark.parametrize("dtype", EMU_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("N,d,n", [(1, 3, 1), (9, 16, 33), (70, 8, 300), (130, 12, 256), (5, 4, 13)])
def test_cuda_emu_binary_encode_exact(emu, dtype, N, d, n):
    """Bits where the sign is unambiguous at the dtype; packed bytes and counts bit-exact."""
    x, W, b = _emu_rnd(N, d, seed=1, dtype=dtype), _emu_rnd(n, d, seed=2, dtype=dtype), _emu_rnd(n, seed=3, dtype=dtype)
    code, packed, counts = emu.binary_encode(x, W, b, True, 0)
    assert code.dtype == dtype and packed.dtype == torch.uint8 and counts.dtype == torch.int64
    z = x.double() @ W.double().t() + b.double()
    safe = z.abs() > 1e-4 * max(1.0, d ** 0.5)
    assert torch.equal((code != 0)[safe], (z > 0)[safe])
    assert bool(((code == 0) | (code == 1)).all())
    np_packed = np.packbits(code.float().numpy().astype(np.uint8), axis=1, bitorder="little")
    assert torch.equal(packed, torch.from_numpy(np_packed))
    assert torch.equal(counts, (code != 0).sum(0))
    code2, packed2, counts2 = emu.binary_encode(x, W, b, False, 0)
    assert code2.shape == (N, 0) and torch.equal(packed2, packed) and torch.equal(counts2, counts)


def test_cuda_emu_binary_encode_zero_maps_to_zero(emu):
    x = torch.tensor([[1.0, -1.0], [0.0, 0.0], [2.0, 2.0]])
    W = torch.tensor([[1.0, 1.0], [1.0, 0.0], [-1.0, 0.0]])
    code, packed, counts = emu.binary_encode(x, W, None, True, 1)
    assert code.tolist() == [[0, 1, 0], [0, 0, 0], [1, 1, 0]]
    assert packed.flatten().tolist() == [2, 0, 3] and counts.tolist() == [1, 2, 0]


@pytest.mark.parametrize("dtype", EMU_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("ste", [0, 1, 2])
def test_cuda_emu_binary_encode_backward(emu, dtype, ste):
    N, d, n = 21, 10, 145
    x, W, b = _emu_rnd(N, d, seed=1, dtype=dtype), _emu_rnd(n, d, seed=2, dtype=dtype), _emu_rnd(n, seed=3, dtype=dtype)
    gc = _emu_rnd(N, n, seed=4, dtype=dtype)
    dx, dW, db = emu.binary_encode_backward(gc, x, W, b, ste)

    def formulas(gc, x, W, b):
        if ste == 0:
            gz = gc * (1 - gc)
        elif ste == 1:
            gz = gc
        else:
            s = torch.sigmoid(x @ W.t() + b)
            gz = gc * s * (1 - s)
        return gz @ W, gz.t() @ x, gz.sum(0)

    want = formulas(gc.double(), x.double(), W.double(), b.double())
    for name, got, w, t in zip(("dx", "dW", "db"), (dx, dW, db), want, formulas(gc, x, W, b)):
        assert got.dtype == dtype
        if dtype == torch.float32:
            assert_close(f"ste {ste} {name}", got, w, 1e-4)
        else:
            _emu_lowp(f"ste {ste} {name}", got, w, t)


def _emu_binary_h(B, n, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    h = (torch.rand(B, n, generator=g) < torch.rand(n, generator=g)).to(dtype)
    h[:, :1] = 1  # a constant column: exactly zero covariance with everything
    return h


EMU_COV_SHAPES = {torch.float32: [(2, 1), (2, 3), (37, 129), (64, 300), (5, 256), (130, 40)],
                  torch.float16: [(2, 3), (37, 129), (130, 40)], torch.bfloat16: [(2, 3), (37, 129), (130, 40)]}
EMU_COV_CASES = [pytest.param(dt, s, id=f"{_dtype_id(dt)}-{s}") for dt, shapes in EMU_COV_SHAPES.items() for s in shapes]


@pytest.mark.parametrize("dtype,shape", EMU_COV_CASES)
def test_cuda_emu_covariance_penalty_exact_on_binary(emu, dtype, shape):
    """Binary h: the tensor-core path is exact up to the final division (value) and the final
    scaling (gradient), for fp32 inputs too."""
    B, n = shape
    h = _emu_binary_h(B, n, B * 1000 + n, dtype)
    value, grad = emu.binary_covariance_penalty(h, True)
    assert value.dtype == dtype and value.dim() == 0 and grad.shape == (B, n)
    exact = float(_exact_penalty(h))
    assert value.item() == torch.tensor(exact, dtype=torch.float64).float().to(dtype).item(), (value.item(), exact)
    hd = h.double().requires_grad_()
    (want,) = torch.autograd.grad(ref.binary_covariance_penalty(hd), [hd])
    # (the fp64 reference itself leaves ~1e-16 where the exact gradient is 0)
    assert_close("dh", grad, want.to(dtype), 1e-9, rtol=1e-6 if dtype == torch.float32 else EMU_ULP[dtype] * 2)
    value2, grad2 = emu.binary_covariance_penalty(h, False)
    assert value2.item() == value.item() and grad2.shape == (0, n)


def test_cuda_emu_covariance_penalty_continuous(emu):
    """Non-binary fp32 h takes the SIMT path: agrees with autograd through torch.cov."""
    h = _emu_rnd(30, 129, seed=5)
    value, grad = emu.binary_covariance_penalty(h, True)
    hd = h.double().requires_grad_()
    want = ref.covariance_penalty_torch_cov(hd)
    (gc,) = torch.autograd.grad(want, [hd])
    assert abs(value.item() - want.item()) <= 1e-5 * want.item()
    assert_close("dh vs torch.cov", grad, gc, 1e-4)
    again = emu.binary_covariance_penalty(h, True)
    assert torch.equal(again[0], value) and torch.equal(again[1], grad), "not deterministic"


def test_cuda_emu_raw_argument_checks(emu):
    X, W, b = torch.randn(3, 5), torch.randn(4, 5), torch.randn(4)
    with pytest.raises(RuntimeError, match=re.escape("k must be in [1, n = 4], got 9")):
        emu.topk_encode(X, W, b, 9)
    with pytest.raises(RuntimeError, match="supports dtypes float32, float16, bfloat16, got Double"):
        emu.topk_encode(X.double(), W.double(), b.double(), 2)
    with pytest.raises(RuntimeError, match="weight must be"):
        emu.binary_encode(X, torch.randn(4, 3), None, True, 0)
    with pytest.raises(RuntimeError, match="ste must be"):
        emu.binary_encode(X, W, None, True, 5)
    with pytest.raises(RuntimeError, match=re.escape("indices must be in [0, 4)")):
        emu.sparse_decode(X[:, :2].contiguous(), torch.full((3, 2), 7), W, None)
    with pytest.raises(RuntimeError, match="at least 2 rows"):
        emu.binary_covariance_penalty(torch.ones(1, 3), False)


@pytest.mark.parametrize("dtype", EMU_DTYPES, ids=_dtype_id)
def test_cuda_emu_topk_encode_on_small_smem_devices(emu, dtype):
    """sm_86/89 GPUs run the sm_80 binary with 99 KB of opt-in shared memory per block: the running
    lists must move to the workspace where they do not fit (fp32 k = 32 needs 104 KB with them),
    with bit-identical results; below the GEMM tile's own need the launcher reports an error."""
    x, W, b = _emu_rnd(33, 16, seed=1, dtype=dtype), _emu_rnd(300, 16, seed=2, dtype=dtype), _emu_rnd(300, seed=3, dtype=dtype)
    want = {k: emu.topk_encode(x, W, b, k) for k in (32, 64)}
    assert emu.topk_smem_lists(x, 64)  # A100 (the default): lists in shared memory
    try:
        emu.set_max_smem(101376)
        assert emu.topk_smem_lists(x, 32) == (dtype != torch.float32) and not emu.topk_smem_lists(x, 64)
        for k, (v, i) in want.items():
            v2, i2 = emu.topk_encode(x, W, b, k)
            assert torch.equal(v2, v) and torch.equal(i2, i), f"k={k}"
        emu.set_max_smem(48 * 1024)
        with pytest.raises(RuntimeError, match="shared memory per block is too small"):
            emu.topk_encode(x, W, b, 8)
    finally:
        emu.set_max_smem(166912)


def _emu_misaligned(t, shift):
    """A contiguous copy of t whose data starts `shift` elements into its storage (a view with a
    storage offset): 16-byte vector loads from it would fault on a GPU (and in the emulator)."""
    buf = torch.zeros(t.numel() + shift, dtype=t.dtype)
    view = buf[shift:].view(t.shape)
    view.copy_(t)
    assert view.is_contiguous() and (shift == 0 or view.data_ptr() % 16 != 0)
    return view


@pytest.mark.parametrize("dtype", EMU_DTYPES, ids=_dtype_id)
def test_cuda_emu_views_with_storage_offsets(emu, dtype):
    """Every op on misaligned views (row bytes a multiple of 16, so only the base pointer can
    rule out vector loads) equals the same op on aligned tensors, bit for bit."""
    g = torch.Generator().manual_seed(0)
    N, d, n, k = 9, 16, 40, 4
    x, W, b = _emu_rnd(N, d, seed=1, dtype=dtype), _emu_rnd(n, d, seed=2, dtype=dtype), _emu_rnd(n, seed=3, dtype=dtype)
    idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(N)])
    vals, go = _emu_rnd(N, k, seed=4, dtype=dtype), _emu_rnd(N, d, seed=5, dtype=dtype)
    gc = _emu_rnd(N, n, seed=6, dtype=dtype)
    h = _emu_binary_h(N, 48, 7, dtype)
    calls = [
        lambda x, W, b, vals, go, gc, h: emu.topk_encode(x, W, b, k),
        lambda x, W, b, vals, go, gc, h: emu.topk_encode_backward(vals, x, W, idx),
        lambda x, W, b, vals, go, gc, h: emu.sparse_decode(vals, idx, W, b[:d]),
        lambda x, W, b, vals, go, gc, h: emu.sparse_decode_backward(go, vals, idx, W),
        lambda x, W, b, vals, go, gc, h: emu.binary_encode(x, W, b, True, 0),
        lambda x, W, b, vals, go, gc, h: emu.binary_encode_backward(gc, x, W, b, 2),
        lambda x, W, b, vals, go, gc, h: emu.binary_covariance_penalty(h, True),
    ]
    args = (x, W, b, vals, go, gc, h)
    shifted = tuple(_emu_misaligned(t, 1) for t in args)
    for c, call in enumerate(calls):
        for o, (a, s) in enumerate(zip(call(*args), call(*shifted))):
            if c == 5 and o < 2:  # dx, dW of the binary encoder come from ATen's mm, not our kernels
                assert_close(f"call {c} output {o}", s, a, 1e-5 * max(1.0, a.abs().max().item()))
            else:
                assert torch.equal(a, s), f"call {c} output {o}"


@pytest.mark.parametrize("dtype", EMU_DTYPES, ids=_dtype_id)
def test_cuda_emu_row_tiles_loop_beyond_grid_y(emu, dtype):
    """gridDim.y <= 65535: the row-tiled kernels (binary encoder, STE recompute, covariance
    gradient, column sums) loop over row tiles with stride gridDim.y, which the emulator caps at 1
    so that these multi-tile shapes run that loop (as N > 8.4M rows would on a GPU)."""
    N, d, n = 300, 8, 20  # 3 row tiles, 2 column-sum chunks
    x, W, b = _emu_rnd(N, d, seed=1, dtype=dtype), _emu_rnd(n, d, seed=2, dtype=dtype), _emu_rnd(n, seed=3, dtype=dtype)
    code, packed, counts = emu.binary_encode(x, W, b, True, 0)
    z = x.double() @ W.double().t() + b.double()
    safe = z.abs() > 1e-2
    assert torch.equal((code != 0)[safe], (z > 0)[safe]) and torch.equal(counts, (code != 0).sum(0))
    gc = _emu_rnd(N, n, seed=4, dtype=dtype)
    dx, dW, db = emu.binary_encode_backward(gc, x, W, b, 2)
    s = torch.sigmoid(z)
    gz = gc.double() * s * (1 - s)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    assert_close("db", db, gz.sum(0), tol * N ** 0.5)
    assert_close("dx", dx, gz @ W.double(), tol)
    h = _emu_binary_h(N, 40, 11, dtype)
    value, grad = emu.binary_covariance_penalty(h, True)
    hd = h.double().requires_grad_()
    (want,) = torch.autograd.grad(ref.binary_covariance_penalty(hd), [hd])
    assert value.item() == torch.tensor(float(_exact_penalty(h)), dtype=torch.float64).float().to(dtype).item()
    assert_close("dh", grad, want.to(dtype), 1e-9, rtol=1e-6 if dtype == torch.float32 else EMU_ULP[dtype] * 2)
