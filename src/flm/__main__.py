"""`python -m flm` runs the `flm` command."""

import sys

from .cli import main

sys.exit(main())
