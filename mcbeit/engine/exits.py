"""From an exception to an exit status: the engine's one mapping (the table is in :mod:`mcbeit.errors`).

:func:`run_guarded` is what every command line's ``main`` calls: it runs the job, logs the stops
that explain themselves and returns their status, lets wrong input (:data:`INPUT_ERRORS`, status 1)
through for the command line to print, and always leaves the process group.
"""
from __future__ import annotations

import gc
import logging
from typing import Any, Callable

from mcbeit.engine.bad_data import TooManyBadImagesError
from mcbeit.engine.control import Preempted
from mcbeit.engine.meter import NonFiniteLossError
from mcbeit.errors import (EXIT_BAD_DATA, EXIT_DIVERGED, EXIT_INTERRUPTED, EXIT_OK, EXIT_PEER_LOST, EXIT_PREEMPTED,
                           InputError)

log = logging.getLogger("mcbeit")

#: wrong input: the message names the flag or file and says what to do (status 1, no traceback); data
#: folders, list files and checkpoints raise subclasses of it
INPUT_ERRORS = (InputError,)

# How gloo / NCCL / the store word a peer that stopped answering (their errors are plain RuntimeErrors)
_PEER_LOST = ("timeout", "timed out", "connection reset", "connection closed", "broken pipe", "pair closure",
              "connection refused")


def peer_lost(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed because another process hung or died."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    return isinstance(exc, dist.DistError) or (isinstance(exc, RuntimeError)
                                               and any(p in str(exc).lower() for p in _PEER_LOST))


def exit_status(exc: BaseException, dist_timeout: float = 30.0) -> int | None:
    """The exit status of a run that stopped with ``exc`` (logged here), or None when it is not one
    of the stops that explain themselves (a bug: the traceback is the message)."""
    if isinstance(exc, NonFiniteLossError):  # the message says what happened and which checkpoint is good
        log.error("%s", exc)
        return EXIT_DIVERGED
    if isinstance(exc, TooManyBadImagesError):
        log.error("%s", exc)
        return EXIT_BAD_DATA
    if isinstance(exc, Preempted):
        log.warning("%s", exc)
        return EXIT_PREEMPTED
    if peer_lost(exc):
        import torch.distributed as dist

        log.error("this process (rank %s) lost the others: %s. Another process hung for more than --dist_timeout "
                  "(%g min) or died (its own log says why). Checkpoints already written are whole; run the same "
                  "command again, or let torchrun --max-restarts restart the group: it resumes from the newest one",
                  dist.get_rank(), str(exc).splitlines()[0][:200], dist_timeout)
        return EXIT_PEER_LOST
    return None


def run_guarded(job: Callable[[], Any], *, dist_timeout: float = 30.0,
                on_exit: Callable[[], None] | None = None) -> int:
    """Run ``job``; return its exit status (see the module docstring)."""
    from mcbeit.engine.distributed import cleanup

    try:
        job()
    except INPUT_ERRORS:  # a data folder without images, a checkpoint that does not fit: the caller says it
        raise
    except KeyboardInterrupt:  # a second Ctrl-C (mcbeit.engine.control.StopSignals): stop at once, no traceback
        log.warning("stopped at once on a second Ctrl-C: checkpoints already written are whole (no temporary file "
                    "is left); run the same command to continue from the newest")
        return EXIT_INTERRUPTED
    except Exception as exc:
        status = exit_status(exc, dist_timeout)
        if status is None:
            raise
        return status
    finally:
        if on_exit is not None:
            on_exit()
        gc.collect()  # wrappers of the process group (DDP, DeepSpeed) go before the group itself
        cleanup()
    return EXIT_OK
