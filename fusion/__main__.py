"""``python -m fusion``: the command line (see ``fusion --help``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
