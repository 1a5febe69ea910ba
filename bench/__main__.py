"""``python -m bench``: see :mod:`bench.run`."""
import sys

from bench.run import main

sys.exit(0 if main() else 1)
