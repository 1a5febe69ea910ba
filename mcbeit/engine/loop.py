"""One pre-training epoch: tokenizer -> masked student -> objective -> backward -> optimizer.

Metrics stay on the device and are read back once per `print_freq` steps (one host sync per
interval, not per step); TensorBoard still gets one point per step.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from mcbeit.engine.distributed import DistInfo, all_reduce_mean, all_reduce_sum
from mcbeit.engine.logging import RunWriter
from mcbeit.engine.schedules import apply_schedules

log = logging.getLogger(__name__)

STEP_METRICS = ("loss", "mlm_acc", "grad_norm", "loss_scale")


class NonFiniteLossError(RuntimeError):
    pass


def autocast_context(device: torch.device, amp_dtype: torch.dtype | None):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


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


def _grad_norm(params: Sequence[torch.nn.Parameter], clip: float | None) -> torch.Tensor:
    if clip is not None and clip > 0:
        return torch.nn.utils.clip_grad_norm_(params, clip)
    grads = [p.grad for p in params if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())  # only without parameters


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


def pretrain_step(state: PretrainState, batch: Sequence[torch.Tensor], temp: float) -> dict[str, torch.Tensor]:
    """One optimisation step; returns detached metric tensors (no host sync)."""
    device = state.dist.device
    view_a, view_b, mask = (t.to(device, non_blocking=True) for t in batch[:3])
    bool_masked_pos = mask.flatten(1).bool()                                  # (B, N)

    # The tokenizer is a fixed target network: inference mode (no autograd bookkeeping at all).
    # Its logits are only read afterwards (softmax / argmax under no_grad), never saved for backward.
    with torch.inference_mode(), autocast_context(device, state.amp_dtype):
        tokenizer_logits = state.tokenizer(view_b).float()                    # (B, V, h, w)

    with autocast_context(device, state.amp_dtype):
        features, masked_logits = state.model(view_a, bool_masked_pos)       # (B, N, D), (M, V)
        out = state.objective(features, masked_logits, tokenizer_logits, bool_masked_pos, temp)
    loss = out["loss"]
    weight = _masked_count_weight(bool_masked_pos, state.dist.world_size)
    backward_loss = loss * weight if weight is not None else loss

    state.optimizer.zero_grad(set_to_none=True)
    if state.scaler is not None:
        state.scaler.scale(backward_loss).backward()
        state.scaler.unscale_(state.optimizer)
        grad_norm = _grad_norm(state.params, state.clip_grad)
        state.scaler.step(state.optimizer)
        state.scaler.update()
        loss_scale = state.scaler._get_scale_async().detach().reshape(())  # a device tensor: no host sync
    else:
        backward_loss.backward()
        grad_norm = _grad_norm(state.params, state.clip_grad)
        state.optimizer.step()
        loss_scale = torch.ones((), device=loss.device)
    return {"loss": loss.detach().float(), "mlm_acc": out["mlm_acc"].detach().float(),
            "grad_norm": grad_norm.detach().float(), "loss_scale": loss_scale.float()}


def _lr_stats(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    lrs = [g["lr"] for g in optimizer.param_groups]
    wds = [g["weight_decay"] for g in optimizer.param_groups if g["weight_decay"] > 0]
    return {"lr": max(lrs), "min_lr": min(lrs), "weight_decay": wds[-1] if wds else 0.0}


def train_one_epoch(state: PretrainState, loader: Iterable, epoch: int, start_step: int, temp: float,
                    steps_per_epoch: int, last_good_checkpoint: str | None = None) -> dict[str, Any]:
    """Run one epoch; return the epoch's averaged statistics (means over ranks)."""
    state.model.train()
    is_main = state.dist.is_main
    bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}", disable=not is_main, dynamic_ncols=True,
               leave=True, mininterval=1.0)
    pending: list[dict[str, torch.Tensor]] = []
    pending_opt: list[dict[str, float]] = []
    totals = {k: 0.0 for k in STEP_METRICS}
    totals_opt = {"lr": 0.0, "min_lr": 0.0, "weight_decay": 0.0}
    skipped = torch.zeros((), dtype=torch.long)
    n_steps, images, t_interval = 0, 0, time.perf_counter()

    def flush() -> None:
        nonlocal pending, pending_opt, images, t_interval
        if not pending:
            return
        # One reduction per interval: per-step loss and accuracy as the mean over ranks.
        values = torch.stack([torch.stack([m[k] for m in pending]) for k in STEP_METRICS])  # (4, steps)
        values[:2] = all_reduce_mean(values[:2])
        stacked = dict(zip(STEP_METRICS, values.cpu().tolist()))
        first = start_step + n_steps - len(pending)
        for i in range(len(pending)):
            values = {k: stacked[k][i] for k in STEP_METRICS}
            if not math.isfinite(values["loss"]):
                raise NonFiniteLossError(
                    f"loss is {values['loss']} at epoch {epoch}, step {first + i}; stopping before it spreads. "
                    f"Last good checkpoint: {last_good_checkpoint or 'none written yet'}. Lower --lr, set "
                    "--clip_grad, or use --amp bf16 / off")
            for k in STEP_METRICS:
                totals[k] += values[k]
            for k, v in pending_opt[i].items():
                totals_opt[k] += v
            if state.writer is not None:
                state.writer.scalars(first + i, {"loss": values["loss"], "mlm_acc": values["mlm_acc"]}, "loss")
                state.writer.scalars(first + i, {**pending_opt[i], "grad_norm": values["grad_norm"],
                                                 "loss_scale": values["loss_scale"]}, "opt")
        elapsed = time.perf_counter() - t_interval
        bar.set_postfix(loss=f"{stacked['loss'][-1]:.4f}", mlm_acc=f"{stacked['mlm_acc'][-1]:.3f}",
                        lr=f"{pending_opt[-1]['lr']:.2e}", img_s=f"{images / max(elapsed, 1e-9):.1f}")
        bar.update(len(pending))
        pending, pending_opt, images, t_interval = [], [], 0, time.perf_counter()

    for step, batch in enumerate(loader):
        if step >= steps_per_epoch:
            break
        it = start_step + step
        apply_schedules(state.optimizer, float(state.lr_schedule[it]), float(state.wd_schedule[it]))
        pending_opt.append(_lr_stats(state.optimizer))
        pending.append(pretrain_step(state, batch, temp))
        skipped += batch[3].sum() if len(batch) > 3 else 0
        images += batch[0].shape[0]
        n_steps += 1
        if n_steps % state.print_freq == 0:
            flush()
    flush()
    bar.close()
    if n_steps == 0:
        raise RuntimeError("the data loader produced no batch this epoch: the dataset has fewer images than "
                           "--batch_size x number of processes; lower --batch_size or add images")

    stats = {k: v / n_steps for k, v in {**totals, **totals_opt}.items()}
    reduced = all_reduce_mean(torch.tensor([stats["loss"], stats["mlm_acc"], stats["grad_norm"]], dtype=torch.float64))
    stats["loss"], stats["mlm_acc"], stats["grad_norm"] = reduced.tolist()
    stats["skipped_images"] = int(all_reduce_sum(skipped.to(torch.float64)).item())
    stats["steps"] = n_steps
    if stats["skipped_images"]:
        log.warning("epoch %d: %d unreadable images were skipped (see the warnings above for their paths)",
                    epoch, stats["skipped_images"])
    return stats
