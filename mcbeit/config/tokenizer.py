"""`mcbeit-tokenizer` configuration: training a VQ-VAE tokenizer (`train`) and looking at any
tokenizer (`inspect`). Without ``--data_path`` training is the embedded demonstration (1,024 codes,
5 epochs: minutes on a CPU)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from mcbeit.config.fields import Group, flag
from mcbeit.config.pretrain import TOKENIZER_KINDS
from mcbeit.config.run import ImageFolderData, RunConfig, at_least
from mcbeit.errors import ConfigError

VQ_DEFAULT_EMBED_DIM = 32       # mcbeit.tokenizers.custom's (kept torch-free here)
VQ_DEFAULT_LOGIT_SCALE = 50.0


@dataclass(frozen=True)
class VQVAEModel(Group):
    TITLE: ClassVar[str] = "model"
    EMBEDDED: ClassVar[dict[str, Any]] = {"vocab_size": 1024}

    vocab_size: int = flag(8192, "codebook size")
    embed_dim: int = flag(VQ_DEFAULT_EMBED_DIM, "dimension of the (l2-normalised) codes")
    hidden: int = flag(16, "width n_hid of the encoder and decoder (DALL-E: 256)")
    blocks_per_group: int = flag(1, "residual blocks per resolution (DALL-E: 2)")
    logit_scale: float = flag(VQ_DEFAULT_LOGIT_SCALE, "pre-training logits are -logit_scale x squared distance to each "
                                                      "code")


@dataclass(frozen=True)
class VQVAEObjective(Group):
    TITLE: ClassVar[str] = "objective"

    commitment: float = flag(0.25, "weight of the commitment loss")
    ema_decay: float = flag(0.99, "EMA decay of the codebook")
    dead_code_steps: int = flag(20, "re-initialise a code unused for this many steps from random batch features "
                                    "(0: never)")


@dataclass(frozen=True)
class TokenizerData(ImageFolderData):
    input_size: int = flag(112, "training crop size (a multiple of 8: tokens = size / 8)")
    crop_min_scale: float = flag(0.35, "random-resized-crop scale range (min, 1)")
    interpolation: str = flag("lanczos", "resize filter (pre-training's --second_interpolation is lanczos)")


@dataclass(frozen=True)
class TokenizerOptim(Group):
    TITLE: ClassVar[str] = "optimisation"
    EMBEDDED: ClassVar[dict[str, Any]] = {"warmup_epochs": 1}

    lr: float = flag(2e-3, "peak learning rate (AdamW)")
    min_lr: float = flag(1e-5, "final learning rate of the cosine schedule")
    warmup_epochs: int = flag(5, "linear LR warm-up, in epochs")
    warmup_steps: int = flag(-1, "linear LR warm-up in steps; overrides --warmup_epochs when > 0")
    weight_decay: float = flag(1e-4, "weight decay")
    opt_betas: tuple[float, ...] = flag((0.9, 0.99), "AdamW betas", nargs=2, type=float)
    clip_grad: float | None = flag(None, "clip the gradient norm to this value", type=float, show_default="no clipping")

    @property
    def final_weight_decay(self) -> float:
        return self.weight_decay  # constant: no weight-decay schedule here


@dataclass(frozen=True)
class TokenizerTrainConfig(VQVAEModel, VQVAEObjective, TokenizerData, TokenizerOptim, RunConfig):
    """`mcbeit-tokenizer train` (`run_tokenizer_training.py`)."""

    TITLE: ClassVar[str] = "run"
    EMBEDDED: ClassVar[dict[str, Any]] = {"epochs": 5, "batch_size": 32, "save_ckpt_freq": 2}

    epochs: int = flag(100, "epochs to train")
    save_ckpt_freq: int = flag(10, "write checkpoint-<epoch>.pth (and tokenizer.pth) every N epochs (and after the last)",
                               experiment=False)
    output_dir: str = flag("./output/mcbeit_tokenizer", "where checkpoints, tokenizer.pth, log.txt and tensorboard/ "
                                                       "go; '' writes nothing", experiment=False)
    print_freq: int = flag(10, "steps between progress-bar / TensorBoard updates (one device read each)",
                           experiment=False)
    image_freq: int = flag(0, "also write an input/reconstruction grid to TensorBoard every N steps (0: at epoch ends "
                              "only)", experiment=False)

    def derive(self, given: set[str]) -> "TokenizerTrainConfig":
        return dataclasses.replace(self, log_dir=self.tensorboard_dir)

    def check(self) -> None:
        self.check_run()
        at_least(self, 1, ("embed_dim", "hidden", "blocks_per_group"))
        at_least(self, 2, ("vocab_size",))
        at_least(self, 0, ("lr", "min_lr", "weight_decay", "warmup_epochs"))
        if self.input_size % 8 or self.input_size < 8:
            raise ConfigError(f"--input_size {self.input_size}: the tokenizer downsamples by 8, use a multiple of 8 "
                              f"(e.g. {max(8, self.input_size // 8 * 8)})")
        if not 0.0 < self.crop_min_scale <= 1.0:
            raise ConfigError(f"--crop_min_scale must lie in (0, 1], got {self.crop_min_scale}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"--ema_decay must lie in [0, 1), got {self.ema_decay}")


@dataclass(frozen=True)
class TokenizerInspectConfig(ImageFolderData):
    """`mcbeit-tokenizer inspect`: token maps, reconstructions and codebook usage of any tokenizer."""

    TITLE: ClassVar[str] = "inspect"

    discrete_vae_type: str = flag("customized", f"one of {', '.join(TOKENIZER_KINDS)}")
    discrete_vae_weight_path: str | None = flag(None, "tokenizer weights (as in pre-training)", type=str,
                                                show_default="none: RANDOM weights")
    input_size: int = flag(112, "image size given to the tokenizer (centre crop)")
    num_images: int = flag(8, "images (columns) in the grid")
    output: str = flag("./output/tokenizer_inspect.png", "PNG of the grid; the histogram goes beside it as "
                                                         "<name>_histogram.png")
    histogram_images: int = flag(512, "images whose tokens the usage histogram counts")
    batch_size: int = flag(32, "images per batch")
    num_workers: int = flag(0, "data-loader worker processes")
    device: str | None = flag(None, "cuda or cpu", show_default="cuda when present")
    seed: int = flag(0, "which images the histogram draws")

    def check(self) -> None:
        if self.num_images < 1 or self.histogram_images < 0 or self.batch_size < 1:
            raise ConfigError("--num_images and --batch_size must be at least 1, --histogram_images at least 0")
