"""Per-step metrics of a training epoch, kept on the device and read back once per interval.

Every training loop (pre-training, tokenizer training) hands each step's metrics to a
:class:`StepMeter` as device tensors plus a few host floats (the learning rate). Every
``print_freq`` steps :meth:`StepMeter.flush` stacks them, averages the chosen ones over ranks
in ONE all-reduce, writes one TensorBoard point per step, adds to the epoch totals and updates
the progress bar: one host sync per interval, not per step.

Divergence: a step whose gradient was not finite was not applied (see
:func:`mcbeit.engine.optim.clip_and_step`); the meter counts it, leaves it out of the means, and
stops the run with :class:`DivergenceError` after ``max_bad_steps`` such steps in a row, naming
the last good checkpoint.

Bad data: the loader's counts of unreadable files skipped (host numbers, no device read) are summed
over ranks after EVERY step by :class:`mcbeit.engine.control.RunControl`'s existing host all-reduce
(:meth:`StepMeter.take_unshared` / :meth:`StepMeter.shared_counts`), which stops the run, after a
checkpoint, at the first step where the epoch's ``--max_bad_fraction`` is certain to be exceeded.
Without a RunControl (tests, the benchmark) the meter checks at each flush instead.

Also written to TensorBoard at each flush: images/s, and the peak memory (``memory/rss_peak_gib``:
the process's peak resident memory; ``memory/cuda_peak_allocated_gib`` on a GPU); after each step
with a RunControl (else at each flush, this rank's), ``data/skipped_images``: the epoch's
unreadable files so far, all ranks.
"""
from __future__ import annotations

import logging
import math
import resource
import sys
import time
from typing import Mapping, Sequence

import torch
from tqdm import tqdm

from mcbeit.engine.bad_data import TooManyBadImagesError, check_bad_fraction
from mcbeit.engine.distributed import all_reduce_mean, all_reduce_sum
from mcbeit.engine.logging import RunWriter

log = logging.getLogger("mcbeit")


class NonFiniteLossError(RuntimeError):
    """A loss or gradient that is not finite stopped the run."""


class DivergenceError(NonFiniteLossError):
    """Too many consecutive steps had non-finite gradients (each was skipped)."""


