"""Builds the CUDA kernels as host code and runs them on CPU tensors (tests only).

``csrc/emu/<name>.cpp`` includes one ``csrc/cuda/*.cu`` with ``FASTATTN_CUDA_EMULATE`` defined
(see ``csrc/include/fa_cuda.h`` and ``csrc/emu/README.md``) and exposes its launchers through
pybind11. :func:`load` JIT-compiles it once per source change (ninja tracks the included headers)
under ``~/.cache/fastattn_emu/<name>``. The CUDA toolkit's headers are needed for ``__half`` and
``__nv_bfloat16``; the toolkit's compiler and a GPU are not.
"""
from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"


def cuda_include_dir() -> Optional[Path]:
    """The toolkit include directory holding cuda_fp16.h, or None."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:  # /usr/local/bin/nvcc is often a link into the toolkit
        candidates.append(str(Path(os.path.realpath(nvcc)).parent.parent))
    for base in candidates:
        if base and (Path(base) / "include" / "cuda_fp16.h").is_file():
            return Path(base) / "include"
    return None


def available(name: str) -> Optional[str]:
    """None when ``csrc/emu/<name>.cpp`` can be built here, else why not."""
    if not (CSRC / "emu" / f"{name}.cpp").is_file():
        return f"no emulator wrapper csrc/emu/{name}.cpp (source checkout needed)"
    if cuda_include_dir() is None:
        return "CUDA toolkit headers (cuda_fp16.h) not found; set CUDA_HOME"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler"
    return None


@functools.lru_cache(maxsize=None)
def load(name: str):
    """The pybind11 module built from ``csrc/emu/<name>.cpp``; RuntimeError when it cannot be built."""
    why = available(name)
    if why is not None:
        raise RuntimeError(f"CUDA emulator for {name!r} unavailable: {why}")
    from torch.utils.cpp_extension import load as jit_load

    # FASTATTN_SANITIZE=address: an AddressSanitizer build (bench/sanitize_raw_ops.py), kept apart.
    sanitize = os.environ.get("FASTATTN_SANITIZE", "")
    san = [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer", "-g"] if sanitize else []
    build = Path(os.environ.get("FASTATTN_EMU_CACHE", Path.home() / ".cache" / "fastattn_emu")) / (
        name + (f"_{sanitize.replace(',', '_')}" if sanitize else ""))
    build.mkdir(parents=True, exist_ok=True)
    try:
        return jit_load(
            name=f"fastattn_emu_{name}", sources=[str(CSRC / "emu" / f"{name}.cpp")],
            # -O1: the emulated kernels run tiny shapes; compile time matters more than speed.
            extra_cflags=["-std=c++20", "-O1", "-pthread", "-DFASTATTN_CUDA_EMULATE", "-w"] + san,
            extra_ldflags=["-pthread"] + san[:1],
            extra_include_paths=[str(CSRC / "include"), str(cuda_include_dir())],
            build_directory=str(build), verbose=os.environ.get("FASTATTN_EMU_VERBOSE") == "1")
    except Exception as exc:  # compile errors arrive as RuntimeError/CalledProcessError
        raise RuntimeError(f"building the CUDA emulator for {name!r} failed: {exc}") from exc
