"""Pure-PyTorch reference implementations (test oracles, benchmark baselines, fallbacks)."""
from fastattn.reference.circular_relative_attention import (  # noqa: F401
    circular_relative_attention,
    relative_scores,
)
