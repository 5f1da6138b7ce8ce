"""Autograd glue shared by the fused circular relative attention ops (the C++ op registered in
fastattn/ops/circular_relative_attention.py and the Triton op in
fastattn/triton/circular_relative_attention.py): one module both import, so neither imports the
other."""
from __future__ import annotations

import torch

from fastattn.reference.raw_terms import circular_relative_attention_raw as _raw_reference


def setup_context(ctx, inputs, output):
    """Autograd context of a fused forward (C++ or Triton op): saves q, k, v, out, lse, ..."""
    q, k, v, table, coords, terms, alpha, scale, causal, kpm, dropout_p, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, table, coords, kpm)
    ctx.args = (terms, alpha, scale, causal, dropout_p, seed)
    ctx.mark_non_differentiable(lse)


def backward_with(kernel):
    """The autograd backward of a fused op whose backward kernel is ``kernel(grad_out, q, k, v,
    out, lse, table, coords, terms, alpha, scale, causal, kpm, dropout_p, seed)``."""
    def _backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse, table, coords, kpm = ctx.saved_tensors
        terms, alpha, scale, causal, dropout_p, seed = ctx.args
        if torch.is_grad_enabled():  # create_graph=True: the kernel's gradients are not differentiable
            return _backward_graph(ctx, grad_out, q, k, v, table, coords, kpm) + (None,) * 8
        dq, dk, dv, dtable = kernel(grad_out.contiguous(), q, k, v, out, lse, table, coords, terms,
                                    alpha, scale, causal, kpm, dropout_p, seed)
        # One gradient per op input: q, k, v, table, then eight non-differentiable arguments.
        return (dq, dk, dv, dtable) + (None,) * 8
    return _backward


def _backward_graph(ctx, grad_out, q, k, v, table, coords, kpm):
    """(dq, dk, dv, dtable) as differentiable functions of the inputs and grad_out, so that double
    backward is exact: autograd through the op's plain-PyTorch formulation (fastattn.reference.
    raw_terms; it materialises [B, H, Lq, Lk] logits, acceptable for higher-order use)."""
    terms, alpha, scale, causal, dropout_p, seed = ctx.args
    inputs = (q, k, v, table)
    wanted = [x for x, need in zip(inputs, ctx.needs_input_grad[:4]) if need]
    with torch.enable_grad():
        out = _raw_reference(q, k, v, table, coords, terms, alpha, scale, causal, kpm, dropout_p, seed)
        grads = iter(torch.autograd.grad(out, wanted, grad_out, create_graph=True, allow_unused=True))
    return tuple(next(grads) if need else None for need in ctx.needs_input_grad[:4])
