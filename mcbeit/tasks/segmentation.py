"""Semantic segmentation with UperNet on a BEiT backbone: the task the engine runs (`mcbeit-seg`).

The recipe of unilm's / mc-BEiT's mmseg 0.11 configs (:mod:`mcbeit.config.segmentation`): the backbone's blocks
3, 5, 7, 11 through the deconvolution neck into UperNet and an auxiliary FCN head
(:mod:`mcbeit.models.segmentation`), mmseg's training pipeline (:mod:`mcbeit.data.seg_transforms`), AdamW with
layer decay over depth + 2 groups, poly(1.0) with mmcv's linear warm-up, counted in iterations; evaluation by
sliding window (single scale, or multi-scale + flip) with mIoU, mAcc and aAcc (:mod:`mcbeit.evaluation.segmentation`).

The engine's epoch is a round of ``--eval_interval`` iterations (an endless stream of data epochs,
:class:`mcbeit.data.samplers.StreamSampler`), so checkpoints, exact resume, preemption, TensorBoard and the
progress bar are the engine's; ``checkpoint-R.pth`` is the state after ``(R + 1) x --eval_interval`` iterations.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from mcbeit.engine.optim import build_optimizer
from mcbeit.engine.schedules import poly_scheduler
from mcbeit.engine.task import Mark, MeterSpec, StepOutput
from mcbeit.errors import InputError
from mcbeit.tasks.rounds import RoundsTask

log = logging.getLogger("mcbeit.seg")

CHECKPOINT_FORMAT = "mcbeit-seg-v1"
_LOSSES = ("loss", "loss_seg", "loss_aux", "acc_seg")


class SegmentationTask(RoundsTask):
    """Train (or evaluate) a UperNet segmentor as ``config`` says."""

    checkpoint_format = CHECKPOINT_FORMAT
    purpose = "segmentation fine-tuning"
    command = "mcbeit-seg"
    best_metric = "mIoU"
    recipe_batch = 16
    recipe_batch_note = " (unilm issue 443: batch 2 gave 48.9 mIoU against 53.6)"
    input_paths = (("--data_path", "data_path"), ("--load_from", "load_from"))
    weights_flag = "--load_from"
    meter = MeterSpec((*_LOSSES, "grad_norm", "loss_scale"), _LOSSES,
                      {"loss": _LOSSES, "opt": ("lr", "min_lr", "weight_decay", "grad_norm", "loss_scale")},
                      {"loss": ("loss", "{:.4f}"), "acc": ("acc_seg", "{:.1f}"), "lr": ("lr", "{:.2e}")})

    @property
    def round_length(self) -> int:
        return self.config.eval_interval

    @property
    def eval_collate(self):  # views of several sizes per image (training batches stack with torch's default)
        from mcbeit.data.seg_transforms import seg_collate

        return seg_collate

    def _datasets(self) -> None:
        """The train / val datasets (the model needs their number of classes)."""
        from mcbeit.data.embedded_seg import embedded_segmentation_root
        from mcbeit.data.seg_transforms import SegTrainTransform
        from mcbeit.data.segmentation import build_segmentation_dataset

        cfg = self.config
        root = cfg.data_path if cfg.data_path is not None else str(embedded_segmentation_root())
        crop = (cfg.crop_size, cfg.crop_size)
        scale = tuple(cfg.img_scale)
        common = dict(seed=cfg.seed, data_set=cfg.data_set, num_classes=cfg.num_classes,
                      reduce_zero_label=cfg.reduce_zero_label)
        if not cfg.eval:
            train_tf = SegTrainTransform(crop_size=crop, img_scale=scale, ratio_range=tuple(cfg.ratio_range),
                                         cat_max_ratio=cfg.cat_max_ratio, photometric=cfg.photometric)
            self.sets["train"] = build_segmentation_dataset(root, "train", train_tf, **common)
        if cfg.eval or not cfg.no_validate:
            self.sets["val"] = build_segmentation_dataset(root, "val", cfg.test_transform(), return_index=True,
                                                          **common)
        found = max(d.num_classes for d in self.sets.values())
        if self.num_classes is None:
            self.num_classes = found
        elif found > self.num_classes:
            from mcbeit.errors import ConfigError

            raise ConfigError(f"--num_classes {self.num_classes}, but the data has {found} classes")

    def build_model(self, run) -> nn.Module:
        from mcbeit.models.segmentation import load_backbone_weights, load_segmentation_checkpoint

        cfg = self.config
        self._datasets()
        if run.device.type == "cuda":
            torch.backends.cudnn.benchmark = not cfg.deterministic  # the original's cudnn_benchmark=True
            torch.backends.cudnn.deterministic = cfg.deterministic
        sync = cfg.sync_bn == "on" or (cfg.sync_bn == "auto" and run.info.world_size > 1 and run.device.type == "cuda")
        if cfg.sync_bn == "on" and run.device.type != "cuda":
            raise InputError("--sync_bn on needs CUDA (torch's SyncBatchNorm has no CPU kernel): use --sync_bn auto")
        if not sync and run.info.world_size > 1:
            log.warning("BatchNorm statistics per process (%d images each): the originals synchronise them over all "
                        "GPUs (SyncBatchNorm, CUDA only)", cfg.batch_size)
        model = cfg.build_segmentor(self.num_classes, sync_bn=sync)
        if cfg.load_from:
            log.info("%s", load_segmentation_checkpoint(model, cfg.load_from).summary("weights from"))
        elif cfg.pretrained:
            report = load_backbone_weights(model, cfg.pretrained, model_key=cfg.model_key, model_prefix=cfg.model_prefix)
            log.info("%s", report.summary("backbone from"))
        elif not cfg.resume and not cfg.eval:
            log.info("no --pretrained: training from RANDOM initialisation")
        log.info("UperNet on %s: %.2fM parameters, %d classes, crop %d, blocks %s", cfg.model,
                 sum(p.numel() for p in model.parameters()) / 1e6, self.num_classes, cfg.crop_size,
                 list(model.backbone.out_indices))
        return model

    def build_data(self, run):
        if self.config.num_workers > 0:  # OpenCV's own threads in every loader worker would oversubscribe the CPUs
            import cv2

            cv2.setNumThreads(0)
        return super().build_data(run)

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        cfg = self.config
        quirk = cfg.decay_cls_and_tables
        return build_optimizer(model, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay, opt_eps=cfg.opt_eps,
                               opt_betas=cfg.opt_betas, layer_decay=None if cfg.layer_decay >= 1.0 else cfg.layer_decay,
                               num_layers=len(model.backbone.blocks), layer_prefix="backbone.",
                               skip_list=() if quirk else ("backbone.cls_token", "backbone.pos_embed"),
                               extra_no_decay_keywords=() if quirk else ("relative_position_bias_table",))

    def schedules(self, steps_per_epoch: int) -> tuple[np.ndarray, np.ndarray]:
        cfg = self.config
        total = cfg.epochs * steps_per_epoch
        warmup = cfg.warmup_iters
        if warmup > total:
            log.warning("--warmup_iters %d is longer than the run (%d iterations): warming up over the whole run",
                        warmup, total)
            warmup = total
        lr = poly_scheduler(cfg.lr, total, cfg.power, cfg.min_lr, warmup, cfg.warmup_ratio)
        return lr, np.full(total, cfg.weight_decay, dtype=np.float64)

    # -- training -----------------------------------------------------------------------------------------
    def train_step(self, batch: Any, mark: Mark | None = None) -> StepOutput:
        from mcbeit.objectives.segmentation import upernet_loss

        run, cfg = self.run, self.config
        images = batch[0].to(run.device, non_blocking=True)                    # (B, 3, crop, crop)
        labels = batch[1].to(run.device, non_blocking=True)                    # (B, crop, crop), 255 ignored
        with run.precision.autocast():
            logits, aux = run.forward(images)                                  # (B, C, crop/4, .), (B, C, crop/16, .)
        if mark is not None:
            mark("forward")
        loss, parts = upernet_loss(logits.float(), None if aux is None else aux.float(), labels,
                                   aux_weight=cfg.aux_weight, average=cfg.loss_average)
        if mark is not None:
            mark("loss")
        metrics = {"loss": loss.detach(), **{k: v.detach().float() for k, v in parts.items()}}
        metrics.setdefault("loss_aux", torch.zeros((), device=loss.device))
        return StepOutput(loss, {k: metrics[k] for k in _LOSSES}, images.shape[0],
                          batch[2].sum() if len(batch) > 2 else 0)

    def _evaluate(self, tag: str, step: int = 0) -> dict[str, Any]:
        from mcbeit.evaluation.segmentation import evaluate_segmentation, save_visualisation

        run, cfg = self.run, self.config
        model = self.model
        was_training = model.training
        model.eval()
        try:
            result = evaluate_segmentation(model.encode_decode, self.val_loader, self.num_classes, run.device,
                                           amp_dtype=run.precision.dtype, sharded=run.info.world_size > 1,
                                           crop=(cfg.crop_size, cfg.crop_size),
                                           stride=(cfg.stride_or_default, cfg.stride_or_default), mode=cfg.test_mode,
                                           class_names=getattr(self.sets["val"], "classes", None),
                                           visualise=cfg.vis_images)
        finally:
            model.train(was_training)
        triples = result.pop("visualisation", None)
        if triples and run.info.is_main and cfg.output_dir:
            grid = save_visualisation(os.path.join(cfg.output_dir, f"vis_{tag}.png"), triples, self.num_classes)
            if run.writer is not None:
                run.writer.image(step, "val/predictions",
                                 torch.from_numpy(np.ascontiguousarray(grid)).permute(2, 0, 1).float() / 255)
        return result

    def epoch_message(self, stats: Mapping[str, Any]) -> str:
        train = super().epoch_message(stats)
        if "test_mIoU" not in stats:
            return train
        return (f"{train}; val mIoU {stats['test_mIoU']:.2f}, mAcc {stats['test_mAcc']:.2f}, aAcc "
                f"{stats['test_aAcc']:.2f} (best mIoU {self.best:.2f})")

    def evaluate_only(self, run, loaded: str | None) -> dict[str, Any]:
        cfg = self.config
        if loaded is None and not cfg.load_from:
            raise self.nothing_to_evaluate()
        log.info("evaluating %s%s", loaded or cfg.load_from, " (multi-scale + flip)" if cfg.aug_test else "")
        self.val_loader = self._val_loader(run)
        result = self._evaluate("test")
        log.info("mIoU %.2f, mAcc %.2f, aAcc %.2f over %d images", result["mIoU"], result["mAcc"], result["aAcc"],
                 result.get("images", -1))
        names = getattr(self.sets["val"], "classes", None) or [str(i) for i in range(self.num_classes)]
        for name, iou, acc in zip(names, result["IoU"], result["Acc"], strict=False):  # mmseg prints this table too
            log.info("  %-24s IoU %6.2f  Acc %6.2f", name, iou, acc)
        return {f"test_{k}": v for k, v in result.items()}

    # -- checkpoints --------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {**super().state(),
                "classes": list(getattr(self.sets.get("val") or self.sets.get("train"), "classes", None) or [])}
