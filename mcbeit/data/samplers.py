"""The training loader, and the sampler wrapper that tags every index with the epoch, so a
sample's randomness is a function of ``(seed, epoch, index)`` and not of the worker that happens
to load it."""

from __future__ import annotations

import functools
import itertools
import signal
import sys
from collections.abc import Callable, Iterator, Sized

import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from mcbeit.errors import InputError

__all__ = ["EpochTaggedSampler", "ShardSampler", "StreamSampler", "build_eval_loader", "build_stream_loader",
           "build_train_loader", "loader_worker_init"]

#: the signals a run stops on (mcbeit.engine.control.STOP_SIGNALS); data-loader workers ignore them
_STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")


def _quiet_when_the_reader_left(exc_type, exc, tb, _default=sys.excepthook) -> None:
    """``sys.excepthook`` of a loader worker: drop the connection error of a batch nobody collects.

    A worker hands each batch's shared memory to the main process through multiprocessing's
    ``resource_sharer`` thread, which reports any error through ``sys.excepthook``. When the main
    process stops at once (a second Ctrl-C) while it is collecting a batch, that thread's socket is
    reset and Python would print a 15-line traceback for a batch that is no longer wanted. Every
    other exception is reported as before."""
    frames, t = [], tb
    while t is not None:
        frames.append(t.tb_frame.f_code.co_filename)
        t = t.tb_next
    if issubclass(exc_type, ConnectionError) and any(f.endswith("resource_sharer.py") for f in frames):
        return
    _default(exc_type, exc, tb)


def _ignore_stop_signals(worker_id: int, then: Callable[[int], None] | None = None) -> None:
    for name in _STOP_SIGNALS:
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, signal.SIG_IGN)
    sys.excepthook = _quiet_when_the_reader_left
    if then is not None:
        then(worker_id)


def loader_worker_init(then: Callable[[int], None] | None = None) -> Callable[[int], None]:
    """A DataLoader ``worker_init_fn`` that makes the worker ignore SIGTERM / SIGUSR1 / SIGINT, then runs ``then``.

    SLURM, ``kill -TERM -PGID``, torchrun's shutdown and a terminal's Ctrl-C signal the whole process
    group, loader workers included; left to the default action they die first and the main process's
    DataLoader raises ("worker ... killed by signal") before it can save. Ignoring them leaves the
    decision to the main process, which finishes its step, saves and shuts the workers down as usual
    (they also exit by themselves within seconds when the main process dies: DataLoader's watchdog).
    Picklable (a module function, or a partial of one), for the spawn start method too."""
    return _ignore_stop_signals if then is None else functools.partial(_ignore_stop_signals, then=then)


class EpochTaggedSampler(Sampler[tuple[int, int]]):
    """Yields ``(index, epoch)`` for every index of the wrapped sampler.

    ``set_epoch(e)`` must be called before each epoch (as for ``DistributedSampler``); it is
    forwarded to the wrapped sampler when that has ``set_epoch`` (so its shuffle changes too).
    ``set_epoch(e, start=k)`` skips the first ``k`` indices of this rank's order for that epoch:
    a run resumed mid-epoch continues with exactly the samples the uninterrupted run would see.
    """

    def __init__(self, sampler: Sampler[int] | Sized, epoch: int = 0) -> None:
        self.sampler = sampler
        self.epoch = int(epoch)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = int(epoch), int(start)
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(self.epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        for position, index in enumerate(self.sampler):
            if position >= self.start:  # the order is computed whole (a permutation); skipping costs nothing
                yield int(index), epoch

    def __len__(self) -> int:
        return max(len(self.sampler) - self.start, 0)

    def __repr__(self) -> str:
        return f"EpochTaggedSampler({self.sampler.__class__.__name__}, epoch={self.epoch})"


def build_train_loader(dataset, batch_size: int, num_workers: int, pin_memory: bool, seed: int, world_size: int,
                       rank: int, batches_per_step: int = 1) -> tuple[DataLoader, EpochTaggedSampler, int]:
    """Shuffled, rank-sharded, epoch-tagged loader of whole batches; returns (loader, sampler, steps per epoch).

    A step is ``batches_per_step`` batches per rank (gradient accumulation, ``--update_freq``);
    an epoch is ``len(dataset) // (batch_size * batches_per_step * world_size)`` steps (the rest
    is dropped, as the originals do). Fewer images than one step is an error that says what to change.
    """
    steps = len(dataset) // (batch_size * batches_per_step * world_size)
    if steps == 0:
        step = f"one batch of {batch_size} per process" + (
            f" x {batches_per_step} accumulated batches (--update_freq)" if batches_per_step > 1 else "")
        raise InputError(f"the dataset has {len(dataset)} images, fewer than {step} x {world_size} processes; "
                         f"lower --batch_size{' or --update_freq' if batches_per_step > 1 else ''} or add images")
    sampler = EpochTaggedSampler(DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                                    seed=seed, drop_last=True))
    workers = max(0, num_workers)
    # Its own generator: starting an epoch's iterator then leaves the global torch RNG (drop path,
    # dropout) alone, so a resumed run draws what the uninterrupted one drew. Samples do not depend
    # on worker seeds (see EpochTaggedSampler).
    generator = torch.Generator().manual_seed(int(seed) + 7919 * int(rank))
    loader = DataLoader(dataset, sampler=sampler, batch_size=batch_size, num_workers=workers, pin_memory=pin_memory,
                        drop_last=True, persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
                        generator=generator, worker_init_fn=loader_worker_init())
    return loader, sampler, steps


