"""``python -m vhdcore``: the same command line as the ``vhdcore`` script."""
import sys

from .cli.main import main

if __name__ == "__main__":
    sys.exit(main())
