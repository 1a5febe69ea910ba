"""How the engine runs backward, the optimizer step and checkpoint files: plainly (one process or
DistributedDataParallel, ``checkpoint-<epoch>.pth`` files) or through DeepSpeed (ZeRO, its own
checkpoint folders). The epoch loop and the run skeleton are the same for both."""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from mcbeit.engine import checkpoint as ckpt_io
from mcbeit.engine.distributed import DistInfo, wrap_ddp
from mcbeit.engine.optim import clip_and_step
from mcbeit.engine.precision import Precision
from mcbeit.engine.resume import resume_path

log = logging.getLogger("mcbeit")


class PlainStrategy:
    """One process or DDP: backward through the fp16 scaler when there is one, clipping and the
    optimizer step in :func:`mcbeit.engine.optim.clip_and_step`; rank 0 writes checkpoint files."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, precision: Precision, info: DistInfo,
                 clip_grad: float | None, params: list[nn.Parameter]):
        self.model, self.optimizer, self.precision, self.info = model, optimizer, precision, info
        self.clip_grad, self.params = clip_grad, params
        self.forward_model = wrap_ddp(model, info)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def no_sync(self, last: bool):
        """DDP's ``no_sync`` on accumulation micro-batches (gradients all-reduced only on the last)."""
        if not last and isinstance(self.forward_model, nn.parallel.DistributedDataParallel):
            return self.forward_model.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, update_freq: int) -> None:
        scaled = loss / update_freq if update_freq > 1 else loss
        scaler = self.precision.scaler
        (scaled if scaler is None else scaler.scale(scaled)).backward()

    def step(self) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Unscale, clip, step: (grad_norm, loss_scale, stepped) as device values."""
        return clip_and_step(self.optimizer, self.precision.scaler, self.params, self.clip_grad)

    # -- checkpoints ----------------------------------------------------------------------------------
    def find_resume(self, resume: str, auto_resume: bool, output_dir: str) -> str | None:
        return resume_path(resume, auto_resume, output_dir)

    def read(self, path: str) -> dict[str, Any]:
        return ckpt_io.load_training_checkpoint(path)

    def load_optimizer(self, ckpt: Mapping[str, Any]) -> None:
        if ckpt.get("optimizer"):
            self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.precision.scaler is not None and ckpt.get("scaler"):
            self.precision.scaler.load_state_dict(ckpt["scaler"])

    def save(self, output_dir: str, name: int | str, entries: Mapping[str, Any], keep_last: int) -> str | None:
        """``checkpoint-<name>.pth`` (rank 0 writes; every rank calls): the model, optimizer and scaler
        states, then ``entries`` (format, position, args, the task's own)."""
        if not self.info.is_main:
            return None
        state = {"format": entries.get("format"), "model": self.model.state_dict(),
                 "optimizer": self.optimizer.state_dict(),
                 "scaler": self.precision.scaler.state_dict() if self.precision.scaler is not None else None,
                 **entries}
        return os.path.abspath(ckpt_io.save_checkpoint(output_dir, name, state, keep_last))


class DeepSpeedStrategy:
    """``--enable_deepspeed``: the run's own optimizer (betas, eps, layer decay kept) inside a DeepSpeed
    engine (:class:`mcbeit.engine.deepspeed.DeepSpeedTrainer`); every rank writes its part of
    ``checkpoint-<epoch>/`` folders."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo, *, batch_size: int,
                 update_freq: int, amp: str | None, zero_stage: int, clip_grad: float | None):
        from mcbeit.engine import deepspeed as ds

        ds.prepare_accelerator(info.device)
        config = ds.deepspeed_config(batch_size=batch_size, update_freq=update_freq, world_size=info.world_size,
                                     amp=amp, zero_stage=zero_stage, clip_grad=clip_grad, device=info.device)
        self.trainer = ds.DeepSpeedTrainer(model, optimizer, config, device=info.device,
                                           local_rank=max(info.local_rank, 0))
        self.model, self.info = model, info
        self.precision = Precision(info.device, self.trainer.autocast_dtype)
        self.forward_model = self.trainer.engine
        self._norm: torch.Tensor | None = None

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.trainer.optimizer

    def zero_grad(self) -> None:
        """DeepSpeed clears gradients itself at each update's boundary."""

    def no_sync(self, last: bool):
        return contextlib.nullcontext()  # DeepSpeed reduces on the accumulation boundary by itself

    def backward(self, loss: torch.Tensor, update_freq: int) -> None:
        self._norm = self.trainer.step(loss)  # accumulates; steps on the boundary (the loss is not divided)

    def step(self) -> tuple[torch.Tensor, torch.Tensor, Any]:
        norm = torch.as_tensor(self._norm, device=self.info.device).float()
        return norm, torch.ones((), device=self.info.device), True  # DeepSpeed's own overflow handling

    # -- checkpoints ----------------------------------------------------------------------------------
    def find_resume(self, resume: str, auto_resume: bool, output_dir: str) -> str | None:
        from mcbeit.engine import deepspeed as ds

        folder = ds.resume_checkpoint(resume, auto_resume, output_dir)
        return None if folder is None else str(folder)

    def read(self, path: str) -> dict[str, Any]:
        """Restore model, optimizer and DeepSpeed's counters; the client state holds the rest."""
        return {"model": None, **self.trainer.load(path)}

    def load_optimizer(self, ckpt: Mapping[str, Any]) -> None:
        """Restored by :meth:`read` already."""

    def save(self, output_dir: str, name: int | str, entries: Mapping[str, Any], keep_last: int) -> str | None:
        folder = self.trainer.save(output_dir, name, dict(entries), keep_last=keep_last)
        return str(Path(folder))
