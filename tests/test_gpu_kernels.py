"""GPU kernels without a GPU: NaN propagation (Triton interpreter, CUDA emulator), the tiles of
each GPU generation run in the interpreter, and the ahead-of-time resource report's parsing.
(The compile-for-sm_80/sm_90 gate itself is `bench/gpu_resources.py --quick --check` in CI.)"""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import fastattn  # noqa: E402
from helpers import assert_close, lowp_compare, make_problem, run  # noqa: E402
from test_circular_relative_attention import _emu_cra, compare, needs_emu, needs_triton  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BACKENDS = [pytest.param("triton", marks=needs_triton), pytest.param(_emu_cra, marks=needs_emu, id="cuda-emu")]


def _forward(backend, q, k, v, onset, pitch, kw):
    op = backend if callable(backend) else functools.partial(fastattn.circular_relative_attention, backend=backend)
    with torch.no_grad():
        return op(q, k, v, onset, pitch, **kw)


def _poison(case, q, k, v, kw, b=1, h=1, at=3):
    """Make one (b, h) diverge: NaN in q row `at`, k or v row `at`, a table row, or logits that
    overflow to +inf (q = k = 1e20) or -inf (q = 1e20, k = -1e20). Returns the key index
    whose visibility decides which rows must be NaN (or None: the whole (b, h) block)."""
    with torch.no_grad():
        if case == "q":
            q[b, h, min(at, q.shape[2] - 1)] = float("nan")
        elif case in ("k", "v"):
            (k if case == "k" else v)[b, h, at] = float("nan")
        elif case == "table":
            kw["bar_table"][1] = float("nan")  # Δbar = 0 (bar_min = -1): pairs less than a bar apart
        elif case in ("overflow", "-overflow"):
            q[b, h] = 1e20
            k[b, h] = 1e20 if case == "overflow" else -1e20
    return at if case in ("k", "v") else None


CASES = [(c, 9, 9) for c in ("q", "k", "v", "table", "overflow", "-overflow")] + \
    [(c, 1, 300) for c in ("k", "-overflow")]  # decoding: the split-key path and its merge


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case,Lq,Lk", CASES, ids=[f"{c}-{'decode' if lq == 1 else 'train'}" for c, lq, _ in CASES])
def test_divergence_gives_nan_never_zeros(backend, case, Lq, Lk):
    """NaN inputs, a NaN table row and overflowing logits give NaN outputs where the reference
    has NaN (divergence is never hidden as zeros); the other rows stay as the reference's. For
    a NaN in v the reference is NaN in every row (0·NaN in P·V); a kernel skips keys a row
    cannot see, so only rows that see the key must be NaN. Decoding runs the split-key path."""
    q, k, v, onset, pitch, kw, _ = make_problem(B=2, H=2, Lq=Lq, Lk=Lk, D=16, terms="all", grad=False, kpm=True)
    kw["key_padding_mask"][:, 3] = False  # key 3 visible
    key = _poison(case, q, k, v, kw)
    out_r = _forward("reference", q, k, v, onset, pitch, kw)
    out = _forward(backend, q, k, v, onset, pitch, kw)
    assert torch.isnan(out).any()
    if case != "v":
        assert_close(f"{case}: out", out, out_r, 1e-4)
        return
    pos = torch.arange(Lq) + (Lk - Lq)
    sees = pos >= key  # causal, key visible
    assert torch.isnan(out[1, 1, sees]).all(dim=-1).all()
    assert_close("other heads", out[:, 0], out_r[:, 0], 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_reaches_the_gradients(backend):
    """A NaN in q makes the gradients NaN, not zeros."""
    prob = make_problem(B=1, H=2, Lq=9, Lk=9, D=16, terms="all")
    q = prob[0]
    with torch.no_grad():
        q[0, 1, 4] = float("nan")
    _, grads = run(backend, *prob)
    assert torch.isnan(grads[0][0, 1]).any() and torch.isnan(grads[1][0, 1]).any()
    assert torch.isfinite(grads[0][0, 0]).all()


@needs_triton
@pytest.mark.parametrize("dtype, D", [(torch.float32, 16), (torch.float32, 128), (torch.bfloat16, 16)])
def test_triton_attention_gpu_tiles(dtype, D):
    """What a GPU runs (bench/gpu_resources.py checks its registers): the GPU tiles (fp32: 32 query
    rows and 8 warps, 16 x 16 tiles and 16-row table slices at D = 128; 16-bit: 64-row forward
    tiles) and the two-pass backward, in the interpreter, match the reference (forward and every
    gradient; several query and key tiles, partial tiles, the index band across tiles)."""
    from fastattn.triton._common import compile_target
    cfg = dict(terms="all", B=1, H=1, Lq=70, Lk=101, D=D, kpm=True)
    with compile_target(90):
        if dtype == torch.float32:
            compare("triton", dtype, **cfg)
        else:
            lowp_compare("triton", dtype, **cfg)


@needs_triton
def test_triton_sae_gpu_tiles():
    """The SAE kernels with the tensor-core tiles and 16-bit inputs (interpreter: exact widening)
    against fp32 computations on the same rounded inputs."""
    import fastattn.ops.sae as S
    from fastattn.triton import sae as tsae
    from fastattn.triton._common import compile_target
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 32, generator=g).bfloat16()
    W = torch.randn(130, 32, generator=g).bfloat16()
    b = torch.randn(130, generator=g).bfloat16()
    with compile_target(90):
        vals, idx = tsae._topk_encode_launch(x, W, b, 8)
        code, packed, counts = tsae._binary_encode_launch(x, W, b, True)
        h = (torch.rand(20, 130, generator=g) < 0.5).bfloat16()
        pen, dh = tsae._covariance_launch(h, True)
    z = x.float() @ W.float().t() + b.float()
    picked = z.gather(1, idx)
    assert (picked - z.topk(8, dim=1).values).abs().max() <= 1e-4 * z.abs().max()  # the top 8, in order
    assert_close("topk values", vals.float(), picked.bfloat16().float(), 0.0, rtol=2 ** -7)
    assert torch.equal(code.float(), (z > 0).float()) and torch.equal(counts, (z > 0).sum(0))
    hr = h.float().requires_grad_()
    want_pen = S.binary_covariance_penalty(hr, backend="reference")
    want_pen.backward()
    assert_close("penalty", pen.float().reshape(()), want_pen.detach(), 1e-3 * want_pen.abs().item())
    assert_close("penalty grad", dh.float(), hr.grad, 1e-2)


