"""What the dense fine-tuning tasks (segmentation, detection) share: training counted in iterations, cut into
rounds that each end with an evaluation.

mmseg and detectron2 count iterations, not epochs, and evaluate every N of them. Here the engine's epoch is such a
round of ``round_length`` updates over an endless stream of data epochs
(:class:`mcbeit.data.samplers.StreamSampler`), so checkpoints, exact resume (mid-round too), preemption,
TensorBoard and the progress bar are the engine's; ``checkpoint-R.pth`` is the state after round R and
``checkpoint-best.pth`` the round with the best ``best_metric``. A subclass says what it trains (``_datasets``,
``build_model``, ``build_optimizer``, ``schedules``, ``train_step``), how it evaluates (``_evaluate``: its
figures, flat) and how many images its recipe trains with (``recipe_batch``).
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any, Callable, ClassVar, Mapping

from mcbeit.engine.resume import load_resumed_weights
from mcbeit.engine.task import Task, TrainData
from mcbeit.errors import InputError

log = logging.getLogger("mcbeit")


class RoundsTask(Task):
    """A dense fine-tuning task counted in iterations (see the module docstring)."""

    evaluates = True
    #: the figure (a key of ``_evaluate``'s result) that picks ``checkpoint-best.pth``
    best_metric: ClassVar[str]
    #: the command, for messages (``mcbeit-seg``)
    command: ClassVar[str]
    #: the total batch (processes x batch x accumulation) the recipe trains with, and the warning when it differs
    recipe_batch: ClassVar[int]
    recipe_batch_note: ClassVar[str] = ""
    #: flags naming files or folders that must exist (flag -> config field)
    input_paths: ClassVar[tuple[tuple[str, str], ...]] = (("--data_path", "data_path"),)
    #: the flag whose file starts the whole model (segmentation's --load_from, detection's --init_checkpoint)
    weights_flag: ClassVar[str]

    def __init__(self, config: Any):
        super().__init__(config)
        self.update_freq = config.update_freq
        self.sets: dict[str, Any] = {}
        self.val_loader = None
        self.num_classes: int | None = config.num_classes
        self.best = 0.0

    # -- what a subclass provides -------------------------------------------------------------------------
    @property
    def round_length(self) -> int:
        """Updates per round (the engine's epoch)."""
        raise NotImplementedError

    @property
    def train_collate(self) -> Callable | None:
        """The training loader's collate function (None: torch's default)."""
        return None

    @property
    def eval_collate(self) -> Callable | None:
        """The evaluation loader's collate function (None: torch's default)."""
        return None

    def _evaluate(self, tag: str, step: int = 0) -> dict[str, Any]:
        """Evaluate the model on ``self.val_loader``; write pictures tagged ``tag``; return the figures."""
        raise NotImplementedError

    def figures(self, result: Mapping[str, Any]) -> dict[str, float]:
        """The numbers of ``_evaluate``'s result to log and plot (default: its top-level numbers)."""
        return {k: float(v) for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

    # -- checks and data ----------------------------------------------------------------------------------
    @property
    def embedded_data(self) -> bool:
        return self.config.data_path is None

    def check_inputs(self) -> None:
        cfg = self.config
        for flag_name, field in self.input_paths:
            path = getattr(cfg, field)
            if path and not os.path.exists(path):
                raise InputError(f"{flag_name} {path}: no such file or folder")
        if cfg.pretrained and not cfg.pretrained.startswith(("https://", "http://")):
            from mcbeit.models.checkpoint import CheckpointError, resolve_source

            try:
                resolve_source(cfg.pretrained, "--pretrained")
            except CheckpointError as exc:
                raise InputError(f"{exc}; or --pretrained none to train from random initialisation") from None

    def build_data(self, run) -> TrainData:
        from mcbeit.data.samplers import build_stream_loader

        cfg, info = self.config, run.info
        self.val_loader = self._val_loader(run)
        dataset = self.sets["train"]
        loader, sampler = build_stream_loader(dataset, cfg.batch_size, self.round_length, cfg.num_workers,
                                              cfg.pin_mem and run.device.type == "cuda", cfg.seed, info.world_size,
                                              info.rank, batches_per_step=cfg.update_freq)
        if self.train_collate is not None:
            loader.collate_fn = self.train_collate
        total = cfg.batch_size * cfg.update_freq * info.world_size
        if total != self.recipe_batch and not self.embedded_data:
            log.warning("total batch %d (%d processes x --batch_size %d x --update_freq %d); the recipe trains with "
                        "%d%s", total, info.world_size, cfg.batch_size, cfg.update_freq, self.recipe_batch,
                        self.recipe_batch_note)
        return TrainData(loader, sampler, self.round_length, described=f"{len(dataset)} images, "
                                                                        f"{self.total_iterations} iterations")

    @property
    def total_iterations(self) -> int:
        return self.config.epochs * self.round_length

    def _val_loader(self, run):
        from mcbeit.data.samplers import build_eval_loader

        if "val" not in self.sets:
            return None
        info = run.info
        loader = build_eval_loader(self.sets["val"], 1, self.config.num_workers, False, info.world_size, info.rank)
        if self.eval_collate is not None:
            loader.collate_fn = self.eval_collate
        return loader

    # -- rounds -------------------------------------------------------------------------------------------
    def end_epoch(self, epoch: int, train_stats: dict[str, Any]) -> dict[str, Any]:
        """Evaluate after each round, keep the best checkpoint, the round's record."""
        run, cfg = self.run, self.config
        iteration = min((epoch + 1) * run.steps_per_epoch, self.total_iterations)
        stats = {**super().end_epoch(epoch, train_stats), "iteration": iteration}
        if self.val_loader is None:
            return stats
        figures = self.figures(self._evaluate(f"iter_{iteration}", iteration))
        stats.update({f"test_{k}": v for k, v in figures.items()})
        # no NaN (an AP of an area range without ground truth) to TensorBoard: it shows a gap anyway
        run.writer.scalars(iteration, {k: v for k, v in figures.items() if math.isfinite(v)}, "val")
        value = figures.get(self.best_metric, 0.0)
        improved = value > self.best
        self.best = stats[f"best_{self.best_metric}"] = max(self.best, value)
        if improved and cfg.output_dir:
            run.save("best", {"epoch": "best", **self.state()})
        return stats

    def epoch_message(self, stats: Mapping[str, Any]) -> str:
        return (f"iteration {stats.get('iteration')}: loss {stats['train_loss']:.4f}, lr {stats['train_lr']:.2e}"
                if "train_loss" in stats else f"iteration {stats.get('iteration')} (resumed)")

    def nothing_to_evaluate(self) -> InputError:
        return InputError(f"nothing to evaluate: pass a checkpoint ({self.command} test ..., {self.weights_flag} FILE, "
                          "--resume FILE) or an --output_dir that holds checkpoints")

    # -- checkpoints --------------------------------------------------------------------------------------
    def load_weights(self, ckpt: Mapping[str, Any], path: str) -> bool:
        if ckpt.get("format") != self.checkpoint_format:
            raise InputError(f"--resume {path} is not a checkpoint of {self.command} (format {ckpt.get('format')!r}); "
                             f"to start from its weights use {self.weights_flag} (a whole model's file) or "
                             "--pretrained (backbone weights)")
        load_resumed_weights(self.model, ckpt["model"], path, self.flags(), ckpt.get("args"))
        return True

    def state(self) -> dict[str, Any]:
        return {f"best_{self.best_metric}": self.best, "num_classes": self.num_classes}

    def load_state(self, ckpt: Mapping[str, Any], path: str) -> None:
        self.best = float(ckpt.get(f"best_{self.best_metric}", 0.0))

    def flags(self) -> dict[str, Any]:
        return {**super().flags(), "num_classes": self.num_classes}
