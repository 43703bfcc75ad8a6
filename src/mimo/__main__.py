"""`python -m mimo ...` (and `torchrun -m mimo ...`) is the `mimo` command."""

import sys

from mimo.cli import main

sys.exit(main())
