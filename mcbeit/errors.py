"""The exceptions library code raises, and the exit status the command line gives each.

Library code (everything below ``mcbeit/cli``) raises; it never calls ``sys.exit`` nor raises
``SystemExit``. The command-line layer (``mcbeit.cli``, with the engine's mapping
``mcbeit.engine.exits``) turns an exception into a message and one of these exit statuses:

====  ======================================================================================
0     the run finished
1     wrong input (:class:`InputError`): a missing folder or file, a checkpoint that does not
      fit, flags that contradict each other; the message names it and says what to pass instead
2     a command line argparse cannot parse (an unknown flag, a value of the wrong type)
3     the run diverged: non-finite losses or gradients (the message names the last good checkpoint)
4     too many unreadable images in an epoch (their paths are in the warnings)
5     another process hung past ``--dist_timeout`` or died
75    stopped on a signal after writing a checkpoint: run the same command again to continue
130   stopped at once by a second Ctrl-C (SIGINT while stopping): checkpoints already written are
      whole, the steps since the newest one are lost
====  ======================================================================================

This module imports nothing of the package, so every layer can raise these.
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_INPUT = 1
EXIT_USAGE = 2
EXIT_DIVERGED = 3
EXIT_BAD_DATA = 4
EXIT_PEER_LOST = 5
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: a scheduler's requeue rule can match it
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for a process Ctrl-C ended


class McbeitError(Exception):
    """Base of the package's own exceptions."""


class InputError(McbeitError):
    """Wrong input: a flag's value, a folder, a file or a checkpoint the run cannot use.

    The message names the flag or file and says what to pass instead; the command line prints it
    without a traceback and exits with :data:`EXIT_INPUT`.
    """


class ConfigError(InputError, ValueError):
    """Flags whose values are out of range or contradict each other."""


class TooManyBadImagesError(McbeitError, RuntimeError):
    """More unreadable images than a run accepts: ``--max_bad_fraction`` of an epoch, or too many in a
    row (:mod:`mcbeit.engine.bad_data`); the command line exits with :data:`EXIT_BAD_DATA`."""
