"""`python -m fastattn.analyze collect | stats | ...` (the same as `fastattn analyze ...`)."""

from fastattn._args import exit_process
from fastattn.analyze.cli import main

exit_process(main())
