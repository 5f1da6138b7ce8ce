"""Interventions: add a feature's decoder direction into the residual stream, measure perplexity.

The direction of feature f is the decoder's contribution of that feature: TopKSAE ``W_dec[f]``
(a unit-norm row), BinaryAutoencoder ``decoder.weight[:, f]`` (the change of x̂ when bit f turns
on). It is normalised to unit length and added, times ``scale``, at every position ≥ 1 of the
layer's residual stream (fastattn.analyze.hooks.add_to_residual). With ``relative`` scales the
unit direction is multiplied by scale · (mean L2 norm of the residual stream at that layer on
the evaluation tokens), so that scales mean the same at every layer and for every model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fastattn.analyze.hooks import add_to_residual, capture_residual, run_captured
from fastattn.analyze.subjects import Contexts, mean_ppl


def feature_direction(model, feature: int) -> Tensor:
    """Decoder direction [d] of ``feature`` of a TopKSAE or BinaryAutoencoder (not normalised)."""
    from fastattn.sae.modules import BinaryAutoencoder

    n = model.d_hidden if isinstance(model, BinaryAutoencoder) else model.n_latents
    if not 0 <= feature < n:
        raise ValueError(f"feature must be in [0, {n}), got {feature}")
    with torch.no_grad():
        if isinstance(model, BinaryAutoencoder):
            return model.decoder.weight[:, feature].detach().clone()
        return model.W_dec[feature].detach().clone()


@torch.no_grad()
def perplexity(subject, ctx: Contexts, batch_size: int = 8) -> dict:
    """Teacher-forced next-token NLL (nats per token) and perplexity of ``subject`` on ``ctx``."""
    total, count = 0.0, 0
    for b in range(0, len(ctx), batch_size):
        s, c = subject.nll(ctx, slice(b, b + batch_size))
        total, count = total + s, count + c
    return {"nll": total / max(count, 1), "ppl": mean_ppl(total, count), "tokens": count}


@torch.no_grad()
def residual_norm(subject, ctx: Contexts, layer: int, batch_size: int = 8) -> float:
    """Mean L2 norm of the residual stream at ``layer`` over positions ≥ 1 of ``ctx``."""
    norms = []
    for b in range(0, len(ctx), batch_size):
        with capture_residual(subject.model, [layer]) as hs:
            run_captured(lambda b=b: subject.forward(ctx, slice(b, b + batch_size)))
        norms.append(hs[layer][:, 1:].float().norm(dim=-1).flatten())
    return float(torch.cat(norms).mean())


@torch.no_grad()
def intervene(
    subject,
    ctx: Contexts,
    layer: int,
    direction: Tensor,
    scales: Sequence[float],
    *,
    relative: bool = True,
    batch_size: int = 8,
    base: dict | None = None,
) -> dict:
    """Perplexity with scale · unit(direction) added at ``layer``, for every scale.

    A zero direction adds nothing (the unit vector of 0 is taken as 0). Returns the base
    perplexity, the reference norm, and per scale the perplexity and the NLL change (nats/token)."""
    if direction.dim() != 1 or direction.shape[0] != subject.d_model:
        raise ValueError(f"direction must be [{subject.d_model}], got {tuple(direction.shape)}")
    if not torch.isfinite(direction).all():
        raise ValueError("direction has NaN or inf entries")
    norm = direction.norm()
    unit = direction / norm if norm > 0 else torch.zeros_like(direction)
    ref = residual_norm(subject, ctx, layer, batch_size) if relative else 1.0
    base = base or perplexity(subject, ctx, batch_size)
    rows = []
    for s in scales:
        with add_to_residual(subject.model, layer, unit.float() * (float(s) * ref)):
            r = perplexity(subject, ctx, batch_size)
        rows.append(
            {
                "scale": float(s),
                "ppl": r["ppl"],
                "nll": r["nll"],
                "delta_nll": r["nll"] - base["nll"],
                "ppl_ratio": r["ppl"] / base["ppl"],
            }
        )
    return {"layer": layer, "relative": relative, "reference_norm": ref, "base": base, "results": rows}


def random_directions(d: int, n: int, seed: int = 0) -> Tensor:
    """n random unit directions [n, d] (the baseline a feature direction is compared against)."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n, d, generator=g)
    return v / v.norm(dim=1, keepdim=True)
