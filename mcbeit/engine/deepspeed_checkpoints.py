"""DeepSpeed checkpoint folders on disk: how a save is made whole, how a resume finds one, and how
they are read without unpickling code.

A checkpoint is DeepSpeed's folder ``<output_dir>/checkpoint-<epoch>/`` (an epoch's end) or
``checkpoint-<epoch>-step<N>/`` (mid-epoch, N updates done; removed once a newer checkpoint is
whole, as the files of :mod:`mcbeit.engine.checkpoint`) plus a ``latest`` file that names the
newest position. Every rank writes its files into a hidden staging folder
(``.saving-checkpoint-<epoch>``); once all have, rank 0 adds :data:`MARKER` (epoch, processes, ZeRO
stage, every file's size) and renames the folder into place (:func:`publish`), so a crash or a full
disk never leaves a half-written folder under a checkpoint's name. Auto-resume checks the newest
folder (files and sizes against the marker, the zip CRCs of every ``.pt``) and falls back to the
previous whole one with a warning (:func:`find_resumable`); ``--keep_last`` prunes as for ``.pth``
files. :func:`read_weights_only` is how every file is read back: ``weights_only=True`` with an
allow-list of the few DeepSpeed classes its checkpoints hold.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from mcbeit.engine.checkpoint import END, checkpoint_problem, position_key, write_atomic
from mcbeit.errors import InputError
from mcbeit.models.checkpoint import UnsafeCheckpointError

log = logging.getLogger("mcbeit.engine.deepspeed")

__all__ = [
    "MARKER",
    "DeepSpeedCheckpointError",
    "checkpoint_folder",
    "deepspeed_checkpoint_problem",
    "find_resumable",
    "list_deepspeed_checkpoints",
    "list_deepspeed_positions",
    "prune_deepspeed_checkpoints",
    "publish",
    "read_marker",
    "read_weights_only",
    "remove_leftovers",
    "resume_checkpoint",
    "staging_folder",
]

#: written by rank 0 into a checkpoint folder once every rank has saved its part
MARKER = "mcbeit_checkpoint.json"
MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
_STAGING, _REPLACED = ".saving-", ".replaced-"  # prefixes of the folders a save works in (hidden)
STAGING_PREFIX, REPLACED_PREFIX = _STAGING, _REPLACED


class DeepSpeedCheckpointError(InputError):
    """A DeepSpeed checkpoint folder that cannot be resumed from: missing, damaged, not a DeepSpeed
    checkpoint, or written with another ZeRO stage or number of processes."""


# ------------------------------------------------------------------------------------------- reading

def _safe_globals() -> list:
    """The classes (besides plain containers and tensors) DeepSpeed pickles into its checkpoints."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def read_weights_only(path: str, map_location: Any = None, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` allowing DeepSpeed's own classes; a file that needs
    anything else is refused with :class:`~mcbeit.models.checkpoint.UnsafeCheckpointError`."""
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:
        refused = sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(e))))
        why = f"it needs {', '.join(refused)}" if refused else str(e).splitlines()[0]
        raise UnsafeCheckpointError(f"{path}: not readable with weights_only=True ({why}); a DeepSpeed checkpoint "
                                    "holding other objects is not loaded here (unpickling could run code)") from e


# ------------------------------------------------------------------------------------------- writing

def staging_folder(output_dir: Path, tag: str) -> Path:
    """The hidden folder every rank writes ``tag``'s files into before :func:`publish`."""
    return output_dir / f"{_STAGING}{tag}"


def remove_leftovers(output_dir: Path, tag: str) -> None:
    """Staging / replaced folders of ``tag`` that an interrupted save left behind."""
    for prefix in (_STAGING, _REPLACED):
        leftover = output_dir / f"{prefix}{tag}"
        if leftover.exists():
            log.warning("removing %s, left by a save that did not finish", leftover)
            shutil.rmtree(leftover)


def publish(staging: Path, folder: Path, info: dict[str, Any], keep_last: int) -> None:
    """Rank 0, once every rank's files are in ``staging``: write :data:`MARKER` (``info`` plus every
    file's size), swap ``staging`` in for ``folder``; for a numbered checkpoint also point ``latest``
    at it and apply ``--keep_last``."""
    info = {**info, "files": _file_sizes(staging)}
    _write_text(staging / MARKER, json.dumps(info, indent=1) + "\n")
    _swap_in(staging, folder)
    key = position_key(folder.name)
    if key is not None:  # a resume point (not 'best')
        _write_text(folder.parent / "latest", folder.name)
        remove_superseded_folders(folder.parent, key)
        if key[1] == END:
            prune_deepspeed_checkpoints(folder.parent, keep_last, key[0])


