"""Loads the compiled extension ``fastattn._C`` once and remembers why it failed, if it did."""
from __future__ import annotations

import torch  # noqa: F401  (loads libc10/libtorch, which _C links against)

_C = None
_error: str | None = None
_info: dict = {}

try:  # the import registers the TORCH_LIBRARY ops as a side effect
    from fastattn import _C  # type: ignore[attr-defined,no-redef]

    # Read once: a pybind call per op call would also break torch.compile graphs.
    _info = dict(_C.build_info())
except ImportError as exc:  # pragma: no cover - depends on the build
    _error = f"fastattn._C could not be imported ({exc}); build it with `pip install --no-build-isolation -e .`"


def extension():
    """The compiled module, or None when it is not built."""
    return _C


def extension_error() -> str | None:
    """Why the compiled module is missing (None when it loaded)."""
    return _error


def build_info() -> dict:
    """What the compiled extension was built with (empty when it is missing)."""
    return dict(_info)


def has_backend(name: str) -> bool:
    """Whether the compiled extension contains kernels for ``name`` ("cpp" or "cuda")."""
    return name in _info.get("backends", ())
