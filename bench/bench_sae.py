#!/usr/bin/env python
"""Benchmark the fused SAE kernels against plain PyTorch (SPEC §7).

    python bench/bench_sae.py                          # CPU: the default shapes below
    python bench/bench_sae.py --device cuda            # GPU providers (fastattn cuda, triton, torch)
    python bench/bench_sae.py --device cuda --shape-set large --dtype bfloat16   # the GPU targets
    python bench/bench_sae.py --quick --out /tmp/sae.csv   # smoke run on small shapes

Ops (one shape each, overridable):
  topk_sae            TopK SAE encode + decode, N=4096 tokens, d=512, n=8192 latents, k=32.
                      fused: topk_encode + ReLU + sparse_decode; torch: F.linear + torch.topk +
                      ReLU + F.embedding_bag (the plain pipeline; autograd backward).
  bae_step            BAE loss (reconstruction + entropy + covariance), N=4096, d=512, d'=2048.
                      fused: BinaryAutoencoder (binary_encode + binary_covariance_penalty);
                      torch: linear + STE binarise + torch.cov penalty, as the authors' code.
  covariance_penalty  Σ_{i≠j}|C_ij| of a binary code alone, N=4096, d'=2048: the fused op vs torch.cov.
  topk_encoder        the TopK encoder alone (fused topk_encode vs F.linear + torch.topk), for its
                      peak memory against plain PyTorch's.
Providers: fused_cuda / fused_triton / fused_cpp (fastattn backends), torch (plain PyTorch) and,
for topk_sae / topk_encoder, gemm: the plain encoder GEMM F.linear(x, W_enc) alone (forward only),
the roofline the fused step is compared with ("step / gemm" in the printed ratios).
--shape-set large: N=4096, d=2048, n=32768, k=32 (TopK) and d'=8192 (BAE, covariance), the shapes
of the GPU targets (fused step >= 50% of the GEMM roofline, encoder peak memory <= 0.3x
plain PyTorch's, BAE step >= 3x faster than plain PyTorch).
Modes: fwd (no_grad) and fwd_bwd (forward + backward of a scalar loss).

Every provider is checked against the other providers' result on a small shape before timing.
Timing: CPU wall clock, --warmup runs then --repeats (median); CUDA triton.testing.do_bench.
Peak memory: each (op, provider, mode) runs in a fresh subprocess that primes torch on a tiny
shape, builds the inputs, resets the peak-RSS mark and reports the growth during the first run
(the attention benchmark's method); on CUDA torch.cuda.max_memory_allocated above the inputs.
Rows are appended to --out (long format, the attention CSV's columns with a ``shape`` column in
place of B/H/Lq/Lk/D).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_circular_relative_attention import (  # noqa: E402
    _peak_rss_start, append_rows, cuda_peak_mb, device_name, versions)
from fastattn.ops import sae as ops  # noqa: E402
from fastattn.reference import sae as ref  # noqa: E402
from fastattn.sae.entropy import entropy_loss_bits  # noqa: E402

CSV_COLUMNS = ("op", "provider", "mode", "shape", "dtype", "ms", "peak_mem_mb", "device", "torch", "triton",
               "commit", "date")
SHAPES = {"topk_sae": dict(N=4096, d=512, n=8192, k=32),
          "topk_encoder": dict(N=4096, d=512, n=8192, k=32),
          "bae_step": dict(N=4096, d=512, n=2048),
          "covariance_penalty": dict(N=4096, n=2048)}
# the GPU targets' shapes (--shape-set large)
SHAPES_LARGE = {"topk_sae": dict(N=4096, d=2048, n=32768, k=32),
                 "topk_encoder": dict(N=4096, d=2048, n=32768, k=32),
                 "bae_step": dict(N=4096, d=2048, n=8192),
                 "covariance_penalty": dict(N=4096, n=8192)}
QUICK = {"topk_sae": dict(N=256, d=64, n=1024, k=16), "topk_encoder": dict(N=256, d=64, n=1024, k=16),
         "bae_step": dict(N=256, d=32, n=128), "covariance_penalty": dict(N=256, n=128)}
CHECK = {"topk_sae": dict(N=64, d=32, n=300, k=8), "topk_encoder": dict(N=64, d=32, n=300, k=8),
         "bae_step": dict(N=64, d=16, n=64), "covariance_penalty": dict(N=64, n=100)}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MODES = ("fwd", "fwd_bwd")
ALPHA = 1e-7  # BAE α_e = α_c


def shape_str(shape: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


def make_inputs(op: str, shape: dict, device: str, grad: bool, dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(0)

    def rnd(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(device=device, dtype=dtype).requires_grad_(grad)

    N, n = shape["N"], shape["n"]
    if op == "covariance_penalty":
        h = (torch.rand(N, n, generator=g) < torch.rand(n, generator=g)).to(device=device, dtype=dtype)
        return {"h": h.requires_grad_(grad)}
    d = shape["d"]
    x = torch.randn(N, d, generator=g).to(device=device, dtype=dtype)
    if op in ("topk_sae", "topk_encoder"):
        w = torch.randn(n, d, generator=g)
        w = (w / w.norm(dim=1, keepdim=True)).to(device=device, dtype=dtype)
        return {"x": x, "W_enc": w.clone().requires_grad_(grad), "b_enc": rnd(n, scale=0.0),
                "W_dec": w.clone().requires_grad_(grad), "b_pre": rnd(d, scale=0.0)}
    return {"x": x, "W_in": rnd(n, d, scale=d ** -0.5), "b_in": rnd(n, scale=0.1),
            "W_out": rnd(d, n, scale=n ** -0.5), "b_out": rnd(d, scale=0.0)}


# ----------------------------------------------------------------------------- providers

def _topk_sae(inp: dict, k: int, backend: Optional[str]):
    x, b_pre = inp["x"], inp["b_pre"]
    if backend is None:  # plain PyTorch
        z = F.linear(x - b_pre, inp["W_enc"], inp["b_enc"])
        v, i = z.topk(k, dim=1)
        return F.embedding_bag(i, inp["W_dec"], per_sample_weights=F.relu(v), mode="sum") + b_pre
    v, i = ops.topk_encode(x - b_pre, inp["W_enc"], inp["b_enc"], k, backend=backend)
    return ops.sparse_decode(F.relu(v), i, inp["W_dec"], b_pre, backend=backend, check_indices=False)


def _topk_encoder(inp: dict, k: int, backend: Optional[str]):
    x = inp["x"] - inp["b_pre"]
    if backend is None:  # plain PyTorch: the [N, n] pre-activations, then topk
        return F.linear(x, inp["W_enc"], inp["b_enc"]).topk(k, dim=1).values
    return ops.topk_encode(x, inp["W_enc"], inp["b_enc"], k, backend=backend, check_finite=False).values


def _bae_loss(inp: dict, backend: Optional[str]):
    x = inp["x"]
    if backend is None:  # the authors' formulation: dense linear, STE, torch.cov
        h = ref.binarize(F.linear(x, inp["W_in"], inp["b_in"]), "reference")
        cov = ref.covariance_penalty_torch_cov(h)
    else:
        h = ops.binary_encode(x, inp["W_in"], inp["b_in"], backend=backend).code
        cov = ops.binary_covariance_penalty(h, backend=backend, check_finite=False)
    x_hat = F.linear(h, inp["W_out"], inp["b_out"])
    return (x_hat - x).pow(2).mean() + ALPHA * entropy_loss_bits(h.mean(0)) + ALPHA * cov


def setup(op: str, provider: str, shape: dict, inp: dict):
    """fn() -> the op's output (a tensor; for fwd_bwd its sum is the loss), or a str reason."""
    if provider == "gemm":  # the encoder-GEMM roofline: F.linear alone, no bias, no selection
        if op not in ("topk_sae", "topk_encoder"):
            return "the GEMM roofline is defined for the TopK encoder only"
        return lambda: F.linear(inp["x"], inp["W_enc"])
    backend = {"torch": None, "fused_cpp": "cpp", "fused_triton": "triton", "fused_cuda": "cuda"}[provider]
    if backend is not None:
        probe = next(iter(inp.values()))
        why = ops.REASONS[backend](probe)
        if why:
            return why
    if op == "topk_sae":
        return lambda: (_topk_sae(inp, shape["k"], backend) - inp["x"]).pow(2).sum()
    if op == "topk_encoder":
        return lambda: _topk_encoder(inp, shape["k"], backend).pow(2).sum()
    if op == "bae_step":
        return lambda: _bae_loss(inp, backend)
    if backend is None:
        return lambda: ref.covariance_penalty_torch_cov(inp["h"])
    return lambda: ops.binary_covariance_penalty(inp["h"], backend=backend, check_finite=False)


