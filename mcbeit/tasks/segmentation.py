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

from mcbeit.config.segmentation import SegmentationConfig
from mcbeit.engine.optim import build_optimizer
from mcbeit.engine.resume import load_resumed_weights
from mcbeit.engine.schedules import poly_scheduler
from mcbeit.engine.task import Mark, MeterSpec, StepOutput, Task, TrainData
from mcbeit.errors import InputError

log = logging.getLogger("mcbeit.seg")

CHECKPOINT_FORMAT = "mcbeit-seg-v1"
_LOSSES = ("loss", "loss_seg", "loss_aux", "acc_seg")


class SegmentationTask(Task):
    """Train (or evaluate) a UperNet segmentor as ``config`` says."""

    checkpoint_format = CHECKPOINT_FORMAT
    purpose = "segmentation fine-tuning"
    evaluates = True
    meter = MeterSpec((*_LOSSES, "grad_norm", "loss_scale"), _LOSSES,
                      {"loss": _LOSSES, "opt": ("lr", "min_lr", "weight_decay", "grad_norm", "loss_scale")},
                      {"loss": ("loss", "{:.4f}"), "acc": ("acc_seg", "{:.1f}"), "lr": ("lr", "{:.2e}")})

    def __init__(self, config: SegmentationConfig):
        super().__init__(config)
        self.update_freq = config.update_freq
        self.sets: dict[str, Any] = {}
        self.val_loader = None
        self.num_classes: int | None = config.num_classes
        self.best_miou = 0.0

    # -- checks and building ------------------------------------------------------------------------------
    @property
    def embedded_data(self) -> bool:
        return self.config.data_path is None

    def check_inputs(self) -> None:
        cfg = self.config
        for flag_name, path in (("--data_path", cfg.data_path), ("--load_from", cfg.load_from)):
            if path and not os.path.exists(path):
                raise InputError(f"{flag_name} {path}: no such file or folder")
        if cfg.pretrained and not cfg.pretrained.startswith(("https://", "http://")):
            from mcbeit.models.checkpoint import CheckpointError, resolve_source

            try:
                resolve_source(cfg.pretrained, "--pretrained")
            except CheckpointError as exc:
                raise InputError(f"{exc}; or --pretrained none to train from random initialisation") from None

    def _datasets(self) -> None:
        """The train / val datasets (the model needs their number of classes)."""
        from mcbeit.data.embedded_seg import embedded_segmentation_root
        from mcbeit.data.seg_transforms import SegTestTransform, SegTrainTransform
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
            ratios = tuple(cfg.eval_ratios) if cfg.aug_test else (1.0,)
            test_tf = SegTestTransform(img_scale=scale, ratios=ratios, flip=cfg.aug_test, crop_size=crop)
            self.sets["val"] = build_segmentation_dataset(root, "val", test_tf, return_index=True, **common)
        found = max(d.num_classes for d in self.sets.values())
        if self.num_classes is None:
            self.num_classes = found
        elif found > self.num_classes:
            from mcbeit.errors import ConfigError

            raise ConfigError(f"--num_classes {self.num_classes}, but the data has {found} classes")

    def build_model(self, run) -> nn.Module:
        from mcbeit.models.segmentation import build_segmentor, load_backbone_weights, load_segmentation_checkpoint

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
        model = build_segmentor(cfg.model, num_classes=self.num_classes, img_size=cfg.crop_size, drop_path=cfg.drop_path,
                                layer_scale_init_value=cfg.layer_scale_init_value,
                                out_indices=tuple(cfg.out_indices) if cfg.out_indices else None, channels=cfg.channels,
                                aux_channels=cfg.aux_channels, aux=cfg.aux_weight > 0, sync_bn=sync,
                                init=cfg.random_init)
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

    def build_data(self, run) -> TrainData:
        from mcbeit.data.samplers import build_stream_loader

        cfg, info = self.config, run.info
        if cfg.num_workers > 0:  # OpenCV's own threads in every loader worker would oversubscribe the CPUs
            import cv2

            cv2.setNumThreads(0)
        self.val_loader = self._val_loader(run)
        dataset = self.sets["train"]
        loader, sampler = build_stream_loader(dataset, cfg.batch_size, cfg.eval_interval, cfg.num_workers,
                                              cfg.pin_mem and run.device.type == "cuda", cfg.seed, info.world_size,
                                              info.rank, batches_per_step=cfg.update_freq)
        total = cfg.batch_size * cfg.update_freq * info.world_size
        if total != 16 and not self.embedded_data:
            log.warning("total batch %d (%d processes x --batch_size %d x --update_freq %d); the originals train with "
                        "16 (unilm issue 443: batch 2 gave 48.9 mIoU against 53.6)", total, info.world_size,
                        cfg.batch_size, cfg.update_freq)
        return TrainData(loader, sampler, cfg.eval_interval,
                         described=f"{len(dataset)} images, {cfg.max_iters} iterations")

    def _val_loader(self, run):
        from mcbeit.data.samplers import build_eval_loader
        from mcbeit.data.seg_transforms import seg_collate

        if "val" not in self.sets:
            return None
        info = run.info
        loader = build_eval_loader(self.sets["val"], 1, self.config.num_workers, False, info.world_size, info.rank)
        loader.collate_fn = seg_collate
        return loader

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

    def end_epoch(self, epoch: int, train_stats: dict[str, Any]) -> dict[str, Any]:
        """Evaluate after each round, keep the best checkpoint (mIoU), the round's record."""
        run, cfg = self.run, self.config
        iteration = (epoch + 1) * run.steps_per_epoch
        stats = {**super().end_epoch(epoch, train_stats), "iteration": iteration}
        if self.val_loader is None:
            return stats
        test = self._evaluate(f"iter_{iteration}", iteration)
        stats.update({f"test_{k}": v for k, v in test.items() if not isinstance(v, list)})
        run.writer.scalars(iteration, {k: test[k] for k in ("mIoU", "mAcc", "aAcc")}, "val")
        improved = test["mIoU"] > self.best_miou
        self.best_miou = stats["best_mIoU"] = max(self.best_miou, test["mIoU"])
        if improved and cfg.output_dir:
            run.save("best", {"epoch": "best", **self.state()})
        return stats

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
        train = (f"iteration {stats.get('iteration')}: loss {stats['train_loss']:.4f}, lr {stats['train_lr']:.2e}"
                 if "train_loss" in stats else f"iteration {stats.get('iteration')} (resumed)")
        if "test_mIoU" not in stats:
            return train
        return (f"{train}; val mIoU {stats['test_mIoU']:.2f}, mAcc {stats['test_mAcc']:.2f}, aAcc "
                f"{stats['test_aAcc']:.2f} (best mIoU {self.best_miou:.2f})")

    def evaluate_only(self, run, loaded: str | None) -> dict[str, Any]:
        cfg = self.config
        if loaded is None and not cfg.load_from:
            raise InputError("nothing to evaluate: pass a checkpoint (mcbeit-seg test CONFIG CHECKPOINT, --load_from "
                             "FILE, --resume FILE) or an --output_dir that holds checkpoints")
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
    def load_weights(self, ckpt: Mapping[str, Any], path: str) -> bool:
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise InputError(f"--resume {path} is not a checkpoint of mcbeit-seg (format {ckpt.get('format')!r}); "
                             "to start from its weights use --load_from (a segmentation file) or --pretrained "
                             "(backbone weights)")
        load_resumed_weights(self.model, ckpt["model"], path, self.flags(), ckpt.get("args"))
        return True

    def state(self) -> dict[str, Any]:
        return {"best_mIoU": self.best_miou, "num_classes": self.num_classes,
                "classes": list(getattr(self.sets.get("val") or self.sets.get("train"), "classes", None) or [])}

    def load_state(self, ckpt: Mapping[str, Any], path: str) -> None:
        self.best_miou = float(ckpt.get("best_mIoU", 0.0))

    def flags(self) -> dict[str, Any]:
        return {**super().flags(), "num_classes": self.num_classes}