def _write_text(path: Path, text: str) -> None:
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def _file_sizes(folder: Path) -> dict[str, int]:
    """Every file under ``folder`` (relative path -> bytes): the marker's manifest."""
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def _swap_in(staging: Path, folder: Path) -> None:
    """Make the complete ``staging`` folder ``folder``. An existing ``folder`` is moved aside first and
    removed only after the swap, so some whole copy is on disk at every moment (the one aside is
    found by :func:`list_deepspeed_checkpoints` if a crash lands between the two renames)."""
    replaced = folder.with_name(f"{_REPLACED}{folder.name}")
    if folder.exists():
        os.replace(folder, replaced)
    os.replace(staging, folder)
    _fsync_dir(folder.parent)
    if replaced.exists():
        shutil.rmtree(replaced)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------- finding

def read_marker(folder: Path) -> dict[str, Any] | None:
    """The :data:`MARKER` of ``folder`` (None when it has none or it is unreadable)."""
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _has_model_states(folder: Path) -> bool:
    return any((folder / name).is_file() for name in MODEL_STATES)


def deepspeed_checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """Why ``folder`` is not a whole DeepSpeed checkpoint (None when it is): no model states, a file
    the marker lists missing or of another size, or a ``.pt`` file that is truncated or fails its
    CRC. Reads every file once; unpickles nothing."""
    folder = Path(folder)
    if not _has_model_states(folder):
        return f"no {MODEL_STATES[0]}"
    listed = (read_marker(folder) or {}).get("files") or {}
    for name, size in listed.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written"
    for path in sorted(folder.rglob("*.pt")):
        problem = checkpoint_problem(path)
        if problem is not None:
            return f"{path.relative_to(folder)}: {problem}"
    return None


def checkpoint_folder(path: Path) -> Path:
    """``path`` itself when it holds model states, else the tag its ``latest`` file names."""
    if _has_model_states(path):
        return path
    latest = path / "latest"
    if latest.is_file():
        folder = path / latest.read_text().strip()
        if _has_model_states(folder):
            return folder
    raise DeepSpeedCheckpointError(f"{path} is not a DeepSpeed checkpoint: pass a checkpoint-<epoch> folder "
                                   f"(holding {MODEL_STATES[0]}) or an output folder whose 'latest' file names one")


def _named_folders(output_dir: str | os.PathLike) -> list[tuple[tuple[int, float], Path]]:
    """(position from the name, folder) of every complete checkpoint folder, epoch or mid-epoch.

    Complete: holds :data:`MARKER` (written after every rank saved). A folder from other DeepSpeed
    code (no marker) counts only when ``latest`` names it and it holds the model states. A folder
    moved aside by a save that a crash stopped before its second rename counts under its name
    when no folder of that name exists.
    """
    root = Path(output_dir)
    if not root.is_dir():
        return []
    latest = (root / "latest").read_text().strip() if (root / "latest").is_file() else None
    found = {}
    for folder in root.iterdir():
        name = folder.name.removeprefix(_REPLACED)
        key = position_key(name) if not name.endswith(".pth") else None
        if key is None or not folder.is_dir() or (name != folder.name and (root / name).exists()):
            continue
        if (folder / MARKER).is_file() or (folder.name == latest and _has_model_states(folder)):
            found[key] = folder
    return sorted(found.items())


