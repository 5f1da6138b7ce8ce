"""Sparse-autoencoder ops (SPEC §5): public functions, fake and autograd registration, dispatch.

Four ops, each with ``reference`` (plain PyTorch, fastattn/reference/sae.py), ``cpp`` (C++ and
OpenMP, csrc/cpu/sae_kernels.cpp, schemas in csrc/cpu/sae_ops.cpp) and ``triton``
(fastattn/triton/sae.py) backends, and ``cuda`` (csrc/cuda/sae.cu, glue csrc/cuda/sae_glue.cpp) in
CUDA builds.

- :func:`topk_encode`  x [N, d], W [n, d], b [n] -> (values [N, k], indices [N, k])
- :func:`sparse_decode` values [N, k], indices [N, k], W [n, d], b [d] -> [N, d]
- :func:`binary_encode` x [N, d], W [n, d], b [n] -> (code [N, n], packed [N, ⌈n/8⌉] uint8, counts [n])
- :func:`binary_covariance_penalty` h [B, n] -> Σ_{i≠j} |C_ij| (0-dim)

``backend="auto"`` takes the first of cuda, triton, cpp, reference that can run the inputs,
with the policy of :mod:`fastattn.backends` (GPU backends not yet validated on a GPU are taken by
name only; Triton runs CPU tensors only when asked for by name under ``TRITON_INTERPRET=1``).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from fastattn import _ext
from fastattn.backends import dtype_device_reason, select, triton_reason
from fastattn.ops import _sae_glue as G
from fastattn.reference import sae as _ref

STE_MODES = _ref.STE_MODES
_STE_CODE = {name: i for i, name in enumerate(STE_MODES)}
_CPU_DTYPES = (torch.float32, torch.float64)
_TRITON_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
OPS = ("topk_encode", "sparse_decode", "binary_encode", "binary_covariance_penalty")


class TopK(NamedTuple):
    """Output of :func:`topk_encode`."""
    values: Tensor   # [N, k] pre-activations, descending per row
    indices: Tensor  # [N, k] int64 latent indices (ties: lower index first)


class BinaryCode(NamedTuple):
    """Output of :func:`binary_encode`."""
    code: Tensor     # [N, n] 0/1 in x's dtype (differentiable through the STE); [N, 0] if not requested
    packed: Tensor   # [N, ceil(n / 8)] uint8, bit b of byte w = column 8w + b
    counts: Tensor   # [n] int64, ones per column (the entropy reduction)


# ----------------------------------------------------------------------------- registration

def _have_compiled_ops() -> bool:
    """True when the loaded extension contains the SAE kernels (an older build may not)."""
    if _ext.extension() is None:
        return False
    try:
        torch.ops.fastattn.topk_encode  # noqa: B018 (attribute lookup raises when missing)
        return True
    except (AttributeError, RuntimeError):
        return False


HAVE_COMPILED = _have_compiled_ops()

if HAVE_COMPILED:

    torch.library.register_fake("fastattn::topk_encode")(G.topk_fake)

    @torch.library.register_fake("fastattn::topk_encode_backward")
    def _topk_bwd_fake(grad_values, x, weight, indices):
        return torch.empty_like(x), torch.empty_like(weight), weight.new_empty((weight.shape[0],))

    torch.library.register_autograd("fastattn::topk_encode", G.topk_backward_with(torch.ops.fastattn.topk_encode_backward),
                                    setup_context=G.topk_setup)

    torch.library.register_fake("fastattn::sparse_decode")(G.decode_fake)

    @torch.library.register_fake("fastattn::sparse_decode_backward")
    def _decode_bwd_fake(grad_out, values, indices, weight):
        return torch.empty_like(values), torch.empty_like(weight), weight.new_empty((weight.shape[1],))

    torch.library.register_autograd("fastattn::sparse_decode",
                                    G.decode_backward_with(torch.ops.fastattn.sparse_decode_backward),
                                    setup_context=G.decode_setup)

    torch.library.register_fake("fastattn::binary_encode")(G.binary_encode_fake)

    @torch.library.register_fake("fastattn::binary_encode_backward")
    def _bin_bwd_fake(grad_code, x, weight, bias, ste):
        return torch.empty_like(x), torch.empty_like(weight), weight.new_empty((weight.shape[0],))

    def _bin_backward(ctx, grad_code, _gp, _gc):
        x, weight, bias = ctx.saved_tensors
        if grad_code.shape[1] == 0:  # the code was not returned: nothing flows back
            return torch.zeros_like(x), torch.zeros_like(weight), (torch.zeros_like(bias) if ctx.has_bias else None), None, None
        if torch.is_grad_enabled():  # create_graph=True: a differentiable formulation (see _sae_glue)
            dx, dw, db = G.binary_backward_graph(grad_code, x, weight, bias, ctx.ste)
        else:
            dx, dw, db = torch.ops.fastattn.binary_encode_backward(grad_code.contiguous(), x, weight, bias, ctx.ste)
        return dx, dw, (db if ctx.has_bias else None), None, None

    torch.library.register_autograd("fastattn::binary_encode", _bin_backward, setup_context=G.binary_encode_setup)

    torch.library.register_fake("fastattn::binary_covariance_penalty")(G.covariance_fake)
    torch.library.register_autograd("fastattn::binary_covariance_penalty", G.covariance_backward,
                                    setup_context=G.covariance_setup)


# ----------------------------------------------------------------------------- backends

def _cpp_reason(x: Tensor) -> Optional[str]:
    if not HAVE_COMPILED:
        return _ext.extension_error() or "the loaded extension has no SAE kernels (rebuild it)"
    return dtype_device_reason(x, ("cpu",), _CPU_DTYPES)


_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _cuda_reason(x: Tensor) -> Optional[str]:
    """csrc/cuda/sae.cu: fp32 (SIMT) and fp16/bf16 (tensor cores, fp32 accumulation), any shape."""
    if not _ext.has_backend("cuda"):
        return "no CUDA kernels in this build (CPU-only build, or FASTATTN_NO_CUDA=1)"
    if not HAVE_COMPILED:
        return _ext.extension_error() or "the loaded extension has no SAE kernels (rebuild it)"
    return dtype_device_reason(x, ("cuda",), _CUDA_DTYPES)


def _triton_reason(x: Tensor) -> Optional[str]:
    return triton_reason(x, _TRITON_CUDA_DTYPES, (torch.float32,))


REASONS = {"cuda": _cuda_reason, "triton": _triton_reason, "cpp": _cpp_reason, "reference": lambda x: None}


def choose_backend(op: str, backend: str, x: Tensor) -> str:
    """The backend that runs ``op`` on inputs like ``x`` (see module docstring), or an error."""
    return select(op, backend, x, REASONS)


def _triton():
    from fastattn.triton import sae as triton_sae  # imports triton: only when asked for
    return triton_sae


# ----------------------------------------------------------------------------- validation

def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _check_tensor(name: str, t, dim: int, like: Optional[Tensor] = None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if like is None:
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {_dtype_name(t.dtype)}")
        return
    if t.dtype != like.dtype:
        raise TypeError(f"{name} dtype {_dtype_name(t.dtype)} does not match {_dtype_name(like.dtype)}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device}, expected {like.device}")


def _check_finite(name: str, t: Tensor) -> None:
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")


def _check_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], check_finite: bool) -> int:
    _check_tensor("x", x, 2)
    _check_tensor("weight", weight, 2, like=x)
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight must be [n, d] with d = {x.shape[1]} (x's width), got {tuple(weight.shape)}")
    if bias is not None:
        _check_tensor("bias", bias, 1, like=x)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must be [n] with n = {weight.shape[0]}, got {tuple(bias.shape)}")
    if check_finite:
        _check_finite("x", x)
    return weight.shape[0]


# ----------------------------------------------------------------------------- public ops

def topk_encode(x: Tensor, weight: Tensor, bias: Optional[Tensor], k: int, *, backend: str = "auto",
                check_finite: bool = True) -> TopK:
    """The k largest pre-activations x·Wᵀ + b of every row, without writing the [N, n] matrix.

    x [N, d], weight [n, d] (rows are latents, ``nn.Linear`` layout), bias [n] or None, 1 <= k <= n.
    Returns ``TopK(values [N, k], indices [N, k] int64)``, each row sorted by value descending
    with ties broken by the lower latent index. Differentiable in x, weight and bias; the
    backward pass touches only the k selected latents of every row.
    """
    n = _check_linear(x, weight, bias, check_finite)
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n = {n}], got {k}")
    name = choose_backend("topk_encode", backend, x)
    if name == "reference":
        return TopK(*_ref.topk_encode(x, weight, bias, k))
    if name == "triton":
        return TopK(*_triton().topk_encode(x, weight, bias, k))
    b = None if bias is None else bias.contiguous()
    return TopK(*torch.ops.fastattn.topk_encode(x.contiguous(), weight.contiguous(), b, k))


def sparse_decode(values: Tensor, indices: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *,
                  backend: str = "auto", check_indices: bool = True) -> Tensor:
    """x̂ = Σ_k values[:, k] · weight[indices[:, k]] + bias (an embedding bag with weights).

    values [N, k] float, indices [N, k] int64 in [0, n), weight [n, d], bias [d] or None.
    Returns [N, d]. Differentiable in values, weight and bias.
    """
    _check_tensor("values", values, 2)
    _check_tensor("weight", weight, 2, like=values)
    if not isinstance(indices, Tensor) or indices.dtype != torch.long:
        raise TypeError("indices must be an int64 tensor"
                        + (f", got {_dtype_name(indices.dtype)}" if isinstance(indices, Tensor) else ""))
    if indices.shape != values.shape:
        raise ValueError(f"indices must have the shape of values {tuple(values.shape)}, got {tuple(indices.shape)}")
    if bias is not None:
        _check_tensor("bias", bias, 1, like=values)
        if bias.shape[0] != weight.shape[1]:
            raise ValueError(f"bias must be [d] with d = {weight.shape[1]}, got {tuple(bias.shape)}")
    if check_indices and indices.numel() and not torch.compiler.is_compiling():
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= weight.shape[0]:
            raise ValueError(f"indices must be in [0, {weight.shape[0]}), got values in [{lo}, {hi}]")
    name = choose_backend("sparse_decode", backend, values)
    if name == "reference":
        return _ref.sparse_decode(values, indices, weight, bias)
    if name == "triton":
        return _triton().sparse_decode(values, indices, weight, bias)
    b = None if bias is None else bias.contiguous()
    return torch.ops.fastattn.sparse_decode(values.contiguous(), indices.contiguous(), weight.contiguous(), b)


def binary_encode(x: Tensor, weight: Tensor, bias: Optional[Tensor], *, ste: str = "reference",
                  return_code: bool = True, backend: str = "auto", check_finite: bool = True) -> BinaryCode:
    """h = 1[x·Wᵀ + b > 0] with its bit-packed form and per-column counts, in one pass.

    x [N, d], weight [n, d], bias [n] or None. Returns ``BinaryCode(code [N, n] in x's dtype,
    packed [N, ceil(n / 8)] uint8, counts [n] int64)``; with ``return_code=False`` the code is
    [N, 0] and only the packed bits and counts are written (entropy estimation). The code is
    differentiable through the straight-through estimator ``ste``: "reference" (the BAE authors'
    code: incoming gradient g becomes g·(1 − g)), "identity" (g) or "sigmoid" (g·σ(z)(1 − σ(z))).
    """
    _check_linear(x, weight, bias, check_finite)
    if ste not in STE_MODES:
        raise ValueError(f"ste must be one of {STE_MODES}, got {ste!r}")
    name = choose_backend("binary_encode", backend, x)
    if name == "reference":
        code, packed, counts = _ref.binary_encode(x, weight, bias, ste)
        return BinaryCode(code if return_code else code[:, :0], packed, counts)
    if name == "triton":
        return BinaryCode(*_triton().binary_encode(x, weight, bias, return_code, _STE_CODE[ste]))
    b = None if bias is None else bias.contiguous()
    return BinaryCode(*torch.ops.fastattn.binary_encode(x.contiguous(), weight.contiguous(), b,
                                                        bool(return_code), _STE_CODE[ste]))


def binary_covariance_penalty(h: Tensor, *, backend: str = "auto", check_finite: bool = True) -> Tensor:
    """Σ_{i≠j} |C_ij| of h [B, n] (B >= 2), C the unbiased covariance of the columns; 0-dim.

    Fused backends tile the Gram matrix and never hold the [n, n] covariance; for binary h they
    are exact up to the final division (integer numerators in double). The gradient (sign(C)
    off the diagonal) is computed in the same pass when h requires grad.
    """
    _check_tensor("h", h, 2)
    if h.shape[0] < 2:
        raise ValueError(f"h needs at least 2 rows (B - 1 divides the covariance), got {h.shape[0]}")
    if check_finite:
        _check_finite("h", h)
    name = choose_backend("binary_covariance_penalty", backend, h)
    if name == "reference":
        return _ref.binary_covariance_penalty(h)
    grad = h.requires_grad and torch.is_grad_enabled()
    if name == "triton":
        return _triton().binary_covariance_penalty(h, grad)[0]
    return torch.ops.fastattn.binary_covariance_penalty(h.contiguous(), grad)[0]
