"""Training checkpoints: `checkpoint-<epoch>.pth`, written atomically, read with `weights_only=True`.

A checkpoint holds plain containers only (tensors, numbers, strings, lists, dicts): `args` is
stored as a dict, so `torch.load(path, weights_only=True)` reads it with no allow-list.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch

from mcbeit.models.checkpoint import load_checkpoint_file

log = logging.getLogger(__name__)

_CKPT_RE = re.compile(r"^checkpoint-(\d+)\.pth$")


def checkpoint_path(output_dir: str | os.PathLike, epoch: int) -> Path:
    return Path(output_dir) / f"checkpoint-{epoch}.pth"


def plain_args(args: argparse.Namespace | dict) -> dict[str, Any]:
    """`args` as a dict of plain values that `weights_only=True` can read back."""
    items = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    out: dict[str, Any] = {}
    for key, value in items.items():
        if value is None or isinstance(value, (bool, int, float, str)):
            out[key] = value
        elif isinstance(value, (list, tuple)) and all(isinstance(v, (bool, int, float, str)) for v in value):
            out[key] = list(value)
        else:
            out[key] = str(value)
    return out


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """``write(file)`` into a temporary file beside ``path``, fsync, then rename over it (and fsync the folder).

    A crash or a full disk leaves either the old file or the new one, never half of one; the
    temporary file is removed when the write fails, and the error propagates.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` through :func:`write_atomic`: the old checkpoint or the new one, never half of one."""
    return write_atomic(path, lambda f: torch.save(obj, f))


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(epoch, path) of every `checkpoint-<epoch>.pth` in `output_dir`, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _CKPT_RE.match(p.name))]
    return sorted(found)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def load_training_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by `save_atomic` (or a released one) without unpickling code."""
    ckpt = load_checkpoint_file(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise RuntimeError(f"{path} is not a training checkpoint (no 'model' entry); "
                           "pass a checkpoint-<epoch>.pth written by mcbeit-pretrain")
    return ckpt
