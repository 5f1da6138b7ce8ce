#!/usr/bin/env python
"""Long fuzz of the raw ops (tests/raw_fuzz.py), optionally on an AddressSanitizer build.

    python bench/fuzz_raw_ops.py --count 3000                      # the built extension
    python bench/fuzz_raw_ops.py --count 3000 --asan               # an ASan build of the CPU kernels
    python bench/fuzz_raw_ops.py --count 300 --asan --source /work/main   # ... of another checkout's kernels
    python bench/fuzz_raw_ops.py --asan --extension SCRATCH/lib/fastattn/_C...so # an ASan build made before
    python bench/fuzz_raw_ops.py --count 300 --extension /work/main/fastattn/_C.cpython-311-x86_64-linux-gnu.so
    python bench/fuzz_raw_ops.py --count 0 --asan --tests          # the hostile-input tests under ASan

--asan compiles csrc/fastattn.cpp and csrc/cpu/*.cpp (setup.py, FASTATTN_NO_CUDA=1) with
-fsanitize=address into a scratch directory, puts this checkout's Python package and that
library into an overlay directory the fuzz workers import fastattn from, and runs them with
libasan preloaded (the interpreter is not instrumented). A sanitizer report aborts the worker:
it counts as a crash, and the report is kept. --extension runs the Python oracle of this
checkout against another build (e.g. the main branch's, to see what the fuzz finds there).
--tests (with --asan) also runs the hostile-input test files (raw ops, hardening, the CUDA
emulator) against that build; the CUDA kernels' emulator is then compiled with
-fsanitize=address as well (FASTATTN_SANITIZE, fastattn/_cuda_emu.py), so the .cu kernels'
host-side bounds checks and index arithmetic run instrumented too.
Nothing under the scratch directory is committed; the summary goes to --out (JSON).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import raw_fuzz  # noqa: E402

SO_NAME = "_C.cpython-311-x86_64-linux-gnu.so"
ASAN_TESTS = ("tests/test_raw_ops.py", "tests/test_hardening_ops.py", "tests/test_cuda_emu.py")


def build_asan(scratch: Path, source: Path) -> Path:
    """The extension of checkout ``source`` compiled with AddressSanitizer (CPU kernels only)."""
    env = dict(os.environ, FASTATTN_NO_CUDA="1", CFLAGS="-fsanitize=address -fno-omit-frame-pointer -g",
               LDFLAGS="-fsanitize=address")
    cmd = [sys.executable, "setup.py", "build_ext", "--build-temp", str(scratch / "temp"),
           "--build-lib", str(scratch / "lib"), "-j", "2"]
    subprocess.run(cmd, cwd=source, env=env, check=True, stdout=subprocess.DEVNULL)
    (so,) = (scratch / "lib" / "fastattn").glob("_C*.so")
    return so


def overlay(scratch: Path, so: Path) -> Path:
    """A directory holding this checkout's fastattn package with ``so`` as its extension."""
    root = scratch / "overlay"
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(REPO / "fastattn", root / "fastattn", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    shutil.copy(so, root / "fastattn" / SO_NAME)
    # fastattn._cuda_emu finds csrc/ next to the package
    (root / "csrc").symlink_to(REPO / "csrc")
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default=",".join(raw_fuzz.FAMILIES))
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--count", type=int, default=1000, help="cases per family")
    ap.add_argument("--asan", action="store_true")
    ap.add_argument("--extension", help="fuzz this compiled extension (.so) instead of the built one "
                                        "(with --asan: an ASan build made before, not rebuilt)")
    ap.add_argument("--source", default=str(REPO),
                    help="with --asan: the checkout whose C++ sources to build (the Python oracle is always this one)")
    ap.add_argument("--tests", nargs="*", metavar="TEST_FILE", default=None,
                    help="with --asan: run these test files too (none named: " + ", ".join(ASAN_TESTS) + ")")
    ap.add_argument("--scratch", default="/tmp/fastattn_fuzz")
    ap.add_argument("--out", help="write the summary JSON here")
    args = ap.parse_args()
    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    build = "the built extension"
    if args.asan or args.extension:
        so = Path(args.extension) if args.extension else build_asan(scratch, Path(args.source))
        env["FASTATTN_FUZZ_PATH"] = str(overlay(scratch, so))
        build = f"AddressSanitizer build ({so})" if args.asan else f"extension {so}"
    if args.asan:
        def gcc_lib(name):
            return subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
        # libstdc++ preloaded too: otherwise ASan's __cxa_throw interceptor finds no real
        # __cxa_throw and every C++ exception (each rejected argument) aborts the worker.
        env["LD_PRELOAD"] = f"{gcc_lib('libasan.so')} {gcc_lib('libstdc++.so')}"
        # Leaks of the (uninstrumented) interpreter are not our findings; abort on the first error.
        env["ASAN_OPTIONS"] = "detect_leaks=0:halt_on_error=1:abort_on_error=0"
    if args.tests is not None and not args.asan:
        ap.error("--tests needs --asan")
    tests = None
    if args.tests is not None:
        t0 = time.time()
        files = [str(REPO / f) for f in (args.tests or ASAN_TESTS)]
        tenv = dict(env, PYTHONPATH=env["FASTATTN_FUZZ_PATH"], FASTATTN_SANITIZE="address",
                    FASTATTN_EMU_CACHE=str(scratch / "emu"))
        # From the overlay directory, so that the tests import the instrumented package.
        p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", *files],
                           cwd=env["FASTATTN_FUZZ_PATH"], env=tenv, capture_output=True, text=True)
        out = p.stdout + p.stderr
        tests = dict(files=[os.path.relpath(f, REPO) for f in files], exit_code=p.returncode,
                     result=(p.stdout.strip().splitlines() or [""])[-1],
                     sanitizer_reports=out.count("ERROR: AddressSanitizer"), seconds=round(time.time() - t0, 1))
        print(json.dumps(tests), flush=True)
        if p.returncode:
            print(out[-6000:])
    results = []
    for fam in (args.families.split(",") if args.count > 0 else []):
        t0 = time.time()
        rep = raw_fuzz.run(fam, args.seed, args.count, env=env)
        s = rep.summary()
        s["seconds"] = round(time.time() - t0, 1)
        results.append(s)
        print(json.dumps({k: s[k] for k in ("family", "cases", "crashes", "sanitizer_reports", "failures",
                                            "outcomes", "seconds")}), flush=True)
    total = {k: sum(r[k] for r in results) for k in ("cases", "crashes", "sanitizer_reports", "failures")}
    summary = dict(command=" ".join(["python", "bench/fuzz_raw_ops.py"] + sys.argv[1:]), build=build,
                   total=total, families=results, tests=tests)
    print(json.dumps(total))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
