"""What a task tells the engine: how to build its model and data, one step, what happens at an
epoch's end, and its extra checkpoint state. The engine (:class:`mcbeit.engine.trainer.Trainer`)
does everything else.

A task's life, as the engine drives it::

    task.check_inputs()                      # files and folders the flags name, before anything is built
    model = task.build_model(run)            # same initial weights on every rank (seeded)
    data = task.build_data(run)              # loader, sampler, updates per epoch
    optimizer = task.build_optimizer(model)  # parameter groups (weight decay, layer decay)
    task.load_state(ckpt, path)              # resuming: the task's own checkpoint entries
    for each epoch:
        for each update:  out = task.train_step(batch, epoch)  (per micro-batch; the engine does
                          backward, accumulation, clipping, the optimizer step), then
                          task.after_update(stepped)
        stats = task.end_epoch(epoch, train_stats)   # evaluation, best checkpoint, extra figures
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Mapping

import torch
from torch import nn

if TYPE_CHECKING:  # the engine's context, handed to the task (no import cycle at run time)
    from mcbeit.engine.context import RunContext

Mark = Callable[[str], None]  # the benchmark's phase timer: mark("forward") as a phase ends


@dataclass(frozen=True)
class MeterSpec:
    """What a task logs per update: device metrics (in log order), which are averaged over ranks,
    TensorBoard heads, the progress bar's fields, the host values (from the optimizer), and the hint
    printed when the run diverges. ``grad_norm`` and ``loss_scale`` come from the engine."""

    metrics: tuple[str, ...]
    mean_over_ranks: tuple[str, ...]
    groups: Mapping[str, tuple[str, ...]]
    postfix: Mapping[str, tuple[str, str]]
    host: tuple[str, ...] = ("lr", "min_lr", "weight_decay")
    stop_hint: str = "Lower --lr, set --clip_grad, or use --amp bf16 / off"


@dataclass
class StepOutput:
    """One micro-batch's result: ``loss`` is what backward differentiates (a rank's share of the global
    loss), ``metrics`` detached device scalars to log (``loss`` among them), ``images`` the batch size,
    ``skipped`` the unreadable files the batch replaced."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]
    images: int
    skipped: Any = 0


