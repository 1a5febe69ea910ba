"""COCO detection and instance segmentation (Mask R-CNN on a BEiT backbone, `mcbeit-det`): the recipe of the
mc-BEiT benchmark's detectron2 LazyConfigs as flags, and the configs themselves as presets.

mc-BEiT's detection code is MIMDet's "benchmarking" Mask R-CNN (detectron2 0.6 LazyConfig). Its values are the
defaults here; each config of the seeds is a preset (``PRESETS``: the config file's name, e.g.
``benchmarking_mask_rcnn_base_FPN_25ep_LSJ_mc-beit``) that sets what it changes, and trailing ``key=value``
overrides take the LazyConfig keys detectron2 reads (``train.init_checkpoint=CKP``, ``optimizer.lr=1e-4``,
``dataloader.train.total_batch_size=16``; ``OPTION_KEYS``). Training counts iterations (``--max_iter``, detectron2's
``train.max_iter``); the engine's epochs are the rounds of ``--eval_period`` iterations between two evaluations (the
last round ends with the schedule, as detectron2 evaluates after its last iteration too).

Without ``--data_path`` the run is the embedded demonstration (generated scenes with boxes and instance masks in
COCO json, a tiny model at 128 px, minutes on a CPU), fine-tuned from the newest checkpoint of ``mcbeit-pretrain``
when there is one.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, ClassVar

from mcbeit.config.fields import Group, embedded_values, flag
from mcbeit.config.finetune import RANDOM_INIT, newest_pretrained_checkpoint
from mcbeit.config.run import RunConfig, at_least
from mcbeit.config.presets import parse_key_values, read_preset_file
from mcbeit.errors import ConfigError

DEFAULT_PRESET = "benchmarking_mask_rcnn_base_FPN_25ep_LSJ_mc-beit"

#: detectron2's 100-epoch benchmarking schedule (184375 iterations of 64 images); the 25-epoch configs divide it by 4
_ITERS_100EP = 184375

#: config name -> the values its file sets (lixiaotong97/mc-BEiT detection/configs/benchmarking/, on top of MIMDet's
#: benchmarking_mask_rcnn_base_FPN_100ep_LSJ_mae.py whose model, optimizer and data values are the flags' defaults)
PRESETS: dict[str, dict[str, Any]] = {
    # pretrained = "mcbeit_pretrained/checkpoint-799.pth": a pre-training checkpoint, shared relative position table
    "benchmarking_mask_rcnn_base_FPN_25ep_LSJ_mc-beit": dict(max_iter=_ITERS_100EP // 4, warmup_length=0.01,
                                                             shared_rel_pos_bias=True),
    # pretrained = "mcbeit_pretrained/checkpoint-best.pth" (a fine-tuned classifier): one table per block
    "benchmarking_mask_rcnn_base_FPN_25ep_LSJ_ft_mc-beit": dict(max_iter=_ITERS_100EP // 4, warmup_length=0.01,
                                                                shared_rel_pos_bias=False),
}

#: detectron2 LazyConfig keys the trailing KEY=VALUE overrides understand -> the flag they set
OPTION_KEYS: dict[str, str] = {
    "train.init_checkpoint": "init_checkpoint", "train.output_dir": "output_dir", "train.max_iter": "max_iter",
    "train.eval_period": "eval_period", "train.checkpointer.period": "checkpoint_period",
    "train.checkpointer.max_to_keep": "keep_last", "train.log_period": "print_freq", "train.device": "device",
    "train.seed": "seed", "train.amp.enabled": "amp_enabled",
    "model.backbone.bottom_up.pretrained": "pretrained", "model.backbone.bottom_up.drop_path_rate": "drop_path",
    "model.backbone.bottom_up.window_size": "window_size", "model.backbone.bottom_up.with_cp": "grad_checkpointing",
    "model.backbone.bottom_up.init_values": "layer_scale_init_value",
    "model.backbone.bottom_up.shared_rel_pos_bias": "shared_rel_pos_bias",
    "model.backbone.bottom_up.img_size": "image_size", "image_size": "image_size",
    "model.roi_heads.num_classes": "num_classes",
    "optimizer.lr": "lr", "optimizer.weight_decay": "weight_decay", "optimizer.betas": "opt_betas",
    "optimizer.eps": "opt_eps", "lr_multiplier.warmup_length": "warmup_length",
    "lr_multiplier.warmup_factor": "warmup_factor",
    "dataloader.train.total_batch_size": "total_batch_size", "dataloader.train.num_workers": "num_workers",
    "dataloader.test.num_workers": "num_workers",
}


def parse_overrides(overrides: tuple[str, ...]) -> dict[str, Any]:
    """detectron2's trailing ``KEY=VALUE`` overrides -> {flag: value}; an unknown key is an error listing the known
    ones. ``train.amp.enabled`` becomes ``--amp`` (on: the device's default, off: ``off``)."""
    out = parse_key_values(overrides, OPTION_KEYS, example="train.init_checkpoint=/path/ckpt.pth",
                           unknown="not a config key mcbeit-det maps (or pass the flag itself, see mcbeit-det train "
                                   "--help)")
    if "amp_enabled" in out:
        out["amp"] = None if out.pop("amp_enabled") else "off"
    return out


def read_config_file(spec: str) -> tuple[str, dict[str, Any]]:
    """A ``--config-file`` argument -> (preset name, the values it sets): a preset name or a path to one of the seed
    configs (``configs/benchmarking/NAME.py``, ``overrides = {LazyConfig key: value}`` inside)."""
    return read_preset_file(spec, PRESETS, "overrides", parse_overrides)


def default_data_path() -> str | None:
    """detectron2's habit: ``$DETECTRON2_DATASETS/coco`` when the variable is set (its builtin coco_2017 datasets)."""
    root = os.environ.get("DETECTRON2_DATASETS")
    return os.path.join(root, "coco") if root else None


@dataclass(frozen=True)
class DetData(Group):
    TITLE: ClassVar[str] = "data"
    EMBEDDED: ClassVar[dict[str, Any]] = {"image_size": 128}

    data_path: str | None = flag(None, "COCO root: train2017/, val2017/ and annotations/instances_{train,val}2017.json",
                                 show_default="$DETECTRON2_DATASETS/coco when set, else the embedded scenes")
    train_json: str = flag("", "training annotations (COCO instances json) instead of the root's")
    train_images: str = flag("", "training image folder instead of the root's train2017/")
    val_json: str = flag("", "validation annotations instead of the root's")
    val_images: str = flag("", "validation image folder instead of the root's val2017/")
    num_classes: int | None = flag(None, "object classes (background not counted)", type=int,
                                   show_default="the annotations' (COCO: 80)")
    image_size: int = flag(1024, "large-scale jitter target and the padded input size (S x S)")
    scale_range: tuple[float, ...] = flag((0.1, 2.0), "large-scale jitter: resize to min(S/h, S/w) x U(a, b)",
                                          nargs=2, type=float)


@dataclass(frozen=True)
class DetModel(Group):
    TITLE: ClassVar[str] = "model"
    EMBEDDED: ClassVar[dict[str, Any]] = {"model": "beit_tiny_patch16_224", "window_size": 4, "fpn_channels": 64,
                                          "box_fc_dim": 256, "anchor_sizes": (16, 32, 64, 128, 256),
                                          "box_batch_size_per_image": 128}

    model: str = flag("beit_base_patch16_224", "backbone size: beit_{tiny,small,base,large}_patch16_224 (a "
                                               "pre-training name such as beit_base_patch16_224_8k_vocab or "
                                               "conmim_base_patch16_224 means its size)")
    pyramid: str = flag("benchmarking", "multi-scale features: blocks 2, 5, 8, 11 through deconv / deconv / identity / "
                                        "max-pool (the benchmark's), or ViTDet's simple pyramid from the last block",
                        choices=("benchmarking", "vitdet"))
    window_size: int = flag(16, "window attention size (tokens) of the blocks that are not global")
    global_blocks: tuple[int, ...] | None = flag(None, "blocks (0-based) with global attention", nargs="+", type=int,
                                                 show_default="the last of each quarter: 2 5 8 11 for 12 blocks")
    drop_path: float = flag(0.1, "stochastic depth rate of the backbone")
    layer_scale_init_value: float = flag(0.1, "layer scale initial value (0.1 for base, 1e-5 for large; loaded "
                                              "weights replace it)")
    shared_rel_pos_bias: bool = flag(True, "one relative position table for the windowed blocks and one for the "
                                           "global ones, resized from a pre-training file's shared table (the "
                                           "benchmark's _mc-beit config); per-block tables with --no_shared_rel_pos_bias "
                                           "(its _ft_mc-beit config, from a fine-tuned file)",
                                     negation="--no_shared_rel_pos_bias", negation_help="one relative table per block")
    fpn_channels: int = flag(256, "FPN channels, also the width of the RPN, box-head and mask-head convolutions")
    box_fc_dim: int = flag(1024, "the box head's fully connected width (4 convs + 1 fc)")
    anchor_sizes: tuple[int, ...] = flag((32, 64, 128, 256, 512), "anchor size of each level p2..p6 (aspect ratios "
                                         "0.5, 1, 2)", nargs=5, type=int)
    rpn_batch_size_per_image: int = flag(256, "anchors sampled per image for the RPN loss")
    box_batch_size_per_image: int = flag(512, "proposals sampled per image for the box and mask losses")
    grad_checkpointing: bool = flag(False, "activation checkpointing of the backbone's blocks (the original's with_cp; "
                                           "ViT-B at 1024 needs it on 16-24 GB GPUs)", aliases=("--with_cp",),
                                    experiment=False)
    sync_bn: str = flag("auto", "SyncBatchNorm in the FPN and heads: auto = when distributed on CUDA (torch has no "
                                "CPU SyncBatchNorm); the original always synchronises", choices=("auto", "on", "off"),
                        experiment=False)


@dataclass(frozen=True)
class DetSource(Group):
    TITLE: ClassVar[str] = "fine-tuning source"

    pretrained: str = flag("", "backbone weights (the config's model.backbone.bottom_up.pretrained): a checkpoint of "
                               "mcbeit-pretrain / -finetune, a released BEiT / mc-BEiT / BEiT v2 / ConMIM file, timm "
                               "BEiT weights; 'none': random initialisation", aliases=("--finetune",),
                           show_default="none (without --data_path: the newest checkpoint of mcbeit-pretrain)")
    model_key: str = flag("model|module", "keys of the checkpoint's state dict, tried in order")
    model_prefix: str = flag("", "prefix stripped from the checkpoint's keys")
    init_checkpoint: str = flag("", "a detection checkpoint whose weights start this run or are evaluated "
                                    "(detectron2's train.init_checkpoint: weights only, a file of mcbeit-det)")


@dataclass(frozen=True)
class DetOptim(Group):
    TITLE: ClassVar[str] = "optimisation"
    EMBEDDED: ClassVar[dict[str, Any]] = {"lr": 4e-4, "warmup_length": 0.05}

    lr: float = flag(8e-5, "peak learning rate (the total batch's; AdamW)")
    weight_decay: float = flag(0.1, "AdamW weight decay (none on normalisation layers, pos_embed and the relative "
                                    "position tables, as detectron2's get_default_optimizer_params there)")
    opt_betas: tuple[float, ...] = flag((0.9, 0.999), "AdamW betas", nargs=2, type=float)
    opt_eps: float = flag(1e-8, "AdamW epsilon")
    layer_decay: float = flag(1.0, "layer-wise lr decay over the backbone's depth (1: none, as the benchmark; ViTDet: "
                                   "0.7)")
    clip_grad: float | None = flag(None, "clip the gradient norm to this value", type=float,
                                   show_default="no clipping (as the original)")
    warmup_length: float = flag(0.01, "linear warm-up as a fraction of --max_iter (the 25-epoch configs: 1%)")
    warmup_factor: float = flag(0.001, "the warm-up starts at lr x this")


@dataclass(frozen=True)
class DetEvaluation(Group):
    TITLE: ClassVar[str] = "evaluation"
    EMBEDDED: ClassVar[dict[str, Any]] = {"eval_period": 150}

    eval_period: int = flag(1844, "evaluate every N iterations (the engine's epoch) and after the last")
    vis_images: int = flag(4, "validation images drawn with their predicted boxes and masks into "
                              "<output_dir>/vis_*.png and TensorBoard at each evaluation", experiment=False)
    eval_only: bool = flag(False, "evaluate (--init_checkpoint, --resume or the newest checkpoint) and exit",
                           aliases=("--eval-only", "--eval"), experiment=False)
    coco_backend: str = flag("faster", "COCO evaluation code: faster-coco-eval (C++, the same numbers) or pycocotools",
                             choices=("faster", "pycocotools"), experiment=False)


@dataclass(frozen=True)
class DetectionConfig(DetData, DetModel, DetSource, DetOptim, DetEvaluation, RunConfig):
    """Mask R-CNN detection and instance segmentation (`mcbeit-det`, the seed's `lazyconfig_train_net.py`)."""

    TITLE: ClassVar[str] = "run"
    EMBEDDED: ClassVar[dict[str, Any]] = {"max_iter": 450, "total_batch_size": 4, "checkpoint_period": 150,
                                          "print_freq": 10}

    config: str = flag(DEFAULT_PRESET, "a preset (the seed's config names, see mcbeit-det presets) or a config file "
                                       "of mimdet/configs; its values apply to the flags not given",
                       aliases=("--config-file",),
                       show_default=f"{DEFAULT_PRESET} (without --data_path: the embedded demonstration)")
    overrides: tuple[str, ...] = flag((), "detectron2-style overrides KEY=VALUE (train.init_checkpoint=CKP, "
                                          "optimizer.lr=1e-4, dataloader.train.total_batch_size=16, ...)",
                                      nargs="+", type=str, metavar="KEY=VALUE", aliases=("--opts",))
    max_iter: int = flag(_ITERS_100EP // 4, "training iterations (optimizer updates): 25 epochs of COCO at batch 64")
    checkpoint_period: int = flag(1844, "write a checkpoint every N iterations (a multiple of --eval_period; "
                                        "--save_ckpt_steps adds transient ones between)", experiment=False)
    total_batch_size: int = flag(64, "images per update over all processes (detectron2's total_batch_size): "
                                     "processes x --batch_size x --update_freq")
    batch_size: int = flag(0, "images per process and micro-batch", show_default="--total_batch_size / processes / "
                                                                                 "--update_freq")
    update_freq: int = flag(1, "gradient accumulation: micro-batches per update (BatchNorm statistics stay per "
                               "micro-batch)")
    output_dir: str = flag("./output/benchmarking_mask_rcnn_base_FPN_25ep_LSJ_mc-beit",
                           "where checkpoints, log.txt, visualisations and tensorboard/ go", experiment=False)
    # derived: the engine's epochs are rounds of --eval_period iterations
    epochs: int = 25
    save_ckpt_freq: int = 1

    def build_detector(self, num_classes: int, sync_bn: bool = False):
        """The Mask R-CNN these flags describe (random weights): what ``mcbeit-det`` trains and the Python API
        rebuilds from a checkpoint's ``args``."""
        from mcbeit.models.detection import build_detector

        return build_detector(self.model, num_classes=num_classes, img_size=self.image_size,
                              window_size=self.window_size,
                              global_blocks=tuple(self.global_blocks) if self.global_blocks else None,
                              drop_path=self.drop_path, layer_scale_init_value=self.layer_scale_init_value,
                              shared_rel_pos_bias=self.shared_rel_pos_bias, pyramid=self.pyramid, sync_bn=sync_bn,
                              grad_checkpointing=self.grad_checkpointing, fpn_channels=self.fpn_channels,
                              box_fc_dim=self.box_fc_dim, anchor_sizes=tuple(self.anchor_sizes),
                              rpn_batch_size_per_image=self.rpn_batch_size_per_image,
                              box_batch_size_per_image=self.box_batch_size_per_image)

    def derive(self, given: set[str]) -> "DetectionConfig":
        """Preset values for the flags not given, then the overrides, then the derived ones."""
        values: dict[str, Any] = {}
        data_path = self.data_path if self.data_path is not None else default_data_path()
        embedded = data_path is None
        if "config" in given or not embedded:
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            values.update({k: defaults[k] for k in embedded_values(type(self)) if k not in given and k in defaults})
            _, preset = read_config_file(self.config)
            values.update({k: v for k, v in preset.items() if k not in given})
        values.update(parse_overrides(self.overrides))
        config = dataclasses.replace(self, data_path=data_path, **values)
        pretrained = "" if config.pretrained.strip().lower() in RANDOM_INIT else config.pretrained
        if (config.data_path is None and "pretrained" not in given and "pretrained" not in values
                and not (config.eval_only or config.resume or config.init_checkpoint)):
            pretrained = newest_pretrained_checkpoint()
        world = max(1, int(os.environ.get("WORLD_SIZE", "1")))  # set by every launcher before the config is read
        batch = config.batch_size
        if batch <= 0:
            per_update = config.total_batch_size // max(world, 1)
            batch = max(1, per_update // max(config.update_freq, 1))
            if batch * world * config.update_freq != config.total_batch_size:
                raise ConfigError(f"--total_batch_size {config.total_batch_size} is not a multiple of {world} "
                                  f"processes x --update_freq {config.update_freq}: choose them so that it divides, or "
                                  "give --batch_size")
        period = min(config.eval_period, config.max_iter) if config.max_iter > 0 else config.eval_period
        return dataclasses.replace(
            config, pretrained=pretrained, batch_size=batch, eval_period=period,
            total_batch_size=batch * world * config.update_freq,
            epochs=max(1, math.ceil(config.max_iter / max(period, 1))),
            save_ckpt_freq=max(1, config.checkpoint_period // max(period, 1)), log_dir=config.tensorboard_dir)

    def check(self) -> None:
        self.check_run()
        at_least(self, 1, ("max_iter", "eval_period", "checkpoint_period", "update_freq", "image_size",
                           "window_size", "total_batch_size"))
        at_least(self, 0, ("lr", "weight_decay", "vis_images", "warmup_factor"))
        if self.checkpoint_period % self.eval_period:
            raise ConfigError(f"--checkpoint_period {self.checkpoint_period} is not a multiple of --eval_period "
                              f"{self.eval_period}; for more resume points add --save_ckpt_steps N")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ConfigError(f"--layer_decay must lie in (0, 1], got {self.layer_decay}")
        if not 0.0 <= self.warmup_length <= 1.0:
            raise ConfigError(f"--warmup_length is a fraction of --max_iter in [0, 1], got {self.warmup_length}")
        if self.image_size % 16:
            raise ConfigError(f"--image_size {self.image_size}: must be a multiple of the patch size 16")
        grid = self.image_size // 16
        if grid % self.window_size:
            raise ConfigError(f"--window_size {self.window_size} does not divide the {grid}x{grid} token grid of "
                              f"--image_size {self.image_size}: pick a divisor of {grid}")
        low, high = self.scale_range
        if not 0 < low <= high:
            raise ConfigError(f"--scale_range {low} {high}: give 0 < a <= b")


def preset_table() -> str:
    """The presets, one per line with what they set (``mcbeit-det presets``)."""
    return "\n".join(f"{name}\n    " + ", ".join(f"{k}={v}" for k, v in values.items())
                     for name, values in PRESETS.items())