def list_deepspeed_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(epoch, folder) of every complete epoch checkpoint ``checkpoint-<epoch>/`` in ``output_dir``,
    oldest first (what ``--keep_last`` counts; see :func:`_named_folders` for 'complete')."""
    return [(epoch, folder) for (epoch, step), folder in _named_folders(output_dir) if step == END]


def _stored_position(folder: Path) -> tuple[int, int] | None:
    """(epoch, updates done) recorded in a folder's client state when it stopped mid-epoch, else None
    (memory-mapped: the tensors are not read)."""
    states = next((folder / n for n in MODEL_STATES if (folder / n).is_file()), None)
    try:
        state = read_weights_only(str(states), map_location="cpu", mmap=True) if states else None
    except Exception:  # damaged or unreadable: deepspeed_checkpoint_problem says why when it is resumed
        return None
    if not isinstance(state, dict) or not isinstance(state.get("epoch"), int):
        return None
    done, spe = state.get("step_in_epoch"), state.get("steps_per_epoch")
    return (state["epoch"], done) if isinstance(done, int) and isinstance(spe, int) and done < spe else None


def list_deepspeed_positions(output_dir: str | os.PathLike) -> list[tuple[tuple[int, float], Path]]:
    """((epoch, updates done or END), folder) of every complete checkpoint folder, oldest position
    first. A ``checkpoint-<epoch>/`` beside mid-epoch folders of its epoch is ordered by the position
    it holds (earlier versions wrote mid-epoch positions under the epoch's name)."""
    named = _named_folders(output_dir)
    mid_epochs = {epoch for (epoch, step), _ in named if step != END}
    placed = []
    for key, folder in named:
        if key[1] == END and key[0] in mid_epochs and (stored := _stored_position(folder)) and stored[0] == key[0]:
            key = stored
        placed.append((key, folder))
    return sorted(placed)


def find_resumable(output_dir: str | os.PathLike) -> Path | None:
    """The newest whole DeepSpeed checkpoint folder in ``output_dir`` (by position), or None. A newer
    damaged one (:func:`deepspeed_checkpoint_problem`) is named in a warning, left in place, and skipped."""
    found = list_deepspeed_positions(output_dir)
    for _, folder in reversed(found):
        problem = deepspeed_checkpoint_problem(folder)
        if problem is None:
            return folder
        log.warning("auto-resume: skipping %s: %s; trying the previous checkpoint", folder, problem)
    if found:
        raise DeepSpeedCheckpointError(f"auto-resume: every DeepSpeed checkpoint in {output_dir} is damaged (see the "
                                       "warnings); move them aside to start afresh, or pass --resume FOLDER")
    return None


def remove_superseded_folders(output_dir: str | os.PathLike, written: tuple[int, float]) -> list[Path]:
    """After the folder of position ``written`` is complete, remove the mid-epoch folders before it
    (as :func:`mcbeit.engine.checkpoint.remove_superseded` for files)."""
    old = [folder for key, folder in list_deepspeed_positions(output_dir) if key < written and key[1] != END]
    for folder in old:
        shutil.rmtree(folder)
    if old:
        log.info("removed the mid-epoch checkpoints %s (superseded by a newer one)", ", ".join(p.name for p in old))
    return old


def prune_deepspeed_checkpoints(output_dir: str | os.PathLike, keep_last: int, written_epoch: int) -> list[Path]:
    """``--keep_last`` for DeepSpeed folders, as :func:`mcbeit.engine.checkpoint.prune_checkpoints` for
    files: after ``checkpoint-<written_epoch>/`` is complete, remove all but the newest ``keep_last``
    numbered folders up to that epoch (0 keeps all); later epochs and ``checkpoint-best`` stay."""
    if keep_last <= 0:
        return []
    upto = [folder for epoch, folder in list_deepspeed_checkpoints(output_dir) if epoch <= written_epoch]
    old = upto[:-keep_last]
    for folder in old:
        shutil.rmtree(folder)
    if old:
        log.info("--keep_last %d: removed %s", keep_last, ", ".join(p.name for p in old))
    return old


def resume_checkpoint(resume: str | None, auto_resume: bool, output_dir: str | None) -> Path | None:
    """``--resume`` (a checkpoint folder, or an output folder with ``latest``), else with
    ``--auto_resume`` the newest whole one in ``--output_dir``, else None. A damaged ``--resume``
    folder is an error."""
    if resume:
        path = Path(resume)
        if not path.exists():
            raise DeepSpeedCheckpointError(f"--resume {resume}: no such folder")
        folder = checkpoint_folder(path)
        problem = deepspeed_checkpoint_problem(folder)
        if problem is not None:
            raise DeepSpeedCheckpointError(f"--resume {folder}: {problem}; pass an earlier checkpoint folder")
        return folder
    if auto_resume and output_dir:
        return find_resumable(output_dir)
    return None
