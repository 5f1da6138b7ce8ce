"""Drop-in modules (SPEC §3)."""
from fastattn.nn.circular_relative_attention import (  # noqa: F401
    CONVENTIONS,
    VARIANTS,
    CircularRelativeAttention,
    KVCache,
    sinusoidal_table,
    variant_kwargs,
)

__all__ = ["CircularRelativeAttention", "KVCache", "VARIANTS", "CONVENTIONS", "variant_kwargs",
           "sinusoidal_table"]
