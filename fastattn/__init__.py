"""fastattn: fused kernels for circular relative attention and sparse autoencoders.

``import fastattn`` needs only torch and numpy; the compiled extension ``fastattn._C`` is
optional (without it only the ``reference`` backends run).
"""
from fastattn._version import __version__  # noqa: F401
from fastattn._ext import build_info  # noqa: F401
from fastattn.ops import circular_relative_attention  # noqa: F401
from fastattn import nn  # noqa: F401

__all__ = ["__version__", "build_info", "circular_relative_attention", "nn"]
