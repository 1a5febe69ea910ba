"""What a long run needs to stop anywhere and continue as if it never stopped.

- :func:`capture_rng` / :func:`restore_rng`: the python, numpy, torch CPU and CUDA generator states
  of one process, in plain containers that ``torch.load(weights_only=True)`` reads back;
  :func:`gather_rng` collects every rank's onto rank 0 for the checkpoint.
- :data:`stop_signals` (:class:`StopSignals`): this process's SIGTERM / SIGUSR1 / SIGINT handlers,
  installed by the command line as soon as its flags are parsed; a signal is only recorded (the run
  finishes its step), a SIGINT while a stop is already pending (a second Ctrl-C) raises
  ``KeyboardInterrupt`` at once. Data-loader workers ignore all three
  (:func:`mcbeit.data.samplers.loader_worker_init`): the main process alone decides.
- :class:`RunControl`: asked after every step whether to write a mid-epoch checkpoint
  (``--save_ckpt_steps``, ``--save_ckpt_minutes``) or to stop because SLURM / torchrun / the
  user sent a stop signal. Ranks agree through one tiny all-reduce of host flags on a
  gloo group (no GPU sync), so they all save at the same step and all stop together.
- :func:`tell_launcher` / :func:`record_exit`: under ``mcbeit-torchrun`` (:mod:`mcbeit.launch`) a
  stopping rank tells the launcher (so it does not restart the group) and every process records its
  exit status for the launcher's own.

The data side needs nothing saved beyond the position: every sample's randomness is a function of
``(seed, epoch, index)`` (``mcbeit.data.datasets.sample_rng``) and the shuffle of
``(seed, epoch)``, so a resumed epoch skips the batches already trained and draws the same rest.
"""
from __future__ import annotations

import logging
import os
import random
import signal
import threading
import time
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from mcbeit.engine.distributed import DistInfo
from mcbeit.errors import EXIT_INTERRUPTED, TooManyBadImagesError

log = logging.getLogger("mcbeit")

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on a signal after writing a checkpoint; run again to continue
STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")

# What mcbeit-torchrun (mcbeit.launch) exports to its workers: a node-local folder where each worker
# records its exit status, and the launcher's pid, signalled (SIGTERM) by a rank that stops on a signal.
LAUNCH_DIR_ENV = "MCBEIT_LAUNCH_DIR"
LAUNCHER_PID_ENV = "MCBEIT_LAUNCHER_PID"


class Preempted(Exception):
    """The run stopped on a signal after writing ``checkpoint`` (None: nothing to write, e.g. a stop
    before the first step, or a task that writes no checkpoints)."""

    def __init__(self, signame: str, checkpoint: str | None, before_training: bool = False):
        where = ("before training started (nothing new to save); " if before_training else "") + (
            f"continue with the same command (auto-resume): {checkpoint}" if checkpoint
            else "run the same command to continue")
        super().__init__(f"stopped on {signame}; {where}")
        self.signame, self.checkpoint = signame, checkpoint


class StopSignals:
    """This process's stop-signal handlers (one instance, :data:`stop_signals`).

    ``install()`` / ``uninstall()`` nest (the command line installs them before anything is built,
    :class:`RunControl` again around the epochs); the outermost install clears ``received``, the
    outermost uninstall restores the previous handlers. A signal is recorded and logged, nothing else:
    the training loop asks :attr:`received` after each step. A SIGINT while a stop is pending (a
    second Ctrl-C) raises ``KeyboardInterrupt`` where the main thread is: the command line exits with
    status 130 (checkpoint writes are atomic, so nothing is left half-written). An exception raised at an
    arbitrary point can leave a lock of a library (a writer thread's queue, a loader's) held for good, so
    the second Ctrl-C also starts a watchdog (in a command line's process: ``install(hard_exit=True)``): a
    process still alive :data:`HARD_EXIT_AFTER_S` seconds later removes the temporary file of a checkpoint
    being written and ends with status 130 at once. Other
    repeated signals are ignored (torchrun and SLURM forward theirs on top of the user's).
    """

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}
        self._depth = 0
        #: arm the watchdog on a second Ctrl-C (the command line's process only: never a test's or a notebook's)
        self.hard_exit = False

    def install(self, hard_exit: bool | None = None) -> "StopSignals":
        if hard_exit is not None:
            self.hard_exit = bool(hard_exit)
        if threading.current_thread() is not threading.main_thread():
            return self
        if self._depth == 0:
            self.received = None
            for name in STOP_SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._previous[sig] = signal.signal(sig, self._on_signal)
        self._depth += 1
        return self

    def uninstall(self) -> None:
        if threading.current_thread() is not threading.main_thread() or self._depth == 0:
            return
        self._depth -= 1
        if self._depth == 0:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
            self._previous.clear()

    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = name
            again = " (Ctrl-C again to stop at once, losing the steps since the last checkpoint)" \
                if name == "SIGINT" else ""
            log.warning("%s received: finishing this step, then writing a checkpoint and exiting%s", name, again)
        elif name == "SIGINT":
            if self.hard_exit:
                _exit_unless_stopped_within(HARD_EXIT_AFTER_S)
            log.warning("SIGINT while stopping on %s: stopping at once (checkpoints already written are whole; "
                        "the steps since the newest one are lost)", self.received)
            raise KeyboardInterrupt


