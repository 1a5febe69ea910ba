"""Training checkpoints: `checkpoint-<epoch>.pth`, written atomically, read with `weights_only=True`.

A checkpoint holds plain containers only (tensors, numbers, strings, lists, dicts): `args` is
stored as a dict of plain values (:func:`mcbeit.config.fields.as_flags`), so
`torch.load(path, weights_only=True)` reads it with no allow-list.

Writes go to a temporary file that is fsynced and renamed over the target, so a crash, a kill or
a full disk leaves the previous file whole; a failed write says which checkpoint survived.
Auto-resume verifies the newest checkpoint (the CRC of every record of torch's zip format) and
falls back to the previous good one with a warning; ``--keep_last K`` prunes older ones only
after a new one is safely on disk.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch

from mcbeit.models.checkpoint import load_checkpoint_file

log = logging.getLogger(__name__)

_CKPT_RE = re.compile(r"^checkpoint-(\d+)\.pth$")


def checkpoint_path(output_dir: str | os.PathLike, epoch: int | str) -> Path:
    return Path(output_dir) / f"checkpoint-{epoch}.pth"


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
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        cause = write_failure(exc)
        if cause is not None:
            kept = f"the previous {path.name} is untouched" if path.exists() else f"no {path.name} was written"
            raise CheckpointWriteError(f"could not write {path}: {cause}; {kept} (the partial file was removed). "
                                       "Free space or raise the limit, then run again (auto-resume continues "
                                       "from the newest good checkpoint)") from exc
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (full disk, file-size limit, I/O error); nothing older was harmed."""


def write_failure(exc: BaseException) -> str | None:
    """A readable cause when ``exc`` is a failed write (torch wraps the OSError in a RuntimeError)."""
    for err in (exc, exc.__cause__, exc.__context__):
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO):
            return {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                    errno.EFBIG: "file too large (a file-size limit)", errno.EIO: "I/O error"}[err.errno]
    if isinstance(exc, RuntimeError) and ("unexpected pos" in str(exc) or "file write failed" in str(exc)):
        return f"the write failed ({str(exc).splitlines()[0][:120]}), most likely a full disk"
    return None


def save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` through :func:`write_atomic`: the old checkpoint or the new one, never half of one."""
    return write_atomic(path, lambda f: torch.save(obj, f))


def save_checkpoint(output_dir: str | os.PathLike, name: int | str, state: Any, keep_last: int = 0) -> Path:
    """Write ``checkpoint-<name>.pth`` atomically into ``output_dir``; after a numbered one (an epoch)
    is safely on disk, apply ``keep_last`` (:func:`prune_checkpoints`)."""
    path = save_atomic(state, checkpoint_path(output_dir, name))
    if isinstance(name, int):
        prune_checkpoints(output_dir, keep_last, name)
    return path


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


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` is not a whole checkpoint file (None when it is): empty, truncated, or a record
    whose CRC does not match. Reads the file once without unpickling anything. Files in torch's
    legacy (pre-zip) format carry no checksums: they pass, and loading them decides."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size == 0:
            return "empty file"
        with open(path, "rb") as f:
            if f.read(1) == b"\x80":  # torch's legacy format (a pickle stream): nothing to verify before loading
                return None
        with zipfile.ZipFile(path) as archive:
            if not any(name.endswith("data.pkl") for name in archive.namelist()):
                return "not a torch.save archive (no data.pkl)"
            bad = archive.testzip()
    except zipfile.BadZipFile as exc:
        return f"truncated or not a zip archive ({exc})"
    except (OSError, EOFError, zipfile.LargeZipFile) as exc:
        return f"unreadable ({exc})"
    return f"record {bad} is corrupt (CRC mismatch)" if bad is not None else None


def latest_good_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest `checkpoint-<epoch>.pth` that is whole; each newer damaged one is named in a warning
    (and left in place: nothing written is deleted on suspicion)."""
    for _, path in reversed(list_checkpoints(output_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        log.warning("auto-resume: skipping %s: %s; trying the previous checkpoint", path, problem)
    return None


def prune_checkpoints(output_dir: str | os.PathLike, keep_last: int, written_epoch: int) -> list[Path]:
    """After `checkpoint-<written_epoch>.pth` is safely on disk, delete all but the newest ``keep_last``
    checkpoints up to that epoch (0 keeps all); returns the deleted paths.

    Checkpoints of later epochs (left by a run that resumed from an earlier one) are not counted and
    are overwritten as the run reaches them; `checkpoint-best.pth` and other names are never touched."""
    if keep_last <= 0:
        return []
    upto = [path for epoch, path in list_checkpoints(output_dir) if epoch <= written_epoch]
    old = upto[:-keep_last]
    for path in old:
        path.unlink(missing_ok=True)
    if old:
        log.info("--keep_last %d: removed %s", keep_last, ", ".join(p.name for p in old))
    return old


def load_training_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by `save_atomic` (or a released one) without unpickling code."""
    ckpt = load_checkpoint_file(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise RuntimeError(f"{path} is not a training checkpoint (no 'model' entry); "
                           "pass a checkpoint-<epoch>.pth written by mcbeit-pretrain")
    return ckpt
