"""``python -m fusion``: the command line (see ``fusion --help``)."""

import sys

from .cli import main

sys.exit(main())
