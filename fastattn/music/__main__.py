"""`python -m fastattn.music <prepare|train|generate|evaluate|demo> ...`"""

from fastattn._args import exit_process
from fastattn.music.cli import main

exit_process(main())
