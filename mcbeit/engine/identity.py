"""A run resumes only its own experiment; a fresh start never mixes with an earlier run's files.

Which flags define the experiment is declared once, where flags are declared: every flag except
those marked ``flag(..., experiment=False)`` (workers, logging, output, devices, launchers,
precision, save frequencies, policies; :func:`mcbeit.config.fields.experiment_flags`). Every
checkpoint records their names (:data:`CHECKPOINT_KEY`) beside its flag values (``args``, a plain
dict of :func:`mcbeit.config.fields.as_flags` plus ``world_size`` and ``rank``).

- Auto-resume (:func:`check_experiment`) compares this run's resolved values (the embedded
  demonstration's defaults applied, the fine-tuning lr derived) with the checkpoint's, for the
  flags both count as defining. The batch is compared as the total batch per update (``batch_size``
  x processes x ``update_freq``): the same total split over another number of processes is the same
  experiment. A difference stops the run before training (InputError, exit 1) with every differing
  flag, both values and the ways on; ``--accept_changed_flags NAME ...|all`` continues with the new
  values (logged as warnings), and an explicit ``--resume FILE`` is the user's choice: warnings only.
  Checkpoints without the record (written before it existed, released files) are not compared, and
  the log says so.
- ``--no_auto_resume`` on a folder that holds checkpoints is refused (a fresh run would overwrite
  some and leave the others for a later auto-resume); ``--start_over`` moves the earlier run's
  checkpoints, ``log.txt`` and ``tensorboard/`` into ``<output_dir>/replaced-<time>/`` first
  (:func:`prepare_fresh_start`): nothing written is lost.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from mcbeit.errors import InputError

log = logging.getLogger("mcbeit")

#: the checkpoint entry that lists the flags defining the experiment it belongs to
CHECKPOINT_KEY = "experiment_flags"
#: what an earlier run leaves in its output folder and ``--start_over`` moves aside
RUN_FILES = ("log.txt", "tensorboard", "latest", "tokenizer.pth")
#: the pseudo-flag of the total batch (named ``batch_size`` for --accept_changed_flags)
BATCH = "batch_size"


@dataclass(frozen=True)
class Difference:
    """One flag whose value differs: ``name`` (what --accept_changed_flags takes), both values as text."""

    name: str
    written: str
    now: str
    label: str = ""

    def __str__(self) -> str:
        return f"--{self.label or self.name}: {self.written} in the checkpoint, {self.now} in this run"


def show(value: Any) -> str:
    """A flag value as a command line writes it."""
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return " ".join(map(show, value)) if value else "(empty)"
    return "''" if value == "" else str(value)


def same_value(a: Any, b: Any) -> bool:
    """Flag values equal as the run uses them: lists and tuples alike, 1 == 1.0, and two spellings of
    one path (``./data`` and ``/abs/data`` from the same folder) alike."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, str) and isinstance(b, str) and a and b and a != b:
        return os.path.realpath(a) == os.path.realpath(b)
    return a == b


def total_batch(flags: Mapping[str, Any]) -> tuple[int, str]:
    """(images per update over all processes, how it is made up) of a run's flags."""
    per, procs, accum = int(flags.get("batch_size", 0)), int(flags.get("world_size") or 1), \
        int(flags.get("update_freq") or 1)
    parts = f"--batch_size {per} x {procs} process{'es' if procs != 1 else ''}"
    return per * procs * accum, parts + (f" x --update_freq {accum}" if accum != 1 else "")


def differences(written: Mapping[str, Any], flags: Mapping[str, Any], names: Iterable[str]) -> list[Difference]:
    """The flags among ``names`` whose values in ``written`` (a checkpoint's ``args``) and ``flags`` (this
    run's) differ; a name missing on either side (a flag of another version) is not compared. The
    batch counts as the total batch (``batch_size`` x ``world_size`` x ``update_freq``)."""
    found = []
    for name in names:
        if name == "update_freq" or name not in written or name not in flags:
            continue  # update_freq is part of the total batch
        if name == BATCH:
            (old, old_parts), (new, new_parts) = total_batch(written), total_batch(flags)
            if old != new:
                found.append(Difference(BATCH, f"{old} ({old_parts})", f"{new} ({new_parts})",
                                        "batch_size (the total batch)"))
            continue
        if not same_value(written[name], flags[name]):
            found.append(Difference(name, show(written[name]), show(flags[name])))
    return found


