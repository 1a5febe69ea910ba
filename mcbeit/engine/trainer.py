"""The run engine: one skeleton for every long job (pre-training, tokenizer training, fine-tuning,
linear probing).

The engine owns what those jobs share: the process group and device, seeding, precision
(:mod:`mcbeit.engine.precision`), the writer (TensorBoard, ``log.txt`` JSON lines, progress bar),
checkpoint save / verify / resume with one position record (:mod:`mcbeit.engine.resume`),
preemption and mid-epoch checkpoints (:class:`mcbeit.engine.control.RunControl`), the divergence
and bad-data policies (:class:`mcbeit.engine.meter.StepMeter`), gradient accumulation and the epoch
loop (:mod:`mcbeit.engine.loop`), plain or DeepSpeed training (:mod:`mcbeit.engine.strategy`).
A :class:`mcbeit.engine.task.Task` says what to train.

    Trainer(config, task).fit()   # -> the last epoch's statistics

Errors propagate as typed exceptions; :mod:`mcbeit.engine.exits` turns them into exit statuses.
"""
from __future__ import annotations

import json
import logging
import os
import random
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mcbeit.config.fields import experiment_flags
from mcbeit.config.run import RunConfig
from mcbeit.engine.context import RunContext
from mcbeit.engine.control import RunControl
from mcbeit.engine.distributed import DistInfo, init_distributed, resolve_device, sync_batch_norm_buffers
from mcbeit.engine.logging import RunWriter, setup_logging
from mcbeit.engine.output_dir import prepare_output_dir
from mcbeit.engine.loop import train_one_epoch
from mcbeit.engine.precision import resolve_precision
from mcbeit.engine import checkpoint as ckpt_io
from mcbeit.engine.identity import check_experiment, prepare_fresh_start
from mcbeit.engine.resume import position_state, resume_path, resume_position
from mcbeit.engine.schedules import cosine_scheduler
from mcbeit.engine.task import Task, TrainData
from mcbeit.errors import InputError
from mcbeit.models.checkpoint import load_into

