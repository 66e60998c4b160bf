"""`python -m packtune ...` (what torchrun launches) is the `packtune` command."""

import sys

from packtune.cli import main

sys.exit(main())
