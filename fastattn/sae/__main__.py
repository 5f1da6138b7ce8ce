"""`python -m fastattn.sae train | entropy-bench | stats` (the same as `fastattn sae ...`)."""

from fastattn._args import exit_process
from fastattn.sae.cli import main

exit_process(main())
