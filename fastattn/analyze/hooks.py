"""Residual-stream access through forward hooks, the same for Hugging Face models and ours.

Layer numbering (used by collection and interventions alike): layer L is the residual stream
after L blocks, i.e. layer 0 is the input of block 0 (embeddings) and layer L ≥ 1 is the output
of block L − 1. For a post-LN encoder such as BERT/MiniLM this equals ``hidden_states[L]``; for
GPT-2 it does too except at the last layer, where Hugging Face's ``hidden_states[-1]`` has the
final LayerNorm applied and ours does not (it is the residual stream itself).

Hidden tensors are [B, C, d] (batch, context, width).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager

import torch
from torch import Tensor, nn


class _StopForward(Exception):
    """Raised by a capture hook once the deepest requested layer is stored (saves the rest)."""


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The Transformer blocks of ``model``: ``model.blocks`` when it has one (our music model),
    else the ModuleList whose length equals the config's layer count (GPT-2 ``transformer.h``,
    BERT ``encoder.layer``, Llama ``model.layers``, ...)."""
    if isinstance(getattr(model, "blocks", None), nn.ModuleList):
        return model.blocks
    cfg = getattr(model, "config", None)
    n = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    if n is None:
        raise ValueError(
            f"{type(model).__name__}: no .blocks and no config.num_hidden_layers; "
            "cannot locate the Transformer blocks"
        )
    found = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) == n and len({type(c) for c in m}) == 1
    ]
    if not found:
        raise ValueError(f"{type(model).__name__}: no ModuleList of {n} identical blocks found")
    return found[0][1]  # the outermost one (named_modules is pre-order)


def n_layers(model: nn.Module) -> int:
    """Number of blocks; valid layers are 0 … n_layers."""
    return len(find_blocks(model))


def check_layers(model: nn.Module, layers: Iterable[int]) -> list:
    n = n_layers(model)
    layers = sorted({int(x) for x in layers})
    if not layers or layers[0] < 0 or layers[-1] > n:
        raise ValueError(f"layers must be in 0 … {n} (residual stream after L of {n} blocks), got {layers}")
    return layers


def _edit_hook(blocks: nn.ModuleList, layer: int, fn: Callable[[Tensor], Tensor | None]):
    """Register ``fn`` on the residual stream at ``layer``; fn may return a replacement tensor."""
    if layer == 0:

        def pre(_mod, args, kwargs):
            if args:
                new = fn(args[0])
                return None if new is None else ((new, *args[1:]), kwargs)
            new = fn(kwargs["hidden_states"])
            return None if new is None else (args, {**kwargs, "hidden_states": new})

        return blocks[0].register_forward_pre_hook(pre, with_kwargs=True)

    def post(_mod, _args, out):
        if isinstance(out, tuple):  # older transformers blocks return (hidden, ...)
            new = fn(out[0])
            return None if new is None else (new, *out[1:])
        return fn(out)

    return blocks[layer - 1].register_forward_hook(post)


@contextmanager
def capture_residual(model: nn.Module, layers: Iterable[int], stop_after: bool = True):
    """Inside the context, every forward stores the residual stream of each layer in the yielded
    dict (layer → [B, C, d], detached). With ``stop_after`` the forward is cut short after the
    deepest layer; call it through :func:`run_captured` then."""
    blocks = find_blocks(model)
    layers = check_layers(model, layers)
    store: dict[int, Tensor] = {}
    last = layers[-1]
    handles = []
    for L in layers:

        def fn(h, L=L):
            store[L] = h.detach()
            if stop_after and L == last:
                raise _StopForward

        handles.append(_edit_hook(blocks, L, fn))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def run_captured(forward: Callable[[], object]) -> None:
    """Run ``forward()`` under :func:`capture_residual`, swallowing the early stop."""
    try:
        forward()
    except _StopForward:
        pass


@contextmanager
def add_to_residual(model: nn.Module, layer: int, vector: Tensor, from_position: int = 1):
    """Inside the context, ``vector`` [d] is added to the residual stream at ``layer`` at every
    position ≥ ``from_position`` (default 1: the BOS position is left alone, as it is dropped
    from collection). Works with any batch size and context length."""
    blocks = find_blocks(model)
    check_layers(model, [layer])
    if vector.dim() != 1:
        raise ValueError(f"vector must be 1-D [d], got shape {tuple(vector.shape)}")

    def fn(h: Tensor) -> Tensor:
        if h.shape[-1] != vector.shape[0]:
            raise ValueError(f"vector has width {vector.shape[0]} but layer {layer} has width {h.shape[-1]}")
        add = torch.zeros_like(h)
        add[:, from_position:] = vector.to(h.dtype)
        return h + add

    handle = _edit_hook(blocks, layer, fn)
    try:
        yield
    finally:
        handle.remove()
