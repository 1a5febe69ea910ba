"""Training checkpoints: `checkpoint-<epoch>.pth`, written atomically, read with `weights_only=True`.

Names say the position: ``checkpoint-<epoch>.pth`` holds the end of ``epoch``; a mid-epoch
checkpoint (``--save_ckpt_steps`` / ``--save_ckpt_minutes``, a stop signal) is
``checkpoint-<epoch>-step<N>.pth`` (N updates of that epoch done). Mid-epoch files are transient
resume points: once a newer checkpoint is safely on disk, the older mid-epoch ones are removed
(:func:`remove_superseded`); ``--keep_last`` counts epoch checkpoints only. Auto-resume takes the
newest by position (:func:`list_resume_points`); a ``checkpoint-<epoch>.pth`` written mid-epoch by
an earlier version (whose position is inside the file only) is ordered by the position it holds.

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
import math
import os
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch

from mcbeit.files import file_mode
from mcbeit.models.checkpoint import load_checkpoint_file

log = logging.getLogger(__name__)

#: ``checkpoint-<epoch>`` or ``checkpoint-<epoch>-step<N>``, then ``.pth`` (files) or nothing (DeepSpeed folders)
_CKPT_RE = re.compile(r"^checkpoint-(\d+)(?:-step(\d+))?\.pth$")
_POSITION_RE = re.compile(r"^checkpoint-(\d+)(?:-step(\d+))?$")

#: the position of an epoch's end in :func:`position_key` order (after every step of it)
END = math.inf


def position_name(epoch: int, steps_done: int | None = None, steps_per_epoch: int | None = None) -> str:
    """The name part of the checkpoint after ``steps_done`` updates of ``epoch``: ``'<epoch>'`` at the
    epoch's end (``steps_done`` None or >= ``steps_per_epoch``), else ``'<epoch>-step<steps_done>'``."""
    if steps_done is None or (steps_per_epoch is not None and steps_done >= steps_per_epoch):
        return str(epoch)
    return f"{epoch}-step{steps_done}"


def position_key(name: str) -> tuple[int, float] | None:
    """(epoch, updates done, END for an epoch's end) of a checkpoint file or folder name, or None when
    ``name`` is not one (``checkpoint-best.pth``, ``log.txt``)."""
    match = _CKPT_RE.match(name) or _POSITION_RE.match(name)
    if not match:
        return None
    return int(match.group(1)), END if match.group(2) is None else int(match.group(2))


def checkpoint_path(output_dir: str | os.PathLike, epoch: int | str, steps_done: int | None = None) -> Path:
    """``checkpoint-<epoch>.pth``, or ``checkpoint-<epoch>-step<steps_done>.pth`` mid-epoch; ``epoch`` may
    also be a whole name part ('best', '3-step20')."""
    name = position_name(epoch, steps_done) if isinstance(epoch, int) else str(epoch)
    return Path(output_dir) / f"checkpoint-{name}.pth"


#: temporary files being written right now (a hard exit removes them: mcbeit.engine.control's second-Ctrl-C watchdog)
WRITING: set[str] = set()


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """``write(file)`` into a temporary file beside ``path``, fsync, then rename over it (and fsync the folder).

    A crash or a full disk leaves either the old file or the new one, never half of one; the
    temporary file is removed when the write fails, and the error propagates.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    WRITING.add(tmp)
    try:
        os.fchmod(fd, file_mode())  # mkstemp creates 0600: the file gets the user's umask, as open() would
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        interrupt = _interrupt_in(exc)
        if interrupt is not None and interrupt is not exc:
            # Ctrl-C inside torch.save: its zip writer then fails on closing ('unexpected pos'); that is the
            # interrupt's doing, not a full disk, so the interrupt is what goes on up.
            raise interrupt.with_traceback(None) from None
        cause = write_failure(exc)
        if cause is not None:
            kept = f"the previous {path.name} is untouched" if path.exists() else f"no {path.name} was written"
            raise CheckpointWriteError(f"could not write {path}: {cause}; {kept} (the partial file was removed). "
                                       "Free space or raise the limit, then run again (auto-resume continues "
                                       "from the newest good checkpoint)") from exc
        raise
    finally:
        WRITING.discard(tmp)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (full disk, file-size limit, I/O error); nothing older was harmed."""