def check_experiment(ckpt: Mapping[str, Any], path: str, flags: Mapping[str, Any], names: Iterable[str], *,
                     explicit: bool, accepted: Iterable[str] = (), output_dir: str = "") -> list[Difference]:
    """Stop (InputError) before a run auto-resumes ``ckpt`` (at ``path``) of another experiment: every
    flag of ``names`` (this run's experiment flags) the checkpoint also records as defining, whose value
    differs from ``flags`` (this run's resolved values) and is not in ``accepted`` ('all' accepts any).
    With ``explicit`` (``--resume FILE``: the user's choice) differences are warnings. Returns them."""
    written, recorded = ckpt.get("args"), ckpt.get(CHECKPOINT_KEY)
    if not isinstance(written, Mapping) or not isinstance(recorded, (list, tuple)):
        log.info("%s does not record which flags define its experiment (written by an earlier version or other "
                 "code): its flags are not compared with this run's", path)
        return []
    found = differences(written, flags, [n for n in names if n in set(recorded)])
    if not found:
        return found
    listed = "\n".join(f"  {d}" for d in found)
    if explicit:
        log.warning("--resume %s was written with other flags; this run goes on with its own:\n%s", path, listed)
        return found
    accepted = {a.lstrip("-") for a in accepted}
    refused = found if not accepted else [d for d in found if "all" not in accepted and d.name not in accepted]
    if not refused:
        log.warning("resuming %s with changed flags (--accept_changed_flags %s): its epochs so far ran with the "
                    "checkpoint's values, the rest run with this run's:\n%s", path, " ".join(sorted(accepted)), listed)
        return found
    names_out = " ".join(dict.fromkeys(d.name for d in refused))
    raise InputError(
        f"auto-resume: {path}, the newest checkpoint in --output_dir {output_dir}, belongs to another experiment; "
        f"{len(found)} flag{'s' if len(found) != 1 else ''} differ:\n{listed}\n"
        f"Nothing was changed. To go on: pass another --output_dir for a new experiment; or "
        f"--accept_changed_flags {names_out} to continue this one with the new values; or --resume {path} to "
        f"start from it anyway (differences are then warnings); or --start_over to move the earlier run's files "
        f"into {os.path.join(output_dir, 'replaced-<time>')}/ and train afresh there")


# ------------------------------------------------------------------------------------------ fresh starts

def held_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Checkpoints an earlier run left in ``output_dir``: ``checkpoint-*`` files and DeepSpeed folders."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("checkpoint-")
                  and (p.is_dir() or p.name.endswith(".pth")))


def prepare_fresh_start(output_dir: str, *, auto_resume: bool, resume: str, start_over: bool,
                        is_main: bool) -> bool:
    """Before a run that does not auto-resume from ``output_dir``: refuse ``--no_auto_resume`` on a
    folder holding checkpoints (InputError); with ``start_over`` move the earlier run's checkpoints,
    ``log.txt``, ``tensorboard/``, ``latest`` and ``tokenizer.pth`` into ``replaced-<time>/`` (rank 0;
    nothing else is touched). Returns whether auto-resume stays on."""
    if not output_dir:
        return auto_resume
    held = held_checkpoints(output_dir)
    if start_over:
        earlier = held + [Path(output_dir) / name for name in RUN_FILES if (Path(output_dir) / name).exists()]
        if resume and any(Path(resume).resolve().is_relative_to(p.resolve()) for p in earlier):
            raise InputError(f"--resume {resume} lies among the files --start_over moves aside: copy it elsewhere "
                             "and pass that path, or leave out --start_over")
        if is_main:
            _move_aside(Path(output_dir), earlier)
        return False
    if not auto_resume and not resume and held:
        names = ", ".join(p.name for p in held[:6]) + (f" and {len(held) - 6} more" if len(held) > 6 else "")
        raise InputError(f"--no_auto_resume: --output_dir {output_dir} holds checkpoints of an earlier run ({names}); "
                         "a fresh run there would overwrite some and leave the others for a later auto-resume. "
                         f"Pass --start_over to move them (with log.txt and tensorboard/) into "
                         f"{os.path.join(output_dir, 'replaced-<time>')}/ first, or another --output_dir")
    return auto_resume


def _move_aside(root: Path, earlier: list[Path]) -> None:
    if not earlier:
        log.info("--start_over: %s holds no earlier run; training from the start", root)
        return
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, n = root / f"replaced-{stamp}", 1
    while target.exists():
        n += 1
        target = root / f"replaced-{stamp}-{n}"
    target.mkdir()
    for path in earlier:
        os.replace(path, target / path.name)  # a rename within the folder: nothing copied, nothing lost
    log.warning("--start_over: moved the earlier run's %s into %s/; training from the start",
                ", ".join(p.name for p in earlier), target)
