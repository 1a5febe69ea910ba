"""Semantic segmentation (UperNet on a BEiT backbone, `mcbeit-seg`): the recipe of the originals' mmseg configs
as flags, and the configs themselves as presets.

The originals (unilm's ``beit/semantic_segmentation``, which mc-BEiT's is, and BEiT v2's) are mmsegmentation 0.11
configs. Their values are the defaults here; each config of the seeds is a preset (``PRESETS``: the config file's
name, e.g. ``upernet_mcbeit_base_12_512_slide_160k_ade20k_pt``) that sets what it changes (learning rate, layer
decay, drop path, crop, model size), and ``--options key=value`` takes the keys the mmseg syntax names
(``model.pretrained=CKP``, ``optimizer.lr=1e-4``, ``data.samples_per_gpu=4``; ``OPTION_KEYS``). Training counts
iterations (``--max_iters``, mmseg's ``runner.max_iters``); the engine's epochs are the rounds of ``--eval_interval``
iterations between two evaluations (mmseg's ``evaluation.interval``).

Without ``--data_path`` the run is the embedded demonstration (generated scenes with per-pixel labels, a tiny
model at 64 px, minutes on a CPU), fine-tuned from the newest checkpoint of ``mcbeit-pretrain`` when there is one.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from mcbeit.config.fields import Group, bool_flag, embedded_values, flag
from mcbeit.config.finetune import RANDOM_INIT, newest_pretrained_checkpoint
from mcbeit.config.presets import parse_key_values, read_preset_file
from mcbeit.config.run import RunConfig, at_least
from mcbeit.errors import ConfigError

DEFAULT_PRESET = "upernet_mcbeit_base_12_512_slide_160k_ade20k_pt"

_BASE = dict(model="beit_base_patch16_224", crop_size=512, img_scale=(2048, 512),
             layer_scale_init_value=0.1, drop_path=0.1, batch_size=2, update_freq=1, max_iters=160000)
_640 = dict(crop_size=640, img_scale=(2560, 640))
_LARGE = dict(model="beit_large_patch16_224", lr=2e-5, layer_decay=0.95, drop_path=0.2, layer_scale_init_value=1e-6)
_MS = dict(aug_test=True)

#: config name -> the values its file sets (checked against the original files: /tmp fact sheet section 6)
PRESETS: dict[str, dict[str, Any]] = {
    # mc-BEiT (lixiaotong97/mc-BEiT semantic_segmentation/configs/mcbeit/upernet/): unilm's _pt with lr / decay changed
    "upernet_mcbeit_base_12_512_slide_160k_ade20k_pt": dict(_BASE, lr=8e-5, layer_decay=0.9),
    # unilm beit/semantic_segmentation/configs/beit/upernet/
    "upernet_beit_base_12_512_slide_160k_ade20k_pt": dict(_BASE, lr=7e-4, layer_decay=0.65),
    "upernet_beit_base_12_512_slide_160k_ade20k_pt2ft": dict(_BASE, lr=3e-5, layer_decay=0.9),
    "upernet_beit_base_12_640_slide_160k_ade20k_pt2ft": dict(_BASE, **_640, lr=3e-5, layer_decay=0.9),
    "upernet_beit_base_12_640_slide_160k_ade20k_ms": dict(_BASE, **_640, **_MS, lr=3e-5, layer_decay=0.9),
    "upernet_beit_large_24_512_slide_160k_ade20k_pt2ft": dict(_BASE, **_LARGE),
    "upernet_beit_large_24_640_slide_160k_ade20k_pt2ft": dict(_BASE, **_640, **_LARGE, batch_size=1, update_freq=2),
    "upernet_beit_large_24_640_slide_160k_ade20k_ms": dict(_BASE, **_640, **_LARGE, **_MS, batch_size=1,
                                                            update_freq=2),
    # BEiT v2 (unilm beit2/semantic_segmentation/configs/beit/upernet/); its rel_pos_bias_interpolation_type=0
    # crashes the original's backbone (no such argument) and means nothing here
    "upernet_beit_base_12_512_slide_160k_ade20k": dict(_BASE, lr=5e-5, layer_decay=0.75, drop_path=0.15),
    "upernet_beit_base_12_512_slide_160k_21ktoade20k": dict(_BASE, lr=5e-5, layer_decay=0.85, drop_path=0.15),
}

#: mmseg config keys --options understands -> the flag they set
OPTION_KEYS: dict[str, str] = {
    "model.pretrained": "pretrained", "load_from": "load_from", "resume_from": "resume", "work_dir": "output_dir",
    "data_root": "data_path", "optimizer.lr": "lr", "optimizer.weight_decay": "weight_decay",
    "optimizer.betas": "opt_betas", "optimizer.eps": "opt_eps",
    "optimizer.paramwise_cfg.layer_decay_rate": "layer_decay",
    "model.backbone.drop_path_rate": "drop_path", "model.backbone.init_values": "layer_scale_init_value",
    "model.backbone.out_indices": "out_indices", "model.backbone.img_size": "crop_size",
    "model.decode_head.num_classes": "num_classes", "model.auxiliary_head.num_classes": "num_classes",
    "model.decode_head.channels": "channels", "model.auxiliary_head.channels": "aux_channels",
    "model.auxiliary_head.loss_decode.loss_weight": "aux_weight",
    "model.test_cfg.mode": "test_mode", "model.test_cfg.stride": "stride",
    "data.samples_per_gpu": "batch_size", "data.workers_per_gpu": "num_workers",
    "optimizer_config.update_interval": "update_freq",
    "runner.max_iters": "max_iters", "total_iters": "max_iters", "evaluation.interval": "eval_interval",
    "checkpoint_config.interval": "checkpoint_interval", "log_config.interval": "print_freq",
    "lr_config.warmup_iters": "warmup_iters", "lr_config.warmup_ratio": "warmup_ratio",
    "lr_config.power": "power", "lr_config.min_lr": "min_lr", "crop_size": "crop_size",
}


def parse_options(options: tuple[str, ...]) -> dict[str, Any]:
    """``--options k=v ...`` -> {flag: value}; an unknown key is an error listing the known ones."""
    return parse_key_values(options, OPTION_KEYS, prefix="--options ", example="model.pretrained=/path/checkpoint.pth",
                            unknown="not a key mcbeit-seg maps (or pass the flag itself, see mcbeit-seg train --help)")


def read_config_file(spec: str) -> tuple[str, dict[str, Any]]:
    """A ``config`` argument -> (preset name, the values it sets): a preset name, or a path to one of the seed
    configs (``configs/mcbeit/upernet/NAME[.py]``, ``options = {mmseg key: value}`` inside)."""
    return read_preset_file(spec, PRESETS, "options", parse_options)


@dataclass(frozen=True)
class SegData(Group):
    TITLE: ClassVar[str] = "data"
    EMBEDDED: ClassVar[dict[str, Any]] = {"crop_size": 64, "img_scale": (256, 64)}

    data_path: str | None = flag(None, "dataset root: ADE20K's (images/{training,validation}, annotations/...) or "
                                       "images/{train,val} + annotations/{train,val} with classes.txt",
                                 show_default="the embedded scenes")
    data_set: str | None = flag(None, "dataset layout", choices=("ade20k", "folder"), show_default="detected")
    num_classes: int | None = flag(None, "number of classes", type=int, show_default="the dataset's (ADE20K: 150)")
    reduce_zero_label: bool | None = flag(None, "label 0 is 'other' (ignored) and 1..C become 0..C-1 (True / False)",
                                          type=bool_flag,
                                          show_default="on for ADE20K, off otherwise")
    crop_size: int = flag(512, "training crop and sliding-window size (the backbone's grid)")
    img_scale: tuple[int, ...] = flag((2048, 512), "(long, short) scale of the keep-ratio resize", nargs=2, type=int)
    ratio_range: tuple[float, ...] = flag((0.5, 2.0), "training resize ratio range", nargs=2, type=float)
    cat_max_ratio: float = flag(0.75, "a training crop is redrawn (10 times) while one class covers more than this")
    photometric: bool = flag(True, "mmseg's PhotoMetricDistortion", negation="--no_photometric",
                             negation_help="no photometric distortion")


@dataclass(frozen=True)
class SegModel(Group):
    TITLE: ClassVar[str] = "model"
    EMBEDDED: ClassVar[dict[str, Any]] = {"model": "beit_tiny_patch16_224", "channels": 128, "aux_channels": 64}

    model: str = flag("beit_base_patch16_224", "backbone size: beit_{tiny,small,base,large}_patch16_224 (a "
                                               "pre-training name such as beit_base_patch16_224_8k_vocab or "
                                               "conmim_base_patch16_224 means its size)")
    drop_path: float = flag(0.1, "stochastic depth rate of the backbone")
    layer_scale_init_value: float = flag(0.1, "layer scale initial value (loaded weights replace it)")
    out_indices: tuple[int, ...] | None = flag(None, "blocks (0-based) whose outputs feed the neck", nargs="+",
                                               type=int, show_default="3 5 7 11 for 12 blocks, proportional otherwise")
    channels: int = flag(768, "UperNet channels")
    aux_channels: int = flag(256, "auxiliary FCN head channels")
    aux_weight: float = flag(0.4, "auxiliary loss weight (0: no auxiliary head)")
    loss_average: str = flag("all_pixels", "cross-entropy mean over all pixels of the batch, ignored ones counted as "
                                           "zeros (mmseg 0.11, the originals), or over the labelled ones only",
                             choices=("all_pixels", "valid"))
    sync_bn: str = flag("auto", "SyncBatchNorm in neck and heads: auto = when distributed on CUDA (torch has no "
                                "CPU SyncBatchNorm); the originals always use it", choices=("auto", "on", "off"),
                        experiment=False)
    random_init: str = flag("original", "a backbone trained from scratch: 'original' re-initialises it as the "
                                        "original's init_weights does (no depth rescale of the output "
                                        "projections), 'timm' keeps timm's", choices=("original", "timm"))


@dataclass(frozen=True)
class SegSource(Group):
    TITLE: ClassVar[str] = "fine-tuning source"

    pretrained: str = flag("", "backbone weights (mmseg's model.pretrained): a checkpoint of mcbeit-pretrain / "
                               "-finetune, a released BEiT / mc-BEiT / BEiT v2 / ConMIM file, timm BEiT weights; "
                               "'none': random initialisation", aliases=("--finetune",),
                           show_default="none (without --data_path: the newest checkpoint of mcbeit-pretrain)")
    model_key: str = flag("model|module", "keys of the checkpoint's state dict, tried in order")
    model_prefix: str = flag("", "prefix stripped from the checkpoint's keys")
    load_from: str = flag("", "a segmentation checkpoint whose weights start this run (mmseg's --load-from: "
                              "weights only, a released unilm ADE20K file or one of mcbeit-seg)",
                          aliases=("--load-from",))


@dataclass(frozen=True)
class SegOptim(Group):
    TITLE: ClassVar[str] = "optimisation"
    EMBEDDED: ClassVar[dict[str, Any]] = {"lr": 1e-3, "warmup_iters": 30}

    lr: float = flag(8e-5, "peak learning rate (of the heads; block i gets lr x layer_decay ** (depth - i))")
    layer_decay: float = flag(0.9, "layer-wise lr decay over depth + 2 groups (mmseg's LayerDecayOptimizerConstructor)")
    weight_decay: float = flag(0.05, "AdamW weight decay")
    decay_cls_and_tables: bool = flag(True, "cls_token and the relative position tables get weight decay, as in the "
                                            "original's constructor (its names carry 'backbone.', so its exemption "
                                            "never matches)", negation="--no_decay_cls_and_tables",
                                      negation_help="exempt cls_token and the relative position tables")
    opt_betas: tuple[float, ...] = flag((0.9, 0.999), "AdamW betas", nargs=2, type=float)
    opt_eps: float = flag(1e-8, "AdamW epsilon")
    clip_grad: float | None = flag(None, "clip the gradient norm to this value", type=float,
                                   show_default="no clipping (as the original)")
    warmup_iters: int = flag(1500, "linear warm-up iterations (mmcv's: it multiplies the poly value)")
    warmup_ratio: float = flag(1e-6, "warm-up starts at lr x this")
    power: float = flag(1.0, "poly decay power")
    min_lr: float = flag(0.0, "poly decay floor")


@dataclass(frozen=True)
class SegEvaluation(Group):
    TITLE: ClassVar[str] = "evaluation"
    EMBEDDED: ClassVar[dict[str, Any]] = {"eval_interval": 300}

    eval_interval: int = flag(16000, "evaluate every N iterations (the engine's epoch)")
    no_validate: bool = flag(False, "no evaluation during training", aliases=("--no-validate",), experiment=False)
    test_mode: str = flag("slide", "sliding-window or whole-image inference", choices=("slide", "whole"))
    stride: int | None = flag(None, "sliding-window stride", type=int, show_default="2/3 of the crop: 341 at 512, "
                                                                                     "426 at 640")
    aug_test: bool = flag(False, "multi-scale (--eval_ratios) + flip evaluation", aliases=("--aug-test",))
    eval_ratios: tuple[float, ...] = flag((0.5, 0.75, 1.0, 1.25, 1.5, 1.75), "multi-scale ratios (scales below "
                                          "the crop become the crop: the originals' SETR_Resize)", nargs="+",
                                          type=float)
    vis_images: int = flag(4, "validation images drawn (image | truth | prediction) into <output_dir>/vis_*.png and "
                              "TensorBoard at each evaluation", experiment=False)
    eval: bool = flag(False, "evaluate (--resume, the newest checkpoint, or --load_from) and exit", experiment=False)


@dataclass(frozen=True)
class SegmentationConfig(SegData, SegModel, SegSource, SegOptim, SegEvaluation, RunConfig):
    """UperNet semantic segmentation (`mcbeit-seg`, the seeds' `tools/train.py` / `tools/test.py`)."""

    TITLE: ClassVar[str] = "run"
    EMBEDDED: ClassVar[dict[str, Any]] = {"max_iters": 900, "batch_size": 8, "checkpoint_interval": 300,
                                          "print_freq": 10}

    config: str = flag(DEFAULT_PRESET, "a preset (the seeds' config names, see mcbeit-seg presets) or a config "
                                       "file of semantic_segmentation/configs; its values apply to the flags not "
                                       "given", show_default=f"{DEFAULT_PRESET} (without --data_path: the "
                                                             "embedded demonstration)")
    options: tuple[str, ...] = flag((), "mmseg-style overrides KEY=VALUE (model.pretrained=CKP, optimizer.lr=1e-4, "
                                        "data.samples_per_gpu=4, ...)", nargs="+", type=str, metavar="KEY=VALUE",
                                    aliases=("--cfg-options",))
    max_iters: int = flag(160000, "training iterations (optimizer updates)")
    checkpoint_interval: int = flag(16000, "write a checkpoint every N iterations (a multiple of --eval_interval; "
                                           "--save_ckpt_steps adds transient ones between)", experiment=False)
    batch_size: int = flag(2, "images per process and micro-batch (the originals: 2 x 8 GPUs = 16)")
    update_freq: int = flag(1, "gradient accumulation: micro-batches per update (total batch = processes x "
                               "--batch_size x this; BatchNorm statistics stay per micro-batch)")
    output_dir: str = flag("./output/mcbeit_seg", "where checkpoints, log.txt, visualisations and tensorboard/ go",
                           aliases=("--work-dir", "--show-dir"), experiment=False)
    deterministic: bool = flag(False, "deterministic cuDNN / algorithms (slower)", experiment=False)
    launcher: str = flag("none", "accepted for the seeds' command lines (torchrun's variables are read anyway)",
                         choices=("none", "pytorch", "slurm", "mpi"), experiment=False)
    # derived: the engine's epochs are rounds of --eval_interval iterations
    epochs: int = 10
    save_ckpt_freq: int = 1

    @property
    def stride_or_default(self) -> int:
        return self.stride if self.stride is not None else self.crop_size * 2 // 3

    def build_segmentor(self, num_classes: int, sync_bn: bool = False):
        """The UperNet these flags describe (random weights): what ``mcbeit-seg`` trains and the Python API
        rebuilds from a checkpoint's ``args``."""
        from mcbeit.models.segmentation import build_segmentor

        return build_segmentor(self.model, num_classes=num_classes, img_size=self.crop_size, drop_path=self.drop_path,
                               layer_scale_init_value=self.layer_scale_init_value,
                               out_indices=tuple(self.out_indices) if self.out_indices else None,
                               channels=self.channels, aux_channels=self.aux_channels, aux=self.aux_weight > 0,
                               sync_bn=sync_bn, init=self.random_init)

    def test_transform(self):
        """mmseg's test pipeline of these flags: keep-ratio resize to ``img_scale`` (times ``eval_ratios`` with
        flips under ``aug_test``), normalised views for the sliding window."""
        from mcbeit.data.seg_transforms import SegTestTransform

        ratios = tuple(self.eval_ratios) if self.aug_test else (1.0,)
        return SegTestTransform(img_scale=tuple(self.img_scale), ratios=ratios, flip=self.aug_test,
                                crop_size=(self.crop_size, self.crop_size))

    def derive(self, given: set[str]) -> "SegmentationConfig":
        """Preset values for the flags not given, then --options, then the derived ones."""
        values: dict[str, Any] = {}
        embedded = self.data_path is None and "data_path" not in given
        if "config" in given or not embedded:
            # a config is a real recipe: the embedded demonstration's values give way to the defaults, then to it
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            values.update({k: defaults[k] for k in embedded_values(type(self)) if k not in given and k in defaults})
            _, preset = read_config_file(self.config)
            values.update({k: v for k, v in preset.items() if k not in given})
        values.update(parse_options(self.options))
        config = dataclasses.replace(self, **values)
        pretrained = "" if config.pretrained.strip().lower() in RANDOM_INIT else config.pretrained
        if (config.data_path is None and "pretrained" not in given and "pretrained" not in values
                and not (config.eval or config.resume or config.load_from)):
            pretrained = newest_pretrained_checkpoint()
        interval = min(config.eval_interval, config.max_iters) if config.max_iters > 0 else config.eval_interval
        return dataclasses.replace(
            config, pretrained=pretrained, eval_interval=interval, epochs=max(1, config.max_iters // max(interval, 1)),
            save_ckpt_freq=max(1, config.checkpoint_interval // max(interval, 1)), log_dir=config.tensorboard_dir)

    def check(self) -> None:
        self.check_run()
        at_least(self, 1, ("max_iters", "eval_interval", "checkpoint_interval", "update_freq", "crop_size"))
        at_least(self, 0, ("lr", "weight_decay", "warmup_iters", "min_lr", "aux_weight", "vis_images"))
        if self.max_iters % self.eval_interval:
            raise ConfigError(f"--max_iters {self.max_iters} is not a multiple of --eval_interval {self.eval_interval}: "
                              "the run is counted in rounds between evaluations; pick e.g. --max_iters "
                              f"{(self.max_iters // self.eval_interval + 1) * self.eval_interval}")
        if self.checkpoint_interval % self.eval_interval:
            raise ConfigError(f"--checkpoint_interval {self.checkpoint_interval} is not a multiple of --eval_interval "
                              f"{self.eval_interval}; for more resume points add --save_ckpt_steps N")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ConfigError(f"--layer_decay must lie in (0, 1], got {self.layer_decay}")
        if self.crop_size % 16:
            raise ConfigError(f"--crop_size {self.crop_size}: must be a multiple of the patch size 16")
        if not self.eval_ratios or min(self.eval_ratios) <= 0:
            raise ConfigError("--eval_ratios: positive numbers")


def preset_table() -> str:
    """The presets, one per line with what they set (``mcbeit-seg presets``)."""
    lines = []
    for name, values in PRESETS.items():
        shown = {k: v for k, v in values.items() if k in ("model", "lr", "layer_decay", "drop_path", "crop_size",
                                                         "batch_size", "update_freq", "aug_test")}
        lines.append(f"{name}\n    " + ", ".join(f"{k}={v}" for k, v in shown.items()))
    return "\n".join(lines)
