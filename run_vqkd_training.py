"""`python run_vqkd_training.py ...` (or under torchrun / torch.distributed.launch) runs `mcbeit-vqkd`: BEiT v2's
VQ-KD tokenizer training with the flags of unilm's beit2/run_vqkd_training.py."""
import sys

from mcbeit.cli.tokenizer import main_vqkd

if __name__ == "__main__":
    sys.exit(main_vqkd())
