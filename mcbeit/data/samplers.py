"""Sampler wrapper that tags every index with the epoch, so a sample's randomness is a function
of ``(seed, epoch, index)`` and not of the worker that happens to load it."""

from __future__ import annotations

from collections.abc import Iterator, Sized

from torch.utils.data import Sampler

__all__ = ["EpochTaggedSampler"]


class EpochTaggedSampler(Sampler[tuple[int, int]]):
    """Yields ``(index, epoch)`` for every index of the wrapped sampler.

    ``set_epoch(e)`` must be called before each epoch (as for ``DistributedSampler``); it is
    forwarded to the wrapped sampler when that has ``set_epoch`` (so its shuffle changes too).
    """

    def __init__(self, sampler: Sampler[int] | Sized, epoch: int = 0) -> None:
        self.sampler = sampler
        self.epoch = int(epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(self.epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        for index in self.sampler:
            yield int(index), epoch

    def __len__(self) -> int:
        return len(self.sampler)

    def __repr__(self) -> str:
        return f"EpochTaggedSampler({self.sampler.__class__.__name__}, epoch={self.epoch})"
