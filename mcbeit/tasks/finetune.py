"""Image classification fine-tuning: the command line of the original `run_class_finetuning.py`, and its main.

Every flag of the original keeps its meaning. With no `--data_path` the run is the embedded
demonstration: a tiny BEiT on the embedded images (10 classes, train/ and val/), fine-tuned from
the newest checkpoint of `mcbeit-pretrain` in ./output/mcbeit_pretrained when there is one, in a
few minutes on a CPU.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import torch
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from timm.data.mixup import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from mcbeit.data.datasets import build_classification_dataset
from mcbeit.data.samplers import build_eval_loader, build_train_loader
from mcbeit.data.transforms import build_classification_transform
from mcbeit.engine import checkpoint as ckpt_io
from mcbeit.engine.control import RunControl
from mcbeit.engine.distributed import DistInfo, wrap_ddp
from mcbeit.engine.finetune_loop import FinetuneState, evaluate, train_one_epoch
from mcbeit.engine.logging import RunWriter
from mcbeit.engine.optim import optimizer_from_args
from mcbeit.engine.schedules import cosine_scheduler
from mcbeit.models.checkpoint import load_into
from mcbeit.models.classifier import build_classifier
from mcbeit.models.recompute import FINETUNE_RECOMPUTE, set_recompute
from mcbeit.models.linear_probe import LinearProbe
from mcbeit.tasks.common import (add_compile_arguments, add_optimizer_arguments, add_recompute_argument,
                                 add_runtime_arguments, compile_modules, amp_settings, fill_defaults,
                                 epoch_save_due, finish_log, load_resumed_weights, log_plan, position_state, resume_path,
                                 resume_position, run_main,
                                 save_checkpoint, seed_everything, start_run,
                                 warmup_steps)

log = logging.getLogger("mcbeit.finetune")

CHECKPOINT_FORMAT = "mcbeit-finetune-v1"
DEFAULT_OUTPUT_DIR = "./output/mcbeit_finetuned"
PRETRAINED_OUTPUT_DIR = "./output/mcbeit_pretrained"  # where `mcbeit-pretrain` writes by default
RANDOM_INIT = ("none", "random")  # --finetune values that mean: start from random weights
BEST_NAME = "checkpoint-best.pth"

# Defaults of the no-argument run on the embedded images (only when --data_path is absent and the
# flag is not given); with --data_path the original's defaults apply.
EMBEDDED_DEFAULTS = {"model": "beit_tiny_patch16_224", "epochs": 3, "batch_size": 32, "warmup_epochs": 1,
                     "save_ckpt_freq": 1, "input_size": 112, "lr": 2e-3, "layer_decay": 0.75,
                     "crop_min_scale": 0.35}
ORIGINAL_DEFAULTS = {"model": "beit_base_patch16_224", "epochs": 30, "batch_size": 64, "warmup_epochs": 5,
                     "save_ckpt_freq": 5, "input_size": 224, "lr": 5e-4, "layer_decay": 0.9,
                     "crop_min_scale": 0.08}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "mcbeit-finetune",
        description="Fine-tune (or, with --eval, evaluate) a BEiT classifier; the flags of the original "
                    "run_class_finetuning.py. With no flags: a tiny model on the embedded images.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    emb = " ({} on the embedded data when --data_path is not given)"
    orig = lambda key, text="": f"{text}default {ORIGINAL_DEFAULTS[key]}" + emb.format(EMBEDDED_DEFAULTS[key])  # noqa: E731
    p.add_argument("--batch_size", type=int, default=None, help=orig("batch_size", "per-process batch size; "))
    p.add_argument("--epochs", type=int, default=None, help=orig("epochs"))
    p.add_argument("--update_freq", type=int, default=1, help="gradient accumulation: micro-batches per update")
    p.add_argument("--save_ckpt_freq", type=int, default=None, help=orig("save_ckpt_freq", "save every N epochs; "))
    # model
    p.add_argument("--model", default=None, type=str,
                   help=orig("model", "a BEiT classifier of timm (beit_base_patch16_224, ...) or ours (tiny, small); "))
    p.add_argument("--rel_pos_bias", action="store_true", help="relative position bias in every block (default on)")
    p.add_argument("--disable_rel_pos_bias", action="store_false", dest="rel_pos_bias")
    p.set_defaults(rel_pos_bias=True)
    p.add_argument("--abs_pos_emb", action="store_true", default=False)
    p.add_argument("--layer_scale_init_value", default=1e-5, type=float,
                   help="0.1 for base, 1e-5 for large; 0 disables layer scale (loaded weights replace it)")
    p.add_argument("--input_size", default=None, type=int, help=orig("input_size", "image size; "))
    p.add_argument("--drop", type=float, default=0.0, help="dropout before the head")
    p.add_argument("--attn_drop_rate", type=float, default=0.0)
    p.add_argument("--drop_path", type=float, default=0.1, help="stochastic depth rate")
    add_recompute_argument(p, FINETUNE_RECOMPUTE)
    add_compile_arguments(p)
    p.add_argument("--disable_eval_during_finetuning", action="store_true", default=False)
    p.add_argument("--model_ema", action="store_true", default=False)
    p.add_argument("--model_ema_decay", type=float, default=0.9999)
    p.add_argument("--model_ema_force_cpu", action="store_true", default=False)
    # optimisation
    add_optimizer_arguments(p, opt_betas=None, min_lr=1e-6, lr=None,
                            warmup_epochs_help=orig("warmup_epochs", "LR warm-up epochs; "))
    p.add_argument("--layer_decay", type=float, default=None, help=orig("layer_decay", "layer-wise LR decay; "))
    # augmentation
    p.add_argument("--color_jitter", type=float, default=0.4)
    p.add_argument("--aa", type=str, default="rand-m9-mstd0.5-inc1", help="RandAugment / AutoAugment policy ('' for none)")
    p.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    p.add_argument("--train_interpolation", type=str, default="bicubic")
    p.add_argument("--crop_pct", type=float, default=None, help="evaluation crop (224/256 below 384 px, else 1)")
    p.add_argument("--crop_min_scale", type=float, default=None,
                   help=orig("crop_min_scale", "smallest area fraction of the training random-resized crop; "))
    p.add_argument("--reprob", type=float, default=0.25, help="random erase probability")
    p.add_argument("--remode", type=str, default="pixel")
    p.add_argument("--recount", type=int, default=1)
    p.add_argument("--resplit", action="store_true", default=False,
                   help="accepted for compatibility: without augmentation splits it changes nothing (as in the original)")
    p.add_argument("--mixup", type=float, default=0, help="mixup alpha (on if > 0)")
    p.add_argument("--cutmix", type=float, default=0, help="cutmix alpha (on if > 0)")
    p.add_argument("--cutmix_minmax", type=float, nargs="+", default=None)
    p.add_argument("--mixup_prob", type=float, default=1.0)
    p.add_argument("--mixup_switch_prob", type=float, default=0.5)
    p.add_argument("--mixup_mode", type=str, default="batch", choices=["batch", "pair", "elem"])
    # fine-tuning source
    p.add_argument("--finetune", default="",
                   help="pre-trained checkpoint: a file, a DeepSpeed folder or an https URL; 'none' trains from "
                        "random initialisation (on the embedded data, where no --finetune picks the newest "
                        "checkpoint of mcbeit-pretrain)")
    p.add_argument("--model_key", default="model|module", type=str)
    p.add_argument("--model_prefix", default="", type=str)
    p.add_argument("--init_scale", default=0.001, type=float, help="scale of the head's initial weights")
    p.add_argument("--use_mean_pooling", action="store_true", help="mean of the patch tokens + fc_norm (default)")
    p.set_defaults(use_mean_pooling=True)
    p.add_argument("--use_cls", action="store_false", dest="use_mean_pooling", help="the CLS token after norm")
    p.add_argument("--disable_weight_decay_on_rel_pos_bias", action="store_true", default=False)
    # data
    p.add_argument("--data_path", default=None, type=str,
                   help="dataset folder (train/ and val/, class folders or <split>_map.txt); default: the embedded images")
    p.add_argument("--eval_data_path", default=None, type=str, help="evaluation folder for --data_set image_folder")
    p.add_argument("--nb_classes", default=None, type=int, help="number of classes (default: from the dataset)")
    p.add_argument("--imagenet_default_mean_and_std", default=False, action="store_true")
    p.add_argument("--data_set", default=None, choices=["CIFAR", "IMNET", "image_folder"],
                   help="dataset layout (the original's default IMNET); default: detected")
    p.add_argument("--save_ckpt", action="store_true")
    p.add_argument("--no_save_ckpt", action="store_false", dest="save_ckpt")
    p.set_defaults(save_ckpt=True)
    p.add_argument("--eval", action="store_true", help="evaluate (--resume, the newest checkpoint, or --finetune) and exit")
    p.add_argument("--dist_eval", action="store_true", default=False,
                   help="evaluate a shard per process (every image exactly once)")
    add_runtime_arguments(p, output_dir=DEFAULT_OUTPUT_DIR)
    # linear probing
    p.add_argument("--linear_probe", action="store_true",
                   help="train only BatchNorm(affine=False) + a linear head on frozen features (mcbeit-linprobe)")
    p.add_argument("--probe_layer", type=int, default=None, help="block whose features are probed, 1-based (default: last)")
    p.add_argument("--probe_pool", default="avg", choices=["avg", "cls"], help="mean patch token or CLS token")
    p.add_argument("--blr", type=float, default=0.1,
                   help="linear probing without --lr: lr = blr x total batch size / 256 (MAE's convention)")
    # DeepSpeed
    p.add_argument("--enable_deepspeed", action="store_true", default=False)
    p.add_argument("--zero_stage", type=int, default=0, choices=[0, 1, 2],
                   help="DeepSpeed ZeRO stage (3 would partition the weights EMA, evaluation and export read)")
    return p


# Linear probing (MAE / BEiT v2 protocol): light augmentation, no mixup / smoothing / erasing /
# drop-path, no weight decay, LARS; applied to the flags the user did not set (mcbeit-linprobe).
LINEAR_PROBE_DEFAULTS = {"linear_probe": True, "aa": "", "reprob": 0.0, "smoothing": 0.0, "mixup": 0.0, "cutmix": 0.0,
                         "color_jitter": 0.0, "drop_path": 0.0, "weight_decay": 0.0, "layer_decay": 1.0,
                         "opt": "lars", "output_dir": "./output/mcbeit_linprobe"}


def get_linprobe_parser() -> argparse.ArgumentParser:
    """`mcbeit-linprobe`: the fine-tuning flags with linear-probing defaults."""
    p = get_args_parser()
    p.prog = "mcbeit-linprobe"
    p.description = ("Linear probing of a pre-trained BEiT: frozen backbone, features of --probe_layer, "
                     "BatchNorm without affine + a linear head. The flags of mcbeit-finetune.")
    p.set_defaults(**LINEAR_PROBE_DEFAULTS)
    return p


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    lr_given = args.lr is not None
    fill_defaults(args, EMBEDDED_DEFAULTS, ORIGINAL_DEFAULTS)
    if args.linear_probe and not lr_given:
        args.lr = args.blr * args.batch_size * args.update_freq * args.world_size / 256
        log.info("linear probing: lr %.4g = --blr %g x %d images per step / 256", args.lr, args.blr,
                 args.batch_size * args.update_freq * args.world_size)
    if args.weight_decay_end is None:
        args.weight_decay_end = args.weight_decay
    if args.log_dir is None and args.output_dir:
        args.log_dir = os.path.join(args.output_dir, "tensorboard")
    for name in ("batch_size", "epochs", "update_freq", "save_ckpt_freq", "print_freq", "input_size"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.linear_probe and (args.enable_deepspeed or args.model_ema):
        raise SystemExit("--linear_probe trains one linear layer: run it without --enable_deepspeed / --model_ema")
    if args.linear_probe and args.layer_decay < 1.0:
        log.info("--linear_probe: --layer_decay %s ignored (only the head trains)", args.layer_decay)
        args.layer_decay = 1.0
    if not 0.0 < args.layer_decay <= 1.0:
        raise SystemExit(f"--layer_decay must lie in (0, 1], got {args.layer_decay}")
    if args.finetune.strip().lower() in RANDOM_INIT:
        args.finetune = ""  # explicit: random initialisation, no checkpoint picked for us
    elif args.data_path is None and not args.finetune and not args.eval and not args.resume:
        latest = ckpt_io.latest_checkpoint(PRETRAINED_OUTPUT_DIR)
        if latest is not None:
            args.finetune = str(latest)
            log.info("no --data_path and no --finetune: fine-tuning %s (the newest checkpoint of mcbeit-pretrain)",
                     latest)
    return args


def _mean_std(args) -> tuple[tuple, tuple]:
    if args.imagenet_default_mean_and_std:
        return IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    return IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD


def build_data(args, info: DistInfo):
    mean, std = _mean_std(args)
    train_tf = build_classification_transform(True, args.input_size, mean=mean, std=std, color_jitter=args.color_jitter,
                                              aa=args.aa, train_interpolation=args.train_interpolation,
                                              reprob=args.reprob, remode=args.remode, recount=args.recount,
                                              crop_min_scale=args.crop_min_scale)
    eval_tf = build_classification_transform(False, args.input_size, mean=mean, std=std, crop_pct=args.crop_pct)
    train_set = None if args.eval else build_classification_dataset(args.data_path, args.data_set, "train", train_tf,
                                                                     args.seed, args.eval_data_path)
    val_set = None
    if args.eval or not args.disable_eval_during_finetuning:
        val_set = build_classification_dataset(args.data_path, args.data_set, "val", eval_tf, args.seed,
                                               args.eval_data_path)
    found = max(getattr(d, "num_classes", 0) for d in (train_set, val_set) if d is not None)
    if args.nb_classes is None:
        args.nb_classes = found
    elif found > args.nb_classes:
        raise SystemExit(f"--nb_classes {args.nb_classes}, but the data has {found} classes (labels up to {found - 1})")
    pin = args.pin_mem and info.device.type == "cuda"
    train = None
    if train_set is not None:
        train = build_train_loader(train_set, args.batch_size, args.num_workers, pin, args.seed, info.world_size,
                                   info.rank, batches_per_step=args.update_freq)
    val_loader = None
    if val_set is not None:
        shards = info.world_size if args.dist_eval else 1
        val_loader = build_eval_loader(val_set, int(1.5 * args.batch_size), args.num_workers, pin, shards,
                                       info.rank if args.dist_eval else 0)
    return train, val_loader, val_set


def build_model(args) -> torch.nn.Module:
    """The classifier; with --linear_probe, the backbone alone (no head) for :class:`LinearProbe`."""
    model = build_classifier(args.model, nb_classes=0 if args.linear_probe else args.nb_classes,
                             input_size=args.input_size,
                             use_mean_pooling=args.use_mean_pooling, init_scale=args.init_scale,
                             rel_pos_bias=args.rel_pos_bias, abs_pos_emb=args.abs_pos_emb,
                             layer_scale_init_value=args.layer_scale_init_value, drop=args.drop,
                             attn_drop_rate=args.attn_drop_rate, drop_path=args.drop_path)
    return set_recompute(model, getattr(args, "recompute", FINETUNE_RECOMPUTE))


def build_criterion(args, mixup_fn):
    if mixup_fn is not None:
        return SoftTargetCrossEntropy()          # smoothing is in the mixed targets
    if args.smoothing > 0.0:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return torch.nn.CrossEntropyLoss()


def build_mixup(args):
    if not (args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None):
        return None
    return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                 prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                 label_smoothing=args.smoothing, num_classes=args.nb_classes)


class Resumed(NamedTuple):
    """Where a fine-tuning run continues (from :func:`restore` / :func:`_deepspeed_restore`)."""
    start: int                # the epoch to train next
    first: int                # its steps already done
    max_accuracy: float
    path: str | None
    unevaluated: int | None   # an epoch whose training ended (a stop on its last step) before its evaluation


def _unevaluated_epoch(ckpt: dict, start: int, first: int) -> int | None:
    """The epoch to evaluate before training on, when ``ckpt`` was written at an epoch's end by a stop signal
    (``evaluated`` False): the evaluation, best checkpoint and log line of that epoch are still owed."""
    return start - 1 if ckpt.get("evaluated") is False and first == 0 and start > 0 else None


def restore(args, model, optimizer, scaler, model_ema, steps_per_epoch: int = 1,
            info: DistInfo | None = None) -> Resumed:
    """--resume / auto-resume: where to continue, with this rank's random generators restored (``info``
    given: training, not --eval)."""
    path = resume_path(args)
    if path is None:
        return Resumed(args.start_epoch, 0, 0.0, None, None)
    ckpt = ckpt_io.load_training_checkpoint(path)
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise SystemExit(f"--resume {path} is not a checkpoint of mcbeit-finetune (format {ckpt.get('format')!r}); "
                         "to start from pre-trained weights use --finetune")
    load_resumed_weights(model, ckpt["model"], path, args, ckpt.get("args"))
    if model_ema is not None and ckpt.get("model_ema") is not None:
        load_resumed_weights(model_ema.module, ckpt["model_ema"], path, args, ckpt.get("args"))
    if not args.eval and optimizer is not None and ckpt.get("optimizer"):
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
    if info is not None and isinstance(ckpt.get("epoch"), int):
        start, first = resume_position(ckpt, path, steps_per_epoch, info, args.start_epoch)
    else:  # --eval, or checkpoint-best.pth given as --resume: its weights, no position
        start, first = args.start_epoch, 0
    return Resumed(start, first, float(ckpt.get("max_accuracy", 0.0)), path, _unevaluated_epoch(ckpt, start, first))


def _restore_for_eval(args, model, model_ema) -> None:
    """--eval: the weights of --resume (a .pth or a DeepSpeed folder), else of the newest checkpoint in
    --output_dir, else those --finetune loaded; with none of these there is nothing to evaluate."""
    deepspeed_folder = os.path.isdir(args.resume) if args.resume else args.enable_deepspeed
    if deepspeed_folder:
        from mcbeit.engine.deepspeed import resume_checkpoint
        from mcbeit.models.finetune_checkpoint import read_checkpoint, resolve_source, select_state_dict

        folder = resume_checkpoint(args.resume, args.auto_resume, args.output_dir)
        if folder is not None:
            state, _, _ = select_state_dict(read_checkpoint(resolve_source(str(folder))), "module|model")
            load_into(model, state, strict=True)
            log.info("evaluating %s (DeepSpeed)", folder)
            return
    elif restore(args, model, None, None, model_ema).path is not None:
        return
    if not args.finetune:
        raise SystemExit("--eval: nothing to evaluate; pass --resume CHECKPOINT, --finetune WEIGHTS, or an "
                         "--output_dir that holds checkpoints")


def save(args, epoch: int | str, model, optimizer, scaler, model_ema, max_accuracy: float,
         position: dict | None = None) -> Path:
    """`checkpoint-<epoch>.pth` with the run's ``position`` (:func:`position_state`), or `checkpoint-best.pth`."""
    state = {"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scaler": scaler.state_dict() if scaler is not None else None, "epoch": epoch,
             "model_ema": model_ema.module.state_dict() if model_ema is not None else None,
             "max_accuracy": max_accuracy, "args": ckpt_io.plain_args(args), **(position or {})}
    if epoch == "best":
        return ckpt_io.save_atomic(state, Path(args.output_dir) / BEST_NAME)
    return save_checkpoint(args, epoch, state)


