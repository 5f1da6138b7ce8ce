#!/usr/bin/env python
"""Small forward+backward runs of every CUDA kernel, for `compute-sanitizer --tool memcheck`
(bench/gpu_session.sh sanitize). Odd shapes on purpose: partial tiles are where bounds go wrong.

    compute-sanitizer --tool memcheck --error-exitcode 9 python bench/gpu_sanitize.py [attention|sae]
"""
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import fastattn.ops.sae as S  # noqa: E402
from helpers import cast_problem, make_problem, run  # noqa: E402


def attention(backends=("cuda", "triton")):
    for backend in backends:
        for dtype in (torch.float32, torch.bfloat16):
            prob = make_problem(B=2, H=2, Lq=70, Lk=131, D=64, terms="all", kpm=True)
            run(backend, *cast_problem(prob, dtype, "cuda"), dropout_p=0.1, dropout_seed=1)
            prob = make_problem(B=1, H=2, Lq=1, Lk=300, D=32, terms="direct", per_head=True)
            run(backend, *cast_problem(prob, dtype, "cuda"))
    print("attention runs finished")


def sae():
    g = torch.Generator(device="cuda").manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for N, d, n, k in ((1, 5, 300, 1), (129, 64, 300, 100), (130, 96, 257, 32)):
            def leaf(*shape):
                return torch.randn(*shape, device="cuda", generator=g).to(dtype).requires_grad_()
            x, W, b = leaf(N, d), leaf(n, d), leaf(n)
            top = S.topk_encode(x, W, b, k, backend="cuda")
            out = S.sparse_decode(top.values.relu(), top.indices, W, None, backend="cuda")
            code = S.binary_encode(x, W, b, backend="cuda").code
            pen = S.binary_covariance_penalty(code, backend="cuda") if N >= 2 else code.sum() * 0
            (out.float().sum() + code.float().sum() + pen.float()).backward()
    print("SAE runs finished")


if __name__ == "__main__":
    which = sys.argv[1:] or ["attention", "sae"]
    for name in which:
        {"attention": attention, "sae": sae}[name]()
    torch.cuda.synchronize()
