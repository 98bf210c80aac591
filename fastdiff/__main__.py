"""``python -m fastdiff`` (and ``torchrun -m fastdiff``): the ``fastdiff`` command line."""

import sys

from fastdiff.cli import main

if __name__ == "__main__":
    sys.exit(main())
