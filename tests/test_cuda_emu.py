"""The CUDA emulator itself (csrc/include/fa_cuda.h): warp collectives, barriers, atomics, WMMA."""
from __future__ import annotations

import pytest
import torch

from fastattn import _cuda_emu

why = _cuda_emu.available("selftest")
pytestmark = pytest.mark.skipif(why is not None, reason=str(why))


@pytest.fixture(scope="module")
def emu():
    return _cuda_emu.load("selftest")


def test_warp_and_block_primitives(emu):
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    out = emu.warp_block(x)
    for b in range(3):
        v = x[b]
        torch.testing.assert_close(out[b, 0], v.sum(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[b, 1], v[:32].sum(), rtol=1e-5, atol=1e-5)
        assert out[b, 2] == v[32 + 7]
        assert out[b, 3] == v[4]
        assert out[b, 4] == (v[:32] > 0).sum()
        torch.testing.assert_close(out[b, 5], v.sum(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[b, 6], v[:48].sum(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_wmma_matches_matmul(emu, dtype):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(16, 16, generator=g).to(dtype)
    b = torch.randn(16, 16, generator=g).to(dtype)
    c = emu.wmma_matmul(a.contiguous(), b.t().contiguous())
    torch.testing.assert_close(c, a.float() @ b.float(), rtol=1e-5, atol=1e-5)


def test_hardware_limits_are_enforced(emu):
    with pytest.raises(RuntimeError, match="not 32-byte aligned"):
        emu.faults(0)
    with pytest.raises(RuntimeError, match="above 48 KB needs FA_SET_MAX_DYNAMIC_SMEM"):
        emu.faults(1)
