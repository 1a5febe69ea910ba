"""BEiT v2's entry point name (unilm `beit2/run_beitv2_pretraining.py`): VQ-KD targets, patch aggregation
and unilm's BEiT v2 defaults (`mcbeit-pretrain-beitv2`); its README command lines run unchanged but for
paths and sizes."""
import sys

from mcbeit.cli.pretrain import main_beitv2 as main

if __name__ == "__main__":
    sys.exit(main())
