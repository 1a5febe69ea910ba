"""BEiT's entry point name: the same pre-training; pass --hard_targets for BEiT's hard-token loss
(its seed command lines use --discrete_vae_type dall-e)."""
import sys

from mcbeit.tasks.pretrain import main_beit as main

if __name__ == "__main__":
    sys.exit(main())
