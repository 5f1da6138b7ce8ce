"""Builds fastattn and its one extension, fastattn._C.

C++ (CPU, OpenMP) always; the CUDA sources (csrc/cuda) too when there are any, torch has CUDA
and a toolkit is found, unless FASTATTN_NO_CUDA=1. Build with `pip install --no-build-isolation -e .` so the extension is
compiled against the torch already installed (an isolated build would fetch another torch).
"""
import glob
import os
import re

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
CUDA_ARCHS = os.environ.get("FASTATTN_CUDA_ARCHS", "80;90a")
# The extension is built on the machine that runs it, so tune the CPU kernels for it
# (vector gathers and a vectorised exp); set FASTATTN_CPU_ARCH="" for a portable build.
CPU_ARCH = os.environ.get("FASTATTN_CPU_ARCH", "native")


def rel(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def use_cuda() -> bool:
    if os.environ.get("FASTATTN_NO_CUDA", "0") == "1" or not rel("csrc/cuda/*.cu"):
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


def extension():
    cuda = use_cuda()
    sources = rel("csrc/fastattn.cpp") + rel("csrc/cpu/*.cpp")
    defines = [f'-DFASTATTN_TORCH_VERSION="{torch.__version__}"']
    cxx = ["-O3", "-std=c++17", "-fopenmp"] + ([f"-march={CPU_ARCH}"] if CPU_ARCH else []) + defines
    args = dict(include_dirs=[os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc", "cpu")],
                extra_link_args=["-fopenmp"])
    if not cuda:
        return CppExtension("fastattn._C", sources, extra_compile_args={"cxx": cxx}, **args)
    archs = [a.strip() for a in CUDA_ARCHS.split(";") if a.strip()]
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    # PTX of the oldest portable arch too, so that newer GPUs (sm_100, ...) can JIT the kernels.
    portable = [a for a in archs if not a.endswith("a")]
    if portable:
        gencode.append(f"-gencode=arch=compute_{portable[0]},code=compute_{portable[0]}")
    cuda_defines = ["-DFASTATTN_WITH_CUDA", f'-DFASTATTN_CUDA_ARCHS="{CUDA_ARCHS}"']
    sources += rel("csrc/cuda/*.cu") + rel("csrc/cuda/*.cpp")
    return CUDAExtension("fastattn._C", sources, extra_compile_args={
        "cxx": cxx + cuda_defines,
        "nvcc": ["-O3", "-Xcompiler", "-fopenmp", "-std=c++17", "--use_fast_math", "-lineinfo"] + gencode + cuda_defines,
    }, **args)


def version():
    text = open(os.path.join(ROOT, "fastattn", "_version.py")).read()
    return re.search(r'__version__ = "([^"]+)"', text).group(1)


setup(
    name="fastattn",
    version=version(),
    description="Fused kernels for circular relative attention and sparse autoencoders",
    packages=find_packages(include=["fastattn", "fastattn.*"]),
    package_data={"fastattn.analyze": ["data/*.txt"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.10",
    install_requires=["torch", "numpy"],
    extras_require={
        "music": ["symusic", "matplotlib", "tqdm"],
        "sae": ["safetensors", "tqdm", "matplotlib"],
        "analyze": ["transformers", "safetensors", "tqdm", "matplotlib"],
        "dev": ["pytest", "ninja", "pybind11", "triton"],
    },
    entry_points={"console_scripts": ["fastattn=fastattn.cli:main"]},
)
