"""BEiT's entry point name: pre-training with BEiT's hard visual-token targets and unilm's BEiT
defaults (`mcbeit-pretrain-beit`; its seed command lines pass --discrete_vae_type dall-e)."""
import sys

from mcbeit.cli.pretrain import main_beit as main

if __name__ == "__main__":
    sys.exit(main())