def check(op: str, providers, device: str) -> Dict[str, Optional[str]]:
    """Reason per provider why it is not usable (None = matches the others at the check shape)."""
    results, reasons = {}, {}
    for p in providers:
        if p == "gemm":  # a baseline, not an implementation of the op: nothing to compare
            reasons[p] = setup(op, p, CHECK[op], make_inputs(op, CHECK[op], device, grad=False))
            reasons[p] = reasons[p] if isinstance(reasons[p], str) else None
            continue
        inp = make_inputs(op, CHECK[op], device, grad=True, dtype=torch.float64 if device == "cpu" and p != "fused_triton" else torch.float32)
        fn = setup(op, p, CHECK[op], inp)
        if isinstance(fn, str):
            reasons[p] = fn
            continue
        try:
            out = fn()
            out.backward()
        except Exception as exc:  # a provider that fails is skipped with the reason
            reasons[p] = f"raised {type(exc).__name__}: {exc}"
            continue
        results[p] = [out.detach().double().cpu()] + [t.grad.double().cpu() for t in inp.values()
                                                      if t.requires_grad and t.grad is not None]
        reasons[p] = None
    base = next((p for p in providers if reasons.get(p) is None and p != "gemm"), None)
    for p in providers:
        if reasons.get(p) is None and p not in (base, "gemm"):
            for a, b in zip(results[p], results[base]):
                if not torch.allclose(a, b, rtol=1e-4, atol=1e-5):
                    reasons[p] = f"differs from {base} by {(a - b).abs().max().item():.3g}"
                    break
    return reasons


