"""Counter-based dropout mask shared by every backend.

The keep/drop decision for (batch b, head h, query i, key j) is a pure function of
(seed, b*H + h, i, j), so the backward pass (and every backend) regenerates exactly the
mask the forward pass used without storing it. The same integer recipe lives in
``csrc/include/cra_common.h`` (``cra_dropout_keep``); keep the two in sync.

All arithmetic stays below 2**63 so int64 tensors reproduce the uint32 recipe exactly:
values are masked to 32 bits and multiplied by constants < 2**31.
"""
from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
_C1 = 0x7FEB352D
_C2 = 0x2C1B3C6D
_GOLDEN = 0x9E3779B9


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = (x * _C1) & _M32
    x = x ^ (x >> 15)
    x = (x * _C2) & _M32
    return x ^ (x >> 16)


def dropout_threshold(p: float) -> int:
    """24-bit threshold: an element is dropped when its 24-bit hash is below it."""
    return min(int(p * (1 << 24)), 1 << 24)  # floor: exactly what the C++/CUDA cast gives


def dropout_keep_mask(seed: int, B: int, H: int, Lq: int, Lk: int, p: float,
                      device=None) -> torch.Tensor:
    """Bool keep-mask [B, H, Lq, Lk] for dropout probability ``p`` and a 32-bit ``seed``."""
    bh = torch.arange(B * H, device=device, dtype=torch.int64).view(B, H, 1, 1)
    i = torch.arange(Lq, device=device, dtype=torch.int64).view(1, 1, Lq, 1)
    j = torch.arange(Lk, device=device, dtype=torch.int64).view(1, 1, 1, Lk)
    h = _mix32((seed & _M32) ^ _mix32((bh + _GOLDEN) & _M32))
    h = _mix32((h + i) & _M32)
    h = _mix32((h + j) & _M32)
    return (h >> 8) >= dropout_threshold(p)


def new_seed() -> int:
    """A 31-bit seed drawn from torch's default generator (so torch.manual_seed reproduces it)."""
    return int(torch.randint(0, 2**31 - 1, (1,)).item())