stop_signals = StopSignals()

#: seconds a process may take to unwind after a second Ctrl-C before the watchdog ends it
HARD_EXIT_AFTER_S = 10.0


def _exit_unless_stopped_within(seconds: float) -> None:
    """Start (once) a daemon timer that ends this process with status 130 if it is still alive after ``seconds``,
    first removing the temporary file of a checkpoint write in progress (the written ones are whole). It writes
    to stderr with ``os.write`` and takes no lock: whatever hangs the unwinding may hold them."""
    global _watchdog
    if _watchdog is not None:
        return

    def hard_exit() -> None:
        from mcbeit.engine.checkpoint import WRITING

        for tmp in list(WRITING):
            try:
                os.unlink(tmp)
            except OSError:
                pass
        try:
            record_exit(EXIT_INTERRUPTED)
        except Exception:  # noqa: BLE001 - the launcher's record is best effort here
            pass
        os.write(2, f"still running {seconds:g} s after the second Ctrl-C: exiting now (status {EXIT_INTERRUPTED}; "
                    "checkpoints already written are whole)\n".encode())
        os._exit(EXIT_INTERRUPTED)

    _watchdog = threading.Timer(seconds, hard_exit)
    _watchdog.daemon = True
    _watchdog.start()


_watchdog: threading.Timer | None = None


def _launch_record(kind: str, value: str) -> None:
    """Write ``<restart>-<local rank>.<kind>`` in mcbeit-torchrun's folder (no-op when not under it)."""
    folder = os.environ.get(LAUNCH_DIR_ENV)
    if not folder or not os.path.isdir(folder):
        return
    name = f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}-{os.environ.get('LOCAL_RANK', '0')}.{kind}"
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(value)
        os.replace(tmp, os.path.join(folder, name))   # the launcher never reads half a record
    except OSError as exc:
        log.warning("could not record %s for the launcher in %s: %s", kind, folder, exc)


def record_start() -> None:
    """Under mcbeit-torchrun: this worker's pid, so the launcher can forward a second Ctrl-C."""
    _launch_record("pid", str(os.getpid()))


def record_exit(status: int) -> None:
    """Under mcbeit-torchrun: this worker's exit status, read by the launcher for its own."""
    _launch_record("exit", str(int(status)))