# ----------------------------------------------------------------------------- measurement

def measure(op: str, provider: str, mode: str, shape: dict, device: str, repeats: int, warmup: int,
            dtype: str = "float32") -> dict:
    grad = mode == "fwd_bwd"
    if provider == "gemm" and grad:
        return {"skip": "the GEMM roofline is timed forward only"}
    tdtype = DTYPES[dtype]
    tiny = make_inputs(op, QUICK[op], device, grad, dtype=tdtype)
    fn = setup(op, provider, QUICK[op], tiny)
    if isinstance(fn, str):
        return {"skip": fn}

    def runner(fn, inp):
        def run():
            if grad:
                for t in inp.values():
                    t.grad = None
                fn().backward()
            else:
                with torch.no_grad():
                    fn()
        return run

    runner(fn, tiny)()  # prime code paths, allocators, thread pools
    del fn, tiny
    inp = make_inputs(op, shape, device, grad, dtype=tdtype)
    run = runner(setup(op, provider, shape, inp), inp)
    gc.collect()
    if device == "cuda":
        peak = cuda_peak_mb(run)
        from triton.testing import do_bench

        ms = do_bench(run, quantiles=[0.5, 0.2, 0.8])
        return {"ms": ms[0], "peak_mem_mb": peak}
    growth = _peak_rss_start()
    run()
    peak = growth()
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append((time.perf_counter() - t0) * 1e3)
    return {"ms": statistics.median(times), "peak_mem_mb": peak}


