"""`python -m fastattn.sae train | entropy-bench | stats` (the same as `fastattn sae ...`)."""
import sys

from fastattn.sae.cli import main

sys.exit(main())
