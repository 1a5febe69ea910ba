"""Timing and peak memory, the same way for the product and the reference.

Time: wall clock between phase marks, the device synchronised at each mark (CUDA), median over
steps. Peak memory of a step: the most tensor memory it held at once beyond what was allocated
before it. On CUDA ``max_memory_allocated``; on the CPU the same count from torch.profiler's
allocation events (every allocation and free, in order), so the figure is the tensors' own bytes,
independent of how the C allocator happens to hold pages (the process's resident-set peak moved by
hundreds of MB between identical steps). ``prepare()`` runs first, outside the measurement: the
callers drop the previous step's gradients, whose frees the profiler could not attribute.
"""
from __future__ import annotations

import contextlib
import gc
import os
import statistics
import sys
import time
from collections import defaultdict
from typing import Callable

import torch

PHASES = ("tokenizer", "forward", "loss", "backward", "optimizer")


def quiet_loggers(*names: str) -> Callable[[], object]:
    """Silence these loggers below ERROR (the 'RANDOM weights' warnings of a benchmark that means them);
    returns the function that restores their levels."""
    import logging

    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    return lambda: [lg.setLevel(level) for lg, level in zip(loggers, levels, strict=True)]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseTimer:
    """``mark(phase)`` records the time since the previous mark; ``start()`` begins a step."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: dict[str, list[float]] = defaultdict(list)
        self._last = 0.0
        self._step: dict[str, float] = {}

    def start(self) -> None:
        synchronize(self.device)
        self._step = {}
        self._last = time.perf_counter()

    def mark(self, phase: str) -> None:
        synchronize(self.device)
        now = time.perf_counter()
        self._step[phase] = self._step.get(phase, 0.0) + now - self._last
        self._last = now

    def stop(self, keep: bool = True) -> None:
        if keep:
            for phase, seconds in self._step.items():
                self.times[phase].append(seconds)
            self.times["step"].append(sum(self._step.values()))

    def last_step(self) -> float:
        """Seconds of the step just timed (kept or not)."""
        return sum(self._step.values())

    def medians(self) -> dict[str, float]:
        return {phase: statistics.median(values) for phase, values in self.times.items()}


@contextlib.contextmanager
def _quiet_stderr():
    """Kineto prints start/stop lines on the C stderr for every profiling session."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory(run: Callable[[], object], device: torch.device,
                prepare: Callable[[], object] | None = None) -> int:
    """Bytes of tensors ``run()`` held at its peak beyond those allocated before it."""
    if prepare is not None:
        prepare()
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    held = peak = 0
    for _, nbytes in events:  # + allocation, - free
        held += nbytes
        peak = max(peak, held)
    return peak


def count_flops(run: Callable[[], object]) -> int:
    """FLOPs (2 x multiply-adds) of the matrix products and convolutions ``run()`` executes, forward
    and backward, recomputation included (torch.utils.flop_counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


# Dense bf16 / fp16 tensor-core peaks (FLOP/s) by device name, for model FLOPs utilisation.
_GPU_PEAKS = (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12), ("A10", 125e12),
              ("L4", 121e12), ("V100", 125e12), ("4090", 165e12), ("3090", 71e12))


def peak_flops(device: torch.device) -> float | None:
    """The GPU's dense bf16 peak (None on the CPU or for a GPU this table does not know)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in _GPU_PEAKS if key in name), None)
