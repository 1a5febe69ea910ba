"""``python -m mcbeit.bench``: see :mod:`mcbeit.bench.run`."""
import sys

from mcbeit.bench.run import main

sys.exit(0 if main() else 1)
