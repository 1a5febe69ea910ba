"""`python run_tokenizer_training.py ...` (or under torchrun) runs `mcbeit-tokenizer train` with the same flags."""
import sys

from mcbeit.cli.tokenizer import main_train

if __name__ == "__main__":
    sys.exit(main_train())
