"""`mcbeit-torchrun` (``python -m mcbeit.launch``): torchrun whose own exit status says "preempted,
checkpoint written, run me again" (75), so a scheduler's requeue rule can match it.

Plain torchrun cannot: its workers run in sessions of their own, so a signal to the launcher's
process group reaches the launcher alone; it forwards the signal to the workers (who finish their
step, save and exit 75), but then exits 1 with a traceback, and with ``--max-restarts`` > 0 it
restarts a group that stopped because it was told to. SIGUSR1 (SLURM's warning signal) is not
among the signals it handles: it kills the launcher outright.

This is torchrun itself (its argument parser and ``run``: :func:`torch.distributed.run.get_args_parser`
and :func:`torch.distributed.run.run`), with the same flags and these differences:

- ``--signals_to_handle`` defaults to SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1. SIGTERM, SIGINT and
  SIGUSR1 are handled here (always SIGTERM): the first one stops the group gracefully, i.e. the
  workers get SIGTERM (finish the step, save, exit 75); a second SIGINT (a second Ctrl-C) is
  forwarded to the workers as SIGINT, which stops them at once (status 130). The others stay
  torchrun's (forwarded as they are).
- ``--shutdown_timeout`` defaults to :data:`DEFAULT_SHUTDOWN_TIMEOUT` seconds (torchrun: 30): how long
  the workers have, after the stop, to finish their step and write the checkpoint before SIGKILL.
- A rank that stops on a signal of its own (SLURM signals every task; ``kill`` to one rank) tells
  the launcher (:func:`mcbeit.engine.control.tell_launcher`: SIGTERM to the pid in
  ``MCBEIT_LAUNCHER_PID``) when the ranks agree to stop, before saving. The launcher then stops the
  group like any stop: a stopped group is never restarted, whatever ``--max-restarts`` says (restarts
  remain for failures: a killed or hung rank).
- Exit status: 75 when the workers stopped on a signal having written their checkpoint: a
  ``ChildFailedError`` whose failures all have exit status 75, or a stop at the launcher after
  which every local worker recorded 75 (or 0: finished); 130 when a second Ctrl-C stopped them at
  once; 0 when they finished; otherwise torchrun's own (1, with its traceback and error file).
  The statuses are learnt without torch internals: every worker process (``mcbeit.cli``) writes
  its pid when it starts and its exit status when it ends in a node-local folder whose path this
  launcher exports as ``MCBEIT_LAUNCH_DIR`` (removed at exit).
"""
from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from mcbeit.engine.control import LAUNCH_DIR_ENV, LAUNCHER_PID_ENV
from mcbeit.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_PREEMPTED

#: SIGTERM,SIGINT,SIGHUP,SIGQUIT (torchrun's) and SIGUSR1 (SLURM's --signal=USR1@N warning)
DEFAULT_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
#: Seconds the workers get, after a stop, to finish their step and write the checkpoint before the
#: launcher kills them. A step of a large model (ViT-L/g with gradient accumulation: tens of
#: seconds) plus writing its checkpoint (weights + AdamW state: 4-12 GB, over a shared file system
#: at 50-200 MB/s: one to four minutes) fits in 300 s; torchrun's 30 s does not. The scheduler's own
#: grace (SLURM's KillWait after SIGTERM, or ``--signal=USR1@N``) still bounds it: ask for enough.
DEFAULT_SHUTDOWN_TIMEOUT = 300
_HANDLED_HERE = ("SIGTERM", "SIGINT", "SIGUSR1")


def _say(message: str) -> None:
    print(f"mcbeit-torchrun: {message}", file=sys.stderr, flush=True)


