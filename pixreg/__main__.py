"""``python -m pixreg``: the same program as the ``pixreg`` console script."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
