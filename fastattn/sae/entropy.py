"""Entropy of binary codes and the synthetic random-direction benchmark (SPEC §5).

- :func:`binary_entropy_bits`: h2(p) = −p·log2 p − (1 − p)·log2(1 − p), exactly 0 at p ∈ {0, 1}.
- :func:`entropy_loss_bits`: the differentiable training term Σ_j h2(p_j), with ``eps`` inside the
  logarithms so its gradient stays finite where a latent never (or always) fires.
- :func:`estimate_entropy_bits`: the entropy estimate of a set of vectors, Σ_j h2(p_j) with p the
  firing frequency over the whole set; streamed in batches through the fused binary encoder,
  which returns only per-column counts (no code is written).
- :func:`random_direction_data`: x = c·M with an orthonormal M ∈ R^{r×d} and fair coins c ∈ {0,1}^r,
  whose true entropy is r bits; :func:`refit_fvu`: whether a BAE's code of such data is lossless.
"""
from __future__ import annotations

import math
from typing import Iterable, NamedTuple, Optional

import torch
from torch import Tensor

LOSS_EPS = 1e-10
SYNTHETIC_SAMPLES = 65_536
SYNTHETIC_TRAIN = 52_428  # 80% of 65,536, as in the BAE paper


def binary_entropy_bits(p: Tensor) -> Tensor:
    """Elementwise h2(p) in bits for p in [0, 1]; 0 at the ends (xlogy(0, 0) = 0)."""
    q = 1 - p
    return -(torch.special.xlogy(p, p) + torch.special.xlogy(q, q)) / math.log(2)


def entropy_loss_bits(p: Tensor, eps: float = LOSS_EPS) -> Tensor:
    """Σ_j h2(p_j) for a batch's firing rates p [n], differentiable with finite gradients."""
    return -(p * torch.log2(p + eps) + (1 - p) * torch.log2(1 - p + eps)).sum()


def entropy_from_counts(counts: Tensor, total: int) -> float:
    """Σ_j h2(counts_j / total) in bits (counts [n] int64 from the binary encoder)."""
    if total <= 0:
        raise ValueError("entropy_from_counts: total must be positive")
    return float(binary_entropy_bits(counts.double() / total).sum())


@torch.no_grad()
def estimate_entropy_bits(model, batches: Iterable[Tensor]) -> float:
    """Entropy estimate of a set of vectors (SPEC §5): Σ_j h2(p_j), p_j = firing frequency of
    latent j of the BAE ``model`` over every vector of ``batches`` (tensors [B, d])."""
    counts, total = None, 0
    for x in batches:
        c = model.encode_counts(x)
        counts = c if counts is None else counts + c
        total += x.shape[0]
    if counts is None:
        raise ValueError("estimate_entropy_bits: no data")
    return entropy_from_counts(counts, total)


@torch.no_grad()
def refit_fvu(model, train: Tensor, test: Tensor) -> float:
    """Held-out FVU of the best linear decoder of ``model``'s binary code: least squares (with a
    bias) from the codes of ``train`` [N, d] to ``train``, applied to the codes of ``test``. Near 0
    when the code is lossless, whatever the state of the model's own decoder."""
    def design(x):
        h = (model.preactivation(x) > 0).double()
        return torch.cat([h, torch.ones(h.shape[0], 1, dtype=torch.float64)], 1)

    sol = torch.linalg.lstsq(design(train), train.double(), driver="gelsd").solution
    err = (design(test) @ sol - test.double()).pow(2).sum()
    return float(err / (test.double() - test.double().mean(0)).pow(2).sum().clamp_min(1e-300))


class RandomDirections(NamedTuple):
    """The synthetic benchmark's data: x = c·M."""
    x: Tensor       # [samples, d] float32
    coins: Tensor   # [samples, r] 0/1 (uint8)
    basis: Tensor   # [r, d] orthonormal rows
    n_train: int    # the first n_train rows are the training split

    @property
    def train(self) -> Tensor:
        return self.x[: self.n_train]

    @property
    def test(self) -> Tensor:
        return self.x[self.n_train:]


def random_direction_data(rank: int, dim: int, samples: int = SYNTHETIC_SAMPLES,
                          n_train: Optional[int] = None, seed: int = 0) -> RandomDirections:
    """Orthonormal M ∈ R^{rank×dim} (QR of a Gaussian matrix), fair coins c ∈ {0,1}^rank,
    x = c·M. True entropy: ``rank`` bits. Default split: 52,428 of 65,536 for training."""
    if not 1 <= rank <= dim:
        raise ValueError(f"rank must be in [1, dim = {dim}], got {rank}")
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, rank, generator=g, dtype=torch.float64))
    basis = q.t().contiguous()  # [rank, dim], orthonormal rows
    coins = torch.randint(0, 2, (samples, rank), generator=g, dtype=torch.uint8)
    x = (coins.double() @ basis).float()
    if n_train is None:
        n_train = round(samples * SYNTHETIC_TRAIN / SYNTHETIC_SAMPLES)
    return RandomDirections(x, coins, basis.float(), n_train)
