"""Masked-image-modelling pre-training: the task the engine runs for every method.

The task owns what every method shares: the patch grid and its masks, the dataset and loader, the
optimizer's parameter groups, the checkpoint format, the epoch's log record. The method
(:mod:`mcbeit.methods`) owns the targets, the student's heads and the objective.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

import timm
import torch
from torch import nn

import mcbeit.models  # noqa: F401  (registers the model names with timm)
from mcbeit.config.pretrain import PretrainConfig
from mcbeit.data.folders import check_data_folder
from mcbeit.data.masking import MASK_CELL_PIXELS, build_mask_generator, check_mask_flags
from mcbeit.data.transforms import normalisation
from mcbeit.engine.optim import build_optimizer
from mcbeit.engine.resume import load_resumed_weights
from mcbeit.engine.task import Mark, StepOutput, Task, TrainData
from mcbeit.errors import ConfigError, InputError
from mcbeit.evaluation.monitor import KnnMonitor, MonitorSettings, default_block
from mcbeit.methods import build_method
from mcbeit.models.beit import patch_size_of
from mcbeit.models.checkpoint import filter_pretraining_state_dict

log = logging.getLogger("mcbeit.pretrain")

CHECKPOINT_FORMAT = "mcbeit-pretrain-v1"


class PretrainTask(Task):
    """Pre-train a BEiT with ``config``'s method (``config.METHOD``: mc-BEiT, BEiT, ...)."""

    checkpoint_format = CHECKPOINT_FORMAT
    purpose = "pre-training"

    def __init__(self, config: PretrainConfig, method: str | None = None):
        super().__init__(config)
        self.method = build_method(method or config.METHOD, config)
        self.meter = self.method.meter
        self.window: tuple[int, int] | None = None
        self.monitor: KnnMonitor | None = None

    @property
    def evaluates(self) -> bool:  # with the monitor, a run stopped before an epoch's measurement makes it up
        return self.monitor is not None

    # -- checks and building ------------------------------------------------------------------------------
    def check_inputs(self) -> None:
        cfg = self.config
        if cfg.data_path:
            check_data_folder(cfg.data_path)
        if cfg.eval_data_path and cfg.eval_freq > 0 and not cfg.data_path:
            raise ConfigError("--eval_data_path needs --data_path (class folders: the k-NN monitor's train split); "
                              "the embedded images bring their own val split")
        if cfg.eval_data_path and cfg.eval_freq > 0:
            check_data_folder(cfg.eval_data_path, "--eval_data_path", "class folders, or a root with val/ or "
                                                                      "val_map.txt")
        check_model_name(cfg.model, self.method.model_patterns)
        self.window = check_geometry(cfg, patch_size_of(cfg.model), second_view=self.method.tokenizer_view)
        self.method.check_inputs()

    def build_model(self, run) -> nn.Module:
        student = self.method.build(run)
        self.window = check_geometry(self.config, student.patch_embed.patch_size[0], self.method.downsample,
                                     second_view=self.method.tokenizer_view)
        log.info("model %s: %.2fM parameters", self.config.model,
                 sum(p.numel() for p in student.parameters() if p.requires_grad) / 1e6)
        depth, block = len(student.blocks), self.config.eval_block
        if block is not None and block >= depth:
            raise ConfigError(f"--eval_block {block}: --model {self.config.model} has blocks 0..{depth - 1}")
        return student

    def build_data(self, run) -> TrainData:
        cfg = self.config
        mean, std = normalisation(cfg.imagenet_default_mean_and_std)
        masks = build_mask_generator(cfg.mask_type, self.window, cfg.num_mask_patches, cfg.mask_ratio,
                                     cfg.min_mask_patches_per_block, cfg.max_mask_patches_per_block,
                                     exact=self.method.exact_masks,
                                     cell=mask_cell(self.model.patch_embed.patch_size[0]))
        transform = self.method.transform(self.window, masks, mean, std)
        data = self.image_training_data(run, transform)
        log.info("data: %s, %s; %s", data.described, masks, transform)
        self.monitor = build_monitor(cfg, len(self.model.blocks), mean, std)
        return data

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        cfg = self.config
        return build_optimizer(model, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay, opt_eps=cfg.opt_eps,
                               opt_betas=cfg.opt_betas, momentum=cfg.momentum)

    def compile(self) -> None:
        cfg = self.config
        if cfg.compile:
            for module in (self.model, *self.method.modules_to_compile()):
                module.compile(backend=cfg.compile_backend, mode=cfg.compile_mode)
            log.info("torch.compile (backend %s, mode %s): the first steps compile", cfg.compile_backend,
                     cfg.compile_mode or "default")

    # -- training -----------------------------------------------------------------------------------------
    def start_epoch(self, epoch: int, first: int = 0) -> None:
        self.method.start_epoch(epoch, first)

    def epoch_temperatures(self, epoch: int) -> dict[str, float]:
        return self.method.epoch_temperatures(epoch)

    def train_step(self, batch: Any, mark: Mark | None = None) -> StepOutput:
        return self.method.step(batch, mark)

    def after_update(self, stepped: Any) -> dict[str, torch.Tensor]:
        return self.method.after_update(stepped)

    def end_epoch(self, epoch: int, train_stats: dict[str, Any]) -> dict[str, Any]:
        stats = {**super().end_epoch(epoch, train_stats), **self.method.epoch_values(epoch),
                 "n_parameters": self.run.n_parameters}
        if self.monitor is not None and self.monitor.due(epoch, self.config.epochs):
            run = self.run
            values = self.monitor.measure(self.method.monitored(self.model), run.device, run.precision.target_dtype, run.info.world_size,
                                          run.info.rank)
            stats.update(values)
            if run.writer is not None:
                run.writer.scalars((epoch + 1) * run.steps_per_epoch, values, "knn")
        return stats

    def epoch_message(self, stats: Mapping[str, Any]) -> str:
        trained = self.method.epoch_message(stats) if "train_loss" in stats else "measured only (trained before)"
        knn = KnnMonitor.message(stats)
        return f"{trained}; {knn}" if knn else trained

    # -- checkpoints --------------------------------------------------------------------------------------
    def load_weights(self, ckpt: Mapping[str, Any], path: str) -> bool:
        """Our checkpoints restore everything; released ones (another format) their weights only."""
        state = filter_pretraining_state_dict(ckpt, self.model)  # "model", or mmpretrain's "state_dict" (names mapped)
        load_resumed_weights(self.model, state, path, self.flags(), ckpt.get("args"))
        return ckpt.get("format") == CHECKPOINT_FORMAT

    def state(self) -> dict[str, Any]:
        return self.method.state()

    def resume_source(self, path: str) -> str:
        return self.method.resume_source(path)

    def saved(self, path: str, epoch: int | str) -> None:
        self.method.saved(path, epoch, self.run.flags() if self.run is not None else self.flags())

    def load_state(self, ckpt: Mapping[str, Any], path: str) -> None:
        self.method.load_state(ckpt, path)

    def flags(self) -> dict[str, Any]:
        # the method is recorded so that mcbeit.get_model rebuilds the right model from the file
        return {**super().flags(), "window_size": list(self.window or ()), "method": self.config.METHOD}


