"""The seed's `tools/test.py CONFIG CHECKPOINT --eval mIoU [--aug-test]`: `mcbeit-seg test` with the same arguments."""
import sys

from mcbeit.cli.segmentation import main_test

if __name__ == "__main__":
    sys.exit(main_test())
