"""What the engine hands a task while it runs: :class:`RunContext`."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mcbeit.config.fields import experiment_flags
from mcbeit.engine.distributed import DistInfo
from mcbeit.engine.identity import CHECKPOINT_KEY
from mcbeit.engine.logging import RunWriter
from mcbeit.engine.precision import Precision


@dataclass
class RunContext:
    """What the engine hands a task: the configuration, the process and device, precision, the
    writer, and (once built) the strategy that runs the model, the schedules and updates per epoch."""

    config: Any
    task: Any  # the mcbeit.engine.task.Task (not imported: that module imports this one)
    info: DistInfo
    precision: Precision
    writer: RunWriter | None = None
    strategy: Any = None
    steps_per_epoch: int = 0
    lr_schedule: np.ndarray = field(default_factory=lambda: np.zeros(0))
    wd_schedule: np.ndarray = field(default_factory=lambda: np.zeros(0))
    n_parameters: int = 0
    output_lock: Any = None  # mcbeit.engine.output_dir.OutputLock on rank 0 of a training run

    @property
    def device(self) -> torch.device:
        return self.info.device

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The trained model's forward, through DDP / DeepSpeed when they wrap it."""
        return self.strategy.forward_model(*args, **kwargs)

    def save(self, name: int | str, entries: dict[str, Any]) -> str | None:
        """Write checkpoint ``name`` (an epoch, or e.g. 'best') with the task's ``entries``; every rank calls it."""
        cfg = self.config
        entries = {"format": self.task.checkpoint_format, **entries, "args": self.flags(),
                   CHECKPOINT_KEY: list(experiment_flags(type(cfg))) if dataclasses.is_dataclass(cfg) else []}
        path = self.strategy.save(cfg.output_dir, name, entries, cfg.keep_last)
        if path and self.info.is_main:
            self.task.saved(path, name)
        return path

    def flags(self) -> dict[str, Any]:
        return {**self.task.flags(), "world_size": self.info.world_size, "rank": self.info.rank}

    def close(self) -> None:
        """Drop the strategy (DDP / DeepSpeed wrappers) now, not whenever a garbage collection finds the
        task <-> context cycle: DDP's reducer must go before the process group does. Releases the output
        folder's lock."""
        self.strategy = None
        if self.output_lock is not None:
            self.output_lock.release()
            self.output_lock = None
