"""The original entry point's name: `python run_mcbeit_pretraining.py ...` (or under torchrun /
`python -m torch.distributed.launch`) runs `mcbeit-pretrain` with the same flags."""
import sys

from mcbeit.cli.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
