"""The one epoch loop of every long run.

An *update* is ``update_freq`` micro-batches whose gradients are accumulated (DDP synchronises
only on the last) before one optimizer step; the LR / weight-decay schedules are indexed by
update, as the originals'. Per micro-batch the task computes forward and loss
(:meth:`mcbeit.engine.task.Task.train_step`); the strategy runs backward; after the last one the
strategy clips and steps, and the task updates what follows the weights (EMA copies, codebooks).

Metrics stay on the device and are read back once per ``print_freq`` updates
(:class:`mcbeit.engine.meter.StepMeter`: one host sync per interval, one TensorBoard point per
update); the meter also applies the divergence and bad-data policies.
"""
from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any, Iterable

import torch

from mcbeit.engine.meter import StepMeter
from mcbeit.engine.schedules import apply_schedules, lr_stats
from mcbeit.engine.task import Mark

if TYPE_CHECKING:
    from mcbeit.engine.control import RunControl
    from mcbeit.engine.context import RunContext


def _mean(values: list[torch.Tensor]) -> torch.Tensor:
    return values[0] if len(values) == 1 else torch.stack(values).mean()


def _meter(run: RunContext, epoch: int, first: int, last_checkpoint: str | None, shared_counts: bool) -> StepMeter:
    spec, cfg, spe = run.task.meter, run.config, run.steps_per_epoch
    return StepMeter(spec.metrics, spec.mean_over_ranks, spec.groups, spec.postfix, epoch=epoch,
                     first_step=epoch * spe + first, total_steps=spe - first, writer=run.writer,
                     show=run.info.is_main, last_good_checkpoint=last_checkpoint, stop_hint=spec.stop_hint,
                     max_bad_steps=cfg.max_bad_steps, scaler_active=run.precision.scaler is not None,
                     max_bad_fraction=cfg.max_bad_fraction, shared_counts=shared_counts)


def run_update(run: RunContext, batches: Iterable, mark: Mark | None = None) -> dict[str, Any] | None:
    """One optimizer update over ``batches`` (``update_freq`` micro-batches; fewer when the loader ends
    first, None when it gave none): forward and loss per micro-batch (the task), backward (the
    strategy, DDP synchronising on the last), then clip, step and the task's after-update work.

    Returns the update's metrics as device tensors (means over micro-batches, ``grad_norm``,
    ``loss_scale``, the task's extras), ``stepped`` (maybe a device bool: no host read), ``images``
    and ``skipped``. ``mark(phase)`` (the benchmark's timer) is called as each phase ends."""
    task, strategy, freq = run.task, run.strategy, task_freq(run)
    outs, images, skipped = [], 0, 0
    strategy.zero_grad()
    for phase, batch in enumerate(batches):
        with strategy.no_sync(phase == freq - 1):
            out = task.train_step(batch, mark)
            strategy.backward(out.loss, freq)
        _mark(mark, "backward")
        outs.append(out.metrics)
        images += out.images
        skipped = skipped + out.skipped
    if not outs:
        return None
    grad_norm, loss_scale, stepped = strategy.step()
    values = {k: _mean([o[k] for o in outs]) for k in outs[0]}
    values.update(grad_norm=grad_norm.detach().float(), loss_scale=loss_scale.float())
    values.update(task.after_update(stepped))
    _mark(mark, "optimizer")
    return {**values, "stepped": stepped, "images": images, "skipped": skipped}


def train_one_epoch(run: RunContext, loader: Iterable, epoch: int, *, first: int = 0,
                    control: RunControl | None = None, last_checkpoint: str | None = None) -> dict[str, Any]:
    """Train ``epoch`` from its update ``first`` (a mid-epoch resume; the loader starts there too) to
    the end; return the epoch's means (over updates, and over ranks where the task says so).
    ``control`` writes mid-epoch checkpoints and stops on signals."""
    task, strategy, spe = run.task, run.strategy, run.steps_per_epoch
    strategy.forward_model.train()
    task.start_epoch(epoch, first)
    if run.writer is not None:  # the epoch's temperatures (mc-BEiT's warm-up, ...): one point at its first step
        run.writer.scalars(epoch * spe + first, task.epoch_temperatures(epoch), "temperature")
    meter = _meter(run, epoch, first, last_checkpoint, shared_counts=control is not None)
    wanted, micro_batches = set(task.meter.metrics), iter(loader)
    for update in range(first, spe):
        it = epoch * spe + update
        if it >= len(run.lr_schedule):  # the run ends with its schedule (a last round shorter than the others)
            break
        apply_schedules(strategy.optimizer, float(run.lr_schedule[it]), float(run.wd_schedule[it]))
        out = run_update(run, itertools.islice(micro_batches, task_freq(run)))
        if out is None:
            break
        host = lr_stats(strategy.optimizer)
        meter.add({k: v for k, v in out.items() if k in wanted}, {k: host[k] for k in task.meter.host}, out["images"],
                  skipped=out["skipped"], stepped=out["stepped"])
        if meter.steps % run.config.print_freq == 0:
            meter.flush()
        if control is not None:
            control.after_step(epoch, update + 1, it + 1, meter)
    return meter.epoch_stats()


def task_freq(run: RunContext) -> int:
    return max(1, int(run.task.update_freq))


def _mark(mark: Mark | None, phase: str) -> None:
    if mark is not None:
        mark(phase)
