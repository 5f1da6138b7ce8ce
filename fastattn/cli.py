"""Command line: `fastattn info | demo | music ... | sae ... | analyze ...` (also `python -m fastattn ...`)."""
from __future__ import annotations

import argparse
import importlib
import platform
import sys

from fastattn._args import positive_int, run


def _info(_args) -> int:
    import torch

    import fastattn
    from fastattn import _ext
    from fastattn.backends import PRIORITY, auto_reason
    from fastattn.ops.circular_relative_attention import REASONS

    print(f"fastattn {fastattn.__version__}")
    print(f"python   {platform.python_version()} ({sys.executable})")
    print(f"torch    {torch.__version__} (CUDA {torch.version.cuda or 'none'}, "
          f"{torch.get_num_threads()} CPU threads)")
    try:
        import triton
        print(f"triton   {triton.__version__}")
    except ImportError:
        print("triton   not installed")
    info = _ext.build_info()
    if info:
        print(f"_C       backends={info['backends']} cuda_archs={info['cuda_archs'] or '-'} "
              f"openmp={info['openmp']} omp_max_threads={info['omp_max_threads']} "
              f"built_against_torch={info['torch_version_built']}")
    else:
        print(f"_C       not built: {_ext.extension_error()}")
    devices = [torch.zeros(1)]
    if torch.cuda.is_available():
        print(f"cuda     {torch.cuda.get_device_name()}")
        devices.append(torch.zeros(1, device="cuda"))
    from fastattn.ops import sae

    for title, reasons in (("circular_relative_attention", REASONS),
                           ("sae ops (" + ", ".join(sae.OPS) + ")", sae.REASONS)):
        print(f"{title} backends:")
        for name in PRIORITY:
            for x in devices:
                for dtype in (torch.float32, torch.bfloat16):
                    why = reasons[name](x.to(dtype))
                    auto = auto_reason(name, x.to(dtype), reasons)
                    state = "no (" + why + ")" if why else "yes" + ("" if auto is None else f"; not under auto: {auto}")
                    print(f"  {name:<9} {x.device.type:<4} {str(dtype).replace('torch.', ''):<8} {state}")
    return 0


def _demo(args) -> int:
    from fastattn.demo import main as demo

    return demo(L=args.L, B=args.B)


# Command groups living in subpackages; each module exposes register(subparsers) and imports
# its heavy dependencies (symusic, matplotlib, safetensors, ...) only when a command runs.
_GROUPS = ("fastattn.music.cli", "fastattn.sae.cli", "fastattn.analyze.cli")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastattn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in _GROUPS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if not name.startswith(exc.name or "?"):  # the group exists but lacks a dependency
                raise
            continue
        module.register(sub)
    sub.add_parser("info", help="versions, build and available backends").set_defaults(func=_info)
    demo = sub.add_parser("demo", help="the five paper attention variants: checked against the "
                                       "reference and timed (about a minute on 2 cores)")
    demo.add_argument("--L", type=positive_int, default=512, help="sequence length")
    demo.add_argument("--B", type=positive_int, default=2, help="batch size")
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
