"""ConMIM's entry point name (TencentARC/ConMIM `run_conmim_pretraining.py`): denoising patch contrast against
an EMA teacher, with the original's defaults (`mcbeit-pretrain-conmim`); its README command line runs unchanged
but for paths and sizes, in one process or many."""
import sys

from mcbeit.cli.pretrain import main_conmim as main

if __name__ == "__main__":
    sys.exit(main())