def measure_in_subprocess(spec: dict, timeout: float) -> dict:
    try:
        proc = subprocess.run([sys.executable, __file__, "--single", json.dumps(spec)], capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"skip": f"timed out after {timeout} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"skip": f"subprocess exited with {proc.returncode}: {' | '.join(tail)}"}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--ops", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--providers", nargs="+", default=None,
                   help="default: cpu: fused_cpp torch; cuda: fused_cuda fused_triton torch gemm")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32",
                   help="dtype of the timed runs (the correctness check runs in fp32/fp64)")
    p.add_argument("--shape-set", choices=("default", "large"), default="default",
                   help="large: the shapes of the GPU targets (see the module docstring)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--quick", action="store_true", help="small shapes (smoke run)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "sae.csv")
    p.add_argument("--single", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.single:
        s = json.loads(args.single)
        try:
            res = measure(**s)
        except Exception as exc:
            res = {"skip": f"raised {type(exc).__name__}: {exc}"}
        print("RESULT " + json.dumps(res), flush=True)
        return
    providers = args.providers or (["fused_cpp", "torch"] if args.device == "cpu"
                                   else ["fused_cuda", "fused_triton", "torch", "gemm"])
    meta = {**versions(), "device": device_name(args.device)}
    print(f"SAE benchmark: {meta['device']}, torch {meta['torch']}, triton {meta['triton'] or '-'}, "
          f"commit {meta['commit'] or '-'}")
    written = 0
    for op in args.ops:
        shape = QUICK[op] if args.quick else (SHAPES_LARGE if args.shape_set == "large" else SHAPES)[op]
        reasons = check(op, providers, args.device)
        print(f"\n{op}  {shape_str(shape)}  (check: " + ", ".join(
            f"{p} {'ok' if r is None else 'skipped: ' + r}" for p, r in reasons.items()) + ")")
        res_of = {}
        for mode in args.modes:
            for prov in providers:
                if reasons.get(prov) is not None:
                    continue
                spec = dict(op=op, provider=prov, mode=mode, shape=shape, device=args.device,
                            repeats=args.repeats, warmup=args.warmup, dtype=args.dtype)
                res = measure(**spec) if args.device == "cuda" else measure_in_subprocess(spec, args.timeout)
                res_of[(mode, prov)] = res
                if "skip" in res:
                    print(f"  {mode:<8}{prov:<14}skipped: {res['skip']}")
                    continue
                print(f"  {mode:<8}{prov:<14}{res['ms']:>10.2f} ms {res['peak_mem_mb']:>10.1f} MB", flush=True)
                date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
                append_rows(args.out, columns=CSV_COLUMNS, rows=[{"op": op, "provider": prov, "mode": mode, "shape": shape_str(shape),
                                        "dtype": args.dtype, "ms": f"{res['ms']:.4f}",
                                        "peak_mem_mb": f"{res['peak_mem_mb']:.1f}", "device": meta["device"],
                                        "torch": meta["torch"], "triton": meta["triton"], "commit": meta["commit"],
                                        "date": date}])
                written += 1
            plain = res_of.get((mode, "torch"), {})
            gemm = res_of.get(("fwd", "gemm"), {})
            for p in providers:
                fused = res_of.get((mode, p), {})
                if not p.startswith("fused") or "ms" not in fused:
                    continue
                if "ms" in plain:
                    print(f"  {mode:<8}ratio torch/{p}: time {plain['ms'] / fused['ms']:.2f}x, "
                          f"peak memory {plain['peak_mem_mb'] / max(fused['peak_mem_mb'], 0.1):.1f}x")
                if "ms" in gemm:
                    print(f"  {mode:<8}GEMM roofline / {p}: {gemm['ms'] / fused['ms']:.2f} "
                          f"(GEMM {gemm['ms']:.3f} ms)")
    print(f"\n{written} rows appended to {args.out}")


if __name__ == "__main__":
    main()