def get_args_parser():
    """torchrun's parser with this launcher's defaults (a ``PET_*`` environment variable still wins,
    as in torchrun)."""
    from torch.distributed.run import get_args_parser as torchrun_parser

    parser = torchrun_parser()
    parser.prog = "mcbeit-torchrun"
    parser.description = ("torchrun for mcbeit runs: the same flags; exits 75 when the workers stopped on a signal "
                          f"after writing their checkpoint. Defaults changed: --signals_to_handle {DEFAULT_SIGNALS}, "
                          f"--shutdown_timeout {DEFAULT_SHUTDOWN_TIMEOUT}. See mcbeit/launch.py.")
    defaults = {}
    if "PET_SIGNALS_TO_HANDLE" not in os.environ:
        defaults["signals_to_handle"] = DEFAULT_SIGNALS
    if "PET_SHUTDOWN_TIMEOUT" not in os.environ and "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" not in os.environ:
        defaults["shutdown_timeout"] = DEFAULT_SHUTDOWN_TIMEOUT
    parser.set_defaults(**defaults)
    for action in parser._actions:  # the help says torchrun's defaults: say ours
        if action.dest == "signals_to_handle":
            action.help = (f"Comma-separated signals that stop the workers (default {DEFAULT_SIGNALS}). SIGTERM, SIGINT "
                           "and SIGUSR1 (SIGTERM always) are handled by mcbeit-torchrun: the workers get SIGTERM, "
                           "a second SIGINT stops them at once; the others are forwarded as they are.")
        elif action.dest == "shutdown_timeout":
            action.help = (f"Seconds the workers get to finish their step and write a checkpoint after a stop, before "
                           f"SIGKILL (default {DEFAULT_SHUTDOWN_TIMEOUT}; torchrun's is 30).")
    return parser


