"""Image-classification fine-tuning and linear probing: the task the engine runs.

Builds the classifier (a BEiT of timm, initialised from ``--finetune``; or, with
``--linear_probe``, a frozen backbone under BatchNorm + a linear head), the data with mixup /
cutmix, the layer-decayed optimizer; per micro-batch the cross-entropy; per update the model EMA;
per epoch the evaluation and the best checkpoint.

Every checkpoint holds ``classes``, the names of the labels (index = label): the class folders'
names, CIFAR-100's, the list layout's ``classes.txt``, or ``[]`` where the data names none.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

import torch
from timm.utils import ModelEmaV3
from torch import nn

from mcbeit.config.finetune import FinetuneConfig
from mcbeit.data.classification_transforms import build_classification_transform
from mcbeit.data.datasets import build_classification_dataset
from mcbeit.data.folders import CLASSIFICATION_LAYOUTS, EVAL_LAYOUT, check_data_folder
from mcbeit.data.samplers import build_eval_loader, build_train_loader
from mcbeit.data.transforms import normalisation
from mcbeit.engine.optim import build_optimizer
from mcbeit.engine.resume import load_resumed_weights
from mcbeit.engine.task import Mark, MeterSpec, StepOutput, Task, TrainData
from mcbeit.errors import ConfigError, InputError
from mcbeit.evaluation.classification import evaluate
from mcbeit.models.beit import patch_size_of
from mcbeit.models.checkpoint import CheckpointError, resolve_source
from mcbeit.models.beit_weights import load_for_finetuning
from mcbeit.models.linear_probe import LinearProbe
from mcbeit.models.recompute import set_recompute
from mcbeit.objectives.classification import build_criterion, build_mixup
from mcbeit.tasks.pretrain import check_patch_grid

log = logging.getLogger("mcbeit.finetune")

CHECKPOINT_FORMAT = "mcbeit-finetune-v1"
_PERF = ("acc1", "acc5", "loss")


class FinetuneTask(Task):
    """Fine-tune (or linearly probe) a BEiT classifier as ``config`` says."""

    checkpoint_format = CHECKPOINT_FORMAT
    purpose = "fine-tuning"
    evaluates = True

    def __init__(self, config: FinetuneConfig):
        super().__init__(config)
        acc = () if config.mixup_on else ("class_acc",)
        self.meter = MeterSpec(("loss", "grad_norm", "loss_scale") + acc, ("loss",) + acc,
                               {"loss": ("loss",) + acc, "opt": ("lr", "min_lr", "weight_decay", "grad_norm",
                                                                 "loss_scale")},
                               {"loss": ("loss", "{:.4f}"), "lr": ("lr", "{:.2e}")})
        self.nb_classes, self.max_accuracy = config.nb_classes, 0.0
        self.model_ema = self.mixup = self.val_loader = None
        self.sets: dict[str, Any] = {}
        self.classes: list[str] = []  # the labels' names (index = label), written into every checkpoint
        self.update_freq, self.deepspeed, self.zero_stage = config.update_freq, config.enable_deepspeed, config.zero_stage

    @property
    def writes_checkpoints(self) -> bool:
        return self.config.save_ckpt and bool(self.config.output_dir)

    @property
    def base_lr(self) -> float:
        """``--lr``, or for a linear probe without it ``--blr`` x the total batch / 256 (MAE's rule)."""
        cfg = self.config
        if cfg.lr is not None:
            return cfg.lr
        return cfg.blr * cfg.batch_size * cfg.update_freq * self.run.info.world_size / 256

    # -- checks and building ------------------------------------------------------------------------------
    def check_inputs(self) -> None:
        cfg = self.config
        if cfg.data_path:
            check_data_folder(cfg.data_path, expected=CLASSIFICATION_LAYOUTS)
        if cfg.eval_data_path:
            check_data_folder(cfg.eval_data_path, "--eval_data_path", EVAL_LAYOUT)
        if cfg.finetune and not cfg.finetune.startswith(("https://", "http://")):
            try:
                resolve_source(cfg.finetune)  # a file, or a DeepSpeed folder with its model states
            except CheckpointError as exc:
                raise InputError(f"{exc}; or --finetune none to train from random initialisation") from None
        if patch := patch_size_of(cfg.model):
            check_patch_grid(cfg.input_size, patch, cfg.model)

    def build_model(self, run) -> nn.Module:
        cfg = self.config
        self._datasets()
        model = cfg.build_classifier(self.nb_classes)
        model = set_recompute(model, cfg.recompute)
        if cfg.finetune:
            report = load_for_finetuning(cfg.finetune, model, model_key=cfg.model_key, model_prefix=cfg.model_prefix)
            if not cfg.imagenet_default_mean_and_std and any(k.startswith("cls_pt_layers.") for k in report.dropped):
                log.warning("%s is a BEiT v2 pre-training checkpoint (it has cls_pt_layers), pre-trained on ImageNet "
                            "mean/std inputs; the original fine-tunes it with --imagenet_default_mean_and_std, this "
                            "run normalises with 0.5/0.5", cfg.finetune)
        elif cfg.linear_probe:
            log.warning("--linear_probe without --finetune probes a RANDOMLY initialised backbone")
        elif not cfg.resume and not cfg.eval:
            log.info("no --finetune: training from RANDOM initialisation")
        if cfg.linear_probe:
            model = LinearProbe(model, self.nb_classes, cfg.probe_layer, cfg.probe_pool)
        log.info("model %s: %.2fM trainable parameters, %d classes, %s", cfg.model,
                 sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6, self.nb_classes,
                 f"linear probe of block {model.layer} ({cfg.probe_pool} pooling)" if cfg.linear_probe else
                 ("mean" if cfg.use_mean_pooling else "CLS") + " pooling")
        if cfg.model_ema:
            self.model_ema = ModelEmaV3(model.to(run.device), decay=cfg.model_ema_decay,
                                        device="cpu" if cfg.model_ema_force_cpu else None)
        return model

    def _datasets(self) -> None:
        """The train / val datasets (the model needs their number of classes)."""
        cfg = self.config
        mean, std = normalisation(cfg.imagenet_default_mean_and_std)
        train_tf = build_classification_transform(
            True, cfg.input_size, mean=mean, std=std, color_jitter=cfg.color_jitter, aa=cfg.aa,
            train_interpolation=cfg.train_interpolation, reprob=cfg.reprob, remode=cfg.remode, recount=cfg.recount,
            crop_min_scale=cfg.crop_min_scale)
        eval_tf = build_classification_transform(False, cfg.input_size, mean=mean, std=std, crop_pct=cfg.crop_pct)
        if not cfg.eval:
            self.sets["train"] = build_classification_dataset(cfg.data_path, cfg.data_set, "train", train_tf, cfg.seed,
                                                              cfg.eval_data_path)
        if cfg.eval or not cfg.disable_eval_during_finetuning:
            self.sets["val"] = build_classification_dataset(cfg.data_path, cfg.data_set, "val", eval_tf, cfg.seed,
                                                            cfg.eval_data_path)
        found = max(getattr(d, "num_classes", 0) for d in self.sets.values())
        self.classes = self._class_names()
        if self.nb_classes is None:
            self.nb_classes = found
        elif found > self.nb_classes:
            which = f"named {_shown(self.classes)}" if self.classes else f"labels up to {found - 1}"
            raise ConfigError(f"--nb_classes {self.nb_classes}, but the data has {found} classes ({which}); pass "
                              f"--nb_classes {found} or more, or leave it out")

    def _class_names(self) -> list[str]:
        """The labels' names for the checkpoints: the train set's, else the val set's; [] when neither names them."""
        names = {split: _names_of(dataset) for split, dataset in self.sets.items()}
        train, val = names.get("train"), names.get("val")
        if train and val and train != val:
            log.warning("the train and val data name their classes differently (train: %s; val: %s): the "
                        "checkpoints keep the train set's names; check that the val labels mean the same classes",
                        _shown(train), _shown(val))
        return train or val or []

    def build_data(self, run) -> TrainData:
        cfg, info = self.config, run.info
        pin = cfg.pin_mem and run.device.type == "cuda"
        self.val_loader = self._val_loader(run)
        loader, sampler, steps = build_train_loader(self.sets["train"], cfg.batch_size, cfg.num_workers, pin, cfg.seed,
                                                    info.world_size, info.rank, batches_per_step=cfg.update_freq)
        self.mixup = build_mixup(cfg, self.nb_classes)
        self.criterion = build_criterion(cfg.smoothing, self.mixup is not None)
        return TrainData(loader, sampler, steps)

    def _val_loader(self, run):
        cfg, info = self.config, run.info
        return None if "val" not in self.sets else build_eval_loader(self.sets["val"], int(1.5 * cfg.batch_size), cfg.num_workers,
                                 cfg.pin_mem and run.device.type == "cuda", info.world_size if cfg.dist_eval else 1,
                                 info.rank if cfg.dist_eval else 0)

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        cfg = self.config
        if cfg.lr is None:
            log.info("linear probing: lr %.4g = --blr %g x %d images per step / 256", self.base_lr, cfg.blr,
                     cfg.batch_size * cfg.update_freq * self.run.info.world_size)
        extra = ("relative_position_bias_table",) if cfg.disable_weight_decay_on_rel_pos_bias else ()
        return build_optimizer(model, cfg.opt, lr=self.base_lr, weight_decay=cfg.weight_decay, opt_eps=cfg.opt_eps,
                               opt_betas=cfg.opt_betas, momentum=cfg.momentum, extra_no_decay_keywords=extra,
                               layer_decay=None if cfg.layer_decay >= 1.0 else cfg.layer_decay)

    def compile(self) -> None:
        if self.config.compile:
            self.model.compile(backend=self.config.compile_backend, mode=self.config.compile_mode)

    # -- training -----------------------------------------------------------------------------------------
    def train_step(self, batch: Any, mark: Mark | None = None) -> StepOutput:
        run = self.run
        samples = batch[0].to(run.device, non_blocking=True)                   # (B, 3, H, W)
        targets = batch[1].to(run.device, non_blocking=True)                   # (B,) class ids
        if self.mixup is not None:
            samples, targets = self.mixup(samples, targets)                    # targets: (B, C) soft
        with run.precision.autocast():
            logits = run.forward(samples)                                      # (B, C)
            loss = self.criterion(logits.float(), targets)
        metrics = {"loss": loss.detach().float()}
        if self.mixup is None:
            metrics["class_acc"] = (logits.detach().argmax(-1) == targets).float().mean()
        return StepOutput(loss, metrics, samples.shape[0], batch[2].sum() if len(batch) > 2 else 0)

    def after_update(self, stepped: Any) -> dict[str, torch.Tensor]:
        if self.model_ema is not None:
            self.model_ema.update(self.model)
        return {}

    def end_epoch(self, epoch: int, train_stats: dict[str, Any]) -> dict[str, Any]:
        """Evaluate (and the EMA), keep the best checkpoint, and the epoch's record."""
        run, cfg = self.run, self.config
        stats = {**super().end_epoch(epoch, train_stats), "n_parameters": run.n_parameters}
        if self.val_loader is None:
            return stats
        test = self._evaluate(self.model)
        stats.update({f"test_{k}": v for k, v in test.items()})
        if self.model_ema is not None:
            stats.update({f"test_ema_{k}": v for k, v in self._evaluate(self.model_ema.module).items()})
        improved = test["acc1"] > self.max_accuracy
        self.max_accuracy = stats["max_accuracy"] = max(self.max_accuracy, test["acc1"])
        run.writer.scalars(epoch, {k: test[k] for k in _PERF}, "perf")
        if improved and cfg.save_ckpt and cfg.output_dir:  # the best so far, kept (every rank: DeepSpeed shards)
            run.save("best", {"epoch": "best", **self.state()})
        return stats

    def _evaluate(self, model: nn.Module) -> dict[str, float]:
        sharded = self.config.dist_eval and self.run.info.world_size > 1
        return evaluate(model, self.val_loader, self.run.device, self.run.precision.dtype, sharded)

    def epoch_message(self, stats: Mapping[str, Any]) -> str:
        train = f"loss {stats['train_loss']:.4f}, lr {stats['train_lr']:.2e}" if "train_loss" in stats else "resumed"
        if "test_acc1" not in stats:
            return train
        return (f"{train}; val acc1 {stats['test_acc1']:.2f}%, acc5 {stats['test_acc5']:.2f}% "
                f"(best {self.max_accuracy:.2f}%)")

    def evaluate_only(self, run, loaded: str | None) -> dict[str, Any]:
        """``--eval``: the weights the engine loaded (--resume, the newest checkpoint), else --finetune's."""
        if loaded is None and not self.config.finetune:
            raise InputError("--eval: nothing to evaluate; pass --resume CHECKPOINT, --finetune WEIGHTS, or an "
                             "--output_dir that holds checkpoints")
        log.info("evaluating %s", loaded or self.config.finetune)
        self.val_loader = self._val_loader(run)
        stats = self._evaluate(self.model)
        log.info("accuracy of the network on the %d test images: acc1 %.2f%%, acc5 %.2f%%, loss %.4f",
                 stats["images"], stats["acc1"], stats["acc5"], stats["loss"])
        return {f"test_{k}": v for k, v in stats.items()}

    # -- checkpoints --------------------------------------------------------------------------------------
    def load_weights(self, ckpt: Mapping[str, Any], path: str) -> bool:
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise InputError(f"--resume {path} is not a checkpoint of mcbeit-finetune (format {ckpt.get('format')!r}); "
                             "to start from pre-trained weights use --finetune")
        load_resumed_weights(self.model, ckpt["model"], path, self.flags(), ckpt.get("args"))
        return True

    def state(self) -> dict[str, Any]:
        return {"model_ema": self.model_ema.module.state_dict() if self.model_ema is not None else None,
                "max_accuracy": self.max_accuracy, "classes": list(self.classes)}

    def load_state(self, ckpt: Mapping[str, Any], path: str) -> None:
        if self.model_ema is not None and ckpt.get("model_ema") is not None:
            load_resumed_weights(self.model_ema.module, ckpt["model_ema"], path, self.flags(), ckpt.get("args"))
        self.max_accuracy = float(ckpt.get("max_accuracy", 0.0))
        before = list(ckpt.get("classes") or [])  # checkpoints written before class names were kept have none
        if before and self.classes and before != self.classes:
            log.warning("%s was trained with the classes %s, the data now names %s: the checkpoints from now on keep "
                        "the data's names", path, _shown(before), _shown(self.classes))

    def flags(self) -> dict[str, Any]:
        lr = self.base_lr if self.run is not None else self.config.lr
        return {**super().flags(), "nb_classes": self.nb_classes, "lr": lr}


def _names_of(dataset: Any) -> list[str]:
    """A dataset's class names as plain strings; [] for none (the list layout without classes.txt) and for the
    one unnamed class of loose images."""
    names = [str(name) for name in getattr(dataset, "classes", None) or []]
    return names if any(names) else []


def _shown(names: list[str], first: int = 5) -> str:
    return ", ".join(names[:first]) + (f" and {len(names) - first} more" if len(names) > first else "")
