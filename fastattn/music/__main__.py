"""`python -m fastattn.music <prepare|train|generate|evaluate|demo> ...`"""
import sys

from fastattn.music.cli import main

sys.exit(main())