# --- the ahead-of-time report's parsing -------------------------------------------------

sys.path.insert(0, str(REPO / "bench"))

PTXAS_LOG = """== nvcc csrc/cuda/circular_relative_attention.cu
ptxas info    : Compiling entry function '_ZN8fastattn8cra_cuda63_GLOBAL__N__b32760a1_30_circular_relative_attention_cu_9d74531010fwd_kernelIfEEvNS0_4ArgsENS0_4PlanEPT_PfS7_' for 'sm_90a'
ptxas info    : Function properties for _ZN8fastattn8cra_cuda63_GLOBAL__N__b32760a1_30_circular_relative_attention_cu_9d74531010fwd_kernelIfEEvNS0_4ArgsENS0_4PlanEPT_PfS7_
    16 bytes stack frame, 16 bytes spill stores, 20 bytes spill loads
ptxas info    : Used 96 registers, used 1 barriers, 16 bytes cumulative stack size, 1024 bytes smem, 900 bytes cmem[0]
"""


def test_resource_report_parses_ptxas_and_gates_spills():
    import gpu_resources as gr
    rows = gr.cuda_rows(PTXAS_LOG)
    assert len(rows) == 1
    r = rows[0]
    assert (r.arch, r.regs, r.spill_stores, r.spill_loads, r.stack, r.smem) == (90, 96, 16, 20, 16, 1024)
    assert "fwd_kernel" in r.kernel and r.paper and r.spills()
    # 96 registers: 3072 per warp, 21 warps -> 5 blocks of 4 warps; smem 1 KB + 1 KB reserved
    assert gr.occupancy(96, 1024, 4, 90) == (5, 20)
    assert gr.occupancy(255, 0, 4, 90) == (2, 8)        # 4-warp programs at 255 registers: two per SM
    assert gr.occupancy(128, 120 * 1024, 8, 90) == (1, 8)  # shared memory bound



def test_resource_report_records_the_paper_launches():
    """The CI gate's launch recording (meta tensors through the op's own assembly and launchers)
    runs in the test suite too, so a change that breaks it fails here, not only in the gate. In a
    subprocess: recording needs the compiled (not interpreted) kernel objects."""
    import subprocess
    pytest.importorskip("triton")
    script = """
import torch, gpu_resources as gr
from fastattn.triton._common import compile_target
for cap in (80, 90):  # as the gate does: the second round meets the first's cached tables
    with compile_target(cap):
        ls = gr.attention_launches(torch.bfloat16, 64, "hadamard", "train")
        ls += gr.attention_launches(torch.bfloat16, 64, "hadamard", "decode")
    print([(x.fn.__name__, x.kwargs.get("PASS", x.kwargs.get("SPLIT"))) for x in ls])
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "bench"), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-2:] == 2 * [str([
        ("_cra_fwd_kernel", False), ("_cra_bwd_kernel", 1), ("_cra_bwd_kernel", 2),
        ("_cra_fwd_kernel", True), ("_cra_combine_kernel", None)])], res.stdout