def tell_launcher(reason: str) -> None:
    """Under mcbeit-torchrun: this rank stops on a signal, so the launcher must stop the group (not restart
    it). Called when the ranks agree to stop, before the checkpoint is written, so the launcher knows
    before any worker exits."""
    _launch_record("stopping", reason)
    pid = os.environ.get(LAUNCHER_PID_ENV)
    if pid and pid.isdigit():
        try:
            os.kill(int(pid), signal.SIGTERM)
        except OSError as exc:  # the launcher is gone: nothing to tell
            log.debug("launcher %s not signalled: %s", pid, exc)


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
        self._last_save = time.monotonic()
        self._told = False
        self._data_counts = (0, 0)   # this rank's (files skipped, images) since the last agreement
        self.agreed_counts = (0, 0)  # the last agreement's sums over ranks
        self._group = None
        if info.world_size > 1 and dist.is_initialized():
            # A gloo group for host-side flags: under NCCL it keeps the decision off the GPU stream.
            self._group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD

    # signals ---------------------------------------------------------------------------------------
    @property
    def _signal(self) -> str | None:
        return stop_signals.received

    def install(self) -> "RunControl":
        """Catch SIGTERM / SIGUSR1 / SIGINT (main thread only; :data:`stop_signals`): finish the step,
        save, exit EXIT_PREEMPTED."""
        stop_signals.install()
        return self

    def uninstall(self) -> None:
        stop_signals.uninstall()

    def __enter__(self) -> "RunControl":
        """Install the handlers; a stop that arrived while the run was being set up (joining the group,
        indexing data, building the model) ends the run here, before its first step, with
        :class:`Preempted` on every rank (one agreement, so a signal on one rank stops them all)."""
        self.install()
        try:
            reason, _ = self._stop_agreed(False)
            if reason:
                raise Preempted(reason, None, before_training=True)
        except BaseException:
            self.uninstall()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.uninstall()

    # decisions -------------------------------------------------------------------------------------
    def _agree(self, stop: bool, timed: bool) -> tuple[bool, bool]:
        """Any rank's stop; rank 0's clock for timed saves; and the data counts :meth:`after_step`
        queued (this rank's unreadable files skipped and images delivered since the last agreement)
        summed over ranks into :attr:`agreed_counts`. One all-reduce (a sum) of four host numbers:
        the bad-data check rides on the stop decision, with no collective or device read of its own."""
        mine, self._data_counts = self._data_counts, (0, 0)
        if self._group is None:
            self.agreed_counts = mine
            return stop, timed
        flags = torch.tensor([float(stop), float(timed and self.info.is_main), *map(float, mine)],
                             dtype=torch.float64)                      # exact integer sums up to 2**53
        dist.all_reduce(flags, op=dist.ReduceOp.SUM, group=self._group)
        self.agreed_counts = (int(flags[2]), int(flags[3]))
        return bool(flags[0] > 0), bool(flags[1] > 0)

    def after_step(self, epoch: int, steps_done: int, global_step: int, meter=None) -> None:
        """Called by every rank after each optimizer step; ``steps_done`` counts this epoch's steps so far.

        With the epoch's ``StepMeter``: its last good checkpoint follows our saves, its bad-data
        counts are summed over ranks in the same agreement (a stop for bad data saves first, like
        a signal, then raises :class:`TooManyBadImagesError` naming the checkpoint), and on a stop
        its pending steps are logged and its bar closed before the exception propagates (every
        rank stops at the same step, so the meter's reductions still pair up)."""
        if meter is not None:
            self._data_counts = meter.take_unshared()
        try:
            self._after_step(epoch, steps_done, global_step, meter)
        except Preempted:
            if meter is not None:
                meter.epoch_stats()
            raise
        except TooManyBadImagesError:
            if meter is not None:
                meter.close()
            raise
        if meter is not None and self.last_checkpoint:
            meter.last_good_checkpoint = self.last_checkpoint

    def _stop_agreed(self, timed: bool) -> tuple[str | None, bool]:
        """(why the ranks stop, or None; whether a timed save is due); on a stop the launcher is told
        (mcbeit-torchrun: do not restart), before anything is saved."""
        mine = self._signal  # read before agreeing: the launcher's forwarded SIGTERM may land during it
        stop, timed = self._agree(mine is not None, timed)
        if not stop:
            return None, timed
        reason = mine or "a signal on another rank"
        if not self._told:
            self._told = True
            tell_launcher(reason)
        return reason, timed

    def _after_step(self, epoch: int, steps_done: int, global_step: int, meter=None) -> None:
        if self.save is None:
            reason, _ = self._stop_agreed(False)
            bad = meter.shared_counts(*self.agreed_counts) if meter is not None else None
            if bad is not None:
                raise bad  # this task writes no checkpoints
            if reason:
                raise Preempted(reason, None)
            return
        timed = self.save_every_minutes > 0 and time.monotonic() - self._last_save >= 60 * self.save_every_minutes
        reason, timed = self._stop_agreed(timed)
        bad = meter.shared_counts(*self.agreed_counts) if meter is not None else None  # the same on every rank
        stop = reason is not None or bad is not None
        by_steps = self.save_every_steps > 0 and global_step % self.save_every_steps == 0
        end_of_epoch = steps_done == self.steps_per_epoch  # the epoch-end save (if due) writes this one
        if (stop or timed or by_steps) and not (end_of_epoch and not stop):
            self.last_checkpoint = self.save(epoch, steps_done)
            self._last_save = time.monotonic()
            if self.last_checkpoint:
                log.info("saved %s (epoch %d, step %d of %d)", self.last_checkpoint, epoch, steps_done,
                         self.steps_per_epoch)
        if bad is not None:
            saved = (f"the {steps_done} steps of epoch {epoch} trained so far are saved in {self.last_checkpoint}: "
                     "the same command continues from there" if self.last_checkpoint
                     else "nothing was saved (no --output_dir)")
            raise TooManyBadImagesError(f"{bad}. Stopped at once: {saved}")
        if reason:
            raise Preempted(reason, self.last_checkpoint)
