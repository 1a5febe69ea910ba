"""One pre-training epoch: tokenizer -> masked student -> objective -> backward -> optimizer.

Metrics stay on the device and are read back once per `print_freq` steps (one host sync per
interval, not per step); TensorBoard still gets one point per step.
"""
from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from mcbeit.engine.control import RunControl
from mcbeit.engine.distributed import DistInfo, all_reduce_sum
from mcbeit.engine.logging import RunWriter
from mcbeit.engine.meter import StepMeter
from mcbeit.engine.optim import backward_and_step
from mcbeit.engine.schedules import apply_schedules, lr_stats

log = logging.getLogger(__name__)

STEP_METRICS = ("loss", "mlm_acc", "grad_norm", "loss_scale")


def autocast_context(device: torch.device, amp_dtype: torch.dtype | None):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


@functools.lru_cache(maxsize=None)  # asked every step; the answer is the hardware's
def native_low_precision(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``device`` computes in ``dtype`` (bf16 / fp16) natively: every GPU autocast supports;
    a CPU only with AVX-512-BF16 / AVX512-FP16 or AMX, else oneDNN emulates it, several times
    slower than fp32 (the VQGAN tokenizer ~7x on an AVX2 CPU)."""
    if device.type != "cpu":
        return True
    check = {torch.bfloat16: torch.ops.mkldnn._is_mkldnn_bf16_supported,
             torch.float16: torch.ops.mkldnn._is_mkldnn_fp16_supported}.get(dtype)
    return check is not None and bool(check())


def tokenizer_amp_dtype(device: torch.device, amp_dtype: torch.dtype | None) -> torch.dtype | None:
    """The autocast dtype the tokenizer runs under: the step's, or fp32 (None) where that dtype is
    emulated (a frozen target network gains nothing from slower low precision)."""
    if amp_dtype is None or not native_low_precision(device, amp_dtype):
        return None
    return amp_dtype


@dataclass
class PretrainState:
    """Everything one step needs, built once by the task."""

    model: torch.nn.Module               # DDP-wrapped when distributed
    model_without_ddp: torch.nn.Module
    tokenizer: torch.nn.Module
    objective: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    lr_schedule: np.ndarray              # one value per global step
    wd_schedule: np.ndarray
    dist: DistInfo
    amp_dtype: torch.dtype | None = None
    clip_grad: float | None = None
    print_freq: int = 20
    writer: RunWriter | None = None
    params: Sequence[torch.nn.Parameter] = field(default_factory=list)
    max_bad_steps: int = 20              # consecutive non-finite steps before the run stops
    max_bad_fraction: float = 1.0        # share of unreadable images in an epoch before the run stops


def _masked_count_weight(mask: torch.Tensor, world_size: int) -> torch.Tensor | None:
    """Factor that turns DDP's mean of per-rank losses into the mean over all masked patches.

    Each rank's loss is a mean over its own masked patches; when ranks mask different counts
    (block masking), averaging those means is not the pooled mean. Scaling rank r's loss by
    world * M_r / M_total makes DDP's gradient average equal the pooled one.
    """
    if world_size == 1:
        return None
    local = mask.sum().to(torch.float32)
    return local * world_size / all_reduce_sum(local)


def pretrain_step(state: PretrainState, batch: Sequence[torch.Tensor], temp: float,
                  mark: Callable[[str], None] | None = None) -> dict[str, Any]:
    """One optimisation step; returns detached metric tensors and ``stepped`` (False: the update was
    skipped for a non-finite gradient). ``mark(phase)`` is called as each phase ends ("tokenizer",
    "forward", "loss", "backward", "optimizer"): the benchmark times the product's own step with it."""
    device = state.dist.device
    view_a, view_b, mask = (t.to(device, non_blocking=True) for t in batch[:3])
    bool_masked_pos = mask.flatten(1).bool()                                  # (B, N)

    # The tokenizer is a fixed target network: inference mode (no autograd bookkeeping at all).
    # Its logits are only read afterwards (softmax / argmax under no_grad), never saved for backward.
    with torch.inference_mode(), autocast_context(device, tokenizer_amp_dtype(device, state.amp_dtype)):
        tokenizer_logits = state.tokenizer(view_b).float()                    # (B, V, h, w)
    if mark is not None:
        mark("tokenizer")

    with autocast_context(device, state.amp_dtype):
        features, masked_logits = state.model(view_a, bool_masked_pos)       # (B, N, D), (M, V)
        if mark is not None:
            mark("forward")
        out = state.objective(features, masked_logits, tokenizer_logits, bool_masked_pos, temp)
    if mark is not None:
        mark("loss")
    loss = out["loss"]
    weight = _masked_count_weight(bool_masked_pos, state.dist.world_size)
    backward_loss = loss * weight if weight is not None else loss

    grad_norm, loss_scale, stepped = backward_and_step(backward_loss, state.optimizer, state.scaler, state.params,
                                                       state.clip_grad, mark)
    return {"loss": loss.detach().float(), "mlm_acc": out["mlm_acc"].detach().float(),
            "grad_norm": grad_norm.detach().float(), "loss_scale": loss_scale.float(), "stepped": stepped}


def train_one_epoch(state: PretrainState, loader: Iterable, epoch: int, start_step: int, temp: float,
                    steps_per_epoch: int, last_good_checkpoint: str | None = None, *, first: int = 0,
                    control: RunControl | None = None) -> dict[str, Any]:
    """Run one epoch (from its step ``first`` when resumed mid-epoch; the loader then starts there too);
    return the epoch's averaged statistics (means over ranks). ``start_step`` is the epoch's first
    global step; ``control`` writes mid-epoch checkpoints and stops on signals."""
    state.model.train()
    meter = StepMeter(STEP_METRICS, ("loss", "mlm_acc"),
                      {"loss": ("loss", "mlm_acc"), "opt": ("lr", "min_lr", "weight_decay", "grad_norm", "loss_scale")},
                      {"loss": ("loss", "{:.4f}"), "mlm_acc": ("mlm_acc", "{:.3f}"), "lr": ("lr", "{:.2e}")},
                      epoch=epoch, first_step=start_step + first, total_steps=steps_per_epoch - first,
                      writer=state.writer,
                      show=state.dist.is_main, last_good_checkpoint=last_good_checkpoint,
                      stop_hint="Lower --lr, set --clip_grad, or use --amp bf16 / off",
                      max_bad_steps=state.max_bad_steps, scaler_active=state.scaler is not None,
                      max_bad_fraction=state.max_bad_fraction)
    for step, batch in enumerate(loader, start=first):
        if step >= steps_per_epoch:
            break
        it = start_step + step
        apply_schedules(state.optimizer, float(state.lr_schedule[it]), float(state.wd_schedule[it]))
        metrics = pretrain_step(state, batch, temp)
        stepped = metrics.pop("stepped")
        meter.add(metrics, lr_stats(state.optimizer), batch[0].shape[0],
                  skipped=batch[3].sum() if len(batch) > 3 else 0, stepped=stepped)
        if meter.steps % state.print_freq == 0:
            meter.flush()
        if control is not None:
            control.after_step(epoch, step + 1, it + 1, meter)

    return meter.epoch_stats()
