"""DeepSpeed training (``--enable_deepspeed``): ZeRO stage 0/1/2, AMP, gradient clipping, resumable checkpoints.

Unlike the original BEiT scripts (whose DeepSpeed config fixed Adam with betas (0.9, 0.999), eps
1e-8, fp16 and no clipping), the run's own optimizer is handed to DeepSpeed: the one
:func:`mcbeit.engine.optim.build_optimizer` builds, so ``--opt_betas``, ``--opt_eps``, the per-group
weight decay and the layer-decay ``lr_scale`` are the same as without DeepSpeed, and
:func:`mcbeit.engine.schedules.apply_schedules` on :attr:`DeepSpeedTrainer.optimizer` drives the
schedules. ``--clip_grad`` becomes DeepSpeed's ``gradient_clipping``; ``--update_freq`` its
``gradient_accumulation_steps``.

Precision: ``--amp bf16`` / ``fp16`` becomes DeepSpeed's ``torch_autocast`` section, so the weights
stay fp32 and the forward runs under ``torch.autocast``, the same numerics as the plain path (the
model EMA, evaluation and the exported weights see fp32 weights). DeepSpeed's own ``bf16`` /
``fp16`` sections (weights kept in half precision) are not used: timm's BEiT keeps an fp32
``k_bias`` buffer the conversion leaves alone, and on CUDA the engine switches off an outer
``torch.autocast`` in that mode, so the forward fails on mixed dtypes. fp16 needs ZeRO stage 0:
DeepSpeed 0.19.8 clips with the loss-scaled norm and steps its GradScaler once per parameter group
under ZeRO 1/2 with torch_autocast fp16 (updates and reported norms are wrong).

Machines without a GPU: DeepSpeed's CPU accelerator with gloo. Choosing the accelerator before the
import, the process group and the state DeepSpeed keeps between engines of one process are
:mod:`mcbeit.engine.deepspeed_setup`.

Checkpoints are DeepSpeed's folders ``<output_dir>/checkpoint-<epoch>/`` with a ``latest`` file;
every rank must call :meth:`DeepSpeedTrainer.save`. How a folder is made whole, found, pruned and
read back (``weights_only=True``) is :mod:`mcbeit.engine.deepspeed_checkpoints`, whose names this
module re-exports.

DeepSpeed is used through its public API (``initialize``, ``backward``, ``step``, ``scale``,
``get_global_grad_norm``, ``save_checkpoint`` / ``load_checkpoint``, ``deepspeed.comm``). Three
shims remain, each marked ``# DeepSpeed 0.19.x:`` with the behaviour it works around: checkpoint
files are read with ``weights_only=True`` (DeepSpeed reads them with full unpickling), the
torch_autocast dtype a previous engine left in module globals is cleared, and groups DeepSpeed
cached from a process group closed behind its back are let go.
"""
from __future__ import annotations

import importlib.metadata
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mcbeit.engine.checkpoint import CheckpointWriteError, write_failure
from mcbeit.engine.deepspeed_checkpoints import (
    MARKER,
    MODEL_STATES,
    DeepSpeedCheckpointError,
    checkpoint_folder,
    deepspeed_checkpoint_problem,
    find_resumable,
    list_deepspeed_checkpoints,
    prune_deepspeed_checkpoints,
    publish,
    read_marker,
    read_weights_only,
    remove_leftovers,
    resume_checkpoint,
    staging_folder,
)
from mcbeit.engine.deepspeed_setup import (
    build_engine,
    ensure_process_group,
    import_deepspeed,
    prepare_accelerator,
    release_process_group,
)
from mcbeit.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = [
    "MARKER",
    "DeepSpeedCheckpointError",
    "DeepSpeedTrainer",
    "deepspeed_checkpoint_problem",
    "deepspeed_config",
    "find_resumable",
    "import_deepspeed",
    "list_deepspeed_checkpoints",
    "prepare_accelerator",
    "prune_deepspeed_checkpoints",
    "release_process_group",
    "resume_checkpoint",
]


# ---------------------------------------------------------------------------------------------- config

def _amp_name(amp: str | torch.dtype | None) -> str | None:
    if amp in (None, "off", "none", torch.float32):
        return None
    if amp in ("bf16", "bfloat16", torch.bfloat16):
        return "bf16"
    if amp in ("fp16", "float16", torch.float16):
        return "fp16"
    raise ValueError(f"amp must be None, 'off', 'bf16' or 'fp16' (or the torch dtype), got {amp!r}")


