"""``python -m kestrel``: the same command line as ``kestrel``."""

import sys

from kestrel.streams.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
