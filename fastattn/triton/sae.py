"""Triton kernels of the SAE ops (SPEC §5), registered as ``torch.ops.fastattn_triton.*``.

Layering per op: ``_<op>_kernel`` (pointer arguments, shapes in comments) -> ``_<op>_launch``
(grid, block sizes, allocation) -> a ``torch.library.custom_op`` with fake and autograd
registrations -> the public function in fastattn/ops/sae.py (backend="triton").

- topk_encode: each program owns BLOCK_M rows and sweeps the latents in BLOCK_N tiles: a
  tl.dot tile of pre-activations, the tile's top KP (KP = next power of two >= k) by a bitonic
  top-k, merged with the running top KP (join + top-k). Values and indices travel together as
  one int64 sort key: the float's order-preserving int32 image in the high word and
  (2^32 − 1 − index) in the low word, so equal values order by lower index. fp32 pre-activations.
- sparse gathers (sparse_decode forward, topk_encode dx) and dots (sparse_decode dvalues) over the
  k selected rows; scatters (dW, db) through a by-latent inverse index built with a stable
  argsort, one program per (latent, column block): deterministic, no float atomics.
- binary_encode: tl.dot tile -> z > 0 -> code, packed bytes (8 bits summed with weights 2^b) and
  column counts (integer atomics, exact). Its backward is the STE transform plus dense GEMMs,
  left to torch (cuBLAS): the code is about half ones, so nothing is sparse there.
- binary_covariance_penalty: one program per (I, J) column tile: G = h_Iᵀ h_J over row chunks, the
  numerator B·G − c_i·c_j in fp64 (exact for binary codes), |·| summed into a per-tile partial
  (summed by torch in a fixed order); the gradient h_J·sign(C)_JI is added into dh with fp32
  atomics, whose sums are integers for binary codes and therefore exact in any order.

Dtypes: fp32 (fp32 products, no TF32) and, on CUDA, fp16/bf16 (tensor cores, fp32
accumulation). Tiles: small ones in the interpreter (CPU tests); on a GPU, per generation and
dtype (:func:`_tiles`): tensor-core tiles (128 x 128 x 64, three or more pipeline stages) for
16-bit inputs, checked by bench/gpu_resources.py to fit registers and shared memory. Under
TRITON_INTERPRET=1 every kernel runs on CPU tensors (tests).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastattn.ops import _sae_glue as G
from fastattn.triton._common import capability, precision
from fastattn.triton._common import dot as _dot

INT64_MIN = tl.constexpr(-(2 ** 63))  # a constexpr: compiled kernels may read no other globals


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _topk_encode_fwd_kernel(
    X, W, B, VALS, IDX,          # X [N, D], W [NL, D], B [NL], VALS [N, K] (out), IDX [N, K] int64 (out)
    N, D, NL,
    K: tl.constexpr, KP: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    offs_d = tl.arange(0, BLOCK_D)
    running = tl.full([BLOCK_M, KP], INT64_MIN, tl.int64)
    for n0 in range(0, NL, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < NL
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            x = tl.load(X + rows[:, None] * D + dd[None, :], mask=row_ok[:, None] & (dd[None, :] < D), other=0.0)
            w = tl.load(W + cols[:, None] * D + dd[None, :], mask=col_ok[:, None] & (dd[None, :] < D), other=0.0)
            acc += _dot(x, tl.trans(w), PREC)
        if HAS_BIAS:
            acc += tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        acc = acc + 0.0  # -0.0 -> +0.0, so that the two zeros tie
        bits = acc.to(tl.int32, bitcast=True)
        ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # int32 order == float order
        key = (ordered.to(tl.int64) << 32) | (0xFFFFFFFF - cols.to(tl.int64))[None, :]
        key = tl.where(col_ok[None, :], key, INT64_MIN)
        tile_top = tl.topk(key, KP, dim=1)                                   # [BLOCK_M, KP]
        both = tl.reshape(tl.join(running, tile_top), [BLOCK_M, 2 * KP])
        running = tl.topk(both, KP, dim=1)
    hi = (running >> 32).to(tl.int32)
    vbits = tl.where(hi >= 0, hi, hi ^ 0x7FFFFFFF)
    vals = vbits.to(tl.float32, bitcast=True)
    idx = 0xFFFFFFFF - (running & 0xFFFFFFFF)
    kk = tl.arange(0, KP)
    mask = row_ok[:, None] & (kk[None, :] < K)
    tl.store(VALS + rows[:, None] * K + kk[None, :], vals.to(VALS.dtype.element_ty), mask=mask)
    tl.store(IDX + rows[:, None] * K + kk[None, :], idx, mask=mask)


@triton.jit
def _gather_combine_kernel(
    COEF, IDX, ROWS, BIAS, OUT,  # COEF [N, K], IDX [N, K] int64, ROWS [NL, D], BIAS [D], OUT [N, D]
    N, K, D,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok, d_ok = rows < N, dd < D
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if HAS_BIAS:
        acc += tl.load(BIAS + dd, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    for kk in range(0, K):
        c = tl.load(COEF + rows * K + kk, mask=row_ok, other=0.0).to(tl.float32)
        j = tl.load(IDX + rows * K + kk, mask=row_ok, other=0)
        w = tl.load(ROWS + j[:, None] * D + dd[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        acc += c[:, None] * w.to(tl.float32)
    tl.store(OUT + rows[:, None] * D + dd[None, :], acc.to(OUT.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _gather_dot_kernel(
    G, IDX, ROWS, OUT,  # G [N, D], IDX [N, K] int64, ROWS [NL, D], OUT [N, K]
    N, K, D,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    kk = tl.program_id(1)
    row_ok = rows < N
    j = tl.load(IDX + rows * K + kk, mask=row_ok, other=0)
    acc = tl.zeros([BLOCK_M], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        m = row_ok[:, None] & (dd[None, :] < D)
        g = tl.load(G + rows[:, None] * D + dd[None, :], mask=m, other=0.0).to(tl.float32)
        w = tl.load(ROWS + j[:, None] * D + dd[None, :], mask=m, other=0.0).to(tl.float32)
        acc += tl.sum(g * w, axis=1)
    tl.store(OUT + rows * K + kk, acc.to(OUT.dtype.element_ty), mask=row_ok)


@triton.jit
def _segment_scatter_kernel(
    ORDER, START, COEF, X, DW, DSUM,  # ORDER [N*K] int64 (entries by latent), START [NL + 1] int64,
                                      # COEF [N*K], X [N, D], DW [NL, D] (out), DSUM [NL] (out)
    K, D,
    HAS_SUM: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):
    j = tl.program_id(0)
    dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = dd < D
    p0 = tl.load(START + j)
    p1 = tl.load(START + j + 1)
    acc = tl.zeros([BLOCK_D], tl.float32)
    csum = tl.zeros([BLOCK_E], tl.float32)
    for p in range(p0, p1, BLOCK_E):
        pp = p + tl.arange(0, BLOCK_E)
        ok = pp < p1
        e = tl.load(ORDER + pp, mask=ok, other=0)
        c = tl.load(COEF + e, mask=ok, other=0.0).to(tl.float32)
        x = tl.load(X + (e // K)[:, None] * D + dd[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.sum(c[:, None] * x.to(tl.float32), axis=0)
        csum += c
    tl.store(DW + j * D + dd, acc.to(DW.dtype.element_ty), mask=d_ok)
    if HAS_SUM:
        if tl.program_id(1) == 0:
            tl.store(DSUM + j, tl.sum(csum, axis=0).to(DSUM.dtype.element_ty))


@triton.jit
def _binary_encode_kernel(
    X, W, B, CODE, PACKED, COUNTS,  # X [N, D], W [NL, D], B [NL], CODE [N, NL], PACKED [N, NB] uint8,
                                    # COUNTS [NL] int32 (atomics)
    N, D, NL, NB,
    HAS_BIAS: tl.constexpr, RETURN_CODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < N, cols < NL
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(X + rows[:, None] * D + dd[None, :], mask=row_ok[:, None] & (dd[None, :] < D), other=0.0)
        w = tl.load(W + cols[:, None] * D + dd[None, :], mask=col_ok[:, None] & (dd[None, :] < D), other=0.0)
        acc += _dot(x, tl.trans(w), PREC)
    if HAS_BIAS:
        acc += tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    valid = row_ok[:, None] & col_ok[None, :]
    bits = ((acc > 0) & valid).to(tl.int32)
    if RETURN_CODE:
        # via fp32: the interpreter turns int32 into bf16 bit patterns, not values
        tl.store(CODE + rows[:, None] * NL + cols[None, :], bits.to(tl.float32).to(CODE.dtype.element_ty), mask=valid)
    tl.atomic_add(COUNTS + cols, tl.sum(bits, axis=0), mask=col_ok)
    weights = (1 << tl.arange(0, 8)).to(tl.int32)
    packed = tl.sum(tl.reshape(bits, [BLOCK_M, BLOCK_N // 8, 8]) * weights[None, None, :], axis=2)
    bytes_ = tl.program_id(1) * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)
    tl.store(PACKED + rows[:, None] * NB + bytes_[None, :], packed.to(tl.uint8),
             mask=row_ok[:, None] & (bytes_[None, :] < NB))


@triton.jit
def _covariance_kernel(
    H, C, PART, RPART, DH,  # H [Bn, NL], C [NL] fp64 column sums, PART [nI, nJ] fp64 (out),
                            # RPART [nJ, NL] fp64 (out: Σ_j c_j S_ij per J tile), DH [Bn, NL] fp32 (atomics)
    Bn, NL,
    COMPUTE_GRAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_B: tl.constexpr, PREC: tl.constexpr,
):
    # Binary codes: 16-bit products and fp32 sums of 0/1 and ±1 values are exact, so the tensor-
    # core path (16-bit H) gives the same integers as the fp32 one.
    ti, tj = tl.program_id(0), tl.program_id(1)
    ci = ti * BLOCK_T + tl.arange(0, BLOCK_T)
    cj = tj * BLOCK_T + tl.arange(0, BLOCK_T)
    i_ok, j_ok = ci < NL, cj < NL
    g = tl.zeros([BLOCK_T, BLOCK_T], tl.float32)
    for b0 in range(0, Bn, BLOCK_B):
        bb = b0 + tl.arange(0, BLOCK_B)
        b_ok = bb < Bn
        hi = tl.load(H + bb[:, None] * NL + ci[None, :], mask=b_ok[:, None] & i_ok[None, :], other=0.0)
        hj = tl.load(H + bb[:, None] * NL + cj[None, :], mask=b_ok[:, None] & j_ok[None, :], other=0.0)
        g += _dot(tl.trans(hi), hj, PREC)
    c_i = tl.load(C + ci, mask=i_ok, other=0.0)
    c_j = tl.load(C + cj, mask=j_ok, other=0.0)
    num = Bn * g.to(tl.float64) - c_i[:, None] * c_j[None, :]
    off = (ci[:, None] != cj[None, :]) & i_ok[:, None] & j_ok[None, :]
    num = tl.where(off, num, 0.0)
    tl.store(PART + ti * tl.num_programs(1) + tj, tl.sum(tl.sum(tl.abs(num), axis=1), axis=0))
    if COMPUTE_GRAD:
        s = tl.where(num > 0, 1.0, tl.where(num < 0, -1.0, 0.0))  # [T_i, T_j], fp64
        tl.store(RPART + tj * NL + ci, tl.sum(s * c_j[None, :], axis=1), mask=i_ok)
        s_h = s.to(H.dtype.element_ty)
        for b0 in range(0, Bn, BLOCK_B):
            bb = b0 + tl.arange(0, BLOCK_B)
            b_ok = bb < Bn
            hj = tl.load(H + bb[:, None] * NL + cj[None, :], mask=b_ok[:, None] & j_ok[None, :], other=0.0)
            contrib = _dot(hj, tl.trans(s_h), PREC)  # [BLOCK_B, T_i]
            tl.atomic_add(DH + bb[:, None] * NL + ci[None, :], contrib, mask=b_ok[:, None] & i_ok[None, :])


# ----------------------------------------------------------------------------- launchers

def _tiles(x: Tensor, kind: str) -> dict:
    """Block sizes, warps and pipeline stages of the GEMM-like kernels ("topk", "binary":
    BLOCK_M x BLOCK_N output tiles over BLOCK_D; "cov": BLOCK_T x BLOCK_T over BLOCK_B rows).
    Interpreter (no target; CPU tensors): small tiles, so tests stay fast. GPU (or a
    compile_target): per generation and dtype."""
    cap = capability(x.device)
    if cap is None:
        small = {"topk": (16, 64, 32), "binary": (16, 64, 32), "cov": (32, 32)}[kind]
        return dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_D") if kind != "cov" else ("BLOCK_T", "BLOCK_B"), small))
    half = x.dtype in (torch.float16, torch.bfloat16)
    if kind == "cov":
        # 16-bit codes: tensor-core 128 x 128 output tiles. fp32 codes (SIMT products, an fp64
        # numerator tile [T, T]) spill beyond 32 x 32.
        t = dict(BLOCK_T=128, BLOCK_B=64, num_warps=8) if half else dict(BLOCK_T=32, BLOCK_B=32, num_warps=4)
    elif kind == "topk":
        # the top-k merge holds [BLOCK_M, BLOCK_N] int64 sort keys: 64-row tiles, 8 warps
        t = dict(BLOCK_M=64, BLOCK_N=128 if half else 64, BLOCK_D=64 if half else 32, num_warps=8)
    else:
        t = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_D=64 if cap >= 90 else 32, num_warps=8) if half else \
            dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=32, num_warps=4)
    t["num_stages"] = 3
    return t


def _topk_encode_launch(x: Tensor, weight: Tensor, bias: Optional[Tensor], k: int) -> Tuple[Tensor, Tensor]:
    N, D = x.shape
    NL = weight.shape[0]
    KP = _next_pow2(k)
    values = x.new_empty((N, k))
    indices = torch.empty((N, k), dtype=torch.long, device=x.device)
    t = _tiles(x, "topk")
    t["BLOCK_N"] = max(t["BLOCK_N"], KP)
    grid = (triton.cdiv(N, t["BLOCK_M"]),)
    _topk_encode_fwd_kernel[grid](x, weight, bias if bias is not None else x, values, indices, N, D, NL,
                                  K=k, KP=KP, HAS_BIAS=bias is not None, PREC=precision(x.dtype, x.device), **t)
    return values, indices


def _gather_combine_launch(coef: Tensor, idx: Tensor, rows: Tensor, bias: Optional[Tensor]) -> Tensor:
    N, K = coef.shape
    D = rows.shape[1]
    out = coef.new_empty((N, D))
    BLOCK_M, BLOCK_D = 16, 64
    grid = (triton.cdiv(N, BLOCK_M), triton.cdiv(D, BLOCK_D))
    _gather_combine_kernel[grid](coef, idx, rows, bias if bias is not None else rows, out, N, K, D,
                                 HAS_BIAS=bias is not None, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D)
    return out


def _gather_dot_launch(g: Tensor, idx: Tensor, rows: Tensor) -> Tensor:
    N, K = idx.shape
    D = rows.shape[1]
    out = g.new_empty((N, K))
    BLOCK_M, BLOCK_D = 16, 64
    _gather_dot_kernel[(triton.cdiv(N, BLOCK_M), K)](g, idx, rows, out, N, K, D, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D)
    return out


def _segment_scatter_launch(coef: Tensor, idx: Tensor, X: Tensor, n: int, with_sum: bool):
    """dW [n, D] = Σ over entries with idx = j of coef · X[row], and optionally Σ coef per j."""
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    start = torch.zeros(n + 1, dtype=torch.long, device=idx.device)
    start[1:] = torch.bincount(flat, minlength=n).cumsum(0)
    return _segment_scatter_run(order, start, coef, idx.shape[1], X, n, with_sum)


def _segment_scatter_run(order: Tensor, start: Tensor, coef: Tensor, K: int, X: Tensor, n: int, with_sum: bool):
    """The kernel launch of _segment_scatter_launch, given the entries by latent (order [N·K],
    start [n + 1])."""
    D = X.shape[1]
    dW = X.new_empty((n, D))
    dsum = X.new_empty((n,)) if with_sum else dW
    BLOCK_E, BLOCK_D = 16, 64
    _segment_scatter_kernel[(n, triton.cdiv(D, BLOCK_D))](order, start, coef.reshape(-1), X, dW, dsum, K, D,
                                                          HAS_SUM=with_sum, BLOCK_E=BLOCK_E, BLOCK_D=BLOCK_D)
    return dW, (dsum if with_sum else None)


def _binary_encode_launch(x: Tensor, weight: Tensor, bias: Optional[Tensor], return_code: bool):
    N, D = x.shape
    NL = weight.shape[0]
    NB = (NL + 7) // 8
    code = x.new_empty((N, NL if return_code else 0))
    packed = torch.empty((N, NB), dtype=torch.uint8, device=x.device)
    counts = torch.zeros(NL, dtype=torch.int32, device=x.device)
    t = _tiles(x, "binary")
    grid = (triton.cdiv(N, t["BLOCK_M"]), triton.cdiv(NL, t["BLOCK_N"]))
    _binary_encode_kernel[grid](x, weight, bias if bias is not None else x, code if return_code else x, packed,
                                counts, N, D, NL, NB, HAS_BIAS=bias is not None, RETURN_CODE=return_code,
                                PREC=precision(x.dtype, x.device), **t)
    return code, packed, counts.long()


def _covariance_launch(h: Tensor, compute_grad: bool):
    Bn, NL = h.shape
    t = _tiles(h, "cov")
    nt = triton.cdiv(NL, t["BLOCK_T"])
    c = h.double().sum(0)  # exact for binary codes
    part = torch.empty((nt, nt), dtype=torch.float64, device=h.device)
    rpart = torch.zeros((nt, NL), dtype=torch.float64, device=h.device)
    dh = torch.zeros((Bn, NL), dtype=torch.float32, device=h.device) if compute_grad else part
    _covariance_kernel[(nt, nt)](h, c, part, rpart, dh, Bn, NL, COMPUTE_GRAD=compute_grad,
                                 PREC=precision(h.dtype, h.device), **t)
    value = (part.sum() / (Bn * (Bn - 1))).to(h.dtype)
    if not compute_grad:
        return value, h.new_empty((0, NL))
    r = rpart.sum(0)
    grad = (2.0 / (Bn - 1)) * (dh.double() - r / Bn)
    return value, grad.to(h.dtype)


# ----------------------------------------------------------------------------- torch ops

# The backward kernels are ops too, so that autograd graphs stay traceable (torch.compile,
# opcheck's AOT tests run the backward on fake tensors).
@torch.library.custom_op("fastattn_triton::gather_combine", mutates_args=())
def _gather_combine_op(coef: Tensor, idx: Tensor, rows: Tensor, bias: Optional[Tensor]) -> Tensor:
    return _gather_combine_launch(coef, idx, rows, bias)


@_gather_combine_op.register_fake
def _(coef, idx, rows, bias):
    return coef.new_empty((coef.shape[0], rows.shape[1]))


@torch.library.custom_op("fastattn_triton::gather_dot", mutates_args=())
def _gather_dot_op(g: Tensor, idx: Tensor, rows: Tensor) -> Tensor:
    return _gather_dot_launch(g, idx, rows)


@_gather_dot_op.register_fake
def _(g, idx, rows):
    return g.new_empty(idx.shape)


@torch.library.custom_op("fastattn_triton::segment_scatter", mutates_args=())
def _segment_scatter_op(coef: Tensor, idx: Tensor, X: Tensor, n: int) -> Tuple[Tensor, Tensor]:
    return _segment_scatter_launch(coef, idx, X, n, with_sum=True)


@_segment_scatter_op.register_fake
def _(coef, idx, X, n):
    return X.new_empty((n, X.shape[1])), X.new_empty((n,))


@torch.library.custom_op("fastattn_triton::topk_encode", mutates_args=())
def _topk_encode_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], k: int) -> Tuple[Tensor, Tensor]:
    return _topk_encode_launch(x, weight, bias, k)


_topk_encode_op.register_fake(G.topk_fake)


def _topk_backward(ctx, grad_values, _grad_indices):
    x, weight, indices = ctx.saved_tensors
    g = grad_values.contiguous().to(x.dtype)
    dx = _gather_combine_op(g, indices, weight, None)
    dw, db = _segment_scatter_op(g, indices, x, weight.shape[0])
    return dx, dw, (db if ctx.has_bias else None), None


_topk_encode_op.register_autograd(_topk_backward, setup_context=G.topk_setup)


@torch.library.custom_op("fastattn_triton::sparse_decode", mutates_args=())
def _sparse_decode_op(values: Tensor, indices: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return _gather_combine_launch(values, indices, weight, bias)


_sparse_decode_op.register_fake(G.decode_fake)


def _decode_backward(ctx, grad_out):
    values, indices, weight = ctx.saved_tensors
    g = grad_out.contiguous().to(values.dtype)
    dvalues = _gather_dot_op(g, indices, weight)
    dw, _ = _segment_scatter_op(values, indices, g, weight.shape[0])
    return dvalues, None, dw, (g.sum(0) if ctx.has_bias else None)


_sparse_decode_op.register_autograd(_decode_backward, setup_context=G.decode_setup)


@torch.library.custom_op("fastattn_triton::binary_encode", mutates_args=())
def _binary_encode_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], return_code: bool,
                      ste: int) -> Tuple[Tensor, Tensor, Tensor]:
    return _binary_encode_launch(x, weight, bias, return_code)


_binary_encode_op.register_fake(G.binary_encode_fake)


def _bin_backward(ctx, grad_code, _gp, _gc):
    x, weight, bias = ctx.saved_tensors
    g = grad_code.to(x.dtype)
    if g.shape[1] == 0:
        gz = x.new_zeros((x.shape[0], weight.shape[0]))
    elif ctx.ste == 1:  # identity
        gz = g
    elif ctx.ste == 0:  # reference: g·(1 − g)
        gz = g * (1 - g)
    else:  # sigmoid, on the recomputed pre-activation
        s = torch.sigmoid(torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t())
        gz = g * s * (1 - s)
    return gz @ weight, gz.t() @ x, (gz.sum(0) if ctx.has_bias else None), None, None


_binary_encode_op.register_autograd(_bin_backward, setup_context=G.binary_encode_setup)


@torch.library.custom_op("fastattn_triton::binary_covariance_penalty", mutates_args=())
def _covariance_op(h: Tensor, compute_grad: bool) -> Tuple[Tensor, Tensor]:
    return _covariance_launch(h, compute_grad)


_covariance_op.register_fake(G.covariance_fake)


_covariance_op.register_autograd(G.covariance_backward, setup_context=G.covariance_setup)


# ----------------------------------------------------------------------------- entry points (validated inputs)

def _c(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


def topk_encode(x, weight, bias, k):
    return _topk_encode_op(x.contiguous(), weight.contiguous(), _c(bias), int(k))


def sparse_decode(values, indices, weight, bias):
    return _sparse_decode_op(values.contiguous(), indices.contiguous(), weight.contiguous(), _c(bias))


def binary_encode(x, weight, bias, return_code, ste):
    return _binary_encode_op(x.contiguous(), weight.contiguous(), _c(bias), bool(return_code), int(ste))


def binary_covariance_penalty(h, compute_grad):
    return _covariance_op(h.contiguous(), bool(compute_grad))