def deepspeed_config(*, batch_size: int, update_freq: int = 1, world_size: int = 1,
                     amp: str | torch.dtype | None = None, zero_stage: int = 0, clip_grad: float | None = None,
                     steps_per_print: int = 2**31 - 1, device: torch.device | str | None = None) -> dict[str, Any]:
    """The DeepSpeed config of a run: batch sizes, accumulation, ZeRO stage, clipping, precision.

    ``batch_size`` is per process and micro-batch (``--batch_size``); ``update_freq`` micro-batches
    make one update. ``amp`` is the *resolved* precision (``amp_settings``' dtype, or 'bf16' /
    'fp16' / None). There is no ``optimizer`` section: the run's own optimizer is passed to
    :class:`DeepSpeedTrainer` (betas, eps, per-group weight decay and lr scales included).
    ``device``, when given, rejects fp16 on the CPU as ``amp_settings`` does.
    """
    for name, value in (("batch_size", batch_size), ("update_freq", update_freq), ("world_size", world_size)):
        if int(value) < 1:
            raise ConfigError(f"--{name} must be at least 1 with --enable_deepspeed, got {value}")
    if zero_stage not in (0, 1, 2):
        hint = (" (stage 3 partitions the weights themselves, which the model EMA, evaluation on the bare "
                "model and the exported checkpoint would see as empty)" if zero_stage == 3 else "")
        raise ConfigError(f"--zero_stage {zero_stage} is not supported: use 0, 1 or 2{hint}")
    precision = _amp_name(amp)
    if precision == "fp16" and device is not None and torch.device(device).type != "cuda":
        raise ConfigError("--amp fp16 needs a CUDA device (fp16 needs a gradient scaler and is slow on CPU); "
                          "use --amp bf16 or --amp off on CPU")
    if precision == "fp16" and zero_stage > 0:
        raise ConfigError(f"--amp fp16 with --zero_stage {zero_stage}: DeepSpeed's torch_autocast fp16 under ZeRO 1/2 "
                          "clips with the loss-scaled gradient norm and updates its GradScaler once per parameter "
                          "group (wrong updates); use --amp bf16, or --zero_stage 0 with fp16")
    config: dict[str, Any] = {
        "train_batch_size": int(batch_size) * int(update_freq) * int(world_size),
        "train_micro_batch_size_per_gpu": int(batch_size),
        "gradient_accumulation_steps": int(update_freq),
        "gradient_clipping": float(clip_grad) if clip_grad else 0.0,
        "zero_optimization": {"stage": int(zero_stage)},
        "steps_per_print": int(steps_per_print),
        "wall_clock_breakdown": False,
    }
    if precision is not None:
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16" if precision == "bf16" else "float16"}
    return config


# ------------------------------------------------------------------------------------------- trainer