class StepMeter:
    """Collect one epoch's per-step metrics.

    metrics:        names of the per-step device tensors (scalars), in the order given to :meth:`add`.
    mean_over_ranks: those of ``metrics`` that differ between ranks and are averaged over them.
    groups:         TensorBoard head -> names (device metrics or host values) written under it.
    postfix:        progress-bar label -> (name, format) shown after each flush.
    first_step:     the global step of this epoch's first step (TensorBoard's x axis).
    stop_hint:      appended to the error raised on a non-finite loss (what to change).
    max_bad_steps:  stop after this many consecutive skipped (non-finite) steps.
    scaler_active:  fp16 with a loss scaler: its overflow skips are routine and logged at INFO.
    max_bad_fraction: at the epoch's end, stop when a larger share of the image files read (on all
                    ranks) was unreadable (1 disables the check). Checked before, against the whole
                    epoch's allowance: a run whose epoch will fail the check stops as soon as that is
                    certain, not hours later at the epoch's end: after every step when ``shared_counts``
                    is fed (by RunControl), else at every flush.
    shared_counts:  whether RunControl feeds :meth:`shared_counts` after every step (then the flush
                    does not check).
    """

    def __init__(self, metrics: Sequence[str], mean_over_ranks: Sequence[str], groups: Mapping[str, Sequence[str]],
                 postfix: Mapping[str, tuple[str, str]], *, epoch: int, first_step: int, total_steps: int,
                 writer: RunWriter | None, show: bool, last_good_checkpoint: str | None, stop_hint: str,
                 max_bad_steps: int = 20, scaler_active: bool = False, max_bad_fraction: float = 1.0,
                 shared_counts: bool = False):
        self.metrics = tuple(metrics)
        self.reduced = [self.metrics.index(k) for k in mean_over_ranks]
        self.groups, self.postfix = groups, postfix
        self.epoch, self.first_step = epoch, first_step
        self.writer = writer
        self.last_good_checkpoint, self.stop_hint = last_good_checkpoint, stop_hint
        self.bar = tqdm(total=total_steps, desc=f"epoch {epoch}", disable=not show, dynamic_ncols=True,
                        mininterval=1.0)
        self.totals: dict[str, float] = {}
        self.steps = 0
        self.max_bad_steps, self.scaler_active = max_bad_steps, scaler_active
        self.max_bad_fraction = max_bad_fraction
        self.total_steps = total_steps
        self.checked_per_step = shared_counts
        self._seen = 0                # images delivered this epoch (this rank)
        self._unshared = [0, 0]       # (files skipped, images) since the last shared_counts (this rank)
        self.shared = (0, 0)          # (files skipped, images) this epoch, all ranks, as of the last step agreed
        self._started = time.perf_counter()
        self.bad_steps = 0            # skipped this epoch
        self.consecutive_bad = 0
        self._pending: list[dict[str, torch.Tensor]] = []
        self._pending_host: list[dict[str, float]] = []
        self._pending_ok: list[bool] = []
        self._images = 0
        self._skipped = 0             # unreadable files skipped this epoch (this rank)
        self._t0 = time.perf_counter()

    def add(self, values: Mapping[str, torch.Tensor], host: Mapping[str, float], images: int,
            skipped: torch.Tensor | int = 0, stepped: bool | torch.Tensor = True) -> None:
        """Queue one step's metrics (no host sync); ``skipped``: unreadable images the batch replaced
        (the loader's count: an int or a CPU tensor, read here without a device sync); ``stepped``:
        False when the update was skipped for a non-finite gradient; a device bool tensor (the fused
        optimizer's own decision) is read, and counted, at the next :meth:`flush`."""
        self._pending.append({k: values[k] for k in self.metrics})
        self._pending_host.append(dict(host))
        self._pending_ok.append(stepped)
        skipped = int(skipped)
        self._images += images
        self._seen += images
        self._skipped += skipped
        self._unshared[0] += skipped
        self._unshared[1] += images
        self.steps += 1
        if not isinstance(stepped, torch.Tensor):
            self._count(bool(stepped), self.first_step + self.steps - 1)

    def _count(self, stepped: bool, step: int) -> None:
        """The run of skipped updates: stop after ``max_bad_steps`` in a row."""
        if stepped:
            self.consecutive_bad = 0
            return
        self.bad_steps += 1
        self.consecutive_bad += 1
        if self.consecutive_bad >= self.max_bad_steps:
            raise DivergenceError(
                f"{self.consecutive_bad} consecutive steps with a non-finite gradient (epoch {self.epoch}, last at "
                f"step {step}); each was skipped, the weights are those of the last good step. Stopping. "
                f"Last good checkpoint: {self.last_good_checkpoint or 'none written yet'}. {self.stop_hint}")
        if self.scaler_active:
            log.info("step %d: fp16 overflow, update skipped and loss scale lowered", step)
        else:
            log.warning("step %d: non-finite gradient, update skipped (%d in a row; the run stops at %d)", step,
                        self.consecutive_bad, self.max_bad_steps)

    def flush(self) -> None:
        """Read back the queued steps: reduce, check, log (one all-reduce and one device-to-host copy)."""
        if not self._pending:
            return
        values = torch.stack([torch.stack([m[k].float() for m in self._pending]) for k in self.metrics])  # (K, steps)
        if self.reduced:
            values[self.reduced] = all_reduce_mean(values[self.reduced])
        ok = torch.stack([s.to(values.device, torch.float32).reshape(()) if isinstance(s, torch.Tensor)
                          else values.new_tensor(float(s)) for s in self._pending_ok])         # (steps,)
        table = torch.cat([values, ok[None]]).cpu().tolist()                                   # one device read
        rows, oks = dict(zip(self.metrics, table[:-1], strict=True)), [v > 0.5 for v in table[-1]]
        first = self.first_step + self.steps - len(self._pending)
        for i, host in enumerate(self._pending_host):
            if isinstance(self._pending_ok[i], torch.Tensor):
                self._count(oks[i], first + i)
            step = {**{k: rows[k][i] for k in self.metrics}, **host}
            if not oks[i]:
                continue  # a skipped update: counted in bad_steps, left out of the means and TensorBoard
            if not math.isfinite(step["loss"]):
                raise NonFiniteLossError(
                    f"loss is {step['loss']} at epoch {self.epoch}, step {first + i}; stopping before it spreads. "
                    f"Last good checkpoint: {self.last_good_checkpoint or 'none written yet'}. {self.stop_hint}")
            for k, v in step.items():
                self.totals[k] = self.totals.get(k, 0.0) + v
            if self.writer is not None:
                for head, names in self.groups.items():
                    self.writer.scalars(first + i, {k: step[k] for k in names}, head)
        last = {**{k: rows[k][-1] for k in self.metrics}, **self._pending_host[-1]}
        elapsed = time.perf_counter() - self._t0
        self.bar.set_postfix({label: fmt.format(last[name]) for label, (name, fmt) in self.postfix.items()}
                             | {"img_s": f"{self._images / max(elapsed, 1e-9):.1f}"})
        self.bar.update(len(self._pending))
        if self.writer is not None:
            self.writer.scalars(first + len(self._pending) - 1, {"images_per_s": self._images / max(elapsed, 1e-9)},
                                "speed")
            self.writer.scalars(first + len(self._pending) - 1, memory_figures(values.device), "memory")
            if not self.checked_per_step:  # else written after each step, summed over ranks (shared_counts)
                self.writer.scalars(first + len(self._pending) - 1, {"skipped_images": self._skipped}, "data")
        self._pending, self._pending_host, self._pending_ok = [], [], []
        self._images, self._t0 = 0, time.perf_counter()
        if self.max_bad_fraction < 1.0 and self.steps < self.total_steps and not self.checked_per_step:
            self._check_bad_images_so_far()

    def _image_counts(self) -> tuple[int, int]:
        """(unreadable files skipped, images delivered) so far this epoch, summed over ranks."""
        counts = torch.tensor([float(self._skipped), float(self._seen)], dtype=torch.float64)
        skipped, seen = (int(v) for v in all_reduce_sum(counts).tolist())
        return skipped, seen

    def take_unshared(self) -> tuple[int, int]:
        """(files skipped, images delivered) on this rank since the last call: host ints for
        RunControl's per-step all-reduce, which hands the sums back to :meth:`shared_counts`."""
        counts = (self._unshared[0], self._unshared[1])
        self._unshared = [0, 0]
        return counts

    def shared_counts(self, skipped: int, seen: int) -> TooManyBadImagesError | None:
        """Add one step's (files skipped, images delivered), summed over ranks (the same numbers on
        every rank); return the bad-data error when the epoch is now certain to exceed
        ``--max_bad_fraction`` (the caller saves a checkpoint, then raises it), else None."""
        total_skipped, total_seen = self.shared[0] + skipped, self.shared[1] + seen
        self.shared = (total_skipped, total_seen)
        if self.writer is not None:
            self.writer.scalars(self.first_step + self.steps - 1, {"skipped_images": total_skipped}, "data")
        try:
            self._check_bad_fraction_of_epoch(total_skipped, total_seen)
        except TooManyBadImagesError as error:
            return error
        return None

    def _check_bad_images_so_far(self) -> None:
        self._check_bad_fraction_of_epoch(*self._image_counts())

    def _check_bad_fraction_of_epoch(self, skipped: int, seen: int) -> None:
        """Stop now when the files already skipped exceed what the whole epoch may skip: the share at
        the epoch's end can only be larger than skipped / (skipped + the epoch's images), the epoch's
        images extrapolated from the steps so far (each step delivers a whole batch)."""
        if skipped and seen and self.max_bad_fraction < 1.0:
            at_end = seen / self.steps * self.total_steps
            if skipped / (skipped + at_end) > self.max_bad_fraction:
                where = (f"in epoch {self.epoch} so far (step {self.steps} of {self.total_steps}: already more than "
                         "the whole epoch may have)" if self.steps < self.total_steps else f"in epoch {self.epoch}")
                check_bad_fraction(skipped, seen, self.max_bad_fraction, where)

    def close(self) -> None:
        """Log the queued steps and close the bar (a run stopping inside the epoch)."""
        self.flush()
        self.bar.close()

    def epoch_stats(self) -> dict[str, float]:
        """Flush and close the bar; return each metric's mean over the epoch's steps, the number of
        steps and the images skipped as unreadable on all ranks (a warning when there were any)."""
        self.flush()
        self.bar.close()
        if self.steps == 0:
            raise RuntimeError("the data loader produced no batch this epoch: the dataset has fewer images than "
                               "--batch_size x number of processes; lower --batch_size or add images")
        applied = self.steps - self.bad_steps
        stats = {k: v / max(applied, 1) for k, v in self.totals.items()}
        stats["steps"] = self.steps
        stats["skipped_steps"] = self.bad_steps
        skipped, seen = self._image_counts()
        stats["skipped_images"] = skipped
        # this process's steps of the epoch (after a resume: the resumed ones), images of all ranks
        stats["images"] = seen
        stats["time_s"] = time.perf_counter() - self._started
        stats["images_per_s"] = seen / max(stats["time_s"], 1e-9)
        if skipped:
            log.warning("epoch %d: %d unreadable images were skipped (see the warnings above for their paths)",
                        self.epoch, skipped)
        check_bad_fraction(skipped, seen, self.max_bad_fraction, f"in epoch {self.epoch}")
        return stats


def memory_figures(device: torch.device) -> dict[str, float]:
    """This process's peak resident memory (GiB) and, on a CUDA device, the peak memory its tensors
    held (``torch.cuda.max_memory_allocated``, GiB): host calls, no device sync."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    figures = {"rss_peak_gib": peak / (2**30 if sys.platform == "darwin" else 2**20)}
    if device.type == "cuda":
        figures["cuda_peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return figures
