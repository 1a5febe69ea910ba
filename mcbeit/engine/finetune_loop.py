"""One fine-tuning epoch (mixup/cutmix, gradient accumulation, AMP, model EMA) and evaluation.

An *update* is ``update_freq`` micro-batches whose gradients are accumulated (DDP synchronises
only on the last one) before one optimiser step; the LR / weight-decay schedules are indexed by
update, as the original's. Metrics are read back once per ``print_freq`` updates
(:class:`mcbeit.engine.meter.StepMeter`).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mcbeit.engine.control import RunControl
from mcbeit.engine.distributed import DistInfo, all_reduce_sum
from mcbeit.engine.logging import RunWriter
from mcbeit.engine.precision import autocast_context
from mcbeit.engine.meter import StepMeter
from mcbeit.engine.optim import clip_and_step
from mcbeit.engine.schedules import apply_schedules, lr_stats

log = logging.getLogger(__name__)


@dataclass
class FinetuneState:
    """Everything one update needs, built once by the task."""

    model: torch.nn.Module                    # DDP-wrapped when distributed (or a DeepSpeed engine)
    model_without_ddp: torch.nn.Module
    optimizer: torch.optim.Optimizer
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    lr_schedule: np.ndarray                   # one value per update
    wd_schedule: np.ndarray
    dist: DistInfo
    scaler: torch.amp.GradScaler | None = None
    amp_dtype: torch.dtype | None = None
    clip_grad: float | None = None
    update_freq: int = 1
    print_freq: int = 20
    mixup_fn: Callable | None = None          # timm Mixup: (images, labels) -> (mixed images, soft targets)
    model_ema: Any = None                     # timm ModelEmaV3
    writer: RunWriter | None = None
    params: Sequence[torch.nn.Parameter] = field(default_factory=list)
    max_bad_steps: int = 20              # consecutive non-finite steps before the run stops
    max_bad_fraction: float = 1.0        # share of unreadable images in an epoch before the run stops
    deepspeed: Any = None                     # mcbeit.engine.deepspeed trainer when --enable_deepspeed


def _no_sync(model: torch.nn.Module, sync: bool):
    """DDP's ``no_sync`` on accumulation micro-batches (gradients all-reduced only on the last)."""
    if not sync and isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


def train_one_epoch(state: FinetuneState, loader: Iterable, epoch: int, steps_per_epoch: int,
                    last_good_checkpoint: str | None = None, *, first: int = 0,
                    control: RunControl | None = None) -> dict[str, Any]:
    """Run the epoch's updates from ``first`` (a mid-epoch resume; the loader starts there too) to
    ``steps_per_epoch``; return the epoch's means (loss over ranks, class_acc without mixup).
    ``control`` writes mid-epoch checkpoints and stops on signals."""
    state.model.train()
    device, freq = state.dist.device, state.update_freq
    metrics = ("loss", "grad_norm", "loss_scale") + (("class_acc",) if state.mixup_fn is None else ())
    meter = StepMeter(metrics, ("loss",) + (("class_acc",) if state.mixup_fn is None else ()),
                      {"loss": ("loss",) + metrics[3:], "opt": ("lr", "min_lr", "weight_decay", "grad_norm", "loss_scale")},
                      {"loss": ("loss", "{:.4f}"), "lr": ("lr", "{:.2e}")},
                      epoch=epoch, first_step=epoch * steps_per_epoch + first, total_steps=steps_per_epoch - first,
                      writer=state.writer, show=state.dist.is_main, last_good_checkpoint=last_good_checkpoint,
                      stop_hint="Lower --lr, set --clip_grad, or use --amp bf16 / off",
                      max_bad_steps=state.max_bad_steps, scaler_active=state.scaler is not None,
                      max_bad_fraction=state.max_bad_fraction)
    losses, hits, skipped, images = [], [], 0, 0
    for micro, batch in enumerate(loader):
        update, phase = divmod(micro, freq)
        update += first
        if update >= steps_per_epoch:
            break
        if phase == 0:
            it = epoch * steps_per_epoch + update
            apply_schedules(state.optimizer, float(state.lr_schedule[it]), float(state.wd_schedule[it]))
            if state.deepspeed is None:
                state.optimizer.zero_grad(set_to_none=True)
        samples = batch[0].to(device, non_blocking=True)                  # (B, 3, H, W)
        targets = batch[1].to(device, non_blocking=True)                  # (B,) class ids
        if state.mixup_fn is not None:
            samples, targets = state.mixup_fn(samples, targets)           # targets: (B, C) soft
        last = phase == freq - 1
        with _no_sync(state.model, last):
            with autocast_context(device, state.amp_dtype):
                logits = state.model(samples)                             # (B, C)
                loss = state.criterion(logits.float(), targets)
            if state.deepspeed is not None:
                grad_norm = state.deepspeed.step(loss)                    # accumulates; steps on the boundary
            else:
                scaled = loss / freq
                (scaled if state.scaler is None else state.scaler.scale(scaled)).backward()
        losses.append(loss.detach().float())
        if state.mixup_fn is None:
            hits.append((logits.detach().argmax(-1) == targets).float().mean())
        skipped += batch[2].sum() if len(batch) > 2 else 0
        images += samples.shape[0]
        if not last:
            continue
        if state.deepspeed is None:
            grad_norm, loss_scale, stepped = clip_and_step(state.optimizer, state.scaler, state.params,
                                                           state.clip_grad)
        else:
            loss_scale, stepped = torch.ones((), device=device), True  # DeepSpeed's own overflow handling
        if state.model_ema is not None:
            state.model_ema.update(state.model_without_ddp)
        values = {"loss": torch.stack(losses).mean(), "grad_norm": torch.as_tensor(grad_norm, device=device).float(),
                  "loss_scale": loss_scale}
        if hits:
            values["class_acc"] = torch.stack(hits).mean()
        meter.add(values, lr_stats(state.optimizer), images, skipped=skipped, stepped=stepped)
        losses, hits, skipped, images = [], [], 0, 0
        if meter.steps % state.print_freq == 0:
            meter.flush()
        if control is not None:
            control.after_step(epoch, update + 1, it + 1, meter)
    return meter.epoch_stats()


@torch.inference_mode()
def evaluate(model: torch.nn.Module, loader: Iterable, device: torch.device, amp_dtype: torch.dtype | None = None,
             sharded: bool = False) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy over every image of ``loader``.

    ``sharded``: the loader holds this rank's shard (``ShardSampler``); sums are all-reduced, so
    each image counts exactly once. Otherwise every rank evaluates the whole set.
    """
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64, device=device)           # loss, top-1, top-5, images, skipped
    for batch in loader:
        images = batch[0].to(device, non_blocking=True)
        target = batch[1].to(device, non_blocking=True)
        with autocast_context(device, amp_dtype):
            logits = model(images)
        logits = logits.float()                                          # (B, C)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices        # (B, k)
        hit = top == target[:, None]
        sums += torch.stack([F.cross_entropy(logits, target, reduction="sum").double(),
                             hit[:, 0].sum().double(), hit.any(dim=1).sum().double(),
                             torch.tensor(float(target.numel()), dtype=torch.float64, device=device),
                             (batch[2].sum() if len(batch) > 2 else torch.tensor(0)).to(device).double()])
    if sharded:
        sums = all_reduce_sum(sums)
    loss, top1, top5, n, skipped = sums.tolist()
    if n == 0:
        raise RuntimeError("the evaluation set is empty")
    return {"loss": loss / n, "acc1": 100.0 * top1 / n, "acc5": 100.0 * top5 / n, "images": int(n),
            "skipped_images": int(skipped)}