class WorkerRecords:
    """What this node's workers wrote in the launch folder: ``<restart>-<local rank>.pid`` when they
    started, ``.stopping`` when they agreed to stop on a signal, ``.exit`` with their status (see
    :mod:`mcbeit.engine.control`). Only the newest restart counts."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def newest_restart(self) -> int | None:
        restarts = [int(p.stem.partition("-")[0]) for p in self.folder.glob("*.pid") if p.stem.partition("-")[0].isdigit()]
        return max(restarts) if restarts else None

    def _of_newest(self, kind: str) -> dict[str, str]:
        newest = self.newest_restart()
        if newest is None:
            return {}
        return {p.stem.partition("-")[2]: p.read_text().strip() for p in self.folder.glob(f"{newest}-*.{kind}")}

    def started(self) -> dict[str, int]:
        return {rank: int(pid) for rank, pid in self._of_newest("pid").items() if pid.isdigit()}

    def exits(self) -> dict[str, int]:
        return {rank: int(code) for rank, code in self._of_newest("exit").items() if code.lstrip("-").isdigit()}

    def stopping(self) -> dict[str, str]:
        return self._of_newest("stopping")

    def running(self) -> list[int]:
        done = self.exits()
        return [pid for rank, pid in self.started().items() if rank not in done]

    def status_after_stop(self) -> int | None:
        """The launcher's status after a stop: 75 / 130 / 0 from the workers' records, None when some
        worker left none (it was killed, e.g. after --shutdown_timeout) or none started."""
        started, exits = self.started(), self.exits()
        if not started or set(started) - set(exits):
            return None
        codes = set(exits[rank] for rank in started)
        if codes <= {EXIT_OK}:
            return EXIT_OK
        if codes <= {EXIT_OK, EXIT_PREEMPTED}:
            return EXIT_PREEMPTED
        if EXIT_INTERRUPTED in codes and codes <= {EXIT_OK, EXIT_PREEMPTED, EXIT_INTERRUPTED}:
            return EXIT_INTERRUPTED
        return None


class StopHandler:
    """The launcher's handler of SIGTERM / SIGINT / SIGUSR1 (installed before torchrun starts anything;
    torchrun is not given these, so it never replaces it).

    The first signal raises torchrun's ``SignalException`` with SIGTERM: its agent forwards SIGTERM
    to every worker's process group, waits ``--shutdown_timeout`` seconds, kills what is left, and
    never restarts. A SIGINT after that (a second Ctrl-C) goes to the running workers as SIGINT: they
    stop at once. Other repeats are ignored; so is anything once the run has ended."""

    def __init__(self, records: WorkerRecords, timeout: int):
        self.records, self.timeout = records, timeout
        self.stopping: str | None = None
        self.done = False

    def install(self, names: Sequence[str]) -> None:
        for name in names:
            signal.signal(getattr(signal, name), self)

    def __call__(self, signum, frame) -> None:  # noqa: ARG002
        from torch.distributed.elastic.multiprocessing import SignalException

        sig = signal.Signals(signum)
        if self.done:
            return
        if self.stopping is None:
            ranks = self.records.stopping()
            self.stopping = (f"{', '.join(sorted(set(ranks.values())))} (local rank {', '.join(sorted(ranks))})"
                             if ranks and sig == signal.SIGTERM else sig.name)
            _say(f"stopping on {self.stopping}: stopping the workers (SIGTERM: finish the step, write a checkpoint; up to "
                 f"{self.timeout} s), not restarting them" + ("; Ctrl-C again to stop them at once"
                                                               if sig == signal.SIGINT else ""))
            raise SignalException(f"Process {os.getpid()} got signal: {sig}", sigval=signal.SIGTERM)
        if sig == signal.SIGINT:
            running = self.records.running()
            _say(f"SIGINT again: stopping the workers at once ({len(running)} running)")
            for pid in running:
                try:
                    os.kill(pid, signal.SIGINT)
                except OSError:
                    pass


def _torchrun_signals(requested: str) -> str:
    """The part of ``--signals_to_handle`` left to torchrun: what this launcher does not handle itself."""
    rest = [s.strip() for s in requested.split(",") if s.strip() and s.strip() not in _HANDLED_HERE]
    return ",".join(rest)


def _quiet_empty_signal_list() -> None:
    """torchrun warns (with a traceback) that it cannot register signal "" when it is left no signal."""
    import logging

    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(
        lambda record: not (str(record.msg).startswith("Failed to register signal handler") and record.args == ("",)))


def launch(argv: Sequence[str] | None = None) -> int:
    """Run torchrun on ``argv``; return this launcher's exit status (see the module docstring); torchrun's
    own failures propagate as its exceptions."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import run

    args = get_args_parser().parse_args(argv)
    requested = [s.strip() for s in args.signals_to_handle.split(",") if s.strip()]
    here = ["SIGTERM"] + [s for s in requested if s in _HANDLED_HERE and s != "SIGTERM"]
    args.signals_to_handle = _torchrun_signals(args.signals_to_handle)
    if not args.signals_to_handle:
        _quiet_empty_signal_list()
    folder = tempfile.mkdtemp(prefix="mcbeit-launch-")
    os.environ[LAUNCH_DIR_ENV], os.environ[LAUNCHER_PID_ENV] = folder, str(os.getpid())
    records = WorkerRecords(folder)
    handler = StopHandler(records, args.shutdown_timeout)
    handler.install(here)
    try:
        try:
            run(args)
            return EXIT_OK
        except ChildFailedError as exc:
            codes = [failure.exitcode for failure in exc.failures.values()]
            if codes and all(code == EXIT_PREEMPTED for code in codes):
                _say(f"the workers stopped on a signal after writing their checkpoint: exit {EXIT_PREEMPTED} "
                     "(run the same command to continue)")
                return EXIT_PREEMPTED
            raise
        except SignalException:
            status = records.status_after_stop()
            if status is None:
                missing = sorted(set(records.started()) - set(records.exits())) or ["(none started)"]
                _say(f"stopped on {handler.stopping}; local rank {', '.join(missing)} left no exit status (killed "
                     f"after --shutdown_timeout {args.shutdown_timeout} s, or not an mcbeit command): torchrun's "
                     "own exit status follows")
                raise
            _say({EXIT_PREEMPTED: f"stopped on {handler.stopping}; every worker wrote its checkpoint: exit 75 (run the "
                                  "same command to continue)",
                  EXIT_INTERRUPTED: f"stopped at once on a second Ctrl-C: exit {EXIT_INTERRUPTED} (checkpoints already "
                                    "written are whole)",
                  EXIT_OK: f"{handler.stopping} received after the workers finished: exit 0"}[status])
            return status
    finally:
        handler.done = True
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import record

    return record(launch)(argv)


def console() -> None:
    sys.exit(main())


if __name__ == "__main__":
    console()
