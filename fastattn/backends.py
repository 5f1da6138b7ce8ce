"""Backend choice from declared capabilities.

Each op declares, per backend, a function ``reason(q) -> str | None`` that says why that
backend cannot run the inputs (None = it can). ``backend="auto"`` walks ``PRIORITY`` and takes
the first backend with no reason (:func:`auto_reason` adds the policy below); an explicitly
requested backend that cannot run raises an error with its reason and never falls back.

Policy for ``auto``: GPU backends whose kernels have not passed the GPU tests on real hardware
(``UNVALIDATED_ON_GPU``; on CPU they are checked by the Triton interpreter and the CUDA
emulator) are passed over, and Triton is never used on CPU tensors (the interpreter is for tests).
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Optional

import torch

PRIORITY = ("cuda", "triton", "cpp", "reference")
BACKENDS = PRIORITY
# Remove a name once `bench/gpu_session.sh test` passes with it on a GPU.
UNVALIDATED_ON_GPU = frozenset({"cuda", "triton"})

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
        why = auto_reason(name, q, reasons)
        if why is None:
            return name
        collected.append(f"{name}: {why}")
    raise RuntimeError(f"{op}: no backend can run these inputs ({'; '.join(collected)})")


def auto_reason(name: str, q: torch.Tensor, reasons: Dict[str, Reason]) -> Optional[str]:
    """Why ``backend="auto"`` does not take ``name`` for inputs like q (None = it does)."""
    why = reasons[name](q)
    if why is None and name == "triton" and q.device.type != "cuda":
        why = "auto uses Triton on CUDA tensors only (the interpreter is for tests)"
    if why is None and name in UNVALIDATED_ON_GPU:
        why = f"not validated on a GPU yet; request backend={name!r} explicitly"
    return why


def dtype_device_reason(q: torch.Tensor, devices, dtypes) -> Optional[str]:
    """Common check: None when q's device type and dtype are supported."""
    if q.device.type not in devices:
        return f"runs on {'/'.join(devices)} tensors, got {q.device.type}"
    if q.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        return f"supports dtypes {names}, got {str(q.dtype).replace('torch.', '')}"
    return None


def triton_interpreting() -> bool:
    """TRITON_INTERPRET=1: Triton kernels run on CPU tensors (read when they are imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_reason(q: torch.Tensor, cuda_dtypes, cpu_dtypes) -> Optional[str]:
    """Common check of the Triton backends: installed, and CUDA tensors (CPU tensors under the
    interpreter) of the kernels' dtypes."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not installed ({exc})"
    if q.device.type == "cpu":
        if not triton_interpreting():
            return "CPU tensors need TRITON_INTERPRET=1 (the Triton interpreter), set before the kernels are imported"
        return dtype_device_reason(q, ("cpu",), cpu_dtypes)
    return dtype_device_reason(q, ("cuda",), cuda_dtypes)