class StreamSampler(Sampler[tuple[int, int]]):
    """An endless stream of ``(index, data_epoch)`` cut into rounds, for training counted in iterations.

    This rank's stream is its ``DistributedSampler`` order of data epoch 0 (shuffled with ``seed``), then of data
    epoch 1, and so on; the engine's epoch ``r`` (a *round* of ``per_round`` samples, e.g. the 16,000 iterations
    between two evaluations) is positions ``[r * per_round, (r + 1) * per_round)`` of it.
    ``set_epoch(r, start=k)`` skips the first ``k`` of the round: a run resumed mid-round continues with exactly
    the samples the uninterrupted run would see. Every index is tagged with its data epoch, so a sample's
    augmentation is a function of ``(seed, data epoch, index)`` (mmseg's iteration runner instead re-creates its
    workers with the same seeds on every pass over the data, repeating their random streams).
    """

    def __init__(self, length: int, per_round: int, world_size: int = 1, rank: int = 0, seed: int = 0) -> None:
        if length <= 0:
            raise InputError("the dataset is empty: there is nothing to train on")
        self.sampler = DistributedSampler(range(length), num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                          drop_last=False)  # padded: every rank has samples, however few there are
        self.per_round, self.round, self.start = int(per_round), 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.round, self.start = int(epoch), int(start)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        per_epoch = len(self.sampler)                              # this rank's samples per pass over the data
        position = self.round * self.per_round + self.start       # in this rank's stream
        end = (self.round + 1) * self.per_round
        while position < end:
            data_epoch, offset = divmod(position, per_epoch)
            self.sampler.set_epoch(data_epoch)
            for index in itertools.islice(iter(self.sampler), offset, offset + end - position):
                yield int(index), data_epoch
            position += min(per_epoch - offset, end - position)

    def __len__(self) -> int:
        return max(self.per_round - self.start, 0)


def build_stream_loader(dataset, batch_size: int, updates_per_round: int, num_workers: int, pin_memory: bool,
                        seed: int, world_size: int, rank: int, batches_per_step: int = 1
                        ) -> tuple[DataLoader, StreamSampler]:
    """The loader of :class:`StreamSampler` rounds of ``updates_per_round`` updates (each ``batches_per_step``
    batches of ``batch_size`` on this rank): whole batches, the data epochs running on without a seam."""
    sampler = StreamSampler(len(dataset), updates_per_round * batch_size * batches_per_step, world_size, rank, seed)
    workers = max(0, num_workers)
    generator = torch.Generator().manual_seed(int(seed) + 7919 * int(rank))
    loader = DataLoader(dataset, sampler=sampler, batch_size=batch_size, num_workers=workers, pin_memory=pin_memory,
                        drop_last=True, persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
                        generator=generator, worker_init_fn=loader_worker_init())
    return loader, sampler


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...`` in order: every sample exactly once over all ranks
    (unlike ``DistributedSampler``, which pads with duplicates), for exact distributed evaluation."""

    def __init__(self, length: int, world_size: int, rank: int) -> None:
        self.length, self.world_size, self.rank = int(length), int(world_size), int(rank)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))


def build_eval_loader(dataset, batch_size: int, num_workers: int, pin_memory: bool, world_size: int = 1,
                      rank: int = 0) -> DataLoader:
    """In-order loader of ``dataset`` (this rank's shard when ``world_size`` > 1), all samples kept."""
    workers = max(0, num_workers)
    return DataLoader(dataset, sampler=ShardSampler(len(dataset), world_size, rank), batch_size=batch_size,
                      num_workers=workers, pin_memory=pin_memory, drop_last=False, worker_init_fn=loader_worker_init())
