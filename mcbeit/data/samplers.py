"""The training loader, and the sampler wrapper that tags every index with the epoch, so a
sample's randomness is a function of ``(seed, epoch, index)`` and not of the worker that happens
to load it."""

from __future__ import annotations

from collections.abc import Iterator, Sized

from torch.utils.data import DataLoader, DistributedSampler, Sampler

__all__ = ["EpochTaggedSampler", "build_train_loader"]


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


def build_train_loader(dataset, batch_size: int, num_workers: int, pin_memory: bool, seed: int, world_size: int,
                       rank: int) -> tuple[DataLoader, EpochTaggedSampler, int]:
    """Shuffled, rank-sharded, epoch-tagged loader of whole batches; returns (loader, sampler, steps per epoch).

    Every rank gets ``len(dataset) // (batch_size * world_size)`` full batches (the rest of the
    epoch is dropped, as the originals do). Fewer images than one batch per rank is an error that
    says what to change.
    """
    steps = len(dataset) // (batch_size * world_size)
    if steps == 0:
        raise SystemExit(f"the dataset has {len(dataset)} images, fewer than one batch of {batch_size} "
                         f"per process x {world_size} processes; lower --batch_size or add images")
    sampler = EpochTaggedSampler(DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                                    seed=seed, drop_last=True))
    workers = max(0, num_workers)
    loader = DataLoader(dataset, sampler=sampler, batch_size=batch_size, num_workers=workers, pin_memory=pin_memory,
                        drop_last=True, persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None)
    return loader, sampler, steps
