"""`mcbeit-vqkd` / `run_vqkd_training.py` / `mcbeit-tokenizer train --tokenizer_type vqkd`: training BEiT v2's
VQ-KD tokenizer, with unilm ``beit2/run_vqkd_training.py``'s flags and defaults.

Without ``--data_path`` it is the embedded demonstration: the embedded images at 112 px, the tiny encoder,
1,024 codes, and (without ``--teacher_weight``) a RANDOM tiny teacher, with a loud warning."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from mcbeit.config.fields import Group, flag
from mcbeit.config.run import ImageFolderData, OptimConfig, RunConfig, at_least
from mcbeit.errors import ConfigError


@dataclass(frozen=True)
class VQKDModel(Group):
    TITLE: ClassVar[str] = "model"
    EMBEDDED: ClassVar[dict[str, Any]] = {"model": "vqkd_encoder_tiny_decoder_1x192x3", "codebook_n_emd": 1024,
                                          "quantize_kmeans_init": True}

    model: str = flag("vqkd_encoder_base_decoder_3x768x12_clip", "VQ-KD architecture: vqkd_encoder_{tiny,small,base,"
                      "large}_decoder_{depth}x{width}x{heads}[_{clip,dino,<timm name>}] (the suffix names the teacher)")
    rec_loss_type: str = flag("cosine", "reconstruction loss: mean(1 - cosine) to the teacher's patch features "
                                        "(the original has no other)", choices=("cosine",))
    codebook_n_emd: int = flag(8192, "codebook size")
    codebook_emd_dim: int = flag(32, "code dimension")
    ema_decay: float = flag(0.99, "EMA decay of the codebook")
    quantize_kmeans_init: bool = flag(False, "initialise the codebook by k-means (10 iterations, cosine) on the first "
                                             "batch (the original's README passes it; without it: random unit codes)")
    dead_code_steps: int = flag(0, "re-seed a code unused for this many steps from random batch features (0: never, as "
                                   "the original)")
    process_type: str = flag("default", "tokenizer input: 'default' maps [0,1] to [-1,1]; 'imagenet_norm' uses "
                                        "ImageNet mean/std", choices=("default", "imagenet_norm"))


@dataclass(frozen=True)
class VQKDTeacher(Group):
    TITLE: ClassVar[str] = "tokenizer"

    teacher_model_type: str = flag("clip", "teacher: clip (an OpenAI CLIP ViT visual tower file), dino (a DINO ViT "
                                           "file) or a timm model name (any weights file, e.g. a checkpoint of this "
                                           "package); a teacher suffix in --model wins, as in the original")
    teacher_weight: str | None = flag(None, "the teacher's weights file (nothing downloads)", type=str,
                                      show_default="none: an error, or a RANDOM tiny teacher in the embedded run")
    teacher_input_size: int = flag(224, "the teacher's input size; images are resized to it when it differs (the "
                                        "original stores it and never resizes)")


@dataclass(frozen=True)
class VQKDData(ImageFolderData):
    EMBEDDED: ClassVar[dict[str, Any]] = {"input_size": 112, "teacher_input_size": 112}

    input_size: int = flag(224, "image size (a multiple of 16: tokens = size / 16)")
    eval_data_path: str = flag("", "images evaluated after every epoch, as the original (resize to --input_size / "
                                   "0.875, centre crop): loss, reconstruction cosine and codes used, logged as test_*",
                               show_default="'': no evaluation", experiment=False)
    disable_eval: bool = flag(False, "no evaluation pass even with --eval_data_path", experiment=False)
    calculate_codebook_usage: bool = flag(False, "accepted for compatibility: usage is reported every epoch",
                                          experiment=False)
    imagenet_default_mean_and_std: bool = flag(False, "accepted for compatibility (the original's VQ-KD data "
                                                      "ignores it)", experiment=False)
    color_jitter: float = flag(0.0, "colour jitter strength (0: none, as the original)")
    train_interpolation: str = flag("bicubic", "resize filter of the random-resized crop",
                                    choices=("bicubic", "bilinear", "lanczos", "random"))
    min_crop_scale: float = flag(0.08, "random-resized-crop scale range (min, 1)")


@dataclass(frozen=True)
class VQKDOptim(OptimConfig):
    EMBEDDED: ClassVar[dict[str, Any]] = {"warmup_epochs": 1, "lr": 5e-4}

    lr: float = flag(5e-5, "learning rate for a total batch of 128: the run uses lr x total batch / 128 (logged)")
    opt_betas: tuple[float, ...] | None = flag(None, "optimizer betas (the README passes 0.9 0.99)", nargs="+",
                                               type=float, show_default="the optimizer's: (0.9, 0.999)")
    weight_decay: float = flag(1e-4, "weight decay (none for biases, 1-D parameters, cls/pos of encoder and decoder)")


@dataclass(frozen=True)
class VQKDTrainConfig(VQKDModel, VQKDTeacher, VQKDData, VQKDOptim, RunConfig):
    """VQ-KD tokenizer training."""

    TITLE: ClassVar[str] = "run"
    EMBEDDED: ClassVar[dict[str, Any]] = {"epochs": 6, "batch_size": 32, "save_ckpt_freq": 2}

    epochs: int = flag(100, "epochs to train")
    batch_size: int = flag(64, "images per process and step")
    save_ckpt_freq: int = flag(20, "write checkpoint-<epoch>.pth every N epochs (and after the last)", experiment=False)
    output_dir: str = flag("./output/mcbeit_vqkd", "where checkpoints, log.txt and tensorboard/ go; '' writes nothing",
                           experiment=False)
    image_freq: int = flag(0, "unused (VQ-KD reconstructs features, not pixels)", experiment=False)

    @property
    def teacher_kind(self) -> str:
        """The teacher: --model's suffix when it has one (the original ignores --teacher_model_type), else the flag."""
        from mcbeit.tokenizers.vqkd import parse_vqkd_name  # torch only when a run is configured

        return parse_vqkd_name(self.model).teacher or self.teacher_model_type

    def derive(self, given: set[str]) -> "VQKDTrainConfig":
        from mcbeit.tokenizers.vqkd import parse_vqkd_name

        suffix = parse_vqkd_name(self.model).teacher
        if "teacher_model_type" in given and suffix and suffix != self.teacher_model_type:
            raise ConfigError(f"--model {self.model} names its teacher ({suffix}; the original then ignores "
                              f"--teacher_model_type), but --teacher_model_type {self.teacher_model_type} was given: "
                              f"use --model {self.model[:-len(suffix) - 1]} (no suffix) to take the teacher from the "
                              "flag")
        return dataclasses.replace(self, log_dir=self.tensorboard_dir, weight_decay_end=self.final_weight_decay)

    def check(self) -> None:
        self.check_run()
        self.check_optim()
        at_least(self, 2, ("codebook_n_emd",))
        at_least(self, 1, ("codebook_emd_dim",))
        at_least(self, 0, ("dead_code_steps", "color_jitter"))
        for name in ("input_size", "teacher_input_size"):
            if getattr(self, name) % 16 or getattr(self, name) < 16:
                raise ConfigError(f"--{name} {getattr(self, name)}: use a multiple of 16 (16-px patches)")
        if not 0.0 < self.min_crop_scale <= 1.0:
            raise ConfigError(f"--min_crop_scale must lie in (0, 1], got {self.min_crop_scale}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"--ema_decay must lie in [0, 1), got {self.ema_decay}")
