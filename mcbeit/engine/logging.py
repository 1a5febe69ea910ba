"""What a run tells its user: console logging, per-step TensorBoard scalars (and images), per-epoch JSON lines.

Only rank 0 writes files; other ranks log warnings and errors only.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger("mcbeit")


def setup_logging(rank: int = 0, debug: bool = False, log_file: str | os.PathLike | None = None) -> None:
    """Console (and optional file) logging for the `mcbeit` logger tree; quiet on ranks > 0."""
    level = logging.DEBUG if debug else logging.INFO
    if rank != 0:
        level = logging.WARNING
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger("mcbeit")
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    root.addHandler(console)
    if log_file is not None and rank == 0:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file, mode="a", encoding="utf-8")
        fh.setFormatter(fmt)
        root.addHandler(fh)
    root.setLevel(level)
    root.propagate = False


class RunWriter:
    """TensorBoard scalars per step (tensorboardX) and one JSON line per epoch in `<output_dir>/log.txt`."""

    def __init__(self, output_dir: str | None, log_dir: str | None, enabled: bool):
        self.enabled = enabled
        self.output_dir = Path(output_dir) if output_dir else None
        self.tb = None
        if enabled and log_dir:
            from tensorboardX import SummaryWriter

            os.makedirs(log_dir, exist_ok=True)
            # tensorboardX names event files by the second and the host: a run resumed within the
            # same second would overwrite the stopped run's file; the pid keeps both.
            self.tb = SummaryWriter(logdir=log_dir, filename_suffix=f".{os.getpid()}.{time.time_ns()}")

    def scalars(self, step: int, values: Mapping[str, float], head: str) -> None:
        if self.tb is None:
            return
        for key, value in values.items():
            if value is not None:
                self.tb.add_scalar(f"{head}/{key}", value, step)

    def image(self, step: int, tag: str, image: Any) -> None:
        """One (3, H, W) float image in [0, 1] (e.g. a grid) under ``tag``."""
        if self.tb is not None:
            self.tb.add_image(tag, image, step, dataformats="CHW")

    def epoch(self, stats: Mapping[str, Any]) -> None:
        if not self.enabled or self.output_dir is None:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        line = json.dumps(dict(stats)) + "\n"
        with open(self.output_dir / "log.txt", "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
