"""Fine-tuning and linear-probing configuration: the flags of the original `run_class_finetuning.py`.

Without ``--data_path`` the run is the embedded demonstration (``EMBEDDED``: a tiny classifier at
112 px for 3 epochs, fine-tuned from the newest checkpoint of ``mcbeit-pretrain`` when there is
one); with it every default is the original script's. ``mcbeit-linprobe`` is the same command with
linear-probing defaults (MAE / BEiT v2's protocol: light augmentation, LARS, no weight decay).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from mcbeit.config.fields import Group, flag
from mcbeit.config.pretrain import RECOMPUTE_MODES
from mcbeit.config.run import CompileConfig, OptimConfig, RunConfig, at_least
from mcbeit.errors import ConfigError

RANDOM_INIT = ("none", "random")  # --finetune values that mean: start from random weights
PRETRAINED_OUTPUT_DIR = "./output/mcbeit_pretrained"  # where `mcbeit-pretrain` writes by default


def newest_pretrained_checkpoint(folder: str = PRETRAINED_OUTPUT_DIR) -> str:
    """The newest ``checkpoint-<epoch>.pth`` or mid-epoch ``checkpoint-<epoch>-step<N>.pth`` in ``folder``
    by position ('' when there is none)."""
    found = [((int(m.group(1)), float(m.group(2) or "inf")), p) for p in Path(folder).glob("checkpoint-*.pth")
             if (m := re.fullmatch(r"checkpoint-(\d+)(?:-step(\d+))?\.pth", p.name))]
    return str(max(found)[1]) if found else ""


def uses_imagenet_mean_and_std(model: str) -> bool:
    """timm's BEiT v2 classifiers (``beitv2_*``) are trained on ImageNet-normalised images (timm's cfg
    ``IMAGENET_DEFAULT_MEAN/STD``; the original fine-tunes v2 with ``--imagenet_default_mean_and_std``)."""
    return str(model).startswith("beitv2_")


@dataclass(frozen=True)
class ClassificationData(Group):
    TITLE: ClassVar[str] = "data"
    EMBEDDED: ClassVar[dict[str, Any]] = {"input_size": 112}

    data_path: str | None = flag(None, "dataset folder: train/ and val/ (class folders or <split>_map.txt)",
                                 show_default="the embedded images")
    eval_data_path: str | None = flag(None, "evaluation folder (for --data_set image_folder)", type=str)
    data_set: str | None = flag(None, "dataset layout", choices=("CIFAR", "IMNET", "image_folder"),
                                show_default="detected (the original's: IMNET)")
    nb_classes: int | None = flag(None, "number of classes", type=int, show_default="from the dataset")
    input_size: int = flag(224, "image size")
    imagenet_default_mean_and_std: bool = flag(False, "normalise with ImageNet's mean/std (else 0.5/0.5); always on "
                                                      "for timm's beitv2_* models, whose weights expect it (their cfg)",
                                               show_default="off (on for --model beitv2_*)")


@dataclass(frozen=True)
class ClassifierModel(Group):
    TITLE: ClassVar[str] = "model"
    EMBEDDED: ClassVar[dict[str, Any]] = {"model": "beit_tiny_patch16_224"}

    model: str = flag("beit_base_patch16_224", "a BEiT classifier of timm (beit_base_patch16_224, ...) or this "
                                               "package's (beit_tiny_patch16_224, beit_small_patch16_224)")
    rel_pos_bias: bool = flag(True, "relative position bias in every block",
                              negation="--disable_rel_pos_bias", negation_help="no relative position bias")
    abs_pos_emb: bool = flag(False, "absolute position embedding")
    layer_scale_init_value: float = flag(1e-5, "layer scale initial value: 0.1 for base, 1e-5 for large; 0 disables "
                                               "it (loaded weights replace it)")
    drop: float = flag(0.0, "dropout before the head")
    attn_drop_rate: float = flag(0.0, "attention dropout")
    drop_path: float = flag(0.1, "stochastic depth rate")
    recompute: str = flag("none", "activations backward recomputes (selective / full save memory, none is fastest)",
                          choices=RECOMPUTE_MODES, experiment=False)
    model_ema: bool = flag(False, "keep an exponential moving average of the weights (evaluated too)")
    model_ema_decay: float = flag(0.9999, "its decay")
    model_ema_force_cpu: bool = flag(False, "keep the average on the CPU", experiment=False)


@dataclass(frozen=True)
class FinetuneSource(Group):
    TITLE: ClassVar[str] = "fine-tuning source"

    finetune: str = flag("", "pre-trained checkpoint: a file, a DeepSpeed folder or an https URL; 'none' trains from "
                             "random initialisation", show_default="none (without --data_path: the newest checkpoint "
                                                                     "of mcbeit-pretrain in ./output/mcbeit_pretrained)")
    model_key: str = flag("model|module", "keys of the checkpoint's state dict, tried in order")
    model_prefix: str = flag("", "prefix stripped from the checkpoint's keys")
    init_scale: float = flag(0.001, "scale of the head's initial weights")
    use_mean_pooling: bool = flag(True, "mean of the patch tokens + fc_norm", negation="--use_cls",
                                  negation_help="the CLS token after the final norm")
    disable_weight_decay_on_rel_pos_bias: bool = flag(False, "no weight decay on relative position tables")


@dataclass(frozen=True)
class Augmentation(Group):
    TITLE: ClassVar[str] = "augmentation"
    EMBEDDED: ClassVar[dict[str, Any]] = {"crop_min_scale": 0.35}

    color_jitter: float = flag(0.4, "colour jitter factor")
    aa: str = flag("rand-m9-mstd0.5-inc1", "RandAugment / AutoAugment policy ('' for none)")
    smoothing: float = flag(0.1, "label smoothing")
    train_interpolation: str = flag("bicubic", "training resize filter (random, bilinear, bicubic)")
    crop_pct: float | None = flag(None, "evaluation centre-crop fraction", type=float,
                                  show_default="224/256 below 384 px, else 1")
    crop_min_scale: float = flag(0.08, "smallest area fraction of the training random-resized crop")
    reprob: float = flag(0.25, "random-erasing probability")
    remode: str = flag("pixel", "random-erasing mode")
    recount: int = flag(1, "random-erasing count")
    resplit: bool = flag(False, "accepted for compatibility: without augmentation splits it changes nothing (as in "
                                "the original)", experiment=False)
    mixup: float = flag(0.0, "mixup alpha (on when > 0)")
    cutmix: float = flag(0.0, "cutmix alpha (on when > 0)")
    cutmix_minmax: tuple[float, ...] | None = flag(None, "cutmix min/max box ratio (overrides --cutmix)", nargs="+",
                                                   type=float)
    mixup_prob: float = flag(1.0, "probability of mixup or cutmix per batch")
    mixup_switch_prob: float = flag(0.5, "probability of cutmix instead of mixup when both are on")
    mixup_mode: str = flag("batch", "how mixup parameters are drawn", choices=("batch", "pair", "elem"))


@dataclass(frozen=True)
class Evaluation(Group):
    TITLE: ClassVar[str] = "evaluation"

    eval: bool = flag(False, "evaluate (--resume, the newest checkpoint, or --finetune) and exit", experiment=False)
    dist_eval: bool = flag(False, "evaluate a shard per process (every image exactly once)", experiment=False)
    disable_eval_during_finetuning: bool = flag(False, "no evaluation at epoch ends", experiment=False)
    save_ckpt: bool = flag(True, "write checkpoints", negation="--no_save_ckpt", negation_help="write no checkpoint",
                           experiment=False)


@dataclass(frozen=True)
class LinearProbing(Group):
    TITLE: ClassVar[str] = "linear probing"

    linear_probe: bool = flag(False, "train only BatchNorm(affine=False) + a linear head on frozen features")
    probe_layer: int | None = flag(None, "block whose features are probed, 1-based", type=int, show_default="the last")
    probe_pool: str = flag("avg", "mean patch token or CLS token", choices=("avg", "cls"))
    blr: float = flag(0.1, "linear probing without --lr: lr = blr x total batch size / 256 (MAE's convention)")


@dataclass(frozen=True)
class DeepSpeedConfig(Group):
    TITLE: ClassVar[str] = "DeepSpeed"

    enable_deepspeed: bool = flag(False, "train through DeepSpeed (ZeRO; its CPU accelerator without a GPU)",
                                  experiment=False)
    zero_stage: int = flag(0, "ZeRO stage (3 would partition the weights EMA, evaluation and export read)",
                           choices=(0, 1, 2), experiment=False)


@dataclass(frozen=True)
class FinetuneConfig(ClassificationData, ClassifierModel, FinetuneSource, Augmentation, Evaluation, LinearProbing,
                     DeepSpeedConfig, CompileConfig, OptimConfig, RunConfig):
    """Image-classification fine-tuning (`run_class_finetuning.py`, `mcbeit-finetune`)."""

    TITLE: ClassVar[str] = "run"
    EMBEDDED: ClassVar[dict[str, Any]] = {"epochs": 3, "batch_size": 32, "warmup_epochs": 1, "save_ckpt_freq": 1,
                                          "lr": 2e-3, "layer_decay": 0.75}

    epochs: int = flag(30, "epochs to train")
    update_freq: int = flag(1, "gradient accumulation: micro-batches per update")
    save_ckpt_freq: int = flag(5, "write checkpoint-<epoch>.pth every N epochs (and after the last)", experiment=False)
    output_dir: str = flag("./output/mcbeit_finetuned", "where checkpoints, log.txt and tensorboard/ go; '' writes "
                                                       "nothing", experiment=False)
    opt_betas: tuple[float, ...] | None = flag(None, "optimizer betas", nargs="+", type=float,
                                               show_default="the optimizer's own")
    min_lr: float = flag(1e-6, "final learning rate of the cosine schedule")
    lr: float | None = flag(5e-4, "peak learning rate", type=float)
    layer_decay: float = flag(0.9, "layer-wise learning-rate decay (1: none)")

    def build_classifier(self, nb_classes: int):
        """The classifier these flags describe (random weights; a linear probe's backbone without a head:
        :class:`~mcbeit.models.linear_probe.LinearProbe` adds it): what ``mcbeit-finetune`` trains and the Python API
        rebuilds from a checkpoint's ``args``."""
        from mcbeit.models.classifier import build_classifier

        return build_classifier(self.model, nb_classes=0 if self.linear_probe else nb_classes,
                                input_size=self.input_size, use_mean_pooling=self.use_mean_pooling,
                                init_scale=self.init_scale, rel_pos_bias=self.rel_pos_bias,
                                abs_pos_emb=self.abs_pos_emb, layer_scale_init_value=self.layer_scale_init_value,
                                drop=self.drop, attn_drop_rate=self.attn_drop_rate, drop_path=self.drop_path)

    @property
    def mixup_on(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0 or self.cutmix_minmax is not None

    def derive(self, given: set[str]) -> "FinetuneConfig":
        """Fill the values that follow from others (the linear probe's lr needs the number of
        processes: None here, the task computes it from --blr)."""
        finetune = "" if self.finetune.strip().lower() in RANDOM_INIT else self.finetune
        if self.data_path is None and "finetune" not in given and not (self.eval or self.resume):
            finetune = newest_pretrained_checkpoint()  # the embedded demonstration: pre-train, then fine-tune
        lr = None if self.linear_probe and "lr" not in given else self.lr
        imagenet_norm = self.imagenet_default_mean_and_std or uses_imagenet_mean_and_std(self.model)
        layer_decay = 1.0 if self.linear_probe else self.layer_decay
        return dataclasses.replace(self, finetune=finetune, lr=lr, layer_decay=layer_decay,
                                   imagenet_default_mean_and_std=imagenet_norm,
                                   weight_decay_end=self.final_weight_decay, log_dir=self.tensorboard_dir)

    def check(self) -> None:
        self.check_run()
        self.check_optim()
        at_least(self, 1, ("update_freq", "input_size"))
        if self.linear_probe and (self.enable_deepspeed or self.model_ema):
            raise ConfigError("--linear_probe trains one linear layer: run it without --enable_deepspeed / --model_ema")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ConfigError(f"--layer_decay must lie in (0, 1], got {self.layer_decay}")


@dataclass(frozen=True)
class LinprobeConfig(FinetuneConfig):
    """Linear probing (`mcbeit-linprobe`): the fine-tuning flags with linear-probing defaults."""

    EMBEDDED: ClassVar[dict[str, Any]] = {"layer_decay": 1.0}

    output_dir: str = flag("./output/mcbeit_linprobe", "where checkpoints, log.txt and tensorboard/ go; '' writes "
                                                      "nothing", experiment=False)
    linear_probe: bool = flag(True, "train only BatchNorm(affine=False) + a linear head on frozen features")
    aa: str = flag("", "RandAugment / AutoAugment policy ('' for none)")
    reprob: float = flag(0.0, "random-erasing probability")
    smoothing: float = flag(0.0, "label smoothing")
    color_jitter: float = flag(0.0, "colour jitter factor")
    drop_path: float = flag(0.0, "stochastic depth rate")
    weight_decay: float = flag(0.0, "weight decay")
    layer_decay: float = flag(1.0, "layer-wise learning-rate decay (ignored: only the head trains)")
    opt: str = flag("lars", "any optimizer timm knows")
    lr: float | None = flag(None, "peak learning rate", type=float, show_default="--blr x total batch size / 256")
