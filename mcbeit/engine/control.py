"""What a long run needs to stop anywhere and continue as if it never stopped.

- :func:`capture_rng` / :func:`restore_rng`: the python, numpy, torch CPU and CUDA generator states
  of one process, in plain containers that ``torch.load(weights_only=True)`` reads back;
  :func:`gather_rng` collects every rank's onto rank 0 for the checkpoint.
- :class:`RunControl`: asked after every step whether to write a mid-epoch checkpoint
  (``--save_ckpt_steps``, ``--save_ckpt_minutes``) or to stop because SLURM / torchrun / the
  user sent SIGTERM or SIGUSR1. Ranks agree through one tiny all-reduce of host flags on a
  gloo group (no GPU sync), so they all save at the same step and all stop together.

The data side needs nothing saved beyond the position: every sample's randomness is a function of
``(seed, epoch, index)`` (``mcbeit.data.datasets.sample_rng``) and the shuffle of
``(seed, epoch)``, so a resumed epoch skips the batches already trained and draws the same rest.
"""
from __future__ import annotations

import logging
import random
import signal
import threading
import time
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from mcbeit.engine.distributed import DistInfo

log = logging.getLogger("mcbeit")

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on a signal after writing a checkpoint; run again to continue
STOP_SIGNALS = ("SIGTERM", "SIGUSR1")


class Preempted(Exception):
    """The run stopped on a signal after writing ``checkpoint``."""

    def __init__(self, signame: str, checkpoint: str | None):
        super().__init__(f"stopped on {signame}; continue with the same command (auto-resume): {checkpoint}")
        self.signame, self.checkpoint = signame, checkpoint


# ----------------------------------------------------------------------------- RNG states


def capture_rng() -> dict[str, Any]:
    """This process's generator states as tensors, lists and numbers (weights_only-safe)."""
    version, internal, gauss = random.getstate()
    numpy_state = np.random.get_state(legacy=False)
    state = {
        "python": [version, list(internal), gauss],
        "numpy": {"bit_generator": numpy_state["bit_generator"],
                  "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
                  "pos": int(numpy_state["state"]["pos"]), "has_gauss": int(numpy_state["has_gauss"]),
                  "gauss": float(numpy_state["gauss"])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
    }
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"],
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng(info: DistInfo) -> list[dict[str, Any]]:
    """Every rank's :func:`capture_rng`, in rank order (a collective: all ranks must call it)."""
    mine = capture_rng()
    if info.world_size == 1 or not dist.is_initialized():
        return [mine]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, mine)
    return out


def restore_rank_rng(states: list[dict[str, Any]] | None, info: DistInfo, source: str) -> bool:
    """Restore this rank's generators from a checkpoint's list; False (with a warning) when it cannot."""
    if not states:
        return False
    if len(states) != info.world_size:
        log.warning("%s was written by %d processes, this run has %d: random states not restored (the run "
                    "continues correctly but not bit-for-bit as the uninterrupted one)", source, len(states),
                    info.world_size)
        return False
    restore_rng(states[info.rank])
    return True


# ----------------------------------------------------------------------------- stop / save decisions


class RunControl:
    """After-step decisions shared by every training loop.

    ``after_step(epoch, step_in_epoch, global_step)`` returns nothing; it calls ``save(epoch,
    steps_done_in_epoch)`` (which returns the checkpoint path; every rank calls it, rank 0 writes)
    when a mid-epoch checkpoint is due, and raises :class:`Preempted` after saving when a stop
    signal arrived on any rank.
    """

    def __init__(self, info: DistInfo, save: Callable[[int, int], str | None] | None, *,
                 save_every_steps: int = 0, save_every_minutes: float = 0.0, steps_per_epoch: int):
        self.info, self.save = info, save
        self.save_every_steps, self.save_every_minutes = save_every_steps, save_every_minutes
        self.steps_per_epoch = steps_per_epoch
        self.last_checkpoint: str | None = None
        self._signal: str | None = None
        self._previous: dict[int, Any] = {}
        self._last_save = time.monotonic()
        self._group = None
        if info.world_size > 1 and dist.is_initialized():
            # A gloo group for host-side flags: under NCCL it keeps the decision off the GPU stream.
            self._group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD

    # signals ---------------------------------------------------------------------------------------
    def install(self) -> "RunControl":
        """Catch SIGTERM / SIGUSR1 (main thread only): finish the step, save, exit EXIT_PREEMPTED."""
        if threading.current_thread() is not threading.main_thread():
            return self
        for name in STOP_SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002
        if self._signal is None:
            self._signal = signal.Signals(signum).name
            log.warning("%s received: finishing this step, then writing a checkpoint and exiting", self._signal)

    def __enter__(self) -> "RunControl":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    # decisions -------------------------------------------------------------------------------------
    def _agree(self, stop: bool, timed: bool) -> tuple[bool, bool]:
        """Any rank's stop; rank 0's clock for timed saves. One all-reduce of two host numbers."""
        if self._group is None:
            return stop, timed
        flags = torch.tensor([float(stop), float(timed and self.info.is_main)])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._group)
        return bool(flags[0]), bool(flags[1])

    def after_step(self, epoch: int, steps_done: int, global_step: int, meter=None) -> None:
        """Called by every rank after each optimizer step; ``steps_done`` counts this epoch's steps so far.

        With the epoch's ``StepMeter``: its last good checkpoint follows our saves, and on a stop
        its pending steps are logged and its bar closed before :class:`Preempted` propagates (every
        rank stops at the same step, so the meter's reductions still pair up)."""
        try:
            self._after_step(epoch, steps_done, global_step)
        except Preempted:
            if meter is not None:
                meter.epoch_stats()
            raise
        if meter is not None and self.last_checkpoint:
            meter.last_good_checkpoint = self.last_checkpoint

    def _after_step(self, epoch: int, steps_done: int, global_step: int) -> None:
        if self.save is None:
            stop, _ = self._agree(self._signal is not None, False)
            if stop:
                raise Preempted(self._signal or "a signal on another rank", None)
            return
        timed = self.save_every_minutes > 0 and time.monotonic() - self._last_save >= 60 * self.save_every_minutes
        stop, timed = self._agree(self._signal is not None, timed)
        by_steps = self.save_every_steps > 0 and global_step % self.save_every_steps == 0
        end_of_epoch = steps_done == self.steps_per_epoch  # the epoch-end save (if due) writes this one
        if (stop or timed or by_steps) and not (end_of_epoch and not stop):
            self.last_checkpoint = self.save(epoch, steps_done)
            self._last_save = time.monotonic()
            if self.last_checkpoint:
                log.info("saved %s (epoch %d, step %d of %d)", self.last_checkpoint, epoch, steps_done,
                         self.steps_per_epoch)
        if stop:
            raise Preempted(self._signal or "a signal on another rank", self.last_checkpoint)