def save_position(args, info: DistInfo, trainer, epoch: int, steps_done: int, steps_per_epoch: int, model,
                  optimizer, scaler, model_ema, max_accuracy: float, evaluated: bool = False) -> str | None:
    """A resume point after ``steps_done`` steps of ``epoch``; every rank calls it. Plain runs: rank 0
    writes `checkpoint-<epoch>.pth`; DeepSpeed: every rank writes its part of `checkpoint-<epoch>/`.
    ``evaluated``: the epoch's evaluation is done (False when a stop signal cut in before it)."""
    position = {**position_state(info, epoch, steps_done, steps_per_epoch), "evaluated": evaluated}
    if trainer is not None:
        return str(trainer.save(args.output_dir, epoch, {**_client_state(args, model_ema, max_accuracy), **position},
                                keep_last=args.keep_last))
    if not info.is_main:
        return None
    return os.path.abspath(save(args, epoch, model, optimizer, scaler, model_ema, max_accuracy, position))


def _deepspeed_trainer(args, info: DistInfo, model, optimizer):
    """--enable_deepspeed: wrap the run's own optimizer (betas, eps, layer decay kept) in a DeepSpeed engine."""
    from mcbeit.engine import deepspeed as ds

    ds.prepare_accelerator(info.device)
    config = ds.deepspeed_config(batch_size=args.batch_size, update_freq=args.update_freq, world_size=info.world_size,
                                 amp=args.amp, zero_stage=args.zero_stage, clip_grad=args.clip_grad, device=info.device)
    trainer = ds.DeepSpeedTrainer(model, optimizer, config, device=info.device, local_rank=max(info.local_rank, 0))
    return trainer, trainer.autocast_dtype