log = logging.getLogger("mcbeit")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    """Runs one task under one run configuration (see the module docstring)."""

    def __init__(self, config: RunConfig, task: Task):
        self.config, self.task = config, task

    # -- the run ----------------------------------------------------------------------------------------
    def start(self, writes: bool = False) -> RunContext:
        """Join the process group, set up logging and the output folder, check the inputs, build the model.

        ``writes`` (training): the output and TensorBoard folders are checked writable and the output
        folder's lock is taken (held by the returned context until :meth:`RunContext.close`), then what
        interrupted saves left is removed (:mod:`mcbeit.engine.output_dir`), before anything is built;
        a run that only reads (``--eval``) takes no lock."""
        cfg, task = self.config, self.task
        info = init_distributed(cfg.device, cfg.dist_on_itp, cfg.local_rank, cfg.dist_url, cfg.dist_timeout)
        setup_logging(info.rank, cfg.debug)
        check_output_dir(cfg.output_dir)
        lock = prepare_output_dir(cfg.output_dir, cfg.tensorboard_dir, info) if writes else None
        try:
            task.check_inputs()
            if cfg.output_dir and info.is_main:
                Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
            run = self.build(info, announce=True)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        run.output_lock = lock
        return run

    def build(self, info: DistInfo, announce: bool = False) -> RunContext:
        """The run's context and the task's model, seeded: the same initial weights on every rank."""
        cfg, task = self.config, self.task
        run = RunContext(cfg, task, info, resolve_precision(cfg.amp, info.device, scaler=not task.deepspeed))
        task.run = run
        if announce:
            log.info("args: %s", json.dumps(run.flags(), sort_keys=True))
            if task.embedded_data:
                log.info("no --data_path: %s on the embedded images (a quick demonstration run)", task.purpose)
        seed_everything(cfg.seed)  # DDP also broadcasts rank 0's weights
        task.model = task.build_model(run).to(info.device)
        run.n_parameters = sum(p.numel() for p in task.model.parameters() if p.requires_grad)
        seed_everything(cfg.seed + info.rank)
        return run

    def evaluate(self) -> dict[str, Any]:
        """Evaluate without training (fine-tuning's ``--eval``): the weights of ``--resume`` or of the
        newest checkpoint in ``--output_dir`` (else the task's own, e.g. ``--finetune``), then the
        task's :meth:`~mcbeit.engine.task.Task.evaluate_only`."""
        run = self.start()
        try:
            return self.task.evaluate_only(run, self._weights_to_evaluate())
        finally:
            run.close()

    def _weights_to_evaluate(self) -> str | None:
        """Load the checkpoint to evaluate (a DeepSpeed folder or a file); its path, or None."""
        cfg, task = self.config, self.task
        if os.path.isdir(cfg.resume) if cfg.resume else task.deepspeed:
            from mcbeit.engine.deepspeed import resume_checkpoint
            from mcbeit.models.checkpoint import read_checkpoint, resolve_source, select_state_dict

            folder = resume_checkpoint(cfg.resume, cfg.auto_resume, cfg.output_dir)
            if folder is None:
                return None
            state, _, _ = select_state_dict(read_checkpoint(resolve_source(str(folder))), "module|model")
            load_into(task.model, state, strict=True)
            return f"{folder} (DeepSpeed)"
        path = resume_path(cfg.resume, cfg.auto_resume, cfg.output_dir)
        if path is not None:
            ckpt = ckpt_io.load_training_checkpoint(path)
            task.load_weights(ckpt, path)
            task.load_state(ckpt, path)
        return path

    def fit(self) -> dict[str, Any]:
        """Train as the configuration says; return the last epoch's log record."""
        run = self.start(writes=True)
        cfg, task, info = self.config, self.task, run.info
        try:  # run.close() also releases the output folder's lock, whatever stops the run
            data = task.build_data(run)
            self.prepare(run, data.steps_per_epoch)
            start_epoch, first, resumed_from, owed = self._restore(run)
            run.writer = RunWriter(cfg.output_dir, cfg.log_dir, enabled=info.is_main and bool(cfg.output_dir))
            self._log_plan(run, start_epoch, resumed_from)
            return self._epochs(run, data, start_epoch, first, resumed_from, owed)
        finally:
            run.close()

    def ready(self, steps_per_epoch: int, info: DistInfo | None = None) -> RunContext:
        """A run ready for :func:`mcbeit.engine.loop.run_update` without data of its own (tests, the
        benchmark): the model built, with optimizer, schedules of ``steps_per_epoch`` updates and
        strategy, on ``info``'s process and device (default: this process alone, on ``--device``);
        neither the process group nor logging is touched."""
        if info is None:
            info = DistInfo(device=resolve_device(self.config.device))
        run = self.build(info)
        self.prepare(run, steps_per_epoch)
        return run

    def prepare(self, run: RunContext, steps_per_epoch: int) -> None:
        """Optimizer, schedules, compilation and the strategy that runs backward and the step."""
        cfg, task = self.config, self.task
        optimizer = task.build_optimizer(task.model)
        spe = run.steps_per_epoch = steps_per_epoch
        own = task.schedules(spe)
        if own is not None:  # the task's (segmentation's poly with mmcv's warm-up)
            run.lr_schedule, run.wd_schedule = own
        else:
            run.lr_schedule = cosine_scheduler(task.base_lr, cfg.min_lr, cfg.epochs, spe,
                                               warmup_epochs=cfg.warmup_epochs, warmup_steps=warmup_steps(cfg, spe))
            run.wd_schedule = cosine_scheduler(cfg.weight_decay, cfg.final_weight_decay, cfg.epochs, spe)
        task.compile()
        if task.deepspeed:
            from mcbeit.engine.strategy import DeepSpeedStrategy

            run.strategy = DeepSpeedStrategy(task.model, optimizer, run.info, batch_size=cfg.batch_size,
                                             update_freq=task.update_freq, amp=cfg.amp, zero_stage=task.zero_stage,
                                             clip_grad=cfg.clip_grad)
            run.precision = run.strategy.precision
        else:
            from mcbeit.engine.strategy import PlainStrategy

            run.strategy = PlainStrategy(task.model, optimizer, run.precision, run.info, cfg.clip_grad,
                                         task.trainable(task.model))

    def _restore(self, run: RunContext) -> tuple[int, int, str | None, int | None]:
        """(first epoch, its updates already done, checkpoint resumed, an epoch whose end is owed)."""
        cfg, task = self.config, self.task
        auto = prepare_fresh_start(cfg.output_dir, auto_resume=cfg.auto_resume, resume=cfg.resume,
                                   start_over=cfg.start_over, is_main=run.info.is_main)
        path = run.strategy.find_resume(cfg.resume, auto, cfg.output_dir)
        if path is None:
            return cfg.start_epoch, 0, None, None
        path = task.resume_source(path)
        ckpt = run.strategy.read(path)
        if ckpt.get("format") == task.checkpoint_format:  # other files: load_weights says what they are
            check_experiment(ckpt, path, run.flags(), experiment_flags(type(cfg)), explicit=bool(cfg.resume),
                             accepted=cfg.accept_changed_flags, output_dir=cfg.output_dir)
        ours = True if task.deepspeed else task.load_weights(ckpt, path)
        if ours:
            run.strategy.load_optimizer(ckpt)
        elif "optimizer" in ckpt:
            log.warning("%s was not written by mcbeit: its weights are loaded, its optimizer state is not "
                        "(parameter order differs between implementations)", path)
        task.load_state(ckpt, path)
        where = f"{path} (DeepSpeed)" if task.deepspeed else path
        start, first = resume_position(ckpt, where, run.steps_per_epoch, run.info, cfg.start_epoch,
                                       restore_random_state=ours)
        owed = start - 1 if task.evaluates and ckpt.get("evaluated") is False and first == 0 and start > 0 else None
        return start, first, path, owed

    def _epochs(self, run: RunContext, data: TrainData, start_epoch: int, first: int, last_ckpt: str | None,
                owed: int | None) -> dict[str, Any]:
        cfg, task, info = self.config, self.task, run.info
        spe, stats, started = run.steps_per_epoch, {}, time.perf_counter()
        saving = task.writes_checkpoints
        control = RunControl(info, (lambda e, done: self.save_position(run, e, done)) if saving else None,
                             save_every_steps=cfg.save_ckpt_steps, save_every_minutes=cfg.save_ckpt_minutes,
                             steps_per_epoch=spe)
        # The first log.txt row of a resumed run says so: which checkpoint, and where in it the run went on.
        resumed = ({"checkpoint": os.path.abspath(last_ckpt), "epoch": start_epoch, "step": first,
                    "global_step": start_epoch * spe + first} if last_ckpt else None)
        try:
            with control:
                if owed is not None:
                    log.info("epoch %d ended on a stop signal before its evaluation: evaluating it now", owed)
                    stats, last_ckpt = self._end_epoch(run, owed, {}, saving, last_ckpt, time.perf_counter(), resumed)
                    resumed = None
                for epoch in range(start_epoch, cfg.epochs):
                    epoch_started = time.perf_counter()
                    data.sampler.set_epoch(epoch, start=first * cfg.batch_size * task.update_freq)
                    train_stats = train_one_epoch(run, data.loader, epoch, first=first, control=control,
                                                  last_checkpoint=last_ckpt)
                    first = 0
                    last_ckpt = control.last_checkpoint or last_ckpt
                    stats, last_ckpt = self._end_epoch(run, epoch, train_stats, saving, last_ckpt, epoch_started,
                                                       resumed)
                    resumed = None
        finally:
            run.writer.close()
        if stats:
            log.info("done in %.1f s; checkpoints and log.txt in %s", time.perf_counter() - started,
                     os.path.abspath(cfg.output_dir) if cfg.output_dir else "(nowhere: --output_dir '')")
        return stats

    def _end_epoch(self, run: RunContext, epoch: int, train_stats: dict[str, Any], saving: bool,
                   last_ckpt: str | None, started: float, resumed: dict[str, Any] | None = None,
                   ) -> tuple[dict[str, Any], str | None]:
        """The task's epoch end (evaluation, best checkpoint), the epoch checkpoint when due, the log record;
        returns the record and the newest checkpoint written.

        The record also holds ``time`` (when it was written, local time with its UTC offset),
        ``epoch_time_s`` (this process's wall time for the epoch since ``started``: training,
        evaluation, checkpoint) and, in a resumed run's first record, ``resumed_from`` (``resumed``:
        the checkpoint and the epoch / step the run went on from; the record's ``train_*`` figures
        then cover the steps from there)."""
        cfg, task = self.config, self.task
        if not task.deepspeed:  # the epoch's evaluation measures the checkpoint's batch-norm statistics on every rank
            sync_batch_norm_buffers(task.model, run.info)
        stats = task.end_epoch(epoch, train_stats)
        path = None
        if saving and ((epoch + 1) % cfg.save_ckpt_freq == 0 or epoch + 1 == cfg.epochs):
            path = self.save_position(run, epoch, run.steps_per_epoch, evaluated=True)
            if path and run.info.is_main:
                log.info("saved %s", path)
        stats["time"] = datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")
        stats["epoch_time_s"] = round(time.perf_counter() - started, 3)
        if resumed is not None:
            stats["resumed_from"] = resumed
        run.writer.epoch(stats)
        log.info("epoch %d: %s", epoch, task.epoch_message(stats))
        return stats, path or last_ckpt

    def save_position(self, run: RunContext, epoch: int, steps_done: int, evaluated: bool = False) -> str | None:
        """A resume point after ``steps_done`` updates of ``epoch`` (every rank calls it)."""
        entries = position_state(run.info, epoch, steps_done, run.steps_per_epoch)
        if self.task.evaluates:
            entries["evaluated"] = evaluated
        # checkpoint-<epoch>.pth at the epoch's end, checkpoint-<epoch>-step<N>.pth inside it
        name = epoch if steps_done >= run.steps_per_epoch else ckpt_io.position_name(epoch, steps_done)
        return run.save(name, {**entries, **self.task.state()})

    def _log_plan(self, run: RunContext, start_epoch: int, resumed_from: str | None) -> None:
        cfg, info = self.config, run.info
        log.info("%d steps per epoch, %d images per step (%d processes); amp %s; epochs %d..%d; output %s",
                 run.steps_per_epoch, cfg.batch_size * info.world_size * self.task.update_freq, info.world_size,
                 run.precision.dtype or "off", start_epoch, cfg.epochs - 1,
                 os.path.abspath(cfg.output_dir) if cfg.output_dir else "(none)")
        if start_epoch >= cfg.epochs:
            log.warning("nothing to do: %s already finished epoch %d of %d. To train it on: --epochs N "
                        "--accept_changed_flags epochs (the schedules then span N epochs); to train again from the "
                        "start: --start_over (the earlier run's files are moved into a replaced-<time>/ subfolder) "
                        "or another --output_dir", resumed_from, start_epoch - 1, cfg.epochs)


def check_output_dir(output_dir: str) -> None:
    if output_dir and os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise InputError(f"--output_dir {output_dir} is a file, not a folder: pass a folder (it is created if "
                         "missing), or --output_dir '' to write nothing")


def warmup_steps(cfg: Any, steps_per_epoch: int) -> int:
    """LR warm-up length in updates, shortened (with a warning) to the run when it is longer."""
    steps = cfg.warmup_steps if cfg.warmup_steps > 0 else cfg.warmup_epochs * steps_per_epoch
    total = cfg.epochs * steps_per_epoch
    if steps > total:
        log.warning("LR warm-up of %d steps is longer than the whole run (%d steps): warming up over the whole "
                    "run instead; set --warmup_epochs / --warmup_steps to choose", steps, total)
        steps = total
    return steps
