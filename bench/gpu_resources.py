#!/usr/bin/env python
"""Ahead-of-time resource report of every GPU kernel, without a GPU.

    python bench/gpu_resources.py                       # everything, sm_80 and sm_90 -> CSV
    python bench/gpu_resources.py --quick --check       # CI gate: paper configuration, exit 1 on
                                                        # any spill or compile failure
    python bench/gpu_resources.py --cuda-log LOG        # CUDA rows from an nvcc -Xptxas -v log
    python bench/gpu_resources.py --only attention --configs decode --out CSV --update
                                                        # recompile some rows of a CSV

Triton kernels are compiled through their real launch path: the launchers of
fastattn/triton/*.py run on ``meta`` tensors of the benchmark shapes (no memory, no GPU) with
their kernels replaced by recorders; every recorded launch (arguments, constexprs, block sizes,
num_warps) is bound with Triton's own specialization rules for a CUDA target
(``GPUTarget("cuda", cap, 32)``) and compiled by ``triton.compile`` to PTX and cubin, each in
an empty cache, so the compile time is the cold first-call cost. ptxas -v (bundled with Triton)
gives registers, spill stores/loads and stack; Triton's metadata gives shared memory and warps.
CUDA kernels (csrc/cuda/*.cu) are compiled by nvcc -Xptxas -v (or read from a log of that, as
.ci/run writes it), one row per kernel instantiation.

Theoretical occupancy (blocks and warps per SM) follows the CUDA occupancy rules: registers
are allocated per warp in 256-register units from 64K per SM; shared memory per SM is 164 KB
(sm_80) or 228 KB (sm_90) with 1 KB reserved per block; at most 64 warps and 32 blocks per SM.

Configurations: attention in fp16/bf16/fp32, D = 32/64/128, Hadamard and add tables (the paper's
terms: index + decomposed time + decomposed pitch, N_idx = Lk, N_bar = 16, bar_res = 48,
N_oct = 22), causal, B = 8, H = 8; "train" = forward + backward at L = 1024, "decode" = one
query against Lk = 4096 keys (split-key forward). The paper's configuration is bf16, D = 64,
Hadamard: the CI gate. SAE: N = 4096, d = 2048, n = 32768, k = 32 (TopK) and d' = 8192 (BAE,
covariance), fp32 and bf16.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

if __name__ == "__main__":  # compiled kernels, not the interpreter (imported by a test: leave it)
    os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fastattn.ops import _cra_terms  # noqa: E402
from fastattn.triton import circular_relative_attention as tri_attn  # noqa: E402
from fastattn.triton import sae as tri_sae  # noqa: E402
from fastattn.triton._common import compile_target  # noqa: E402

ARCHS = (80, 90)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
PAPER = dict(dtype="bf16", D=64, combine="hadamard")
SM_SMEM = {80: 164 * 1024, 90: 228 * 1024}  # shared memory per SM usable by blocks
CSV_COLUMNS = ("backend", "kernel", "arch", "config", "paper", "regs", "spill_stores", "spill_loads",
               "stack", "smem", "num_warps", "blocks_per_sm", "warps_per_sm", "compile_s", "status", "notes")


@dataclass
class Row:
    backend: str
    kernel: str
    arch: int
    config: str
    paper: bool = False
    regs: Optional[int] = None
    spill_stores: Optional[int] = None
    spill_loads: Optional[int] = None
    stack: Optional[int] = None
    smem: Optional[int] = None
    num_warps: Optional[int] = None
    blocks_per_sm: Optional[int] = None
    warps_per_sm: Optional[int] = None
    compile_s: Optional[float] = None
    status: str = "ok"
    notes: List[str] = field(default_factory=list)

    def spills(self) -> bool:
        return bool(self.spill_stores or self.spill_loads)


def occupancy(regs: int, smem: int, warps: int, arch: int):
    """(blocks, warps) per SM from registers, shared memory and warps per block."""
    regs_per_warp = ((max(regs, 1) * 32 + 255) // 256) * 256
    by_regs = (65536 // regs_per_warp) // warps
    by_smem = SM_SMEM[arch] // (smem + 1024) if smem else 32
    by_warps = 64 // warps
    blocks = max(0, min(by_regs, by_smem, by_warps, 32))
    return blocks, blocks * warps


# ----------------------------------------------------------------------------- Triton

@dataclass
class Launch:
    fn: JITFunction
    grid: tuple
    args: tuple
    kwargs: dict


class _Recorder:
    def __init__(self, fn: JITFunction, log: List[Launch]):
        self.fn, self.log = fn, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append(Launch(self.fn, tuple(grid), args, kwargs))
        return launch


@contextlib.contextmanager
def recording(*modules) -> Iterator[List[Launch]]:
    """Replace the Triton kernels of ``modules`` by recorders of their launches."""
    log: List[Launch] = []
    saved = [(m, n, v) for m in modules for n, v in vars(m).items() if isinstance(v, JITFunction)]
    for m, n, v in saved:
        setattr(m, n, _Recorder(v, log))
    try:
        yield log
    finally:
        for m, n, v in saved:
            setattr(m, n, v)


_PTXAS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def compile_launch(launch: Launch, arch: int):
    """Compile one recorded launch for sm_<arch> as the JIT would: (kernel, seconds, ptxas log)."""
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    fn = launch.fn
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(launch.kwargs, debug=False)
    bound, spec, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
    saved = knobs.cache.dir, knobs.nvidia.dump_ptxas_log
    with tempfile.TemporaryDirectory() as cache:
        knobs.cache.dir, knobs.nvidia.dump_ptxas_log = cache, True
        log = io.StringIO()
        try:
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(log):
                kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                        options=options.__dict__)
            return kernel, time.perf_counter() - t0, log.getvalue()
        finally:
            knobs.cache.dir, knobs.nvidia.dump_ptxas_log = saved


def triton_rows(name: str, launches: List[Launch], arch: int, paper: bool) -> List[Row]:
    rows = []
    for launch in launches:
        cx = {k: v for k, v in launch.kwargs.items() if k.isupper() and k not in ("TP",)}
        kind = {k: cx[k] for k in ("PASS", "SPLIT") if k in cx}
        label = launch.fn.__name__ + "".join(f"[{k}={int(v)}]" for k, v in kind.items())
        row = Row("triton", label, arch, name, paper)
        try:
            kernel, secs, log = compile_launch(launch, arch)
        except Exception as exc:  # a compile failure is a row, and fails the gate
            row.status = f"compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            rows.append(row)
            continue
        m, r = _PTXAS.search(log), _REGS.search(log)
        row.stack, row.spill_stores, row.spill_loads = (int(x) for x in m.groups())
        row.regs = int(r.group(1))
        row.smem = kernel.metadata.shared
        row.num_warps = kernel.metadata.num_warps
        row.blocks_per_sm, row.warps_per_sm = occupancy(row.regs, row.smem, row.num_warps, arch)
        row.compile_s = round(secs, 2)
        row.notes.append(", ".join(f"{k}={v}" for k, v in cx.items()))
        rows.append(row)
    return rows


def _attention_inputs(dtype, D, combine, Lq, Lk, B=8, H=8):
    """Meta tensors of the benchmark configuration, assembled as the op assembles them."""
    meta = dict(device="meta", dtype=dtype)
    q = torch.empty(B, H, Lq, D, **meta)
    kv = torch.empty(B, H, Lk, D, **meta)
    coord = torch.empty(B, Lk, dtype=torch.long, device="meta")
    kw = {n: None for n in _cra_terms.TABLE_ARGS + ("bar", "position")}
    kw.update(rel_index_table=torch.empty(Lk, D, **meta), bar_table=torch.empty(16, D, **meta),
              pos_table=torch.empty(48, D, **meta), octave_table=torch.empty(22, D, **meta),
              pitch_class_table=torch.empty(12, D, **meta), bar_res=48, bar_min=0, octave_min=-11,
              rel_index_min=0, time_min=0, pitch_min=-127)
    asm = _cra_terms.assemble(q, Lk, coord, coord, kw, combine, "quotient")
    return q, kv, asm


def attention_launches(dtype, D, combine, mode) -> List[Launch]:
    """The launches of the Triton attention op for one configuration (train: forward and
    backward at L = 1024; decode: one query against 4096 keys)."""
    Lq, Lk = (1024, 1024) if mode == "train" else (1, 4096)
    q, kv, asm = _attention_inputs(dtype, D, combine, Lq, Lk)
    args = (asm.table, asm.coords, asm.terms, 0.1, D ** -0.5, True, None, 0.0, 0)
    with recording(tri_attn) as log:
        out, lse = tri_attn.forward(q, kv, kv, *args)
        if mode == "train":
            tri_attn.backward(out, q, kv, kv, out, lse, *args)
    return log


def sae_launches(dtype) -> Dict[str, List[Launch]]:
    """The launches of each Triton SAE op (forward and backward kernels) at the large shapes."""
    N, d, n, k, n_bae = 4096, 2048, 32768, 32, 8192
    meta = dict(device="meta", dtype=dtype)
    x, W, b = torch.empty(N, d, **meta), torch.empty(n, d, **meta), torch.empty(n, **meta)
    idx = torch.empty(N, k, dtype=torch.long, device="meta")
    vals = torch.empty(N, k, **meta)
    Wb, bb = torch.empty(n_bae, d, **meta), torch.empty(n_bae, **meta)
    code = torch.empty(N, n_bae, **meta)
    order = torch.empty(N * k, dtype=torch.long, device="meta")  # entries by latent (host-side argsort)
    start = torch.empty(n + 1, dtype=torch.long, device="meta")
    calls: Dict[str, Callable[[], object]] = {
        "topk_encode": lambda: tri_sae._topk_encode_launch(x, W, b, k),
        "sparse_decode": lambda: tri_sae._gather_combine_launch(vals, idx, W, b),
        "sparse_decode_bwd_dvalues": lambda: tri_sae._gather_dot_launch(x, idx, W),
        "segment_scatter (dW)": lambda: tri_sae._segment_scatter_run(order, start, vals, k, x, n, True),
        "binary_encode": lambda: tri_sae._binary_encode_launch(x, Wb, bb, True),
        "binary_covariance_penalty": lambda: tri_sae._covariance_launch(code, True),
    }
    out = {}
    for name, call in calls.items():
        with recording(tri_sae) as log:
            call()
        out[name] = log
    return out


# ----------------------------------------------------------------------------- CUDA (nvcc)

_NVCC_FUNC = re.compile(r"(?:Compiling entry function|Function properties for) '?(\S+?)'?(?: for '(sm_\w+)')?$")


def _demangle(names: List[str]) -> Dict[str, str]:
    tool = next((t for t in ("cu++filt", "c++filt") if subprocess.run(
        ["which", t], capture_output=True).returncode == 0), None)
    if tool is None:
        return {n: n for n in names}
    res = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    return dict(zip(names, res.stdout.splitlines()))


def parse_ptxas_log(text: str, source: str) -> List[Row]:
    """Rows from nvcc -Xptxas -v output: one per (kernel, arch)."""
    rows: Dict[tuple, Row] = {}
    cur = None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for '(sm_\w+)'", line)
        if m:
            arch = int(re.sub(r"\D", "", m.group(2)))
            cur = rows.setdefault((m.group(1), arch), Row("cuda", m.group(1), arch, source))
            continue
        if cur is None:
            continue
        m = _PTXAS.search(line)
        if m:
            cur.stack, cur.spill_stores, cur.spill_loads = (int(x) for x in m.groups())
        m = _REGS.search(line)
        if m:
            cur.regs = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            cur.smem = int(s.group(1)) if s else 0
    names = _demangle([k[0] for k in rows])
    for (mangled, _), row in rows.items():
        name = names.get(mangled, mangled).replace("(anonymous namespace)::", "")
        name = re.sub(r"^void ", "", name).split("(")[0]  # drop the return type and parameters
        row.kernel = name.replace("fastattn::", "")
    return list(rows.values())


def nvcc_log(files: List[Path], archs=ARCHS) -> str:
    nvcc = os.environ.get("NVCC") or "nvcc"
    if subprocess.run(["which", nvcc], capture_output=True).returncode != 0:
        nvcc = "/usr/local/cuda/bin/nvcc"
    gens = [f"-gencode=arch=compute_{a}{'a' if a == 90 else ''},code=sm_{a}{'a' if a == 90 else ''}"
            for a in archs]
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for f in files:
            cmd = [nvcc, "-std=c++17", "-O3", f"-I{REPO / 'csrc/include'}", *gens, "-Xptxas", "-v", "-c",
                   str(f), "-o", str(Path(tmp) / (f.name + ".o"))]
            res = subprocess.run(cmd, capture_output=True, text=True)
            out.append(f"== nvcc {f.relative_to(REPO)}\n" + res.stdout + res.stderr)
            if res.returncode != 0:
                out.append(f"NVCC FAILED {f.relative_to(REPO)}")
    return "\n".join(out)


MAX_SMEM_PER_BLOCK = {80: 166912, 90: 232448}  # opt-in limits: A100 163 KB, H100 227 KB
_TEMPLATE_DTYPE = {"__nv_bfloat16": "bf16", "__half": "fp16", "float": "fp32"}


def cuda_attention_plans() -> Dict[tuple, dict]:
    """{(kernel, dtype, arch): plan} of the CUDA attention kernels at the paper's configuration
    (B = H = 8, L = 1024, D = 64, Hadamard): tiles and dynamic shared memory from the launch
    plan of csrc/include/cra_cuda_launch.h, through the emulator build ({} without it)."""
    from fastattn import _cuda_emu
    if _cuda_emu.available("circular_relative_attention") is not None:
        return {}
    emu = _cuda_emu.load("circular_relative_attention")
    plans = {}
    for name, dtype in DTYPES.items():
        q = torch.zeros(8, 8, 1024, 64, dtype=dtype)
        coord = torch.zeros(8, 1024, dtype=torch.long)
        kw = {n: None for n in _cra_terms.TABLE_ARGS + ("bar", "position")}
        kw.update(rel_index_table=torch.zeros(1024, 64, dtype=dtype), bar_table=torch.zeros(16, 64, dtype=dtype),
                  pos_table=torch.zeros(48, 64, dtype=dtype), octave_table=torch.zeros(22, 64, dtype=dtype),
                  pitch_class_table=torch.zeros(12, 64, dtype=dtype), bar_res=48, bar_min=0, octave_min=-11,
                  rel_index_min=0, time_min=0, pitch_min=-127)
        asm = _cra_terms.assemble(q, 1024, coord, coord, kw, "hadamard", "quotient")
        for arch, limit in MAX_SMEM_PER_BLOCK.items():
            for kernel, bwd in (("fwd_kernel", False), ("bwd_kernel", True)):
                try:
                    plans[(kernel, name, arch)] = emu.plan(q, q, q, asm.table, asm.coords, asm.terms, True, bwd, limit)
                except RuntimeError as exc:  # the op refuses: the tables do not fit a block
                    plans[(kernel, name, arch)] = {"error": str(exc).split(":", 1)[-1].split(";")[0].strip()}
    return plans


def cuda_rows(log_text: str, plans: Optional[Dict[tuple, dict]] = None) -> List[Row]:
    """Rows of an nvcc -Xptxas -v log; attention kernels get the dynamic shared memory of their
    plan at the paper's configuration when ``plans`` has it (ptxas sees static memory only)."""
    rows = []
    for chunk in re.split(r"^== nvcc ", log_text, flags=re.M)[1:]:
        source = chunk.splitlines()[0].strip()
        rows += parse_ptxas_log(chunk, source)
    for row in rows:
        row.num_warps = 4  # every csrc/cuda kernel launches 128-thread blocks (fa_cuda.h)
        m = re.search(r"(fwd_kernel|bwd_kernel)<(\w+)>", row.kernel)
        plan = (plans or {}).get((m.group(1), _TEMPLATE_DTYPE.get(m.group(2)), row.arch)) if m else None
        if plan is not None and "error" in plan:
            row.notes.append(f"paper config: no plan ({plan['error']})")
        elif plan is not None:
            row.smem = (row.smem or 0) + plan["smem"]
            row.notes.append(f"paper config plan: BQ={plan['BQ']} BK={plan['BK']} dynamic smem {plan['smem']} B")
        if row.regs is not None:
            row.blocks_per_sm, row.warps_per_sm = occupancy(row.regs, row.smem or 0, 4, row.arch)
        row.paper = "circular_relative_attention" in row.config
    failed = re.findall(r"NVCC FAILED (\S+)", log_text)
    rows += [Row("cuda", "(compile)", 0, f, status="nvcc failed") for f in failed]
    return rows


