"""COCO detection and instance segmentation with Mask R-CNN on a BEiT backbone: the task the engine runs
(`mcbeit-det`).

The recipe of the mc-BEiT benchmark's detectron2 LazyConfig (:mod:`mcbeit.config.detection`): the backbone with
windowed attention and blocks 2, 5, 8, 11 through the multi-scale adaptor into an FPN, torchvision's Mask R-CNN with
the benchmark's heads (:mod:`mcbeit.models.detection`), large-scale jitter at 1024 (:mod:`mcbeit.data.det_transforms`),
AdamW with detectron2's weight-decay rule, a cosine schedule with a 1 % warm-up, counted in iterations; COCO box and
mask AP (:mod:`mcbeit.evaluation.detection`).

The engine's epoch is a round of ``--eval_period`` iterations (an endless stream of data epochs,
:class:`mcbeit.data.samplers.StreamSampler`); the last round ends with the schedule, after ``--max_iter``
iterations. ``checkpoint-R.pth`` is the state after round R.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from mcbeit.engine.optim import build_optimizer, detectron2_no_decay
from mcbeit.engine.schedules import warmup_cosine_multiplier
from mcbeit.engine.task import Mark, MeterSpec, StepOutput
from mcbeit.errors import ConfigError, InputError
from mcbeit.tasks.rounds import RoundsTask

log = logging.getLogger("mcbeit.det")

CHECKPOINT_FORMAT = "mcbeit-det-v1"
#: torchvision's Mask R-CNN losses (detectron2's loss_cls, loss_box_reg, loss_mask, loss_rpn_cls, loss_rpn_loc)
_PARTS = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")
_LOSSES = ("loss", *_PARTS)
#: the recipe's total batch (32 GPUs x 2 images)
RECIPE_BATCH = 64


def _to_device(target: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in target.items()}


class DetectionTask(RoundsTask):
    """Train (or evaluate) a Mask R-CNN detector as ``config`` says."""

    checkpoint_format = CHECKPOINT_FORMAT
    purpose = "detection fine-tuning"
    command = "mcbeit-det"
    best_metric = "bbox_AP"
    recipe_batch = RECIPE_BATCH
    recipe_batch_note = ": scale --lr with the batch if you change it"
    input_paths = (("--data_path", "data_path"), ("--init_checkpoint", "init_checkpoint"),
                   ("--train_json", "train_json"), ("--val_json", "val_json"), ("--train_images", "train_images"),
                   ("--val_images", "val_images"))
    weights_flag = "--init_checkpoint"
    meter = MeterSpec((*_LOSSES, "grad_norm", "loss_scale"), _LOSSES,
                      {"loss": _LOSSES, "opt": ("lr", "min_lr", "weight_decay", "grad_norm", "loss_scale")},
                      {"loss": ("loss", "{:.4f}"), "mask": ("loss_mask", "{:.3f}"), "lr": ("lr", "{:.2e}")})

    @property
    def round_length(self) -> int:
        return self.config.eval_period

    @property
    def total_iterations(self) -> int:
        return self.config.max_iter  # the last round ends with the schedule

    @property
    def train_collate(self):  # lists of images and targets: boxes and masks vary per image
        from mcbeit.data.detection import det_collate

        return det_collate

    eval_collate = train_collate

    def _datasets(self) -> None:
        """The train / val datasets (the model needs their number of classes)."""
        from mcbeit.data.detection import build_detection_dataset
        from mcbeit.data.embedded_det import embedded_detection_root

        cfg = self.config
        root = cfg.data_path if cfg.data_path is not None else str(embedded_detection_root())
        common = dict(size=cfg.image_size, seed=cfg.seed)
        if not cfg.eval_only:
            self.sets["train"] = build_detection_dataset(root, "train", train=True, ann_file=cfg.train_json or None,
                                                         image_dir=cfg.train_images or None,
                                                         scale_range=tuple(cfg.scale_range), **common)
        if cfg.eval_only or cfg.eval_period > 0:
            self.sets["val"] = build_detection_dataset(root, "val", train=False, ann_file=cfg.val_json or None,
                                                       image_dir=cfg.val_images or None, **common)
        counts = {name: len(d.categories) for name, d in self.sets.items()}
        if len(set(counts.values())) > 1:
            raise InputError(f"the training and validation annotations have different categories ({counts}): "
                             "detection needs the same category list in both")
        found = next(iter(counts.values()))
        if self.num_classes is None:
            self.num_classes = found
        elif found > self.num_classes:
            raise ConfigError(f"--num_classes {self.num_classes}, but the annotations have {found} categories")

    @property
    def categories(self) -> list:
        data = self.sets.get("val") or self.sets.get("train")
        return list(data.categories) if data is not None else []

    def build_model(self, run) -> nn.Module:
        from mcbeit.models.detection import load_backbone_weights, load_detection_checkpoint

        cfg = self.config
        self._datasets()
        if run.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        sync = cfg.sync_bn == "on" or (cfg.sync_bn == "auto" and run.info.world_size > 1 and run.device.type == "cuda")
        if cfg.sync_bn == "on" and run.device.type != "cuda":
            raise InputError("--sync_bn on needs CUDA (torch's SyncBatchNorm has no CPU kernel): use --sync_bn auto")
        model = cfg.build_detector(self.num_classes, sync_bn=sync)
        if cfg.init_checkpoint:
            log.info("%s", load_detection_checkpoint(model, cfg.init_checkpoint).summary("weights from"))
        elif cfg.pretrained:
            report = load_backbone_weights(model, cfg.pretrained, model_key=cfg.model_key, model_prefix=cfg.model_prefix)
            log.info("%s", report.summary("backbone from"))
        elif not cfg.resume and not cfg.eval_only:
            log.info("no --pretrained: training from RANDOM initialisation")
        log.info("Mask R-CNN on %s (%s pyramid): %.2fM parameters, %d classes, input %d, window %d", cfg.model,
                 cfg.pyramid, sum(p.numel() for p in model.parameters()) / 1e6, self.num_classes, cfg.image_size,
                 cfg.window_size)
        return model

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        from mcbeit.models.detection import vit_of

        cfg = self.config
        prefix, vit = vit_of(model)
        return build_optimizer(model, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay, opt_eps=cfg.opt_eps,
                               opt_betas=cfg.opt_betas, layer_decay=None if cfg.layer_decay >= 1.0 else cfg.layer_decay,
                               num_layers=len(vit.blocks), layer_prefix=prefix,
                               no_decay_names=detectron2_no_decay(model))

    def schedules(self, steps_per_epoch: int) -> tuple[np.ndarray, np.ndarray]:
        cfg = self.config
        lr = cfg.lr * warmup_cosine_multiplier(cfg.max_iter, cfg.warmup_length, cfg.warmup_factor)
        return lr, np.full(cfg.max_iter, cfg.weight_decay, dtype=np.float64)

    # -- training -----------------------------------------------------------------------------------------
    def train_step(self, batch: Any, mark: Mark | None = None) -> StepOutput:
        run = self.run
        images = [im.to(run.device, non_blocking=True) for im in batch[0]]     # B x (3, S, S), 0-1
        targets = [_to_device(t, run.device) for t in batch[1]]                # boxes (N,4), labels (N,), masks (N,S,S)
        with run.precision.autocast():
            losses = run.forward(images, targets)                              # torchvision's 5 losses
        if mark is not None:
            mark("forward")
        parts = {k: losses[k].float() for k in _PARTS}
        loss = sum(parts.values())
        metrics = {"loss": loss.detach(), **{k: v.detach() for k, v in parts.items()}}
        skipped = sum(int(t.get("n_skipped", 0)) for t in batch[1])             # unreadable images replaced
        return StepOutput(loss, metrics, len(images), skipped)

    def _evaluate(self, tag: str, step: int = 0) -> dict[str, Any]:
        from mcbeit.evaluation.detection import evaluate_detection, save_detection_visualisation

        run, cfg = self.run, self.config
        model = self.model
        data = self.sets["val"]
        result = evaluate_detection(model, self.val_loader, run.device, data.coco_ann_file, data.label_to_cat_id,
                                    amp_dtype=run.precision.dtype, backend=cfg.coco_backend,
                                    visualise=cfg.vis_images)
        shown = result.pop("visualisation", None)
        if shown and shown.get("images") and run.info.is_main and cfg.output_dir:
            names = [name for _, name in data.categories]
            grid = save_detection_visualisation(os.path.join(cfg.output_dir, f"vis_{tag}.png"), shown["images"],
                                                shown["outputs"], names, targets=shown["targets"])
            if run.writer is not None and grid is not None:
                run.writer.image(step, "val/predictions",
                                 torch.from_numpy(np.ascontiguousarray(grid)).permute(2, 0, 1).float() / 255)
        return result

    def figures(self, result: Mapping[str, Any]) -> dict[str, float]:
        return _flatten(result)

    def epoch_message(self, stats: Mapping[str, Any]) -> str:
        train = super().epoch_message(stats)
        if "test_bbox_AP" not in stats:
            return train
        return (f"{train}; val box AP {stats['test_bbox_AP']:.2f}, mask AP {stats.get('test_segm_AP', 0.0):.2f} "
                f"(best box AP {self.best:.2f})")

    def evaluate_only(self, run, loaded: str | None) -> dict[str, Any]:
        cfg = self.config
        if loaded is None and not cfg.init_checkpoint:
            raise self.nothing_to_evaluate()
        log.info("evaluating %s", loaded or cfg.init_checkpoint)
        self.val_loader = self._val_loader(run)
        result = self._evaluate("test")
        from mcbeit.evaluation.detection import format_metrics

        log.info("%s", format_metrics(result))
        return {f"test_{k}": v for k, v in _flatten(result).items()}

    # -- checkpoints --------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {**super().state(), "categories": [[int(c), str(n)] for c, n in self.categories]}


def _flatten(result: Mapping[str, Any]) -> dict[str, float]:
    """:func:`evaluate_detection`'s result as flat numbers: detectron2's headline names per iou type (``bbox_AP``,
    ``segm_AP50``, ...; :func:`mcbeit.evaluation.detection.flat_metrics` without the per-category APs) and the
    counts (``images``, ``detections``, ``seconds``)."""
    from mcbeit.evaluation.detection import flat_metrics

    out = {k.replace("/", "_"): float(v) for k, v in flat_metrics(result).items() if "/AP-" not in k}
    out.update({k: float(v) for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return out