def mask_cell(patch: int) -> int:
    """random_mps32's cell side in patches: 32 pixels over the patch size (2 at patch 16)."""
    return max(1, MASK_CELL_PIXELS // patch)


def build_monitor(cfg: PretrainConfig, depth: int, mean, std) -> KnnMonitor | None:
    """The k-NN monitor of ``cfg`` on the labelled splits of --data_path / --eval_data_path, or None
    (said once) when --eval_freq is 0 or there is no labelled split and --eval_data_path is not given."""
    from mcbeit.data.classification_transforms import build_classification_transform
    from mcbeit.data.labelled import NoLabelledSplit, labelled_splits, per_class_subset

    if cfg.eval_freq <= 0:
        return None
    transform = build_classification_transform(False, cfg.input_size, mean=mean, std=std)
    try:
        train, val = labelled_splits(cfg.data_path, cfg.eval_data_path, transform)
    except NoLabelledSplit as e:
        if cfg.eval_data_path:
            raise
        log.info("k-NN monitor off: %s (pass --eval_data_path with --data_path of class folders to turn it on)", e)
        return None
    num_classes = max(int(train.num_classes), int(val.num_classes))
    train = per_class_subset(train, cfg.knn_images_per_class, seed=cfg.seed)
    block = cfg.eval_block if cfg.eval_block is not None else default_block(depth)
    settings = MonitorSettings(every=cfg.eval_freq, block=block, nb_knn=tuple(cfg.nb_knn),
                               temperature=cfg.knn_temperature, linear=cfg.eval_linear,
                               images_per_class=cfg.knn_images_per_class, batch_size=max(cfg.batch_size, 64),
                               num_workers=min(cfg.num_workers, 4), seed=cfg.seed)
    log.info("k-NN monitor: every %d epochs and after the last, %d train / %d val images, %d classes, k %s, last block "
             "and block %d%s", cfg.eval_freq, len(train), len(val), num_classes, "/".join(map(str, cfg.nb_knn)), block,
             ", with a linear probe" if cfg.eval_linear else "")
    return KnnMonitor(train, val, num_classes, settings)


#: BEiT v2's patch-aggregation models (only BEiT v2 trains them; the methods say what they train)
V2_MODELS = ("beit_*_8k_vocab_cls_pt",)


def check_model_name(name: str, patterns: tuple[str, ...]) -> None:
    """``--model`` is one of the pre-training models ``patterns`` match (the method's)."""
    names = timm.list_models(list(patterns))
    if name not in names:
        if name in timm.list_models(list(V2_MODELS)):
            raise ConfigError(f"--model {name} is BEiT v2's patch-aggregation model (two outputs, two losses): train it "
                              f"with mcbeit-pretrain-beitv2 (run_beitv2_pretraining.py), or choose one of {names}")
        if name in timm.list_models(["beit_*_8k_vocab", "conmim_*"]):
            what = "is another method's pre-training model (its heads are not this method's)"
        else:
            what = "has no masked-image-modeling head" if timm.is_model(name) else "is not a pre-training model"
        raise ConfigError(f"--model {name} {what}; choose one of {names}")


def check_patch_grid(input_size: int, patch: int, model: str) -> tuple[int, int]:
    """The (h, w) patch grid of ``--input_size`` for ``--model``'s ``patch`` size; an input that is
    not a positive multiple of the patch size is an error that says which sizes fit."""
    if input_size < patch or input_size % patch:
        lower, upper = input_size // patch * patch, (input_size // patch + 1) * patch
        fits = f"{upper} or {lower}" if lower >= patch else f"{upper}"
        raise ConfigError(f"--input_size {input_size} is not {'a positive size ' if input_size < patch else ''}"
                          f"divisible by the patch size {patch} of --model {model}: use --input_size {fits}")
    return input_size // patch, input_size // patch


def check_geometry(cfg: PretrainConfig, patch: int, tokenizer_down: int | None = None,
                   second_view: bool = True) -> tuple[int, int]:
    """The ViT's patch grid, once --input_size, --second_input_size and the masking flags are known to
    fit together. With a tokenizer's ``second_view``: ``tokenizer_down`` None (before the tokenizer is
    loaded): --second_input_size must be the grid side times a power of two (every tokenizer
    downsamples by one, 8 for the released ones); given: exactly the grid side times the tokenizer's
    downsampling."""
    window = check_patch_grid(cfg.input_size, patch, cfg.model)
    side, size = window[0], cfg.second_input_size
    if not second_view:
        pass
    elif tokenizer_down is None:
        ratio = size // side if size > 0 and size % side == 0 else 0
        if ratio < 1 or ratio & (ratio - 1):
            raise ConfigError(
                f"--second_input_size {size} cannot give the tokenizer the ViT's {side}x{side} grid (--input_size "
                f"{cfg.input_size} / patch {patch}): it must be {side} x the tokenizer's downsampling (8 for every "
                f"released tokenizer); use --second_input_size {side * 8}")
    elif size % tokenizer_down or size // tokenizer_down != side:
        raise ConfigError(
            f"--second_input_size {size} gives the tokenizer a {size // tokenizer_down}x{size // tokenizer_down} grid "
            f"but the ViT has {window[0]}x{window[1]} patches; use --second_input_size {side * tokenizer_down}")
    try:
        check_mask_flags(cfg.mask_type, window, cfg.num_mask_patches, cfg.mask_ratio,
                         cfg.min_mask_patches_per_block, cfg.max_mask_patches_per_block, mask_cell(patch))
    except ValueError as exc:
        raise InputError(f"{exc} (--input_size {cfg.input_size} gives {side}x{side} patches of {patch} px)") from None
    return window
