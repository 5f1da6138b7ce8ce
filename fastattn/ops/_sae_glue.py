"""Fake kernels and autograd contexts shared by the C++ SAE ops (fastattn/ops/sae.py) and their
Triton twins (fastattn/triton/sae.py): same inputs, same outputs, so the same glue. Only the
backward kernels differ and stay with each backend."""
from __future__ import annotations

import torch


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
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])


def covariance_backward(ctx, grad_value, _grad_unit):
    (unit,) = ctx.saved_tensors
    if unit.shape[0] == 0:
        raise RuntimeError("binary_covariance_penalty was called with compute_grad=False; "
                           "call it with compute_grad=True to differentiate it")
    # The forward pass already computed d(penalty)/dh in the same tiles (one pass, not two).
    return grad_value * unit, None
