"""`python -m fastattn.analyze collect | stats | ...` (the same as `fastattn analyze ...`)."""

import sys

from fastattn.analyze.cli import main

sys.exit(main())
