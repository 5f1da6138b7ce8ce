"""Shared by the Triton kernel modules: the GPU generation launchers choose tiles for, and the
dot product with its precision rule.

Tiles that fit one generation's registers and shared memory can spill on another (sm_80's
mma.sync keeps both operands in registers; sm_90's wgmma reads them from shared memory), so
launchers ask :func:`capability` for the device of their tensors. :func:`compile_target`
overrides it (bench/gpu_resources.py compiles for sm_80 and sm_90 from meta tensors without a
GPU; tests run a generation's tiles in the interpreter).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
import triton
import triton.language as tl

_OVERRIDE: Optional[int] = None


def capability(device: torch.device) -> Optional[int]:
    """Compute capability to plan for, as an int (80 for sm_80, 90 for sm_90): the override of
    :func:`compile_target`, else a CUDA device's own, else None (interpreter or meta tensors:
    launchers choose their default tiles)."""
    if _OVERRIDE is not None:
        return _OVERRIDE
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor
    return None


@contextlib.contextmanager
def compile_target(cap: int) -> Iterator[None]:
    """Launchers plan for sm_<cap> inside this block, whatever the tensors' device."""
    global _OVERRIDE
    saved, _OVERRIDE = _OVERRIDE, int(cap)
    try:
        yield
    finally:
        _OVERRIDE = saved


def precision(dtype: torch.dtype, device: torch.device) -> str:
    """``PREC`` for :func:`dot`: fp32 inputs keep fp32 products ("ieee"; tl.dot would otherwise
    use TF32 on NVIDIA GPUs); 16-bit inputs use tensor cores ("tf32" is ignored for them), or
    exact widening in the interpreter ("upcast")."""
    if dtype in (torch.float32, torch.float64):
        return "ieee"
    return "upcast" if device.type == "cpu" else "tf32"


@triton.jit
def dot(a, b, PREC: tl.constexpr):
    """a·b with fp32 accumulation. PREC "upcast" (interpreter, 16-bit inputs) multiplies the
    exactly widened operands: what tensor cores compute, and what the interpreter's own 16-bit
    dot (bf16 read as integers in Triton 3.x) gets wrong."""
    if PREC == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PREC)
