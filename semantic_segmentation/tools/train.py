"""The seed's `tools/train.py CONFIG [--work-dir DIR] [--seed N] [--deterministic] [--options k=v ...]`:
`mcbeit-seg train` with the same arguments (see `mcbeit-seg train --help`)."""
import sys

from mcbeit.cli.segmentation import main_train

if __name__ == "__main__":
    sys.exit(main_train())
