"""`python -m piformer.cli` (what torchrun launches): the same as the `piformer` command."""

import sys

from . import main

sys.exit(main())
