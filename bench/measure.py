"""Timing and peak memory, the same way for the product and the reference.

Time: wall clock between phase marks, the device synchronised at each mark (CUDA), median over
steps. Peak memory of a step: on CUDA ``max_memory_allocated`` above what was allocated before the
step; on the CPU the process's peak resident set (``VmHWM``, reset through
``/proc/self/clear_refs``) above its resident set before the step, after returning freed heap
memory to the system (``malloc_trim``) so one measurement does not hide in another's leftovers.
"""
from __future__ import annotations

import ctypes
import gc
import statistics
import time
from collections import defaultdict
from typing import Callable

import torch

PHASES = ("tokenizer", "forward", "loss", "backward", "optimizer")


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

    def medians(self) -> dict[str, float]:
        return {phase: statistics.median(values) for phase, values in self.times.items()}


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_LIBC = _libc()


def _status(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def cpu_peak_supported() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status("VmHWM:") is not None
    except OSError:
        return False


def peak_memory(run: Callable[[], object], device: torch.device) -> int | None:
    """Bytes the call ``run()`` needed at its peak beyond what was already allocated (None when
    this system cannot tell)."""
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if _LIBC is None or not cpu_peak_supported():
        return None
    _LIBC.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = _status("VmRSS:")
    run()
    return _status("VmHWM:") - before
