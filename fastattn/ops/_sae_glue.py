"""Fake kernels and autograd contexts shared by the C++ SAE ops (fastattn/ops/sae.py) and their
Triton twins (fastattn/triton/sae.py): same inputs, same outputs, so the same glue. Only the
backward kernels differ and stay with each backend.

Double backward: the backward kernels are not differentiable themselves, so under
``create_graph=True`` (grad mode on inside backward) the ``*_backward_with`` wrappers compute the
same gradients with the differentiable PyTorch formulas below instead; second derivatives are
then exact. The formulas gather [N, k, d] rows: fine for the rare higher-order use.
"""
from __future__ import annotations

import torch
from torch import Tensor


def topk_backward_graph(grad_values: Tensor, x: Tensor, weight: Tensor, indices: Tensor):
    """(dx [N, d], dweight [n, d], dbias [n]) of values = (x·Wᵀ + b)[rows, indices], differentiably."""
    g = grad_values.to(x.dtype)
    flat = indices.reshape(-1)
    dx = torch.einsum("rk,rkd->rd", g, weight[indices])
    dw = weight.new_zeros(weight.shape).index_add(0, flat, (g.unsqueeze(-1) * x.unsqueeze(1)).reshape(flat.numel(), x.shape[1]))
    db = weight.new_zeros(weight.shape[0]).index_add(0, flat, g.reshape(-1))
    return dx, dw, db


def decode_backward_graph(grad_out: Tensor, values: Tensor, indices: Tensor, weight: Tensor):
    """(dvalues [N, k], dweight [n, d], dbias [d]) of Σ_k values·weight[indices] + b, differentiably."""
    g = grad_out.to(values.dtype)
    dvalues = torch.einsum("rd,rkd->rk", g, weight[indices])
    dw = weight.new_zeros(weight.shape).index_add(
        0, indices.reshape(-1), (values.unsqueeze(-1) * g.unsqueeze(1)).reshape(indices.numel(), weight.shape[1]))
    return dvalues, dw, g.sum(0)


def binary_backward_graph(grad_code: Tensor, x: Tensor, weight: Tensor, bias, ste: int):
    """(dx, dweight, dbias) through the straight-through estimator ``ste`` (0 reference g·(1 − g),
    1 identity, 2 sigmoid on the recomputed pre-activation), differentiably."""
    g = grad_code.to(x.dtype)
    if ste == 1:
        gz = g
    elif ste == 0:
        gz = g * (1 - g)
    else:
        s = torch.sigmoid(x @ weight.t() + (bias if bias is not None else 0))
        gz = g * s * (1 - s)
    return gz @ weight, gz.t() @ x, gz.sum(0)


def covariance_grad_graph(h: Tensor) -> Tensor:
    """d/dh Σ_{i≠j} |C_ij| = 2/(B(B−1)) · (B·h − 1cᵀ) · S with S = sign(B·hᵀh − ccᵀ) off the
    diagonal (0 at exact zeros, like the kernels); differentiable in h (S is piecewise constant)."""
    B = h.shape[0]
    c = h.sum(0)
    S = torch.sign((B * (h.t() @ h) - torch.outer(c, c)).detach())
    S.fill_diagonal_(0)
    return (2.0 / (B * (B - 1))) * (B * h - c) @ S


def topk_backward_with(kernel):
    """The autograd backward of a TopK encoder op whose backward kernel is
    ``kernel(grad_values, x, weight, indices) -> (dx, dweight, dbias)``."""
    def _backward(ctx, grad_values, _grad_indices):
        x, weight, indices = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a differentiable formulation
            dx, dw, db = topk_backward_graph(grad_values, x, weight, indices)
        else:
            dx, dw, db = kernel(grad_values.contiguous(), x, weight, indices)
        return dx, dw, (db if ctx.has_bias else None), None
    return _backward


def decode_backward_with(kernel):
    """The autograd backward of a sparse decoder op whose backward kernel is
    ``kernel(grad_out, values, indices, weight) -> (dvalues, dweight, dbias)``."""
    def _backward(ctx, grad_out):
        values, indices, weight = ctx.saved_tensors
        if torch.is_grad_enabled():
            dv, dw, db = decode_backward_graph(grad_out, values, indices, weight)
        else:
            dv, dw, db = kernel(grad_out.contiguous(), values, indices, weight)
        return dv, None, dw, (db if ctx.has_bias else None)
    return _backward


def topk_fake(x, weight, bias, k):
    torch._check(x.dim() == 2 and weight.dim() == 2 and weight.shape[1] == x.shape[1])
    torch._check(1 <= k <= weight.shape[0])
    return x.new_empty((x.shape[0], k)), x.new_empty((x.shape[0], k), dtype=torch.long)


def topk_setup(ctx, inputs, output):
    x, weight, bias, _k = inputs
    _values, indices = output
    ctx.save_for_backward(x, weight, indices)
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(indices)


def decode_fake(values, indices, weight, bias):
    torch._check(values.dim() == 2 and indices.shape == values.shape and weight.dim() == 2)
    return values.new_empty((values.shape[0], weight.shape[1]))


def decode_setup(ctx, inputs, output):
    values, indices, weight, bias = inputs
    ctx.save_for_backward(values, indices, weight)
    ctx.has_bias = bias is not None


def binary_encode_fake(x, weight, bias, return_code, ste):
    torch._check(x.dim() == 2 and weight.dim() == 2 and weight.shape[1] == x.shape[1])
    N, n = x.shape[0], weight.shape[0]
    return (x.new_empty((N, n if return_code else 0)), x.new_empty((N, (n + 7) // 8), dtype=torch.uint8),
            x.new_empty((n,), dtype=torch.long))


def binary_encode_setup(ctx, inputs, output):
    x, weight, bias, _return_code, ste = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.ste = ste
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(output[1], output[2])


def covariance_fake(h, compute_grad):
    torch._check(h.dim() == 2)
    return h.new_empty(()), h.new_empty((h.shape[0] if compute_grad else 0, h.shape[1]))


def covariance_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], output[1])
    ctx.mark_non_differentiable(output[1])


def covariance_backward(ctx, grad_value, _grad_unit):
    h, unit = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: the saved gradient is a constant; recompute it
        return grad_value * covariance_grad_graph(h), None
    if unit.shape[0] == 0:
        raise RuntimeError("binary_covariance_penalty was called with compute_grad=False; "
                           "call it with compute_grad=True to differentiate it")
    # The forward pass already computed d(penalty)/dh in the same tiles (one pass, not two).
    return grad_value * unit, None