class DeepSpeedTrainer:
    """A DeepSpeed engine over the run's model and optimizer.

    ``optimizer``: the optimizer of the plain path (:func:`mcbeit.engine.optim.build_optimizer`); its
    parameter groups (``lr_scale``, per-group ``weight_decay``) survive inside DeepSpeed, so
    ``apply_schedules(trainer.optimizer, lr, wd)`` sets this update's values. Under ZeRO 1/2 only
    the elementwise optimizers DeepSpeed has tested (Adam, AdamW, Adagrad) are accepted: ZeRO
    flattens parameters, which breaks per-tensor optimizers such as LAMB.

    Per micro-batch: forward through :attr:`engine` (or the trainer itself), then
    :meth:`step` with the micro-batch's loss (not divided by ``update_freq``: DeepSpeed does that).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, config: Mapping[str, Any], *,
                 device: torch.device | str | None = None, local_rank: int = 0):
        device = torch.device(next(model.parameters()).device if device is None else device)
        deepspeed = import_deepspeed(device)
        self.config = dict(config)
        self.zero_stage = int(self.config.get("zero_optimization", {}).get("stage", 0))
        _check_zero_optimizer(optimizer, self.zero_stage)
        ensure_process_group(device, local_rank)
        _check_world_size(self.config, dist.get_world_size())
        autocast = self.config.get("torch_autocast", {})
        self.autocast_dtype: torch.dtype | None = (
            {"bfloat16": torch.bfloat16, "float16": torch.float16}[autocast.get("dtype", "bfloat16")]
            if autocast.get("enabled") else None)
        self.engine = build_engine(deepspeed, model, optimizer, self.config)
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()
        # DeepSpeed 0.19.x: its TorchCheckpointEngine.load reads every checkpoint file with
        # torch.load(weights_only=False) (full unpickling), and neither the config nor load_checkpoint's
        # options change that; load_checkpoint reads every file through this one method.
        self.engine.checkpoint_engine.load = read_weights_only

    # -- training

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The engine's optimizer (ZeRO's wrapper under ZeRO 1/2); its ``param_groups`` are the run's groups."""
        return self.engine.optimizer

    @property
    def module(self) -> nn.Module:
        """The bare model (fp32 weights, whole on every rank): for EMA, evaluation and exports."""
        return self.engine.module

    @property
    def device(self) -> torch.device:
        return torch.device(self.engine.device)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.engine(*args, **kwargs)

    def step(self, loss: torch.Tensor) -> torch.Tensor | None:
        """Backward for this micro-batch; on the last of ``update_freq`` also clip and step.

        Returns the gradient norm before clipping (a 0-d float tensor; ``inf`` when fp16 overflowed
        and the update was skipped) on the update's last micro-batch, None on the others.
        """
        engine = self.engine
        boundary = engine.is_gradient_accumulation_boundary()
        engine.backward(loss)
        norm = self._stage0_norm() if boundary and self.zero_stage == 0 else None
        engine.step()
        if not boundary:
            return None
        if norm is None:
            reported = engine.get_global_grad_norm()
            norm = torch.as_tensor(float("nan") if reported is None else reported)
        return norm.detach().to(self.device, torch.float32).reshape(())

    def _stage0_norm(self) -> torch.Tensor:
        """Without ZeRO DeepSpeed does not report the norm: the all-reduced gradients' norm, unscaled
        (the gradients are still multiplied by the fp16 loss scale here)."""
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.device)
        return norm.float() / self.loss_scale().to(norm.device)

    def loss_scale(self) -> torch.Tensor:
        """The fp16 loss scale (1 without fp16), as a 0-d tensor on the device (read without a sync).

        DeepSpeed has no getter for the scale of its torch_autocast GradScaler; ``engine.scale``, its
        public "scale a loss for a manual backward", applied to a 1 gives it (under ZeRO too)."""
        with torch.enable_grad():
            one = torch.ones((), device=self.device, requires_grad=True) * 1.0  # a "loss": 0-d with a grad_fn
            return self.engine.scale(one).detach().float().reshape(())
    # -- checkpoints

    def save(self, output_dir: str | os.PathLike, epoch: int | str,
             client_state: Mapping[str, Any] | None = None, *, keep_last: int = 0) -> Path:
        """Write ``<output_dir>/checkpoint-<epoch>/`` (every rank must call this); ``epoch`` may be a
        mid-epoch position ``'<epoch>-step<N>'`` or e.g. ``'best'``.

        Every rank writes its files into a staging folder; once all have (DeepSpeed's save ends with
        a barrier), rank 0 adds :data:`MARKER` listing every file and its size, and swaps the staging
        folder in for ``checkpoint-<epoch>/``. A crash or a full disk mid-save leaves the previous
        folder of that name whole.

        ``latest`` names the newest position (a resume point): saving ``epoch='best'`` leaves it
        alone. The mid-epoch folders before this position are then removed; after an epoch's end,
        ``keep_last`` > 0 removes all but the newest ``keep_last`` epoch folders up to this epoch.
        ``client_state`` (plain containers and tensors: it is read back with ``weights_only=True``;
        e.g. ``args`` through ``mcbeit.config.fields.as_flags``, the EMA's state dict) comes back from
        :meth:`load`; ``epoch`` is added to it unless given.
        """
        output_dir = Path(output_dir)
        tag = f"checkpoint-{epoch}"
        staging, folder = staging_folder(output_dir, tag), output_dir / tag
        state = dict(client_state or {})
        state.setdefault("epoch", epoch)
        if self.rank == 0:
            output_dir.mkdir(parents=True, exist_ok=True)
            remove_leftovers(output_dir, tag)  # of a save a crash interrupted
        dist.barrier()
        try:
            self.engine.save_checkpoint(str(output_dir), tag=staging.name, client_state=state, save_latest=False)
        except BaseException as exc:
            cause = write_failure(exc)
            if cause is None:
                raise
            raise CheckpointWriteError(f"could not write {folder}: {cause}; the previous checkpoints are untouched "
                                       f"(the partial {staging.name} is removed at the next save). Free space, "
                                       "then run again (auto-resume continues from the newest good one)") from exc
        if self.rank == 0:  # every rank's files are written
            publish(staging, folder, {"epoch": epoch, "tag": tag, "world_size": self.world_size,
                                      "zero_stage": self.zero_stage,
                                      "amp": {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.autocast_dtype),
                                      "deepspeed": importlib.metadata.version("deepspeed")}, keep_last)
        dist.barrier()
        return folder

    def load(self, checkpoint: str | os.PathLike, *, weights_only: bool = False) -> dict[str, Any]:
        """Restore a checkpoint folder (``.../checkpoint-<epoch>``, or an output folder with ``latest``).

        Model, optimizer and DeepSpeed's step counters; ``weights_only=True`` restores the model
        weights only (a fresh optimizer), which also works when the checkpoint's ZeRO stage or
        number of processes differs. Returns the ``client_state`` given to :meth:`save`.
        """
        folder = checkpoint_folder(Path(checkpoint))
        if not weights_only:
            self._check_resumable(folder)
        from deepspeed.runtime.zero.utils import ZeRORuntimeException

        try:
            path, client_state = self.engine.load_checkpoint(
                str(folder.parent), tag=folder.name, load_optimizer_states=not weights_only,
                load_lr_scheduler_states=False, load_module_only=weights_only)
        except ZeRORuntimeException as e:
            raise DeepSpeedCheckpointError(f"cannot resume from {folder}: {e} Load its weights only instead.") from e
        if path is None:
            raise DeepSpeedCheckpointError(f"{folder} is not a DeepSpeed checkpoint (no {MODEL_STATES[0]})")
        log.info("resumed from %s%s", folder, " (weights only)" if weights_only else "")
        return dict(client_state or {})

    def _check_resumable(self, folder: Path) -> None:
        """A folder whose marker says it was written with another ZeRO stage, or split between another
        number of processes, cannot give this run its optimizer state."""
        saved = read_marker(folder)
        if saved is None:
            return
        problem = None
        if saved.get("zero_stage") != self.zero_stage:
            problem = f"ZeRO stage {saved.get('zero_stage')}, this run uses {self.zero_stage}"
        elif self.zero_stage > 0 and saved.get("world_size") != self.world_size:
            problem = (f"{saved.get('world_size')} processes under ZeRO stage {self.zero_stage} (the optimizer "
                       f"state is split {saved.get('world_size')} ways), this run has {self.world_size}")
        if problem:
            raise DeepSpeedCheckpointError(f"cannot resume from {folder}: it was written with {problem}. Resume with "
                                           "the same --zero_stage and number of processes, or start from its weights "
                                           "only (--finetune with the folder, or load(..., weights_only=True))")


def _check_zero_optimizer(optimizer: torch.optim.Optimizer, zero_stage: int) -> None:
    """ZeRO flattens parameters into partitions: only elementwise optimizers DeepSpeed tested work."""
    if zero_stage > 0:
        from deepspeed.runtime.zero.utils import ZERO_SUPPORTED_OPTIMIZERS

        if type(optimizer) not in ZERO_SUPPORTED_OPTIMIZERS:
            raise ConfigError(f"{type(optimizer).__name__} with --zero_stage {zero_stage}: ZeRO flattens "
                              "parameters into partitions, which only the elementwise optimizers DeepSpeed "
                              "has tested handle (Adam, AdamW, Adagrad); use --opt adamw or --zero_stage 0")


def _check_world_size(config: Mapping[str, Any], world_size: int) -> None:
    per_update = config["train_micro_batch_size_per_gpu"] * config.get("gradient_accumulation_steps", 1)
    if config.get("train_batch_size", per_update * world_size) != per_update * world_size:
        raise ConfigError(f"DeepSpeed config for {config['train_batch_size'] // per_update} processes but "
                          f"{world_size} are running: pass world_size=<number of processes> to deepspeed_config")
