"""The bad-data policy: how many unreadable images a run accepts before it stops (exit status 4).

The datasets skip a file that does not decode and count it (``n_skipped``); they give up with
:class:`TooManyBadImagesError` after ``MAX_CONSECUTIVE_BAD`` in a row. The engine sums the counts of
an epoch over the ranks and calls :func:`check_bad_fraction`, which stops the run once more than
``--max_bad_fraction`` of the files read were unreadable.

The error lives in :mod:`mcbeit.errors`, so that the data layer raises it without importing the engine.
"""
from __future__ import annotations

from mcbeit.errors import TooManyBadImagesError

__all__ = ["TooManyBadImagesError", "check_bad_fraction"]


def check_bad_fraction(skipped: int, seen: int, max_fraction: float, where: str = "in this epoch") -> None:
    """Raise :class:`TooManyBadImagesError` when too large a share of the images read was unreadable.

    ``skipped``: the unreadable files skipped (the sum of the items' ``n_skipped``); ``seen``:
    the samples delivered, each one readable image. Of the ``skipped + seen`` files read, the
    share ``skipped / (skipped + seen)`` may be at most ``max_fraction``; reaching it exactly is
    fine, 0 allows no bad file and 1 disables the check. ``where`` completes "N of M images ..."
    in the message (e.g. "in epoch 3"). Call it with the same (all-reduced) counts on every
    rank, so that all of them stop together.
    """
    if not 0.0 <= max_fraction <= 1.0:  # also refuses NaN
        raise ValueError(f"--max_bad_fraction must be between 0 and 1, got {max_fraction}")
    if skipped < 0 or seen < 0:
        raise ValueError(f"image counts cannot be negative (skipped={skipped}, seen={seen})")
    total = skipped + seen
    if max_fraction >= 1.0 or skipped == 0 or skipped / total <= max_fraction:
        return  # skipped / total is correctly rounded: 29 of 100 equals 0.29 exactly
    scope = f" {where}" if where else ""
    raise TooManyBadImagesError(
        f"{skipped} of {total} images{scope} ({100.0 * skipped / total:.3g}%) were unreadable, more than "
        f"--max_bad_fraction {max_fraction:g}; the skipped files are listed in the warnings above: fix or "
        "remove them, or raise --max_bad_fraction (1 disables this check)"
    )