def _client_state(args, model_ema, max_accuracy: float) -> dict[str, Any]:
    return {"format": CHECKPOINT_FORMAT, "args": ckpt_io.plain_args(args), "max_accuracy": max_accuracy,
            "model_ema": model_ema.module.state_dict() if model_ema is not None else None}


def _deepspeed_restore(args, trainer, model_ema, steps_per_epoch: int, info: DistInfo) -> Resumed:
    from mcbeit.engine import deepspeed as ds

    path = ds.resume_checkpoint(args.resume, args.auto_resume, args.output_dir)
    if path is None:
        return Resumed(args.start_epoch, 0, 0.0, None, None)
    client = trainer.load(path)
    if model_ema is not None and client.get("model_ema") is not None:
        load_into(model_ema.module, client["model_ema"], strict=True)
    start, first = resume_position(client, f"{path} (DeepSpeed)", steps_per_epoch, info, args.start_epoch)
    return Resumed(start, first, float(client.get("max_accuracy", 0.0)), str(path),
                   _unevaluated_epoch(client, start, first))


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Fine-tune (or evaluate) as `args` say; return the last epoch's statistics."""
    info = start_run(args, resolve_defaults, "fine-tuning")
    seed_everything(args.seed + info.rank)
    train, val_loader, val_set = build_data(args, info)
    model = build_model(args)
    if args.finetune:
        from mcbeit.models.finetune_checkpoint import load_for_finetuning

        load_for_finetuning(args.finetune, model, model_key=args.model_key, model_prefix=args.model_prefix)
    elif args.linear_probe:
        log.warning("--linear_probe without --finetune probes a RANDOMLY initialised backbone")
    elif not args.resume and not args.eval:
        log.info("no --finetune: training from RANDOM initialisation")
    if args.linear_probe:
        model = LinearProbe(model, args.nb_classes, args.probe_layer, args.probe_pool)
    model.to(info.device)
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("model %s: %.2fM trainable parameters, %d classes, %s", args.model, n_parameters / 1e6, args.nb_classes,
             f"linear probe of block {model.layer} ({args.probe_pool} pooling)" if args.linear_probe else
             ("mean" if args.use_mean_pooling else "CLS") + " pooling")
    model_ema = None
    if args.model_ema:
        from timm.utils import ModelEmaV3

        model_ema = ModelEmaV3(model, decay=args.model_ema_decay, device="cpu" if args.model_ema_force_cpu else None)
    amp_dtype, scaler = amp_settings(args.amp, info.device)
    sharded = args.dist_eval and info.world_size > 1

    if args.eval:
        _restore_for_eval(args, model, model_ema)
        stats = evaluate(model, val_loader, info.device, amp_dtype, sharded)
        log.info("accuracy of the network on the %d test images: acc1 %.2f%%, acc5 %.2f%%, loss %.4f",
                 stats["images"], stats["acc1"], stats["acc5"], stats["loss"])
        return {f"test_{k}": v for k, v in stats.items()}

    loader, sampler, steps_per_epoch = train
    optimizer = optimizer_from_args(args, model)  # layer decay, --disable_weight_decay_on_rel_pos_bias
    lr_schedule = cosine_scheduler(args.lr, args.min_lr, args.epochs, steps_per_epoch,
                                   warmup_epochs=args.warmup_epochs, warmup_steps=warmup_steps(args, steps_per_epoch))
    wd_schedule = cosine_scheduler(args.weight_decay, args.weight_decay_end, args.epochs, steps_per_epoch)
    compile_modules(args, model)
    trainer = None
    if args.enable_deepspeed:
        trainer, amp_dtype = _deepspeed_trainer(args, info, model, optimizer)
        optimizer, scaler, ddp_model = trainer.optimizer, None, trainer.engine
        resumed = _deepspeed_restore(args, trainer, model_ema, steps_per_epoch, info)
    else:
        resumed = restore(args, model, optimizer, scaler, model_ema, steps_per_epoch, info)
        ddp_model = wrap_ddp(model, info)
    writer = RunWriter(args.output_dir, args.log_dir, enabled=info.is_main and bool(args.output_dir))
    mixup_fn = build_mixup(args)
    state = FinetuneState(model=ddp_model, model_without_ddp=model, optimizer=optimizer,
                          criterion=build_criterion(args, mixup_fn), lr_schedule=lr_schedule,
                          wd_schedule=wd_schedule, dist=info, scaler=scaler, amp_dtype=amp_dtype,
                          clip_grad=args.clip_grad, update_freq=args.update_freq, print_freq=args.print_freq,
                          max_bad_steps=args.max_bad_steps, max_bad_fraction=args.max_bad_fraction,
                          mixup_fn=mixup_fn, model_ema=model_ema, writer=writer,
                          params=[p for p in model.parameters() if p.requires_grad], deepspeed=trainer)
    start_epoch, first, max_accuracy, resumed_from, unevaluated = resumed
    log_plan(args, info, steps_per_epoch, amp_dtype, start_epoch, resumed_from)

    stats: dict[str, Any] = {}
    last_ckpt = resumed_from
    started = time.perf_counter()
    saving = args.save_ckpt and bool(args.output_dir)
    resume_point = lambda e, done, evaluated=False: save_position(  # noqa: E731
        args, info, trainer, e, done, steps_per_epoch, model, optimizer, scaler, model_ema, max_accuracy, evaluated)
    control = RunControl.from_args(args, info, resume_point if saving else None, steps_per_epoch)

    def end_epoch(epoch: int, train_stats: dict[str, Any]) -> None:
        """Evaluate, checkpoint (resume point, best) and log the epoch whose training just ended."""
        nonlocal stats, max_accuracy, last_ckpt
        stats = {**{f"train_{k}": v for k, v in train_stats.items()}, "epoch": epoch, "n_parameters": n_parameters}
        improved = False
        if val_loader is not None:
            test = evaluate(model, val_loader, info.device, amp_dtype, sharded)
            stats.update({f"test_{k}": v for k, v in test.items()})
            if model_ema is not None:
                ema = evaluate(model_ema.module, val_loader, info.device, amp_dtype, sharded)
                stats.update({f"test_ema_{k}": v for k, v in ema.items()})
            improved = test["acc1"] > max_accuracy
            max_accuracy = max(max_accuracy, test["acc1"])
            stats["max_accuracy"] = max_accuracy
            writer.scalars(epoch, {k: test[k] for k in ("acc1", "acc5", "loss")}, "perf")
        if saving and epoch_save_due(args, epoch):
            last_ckpt = resume_point(epoch, steps_per_epoch, True) or last_ckpt
            if info.is_main:
                log.info("saved %s", last_ckpt)
        if improved and saving:  # the best so far, kept
            if trainer is not None:  # DeepSpeed: every rank writes its shard
                trainer.save(args.output_dir, "best", _client_state(args, model_ema, max_accuracy))
            elif info.is_main:
                save(args, "best", model, optimizer, scaler, model_ema, max_accuracy)
        writer.epoch(stats)
        train = f"loss {stats['train_loss']:.4f}, lr {stats['train_lr']:.2e}" if train_stats else "resumed"
        log.info("epoch %d: %s%s", epoch, train, "" if val_loader is None else
                 f"; val acc1 {stats['test_acc1']:.2f}%, acc5 {stats['test_acc5']:.2f}% (best {max_accuracy:.2f}%)")

    try:
        control.install()
        if unevaluated is not None and val_loader is not None:
            log.info("epoch %d ended on a stop signal before its evaluation: evaluating it now", unevaluated)
            end_epoch(unevaluated, {})
        for epoch in range(start_epoch, args.epochs):
            sampler.set_epoch(epoch, start=first * args.batch_size * args.update_freq)
            train_stats = train_one_epoch(state, loader, epoch, steps_per_epoch, last_good_checkpoint=last_ckpt,
                                          first=first, control=control)
            first = 0
            last_ckpt = control.last_checkpoint or last_ckpt
            end_epoch(epoch, train_stats)
    finally:
        control.uninstall()
        writer.close()
    finish_log(stats, started, args.output_dir)
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    return _main(get_args_parser(), argv)


def main_linprobe(argv: Sequence[str] | None = None) -> int:
    return _main(get_linprobe_parser(), argv)


def _release_deepspeed(args: argparse.Namespace) -> None:
    if args.enable_deepspeed and "mcbeit.engine.deepspeed" in sys.modules:
        sys.modules["mcbeit.engine.deepspeed"].release_process_group()


def _main(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    return run_main(parser, argv, run, on_exit=_release_deepspeed)


if __name__ == "__main__":
    sys.exit(main())
