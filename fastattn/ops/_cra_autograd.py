"""Autograd glue shared by the fused circular relative attention ops (the C++ op registered in
fastattn/ops/circular_relative_attention.py and the Triton op in
fastattn/triton/circular_relative_attention.py): one module both import, so neither imports the
other."""
from __future__ import annotations


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
        dq, dk, dv, dtable = kernel(grad_out.contiguous(), q, k, v, out, lse, table, coords, terms,
                                    alpha, scale, causal, kpm, dropout_p, seed)
        # One gradient per op input: q, k, v, table, then eight non-differentiable arguments.
        return (dq, dk, dv, dtable) + (None,) * 8
    return _backward
