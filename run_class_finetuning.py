"""The original entry point's name: `python run_class_finetuning.py ...` (or under torchrun /
`python -m torch.distributed.launch`) runs `mcbeit-finetune` with the same flags."""
import sys

from mcbeit.cli.finetune import main

if __name__ == "__main__":
    sys.exit(main())
