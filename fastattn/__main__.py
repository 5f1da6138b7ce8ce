from fastattn._args import exit_process
from fastattn.cli import main

exit_process(main())