@dataclass
class TrainData:
    """The training loader, its sampler (``set_epoch(epoch, start=...)``) and updates per epoch."""

    loader: Iterable
    sampler: Any
    steps_per_epoch: int
    described: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class Task(ABC):
    """A long run's what: see the module docstring. ``config`` is the command's frozen configuration."""

    checkpoint_format: ClassVar[str]
    meter: ClassVar[MeterSpec]
    purpose: ClassVar[str] = "training"
    #: whether checkpoints record that the epoch-end work (evaluation) was done: a run stopped
    #: between an epoch's last update and its evaluation evaluates that epoch when resumed
    evaluates: ClassVar[bool] = False

    def __init__(self, config: Any):
        self.config = config
        self.run: RunContext | None = None
        self.model: nn.Module | None = None

    #: micro-batches whose gradients one update accumulates (``--update_freq``)
    update_freq: int = 1
    #: whether the run trains through DeepSpeed (``--enable_deepspeed``), and its ZeRO stage
    deepspeed: bool = False
    zero_stage: int = 0

    # -- building ---------------------------------------------------------------------------------
    @property
    def base_lr(self) -> float:
        """The peak learning rate of the schedule (``--lr``)."""
        return self.config.lr

    @property
    def writes_checkpoints(self) -> bool:
        """Whether the run writes checkpoints (an ``--output_dir`` is given; fine-tuning's ``--no_save_ckpt``)."""
        return bool(self.config.output_dir)

    @property
    def embedded_data(self) -> bool:
        """Whether the run is on the embedded images (no ``--data_path``)."""
        return getattr(self.config, "data_path", "") is None

    def check_inputs(self) -> None:
        """Raise :class:`mcbeit.errors.InputError` for a file or folder the flags name that cannot be used."""

    @abstractmethod
    def build_model(self, run: RunContext) -> nn.Module:
        """The trained module (its state dict is the checkpoint's ``model``), on the CPU or ``run.device``."""

    @abstractmethod
    def build_data(self, run: RunContext) -> TrainData:
        """The training data."""

    def image_training_data(self, run: RunContext, transform: Any) -> TrainData:
        """The training data of an unlabelled image task (pre-training, tokenizers): ``--data_path`` (or the
        embedded images) through ``transform``, sharded over the ranks, ``--batch_size`` per rank."""
        from mcbeit.data.datasets import build_pretraining_dataset
        from mcbeit.data.samplers import build_train_loader

        cfg = self.config
        dataset = build_pretraining_dataset(cfg.data_path, cfg.data_set, transform, cfg.seed)
        loader, sampler, steps = build_train_loader(dataset, cfg.batch_size, cfg.num_workers,
                                                    cfg.pin_mem and run.device.type == "cuda", cfg.seed,
                                                    run.info.world_size, run.info.rank)
        return TrainData(loader, sampler, steps, described=f"{len(dataset)} images")

    @abstractmethod
    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """The optimizer over ``model``'s parameter groups."""

    def schedules(self, steps_per_epoch: int) -> tuple[Any, Any] | None:
        """Per-update learning-rate and weight-decay arrays over the whole run (``epochs x steps_per_epoch``
        values); None (the default) for the engine's cosine schedules of ``--lr`` / ``--min_lr`` /
        ``--warmup_epochs`` and ``--weight_decay`` / ``--weight_decay_end``."""
        return None

    def trainable(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    def compile(self) -> None:
        """``torch.compile`` what the task runs, when its flags ask (``--compile``)."""

    # -- training ---------------------------------------------------------------------------------
    def start_epoch(self, epoch: int, first: int = 0) -> None:
        """Called before an epoch's first update (``first``: updates already done in it, on a resume):
        per-epoch values such as a temperature."""

    def epoch_temperatures(self, epoch: int) -> dict[str, float]:
        """The temperatures (or logit scales) ``epoch`` trains with, by name, for TensorBoard's
        ``temperature/`` group (the engine writes them at the epoch's first step); none by default."""
        return {}

    @abstractmethod
    def train_step(self, batch: Any, mark: Mark | None = None) -> StepOutput:
        """Forward and loss of one micro-batch (the engine does backward and the update)."""

    def after_update(self, stepped: Any) -> dict[str, torch.Tensor]:
        """After an optimizer update (``stepped``: whether it was applied, maybe a device bool):
        EMA updates and the like; returns extra metrics to log."""
        return {}

    def end_epoch(self, epoch: int, train_stats: dict[str, Any]) -> dict[str, Any]:
        """The epoch's log record (``train_*`` figures are in ``train_stats``; empty when the epoch
        was trained before a resume): evaluation, best checkpoint, extra figures."""
        return {**{f"train_{k}": v for k, v in train_stats.items()}, "epoch": epoch}

    def evaluate_only(self, run: RunContext, loaded: str | None) -> dict[str, Any]:
        """Evaluate without training (``Trainer.evaluate``; ``loaded``: the checkpoint whose weights the
        engine loaded, None when there was none); tasks that evaluate override it."""
        raise NotImplementedError(f"{type(self).__name__} has no evaluation of its own")

    def epoch_message(self, stats: Mapping[str, Any]) -> str:
        """The epoch's log line, after ``epoch N: ``."""
        return f"loss {stats.get('train_loss', float('nan')):.4f}, lr {stats.get('train_lr', float('nan')):.2e}"

    # -- checkpoints --------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """The task's own checkpoint entries (beside model, optimizer, scaler, position and args)."""
        return {}

    def load_state(self, ckpt: Mapping[str, Any], path: str) -> None:
        """Restore what :meth:`state` wrote."""

    def load_weights(self, ckpt: Mapping[str, Any], path: str) -> bool:
        """Load a resumed checkpoint's weights into ``self.model``; return whether its optimizer state
        (and random states) belong to this run (False for files of other code: weights only)."""
        from mcbeit.engine.resume import load_resumed_weights

        if ckpt.get("format") != self.checkpoint_format:
            from mcbeit.errors import InputError

            raise InputError(f"{path} is not a checkpoint of this command (format {ckpt.get('format')!r}, "
                             f"expected {self.checkpoint_format!r})")
        load_resumed_weights(self.model, ckpt["model"], path, self.flags(), ckpt.get("args"))
        return True

    def flags(self) -> dict[str, Any]:
        """The run's flags as checkpoints store them (``args``)."""
        from mcbeit.config import as_flags

        return as_flags(self.config)

    def resume_source(self, path: str) -> str:
        """The checkpoint a resume from ``path`` (``--resume`` or the newest found) reads; ``path`` itself by default."""
        return path

    def saved(self, path: str, epoch: int | str) -> None:
        """Called on rank 0 after a checkpoint was written (files the task writes beside it)."""
