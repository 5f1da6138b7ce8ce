"""Backend choice from declared capabilities.

Each op declares, per backend, a function ``reason(q) -> str | None`` that says why that
backend cannot run the inputs (None = it can). ``backend="auto"`` walks ``PRIORITY`` and takes
the first backend with no reason; an explicitly requested backend that cannot run raises an
error with its reason and never falls back.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

PRIORITY = ("cuda", "triton", "cpp", "reference")
BACKENDS = PRIORITY

Reason = Callable[[torch.Tensor], Optional[str]]


def select(op: str, backend: str, q: torch.Tensor, reasons: Dict[str, Reason]) -> str:
    """Return the backend name to run ``op`` with, or raise saying why none/that one can't."""
    if backend not in BACKENDS and backend != "auto":
        raise ValueError(f"backend must be 'auto' or one of {list(BACKENDS)}, got {backend!r}")
    if backend != "auto":
        why = reasons[backend](q)
        if why is not None:
            raise RuntimeError(f"{op}: backend={backend!r} cannot run these inputs: {why}")
        return backend
    collected = []
    for name in PRIORITY:
        why = reasons[name](q)
        if why is None:
            return name
        collected.append(f"{name}: {why}")
    raise RuntimeError(f"{op}: no backend can run these inputs ({'; '.join(collected)})")


def dtype_device_reason(q: torch.Tensor, devices, dtypes) -> Optional[str]:
    """Common check: None when q's device type and dtype are supported."""
    if q.device.type not in devices:
        return f"runs on {'/'.join(devices)} tensors, got {q.device.type}"
    if q.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        return f"supports dtypes {names}, got {str(q.dtype).replace('torch.', '')}"
    return None
