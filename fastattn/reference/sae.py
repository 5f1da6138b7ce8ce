"""Sparse-autoencoder ops in plain PyTorch (SPEC §5): the test oracle of the fused backends.

Every function here materialises what the fused kernels avoid (the [N, n] pre-activations,
the [N, k, d] gathered decoder rows, the [n, n] covariance) and keeps the semantics obvious:

- ``topk_encode``: the k largest entries of x·Wᵀ + b per row, sorted descending; ties go to the
  lower latent index (a stable descending sort keeps equal values in index order).
- ``sparse_decode``: Σ_k values[:, k] · W[indices[:, k]] + b.
- ``binary_encode``: code = 1[x·Wᵀ + b > 0] (0 maps to 0), with a selectable straight-through
  estimator for the backward pass; bit-packed code and per-column counts.
- ``binary_covariance_penalty``: Σ_{i≠j} |C_ij| with C the unbiased covariance of the columns.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

# Straight-through estimators of the binarisation (SPEC §5), by name and by the integer the
# compiled ops take. "reference" is the BAE authors' default.
STE_MODES = ("reference", "identity", "sigmoid")


def topk_encode(x: Tensor, weight: Tensor, bias: Optional[Tensor], k: int) -> Tuple[Tensor, Tensor]:
    """x [N, d], weight [n, d], bias [n] or None -> (values [N, k], indices [N, k] int64)."""
    z = x @ weight.t()
    if bias is not None:
        z = z + bias
    values, indices = torch.sort(z, dim=-1, descending=True, stable=True)
    return values[:, :k], indices[:, :k]


def sparse_decode(values: Tensor, indices: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """values [N, k], indices [N, k] int64, weight [n, d], bias [d] or None -> [N, d]."""
    out = (values.unsqueeze(-1) * weight[indices]).sum(1)
    return out if bias is None else out + bias


class _BinarizeSTE(torch.autograd.Function):
    """code = 1[z > 0]; backward passes the incoming gradient g through an STE:
    "reference" g·(1 − g) (the BAE authors' code), "identity" g, "sigmoid" g·σ(z)(1 − σ(z))."""

    @staticmethod
    def forward(ctx, z: Tensor, ste: str) -> Tensor:
        ctx.ste = ste
        ctx.save_for_backward(z if ste == "sigmoid" else None)
        return (z > 0).to(z.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):
        if ctx.ste == "identity":
            return g, None
        if ctx.ste == "reference":
            return g * (1 - g), None
        (z,) = ctx.saved_tensors
        s = torch.sigmoid(z)
        return g * s * (1 - s), None


def binarize(z: Tensor, ste: str = "reference") -> Tensor:
    """1[z > 0] in z's dtype, differentiable through the chosen straight-through estimator."""
    if ste not in STE_MODES:
        raise ValueError(f"ste must be one of {STE_MODES}, got {ste!r}")
    return _BinarizeSTE.apply(z, ste)


def pack_bits(code: Tensor) -> Tensor:
    """code [N, n] of 0/1 (any dtype) -> [N, ceil(n / 8)] uint8; bit b of byte w is column 8w + b
    (numpy ``packbits(..., bitorder="little")``)."""
    N, n = code.shape
    bits = (code != 0).to(torch.uint8)
    pad = (-n) % 8
    if pad:
        bits = torch.cat([bits, bits.new_zeros(N, pad)], 1)
    weights = torch.tensor([1 << b for b in range(8)], dtype=torch.uint8, device=code.device)
    return (bits.view(N, (n + pad) // 8, 8) * weights).sum(-1, dtype=torch.uint8)  # explicit: N may be 0


def unpack_bits(packed: Tensor, n: int) -> Tensor:
    """Inverse of :func:`pack_bits`: [N, ceil(n / 8)] uint8 -> [N, n] bool."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(packed.shape[0], -1)[:, :n].bool()


def binary_encode(x: Tensor, weight: Tensor, bias: Optional[Tensor], ste: str = "reference"
                  ) -> Tuple[Tensor, Tensor, Tensor]:
    """x [N, d], weight [n, d], bias [n] or None -> (code [N, n] in x's dtype (differentiable
    through ``ste``), packed [N, ceil(n / 8)] uint8, counts [n] int64)."""
    z = x @ weight.t()
    if bias is not None:
        z = z + bias
    code = binarize(z, ste)
    return code, pack_bits(code.detach()), (code.detach() != 0).sum(0)


def binary_covariance_penalty(h: Tensor) -> Tensor:
    """h [B, n] -> Σ_{i≠j} |C_ij| (0-dim), C = unbiased covariance of h's columns.

    Written as |B·hᵀh − c·cᵀ| / (B(B − 1)) with c the column sums: for binary h the numerator is
    an integer matrix, so (unlike ``torch.cov``, which centres by an inexact mean) exact zeros
    stay zeros and their subgradient is 0, as in the fused kernels.
    """
    B = h.shape[0]
    c = h.sum(0)
    num = B * (h.t() @ h) - torch.outer(c, c)
    return (num.abs().sum() - num.diagonal().abs().sum()) / (B * (B - 1))


def covariance_penalty_torch_cov(h: Tensor) -> Tensor:
    """The plain-PyTorch formulation the BAE code uses (``torch.cov``): the benchmark baseline."""
    C = torch.cov(h.t()).reshape(h.shape[1], h.shape[1])  # torch.cov squeezes a single column
    return C.abs().sum() - C.diagonal().abs().sum()