def _interrupt_in(exc: BaseException) -> KeyboardInterrupt | None:
    """The KeyboardInterrupt ``exc`` is, or arose while handling (its __context__ / __cause__ chain)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


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
    """Write ``checkpoint-<name>.pth`` atomically into ``output_dir`` (``name``: an epoch, a mid-epoch
    position '<epoch>-step<N>', or e.g. 'best'). After a position is safely on disk, the mid-epoch
    checkpoints it supersedes are removed (:func:`remove_superseded`), and after an epoch's
    ``keep_last`` is applied (:func:`prune_checkpoints`)."""
    path = save_atomic(state, checkpoint_path(output_dir, name))
    key = position_key(path.name)
    if key is not None:
        remove_superseded(output_dir, key)
        if key[1] == END:
            prune_checkpoints(output_dir, keep_last, key[0])
    return path


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(epoch, path) of every epoch checkpoint `checkpoint-<epoch>.pth` in `output_dir`, oldest first
    (what ``--keep_last`` counts; mid-epoch ones are in :func:`list_resume_points`)."""
    return [(epoch, path) for (epoch, step), path in _named_positions(output_dir) if step == END]


def _named_positions(output_dir: str | os.PathLike) -> list[tuple[tuple[int, float], Path]]:
    root = Path(output_dir)
    if not root.is_dir():
        return []
    return sorted((key, p) for p in root.iterdir() if _CKPT_RE.match(p.name) and (key := position_key(p.name)))


def stored_position(path: str | os.PathLike) -> tuple[int, int] | None:
    """(epoch, updates done) recorded inside a checkpoint file when it stopped mid-epoch, else None.
    Memory-maps the file: the tensors are not read."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # damaged or not a zip archive: verification (checkpoint_problem) says why
        return None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("epoch"), int):
        return None
    done, spe = ckpt.get("step_in_epoch"), ckpt.get("steps_per_epoch")
    if isinstance(done, int) and isinstance(spe, int) and done < spe:
        return ckpt["epoch"], done
    return None


def _position_of(key: tuple[int, float], path: Path, mid_epochs: set[int]) -> tuple[int, float]:
    """``key`` (from the name), except for a ``checkpoint-<epoch>.pth`` beside mid-epoch files of the
    same epoch: an earlier version wrote mid-epoch positions under that name, so its recorded
    position decides where it stands."""
    if key[1] == END and key[0] in mid_epochs:
        stored = stored_position(path)
        if stored is not None and stored[0] == key[0]:
            return stored[0], stored[1]
    return key


def list_resume_points(output_dir: str | os.PathLike) -> list[tuple[tuple[int, float], Path]]:
    """((epoch, updates done or END), path) of every epoch and mid-epoch checkpoint file in
    ``output_dir``, oldest position first."""
    named = _named_positions(output_dir)
    mid_epochs = {epoch for (epoch, step), _ in named if step != END}
    return sorted((_position_of(key, path, mid_epochs), path) for key, path in named)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The checkpoint of the newest position (verified or not)."""
    found = list_resume_points(output_dir)
    return found[-1][1] if found else None


def remove_superseded(output_dir: str | os.PathLike, written: tuple[int, float]) -> list[Path]:
    """After the checkpoint of position ``written`` is safely on disk, remove the mid-epoch checkpoints
    before it (transient resume points; a newer one is now whole). Epoch checkpoints stay (``--keep_last``
    decides), and so do positions after ``written`` (left by a run that resumed from an earlier one)."""
    old = [path for key, path in list_resume_points(output_dir) if key < written and key[1] != END]
    for path in old:
        path.unlink(missing_ok=True)
    if old:
        log.info("removed the mid-epoch checkpoints %s (superseded by a newer one)", ", ".join(p.name for p in old))
    return old


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
    """The checkpoint of the newest position (epoch or mid-epoch) that is whole; each newer damaged one
    is named in a warning (and left in place: nothing written is deleted on suspicion)."""
    for _, path in reversed(list_resume_points(output_dir)):
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
    if not isinstance(ckpt, dict) or not {"model", "state_dict"} & ckpt.keys():  # ours / unilm's, or mmpretrain's
        raise RuntimeError(f"{path} is not a training checkpoint (no 'model' or 'state_dict' entry); "
                           "pass a checkpoint-<epoch>.pth written by mcbeit-pretrain")
    return ckpt