# ----------------------------------------------------------------------------- first call (GPU)

def first_call_latency(backend: str = "triton", L: int = 1024) -> List[str]:
    """On a GPU: seconds of the first forward+backward of the paper's configuration with an
    empty Triton cache (compile + load + run) and of the second (run only)."""
    sys.path.insert(0, str(REPO / "tests"))
    from helpers import cast_problem, make_problem, run
    prob = cast_problem(make_problem(B=8, H=8, Lq=L, Lk=L, D=64, terms="all"), torch.bfloat16, "cuda")
    lines = []
    with tempfile.TemporaryDirectory() as cache:
        saved, knobs.cache.dir = knobs.cache.dir, cache
        try:
            for label in ("first call (empty cache)", "second call"):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                run(backend, *prob)
                torch.cuda.synchronize()
                lines.append(f"{backend} bf16 B=8 H=8 L={L} D=64 fwd+bwd, {label}: {time.perf_counter() - t0:.2f} s")
        finally:
            knobs.cache.dir = saved
    return lines


# ----------------------------------------------------------------------------- summary

def markdown(csv_path: Path) -> str:
    """README tables from a CSV of this script: the paper's configuration kernel by kernel, then
    the worst case per configuration group."""
    rows = list(csv.DictReader(open(csv_path)))
    num = lambda x: int(float(x)) if x not in ("", None) else None  # noqa: E731
    out = ["| kernel (paper's config: bf16, D = 64, Hadamard) | arch | regs | spill stores / loads | "
           "smem | warps | blocks / SM | compile |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["backend"] == "triton" and r["paper"] == "True":
            mode = r["config"].split()[-1]
            out.append(f"| Triton `{r['kernel']}` ({mode}) | sm_{r['arch']} | {r['regs']} | "
                       f"{r['spill_stores']} / {r['spill_loads']} B | {num(r['smem']) // 1024} KB | "
                       f"{r['num_warps']} | {r['blocks_per_sm']} | {float(r['compile_s']):.1f} s |")
    for r in rows:
        if r["backend"] == "cuda" and r["paper"] == "True" and re.search(r"(fwd|bwd)_kernel<__nv_bfloat16>", r["kernel"]):
            out.append(f"| CUDA `{r['kernel']}` | sm_{r['arch']} | {r['regs']} | {r['spill_stores']} / "
                       f"{r['spill_loads']} B | {(num(r['smem']) or 0) // 1024} KB | 4 | {r['blocks_per_sm']} | |")
    groups: Dict[tuple, list] = {}
    for r in rows:
        key = (r["backend"], " ".join(r["config"].split()[:2]) if r["backend"] == "triton" else r["config"],
               r["arch"])
        groups.setdefault(key, []).append(r)
    out += ["", "| kernels | arch | count | spilling | worst spill stores / loads | max regs | max compile |",
            "|---|---|---|---|---|---|---|"]
    for (backend, cfg, arch), rs in sorted(groups.items()):
        spilling = [r for r in rs if num(r["spill_stores"]) or num(r["spill_loads"])]
        worst = max(rs, key=lambda r: (num(r["spill_stores"]) or 0) + (num(r["spill_loads"]) or 0))
        comp = [float(r["compile_s"]) for r in rs if r["compile_s"]]
        out.append(f"| {backend} {cfg} | sm_{arch} | {len(rs)} | {len(spilling)} | {worst['spill_stores']} / "
                   f"{worst['spill_loads']} B | {max(num(r['regs']) or 0 for r in rs)} | "
                   f"{f'{max(comp):.1f} s' if comp else ''} |")
    return "\n".join(out)


# ----------------------------------------------------------------------------- driver

def attention_configs(quick: bool):
    if quick:
        yield dict(PAPER, mode="train")
        yield dict(PAPER, mode="decode")
        return
    for dtype in DTYPES:
        for D in (32, 64, 128):
            for combine in ("hadamard", "add"):
                for mode in ("train", "decode"):
                    yield dict(dtype=dtype, D=D, combine=combine, mode=mode)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=ARCHS)
    ap.add_argument("--quick", action="store_true", help="attention at the paper's configuration only")
    ap.add_argument("--check", action="store_true",
                    help="exit 1 on a spill or compile failure of an attention kernel at the paper's configuration")
    ap.add_argument("--only", choices=("attention", "sae", "cuda"), nargs="+",
                    default=["attention", "sae", "cuda"])
    ap.add_argument("--cuda-log", type=Path, help="parse this nvcc -Xptxas -v log instead of compiling")
    ap.add_argument("--out", type=Path, help="CSV to write (default: print only)")
    ap.add_argument("--configs", metavar="TEXT", help="only the attention configurations whose name contains "
                    "TEXT (e.g. 'decode', 'fp32 D=128')")
    ap.add_argument("--update", action="store_true",
                    help="replace the rows of --out that this run recompiles, keep the others")
    ap.add_argument("--markdown", type=Path, metavar="CSV", help="print README tables from a CSV and exit")
    ap.add_argument("--first-call", action="store_true",
                    help="on a GPU: also time the first (cold cache) and second call of the Triton op")
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown(args.markdown))
        return 0

    rows: List[Row] = []

    def report(new: List[Row]):
        for r in new:
            print(f"{r.backend:6} sm_{r.arch} {r.kernel:42.42} {r.config:34.34} regs {r.regs!s:>4} "
                  f"spill {r.spill_stores!s:>4}/{r.spill_loads!s:<4} stack {r.stack!s:>5} smem {r.smem!s:>6} "
                  f"warps {r.num_warps!s:>2} blocks/SM {r.blocks_per_sm!s:>2} "
                  f"{'' if r.compile_s is None else f'{r.compile_s:6.1f}s'} {'' if r.status == 'ok' else r.status}",
                  flush=True)
        rows.extend(new)

    if "attention" in args.only:
        for cfg in attention_configs(args.quick):
            name = f"attention {cfg['dtype']} D={cfg['D']} {cfg['combine']} {cfg['mode']}"
            if args.configs and args.configs not in name:
                continue
            paper = all(cfg[k] == v for k, v in PAPER.items())
            for arch in args.arch:
                with compile_target(arch):  # the launchers plan tiles for this generation
                    launches = attention_launches(DTYPES[cfg["dtype"]], cfg["D"], cfg["combine"], cfg["mode"])
                report(triton_rows(name, launches, arch, paper))
    if "sae" in args.only and not args.quick:
        for dt in ("fp32", "bf16"):
            for arch in args.arch:
                with compile_target(arch):
                    ops = sae_launches(DTYPES[dt])
                for op, launches in ops.items():
                    report(triton_rows(f"sae {op} {dt}", launches, arch, False))
    if "cuda" in args.only:
        text = args.cuda_log.read_text() if args.cuda_log else nvcc_log(
            sorted((REPO / "csrc/cuda").glob("*.cu")), args.arch)
        report(cuda_rows(text, None if args.quick else cuda_attention_plans()))

    if args.first_call:
        for line in first_call_latency():
            print(line)

    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        out = [{k: ("" if v is None else v) for k, v in dict(asdict(r), notes="; ".join(r.notes)).items()}
               for r in rows]
        if args.update and args.out.exists():  # keep the old row order, new values where recompiled
            key = lambda r: (r["backend"], r["kernel"], str(r["arch"]), r["config"])  # noqa: E731
            fresh = {key(r): r for r in out}
            old = list(csv.DictReader(open(args.out)))
            known = {key(r) for r in old}
            out = [fresh.get(key(r), r) for r in old] + [r for r in out if key(r) not in known]
        with open(args.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            w.writeheader()
            w.writerows(out)
        print(f"wrote {len(out)} rows to {args.out}")

    bad = [r for r in rows if r.paper and (r.status != "ok" or r.spills())]
    bad += [r for r in rows if r.status != "ok" and r not in bad]
    if args.check and bad:
        print("FAILED: attention kernels at the paper's configuration must compile without spills:")
        for r in bad:
            print(f"  {r.backend} sm_{r.arch} {r.kernel} ({r.config}): spill {r.spill_stores}/{r.spill_loads} B, {r.status}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
