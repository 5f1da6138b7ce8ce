"""Public ops. Each op module registers its fake and autograd kernels on import."""
from fastattn.ops.circular_relative_attention import circular_relative_attention  # noqa: F401
