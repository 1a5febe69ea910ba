"""Where a run continues: which checkpoint to resume, the ONE position record every checkpoint
carries (epoch, steps done in it, every rank's random generators), and loading resumed weights
with an error that says which flags differ.

Position record (the checkpoint's top-level entries, unchanged since the first format):
``epoch``, ``step_in_epoch``, ``steps_per_epoch``, ``global_step``, ``rng`` (a list, one entry per
rank, of :func:`mcbeit.engine.control.capture_rng`). A checkpoint without it (a released file)
counts as the end of its epoch.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import torch

from mcbeit.engine import checkpoint as ckpt_io
from mcbeit.engine.control import gather_rng, restore_rank_rng
from mcbeit.engine.distributed import DistInfo
from mcbeit.engine.identity import same_value, show
from mcbeit.errors import InputError
from mcbeit.models.checkpoint import StateDictMismatchError, load_into

log = logging.getLogger("mcbeit")

RESUME_HINT = ("pass an existing checkpoint-<epoch>.pth, or leave --resume out (the newest checkpoint in --output_dir "
               "is then resumed, if there is one)")

#: flags that change the model's architecture: named when a resumed checkpoint does not fit. The
#: tokenizer's (pre-training) size the prediction head: its vocabulary is the head's width.
ARCHITECTURE_FLAGS = ("model", "input_size", "window_size", "rel_pos_bias", "abs_pos_emb", "layer_scale_init_value",
                      "vocab_size", "embed_dim", "hidden", "blocks_per_group", "discrete_vae_type",
                      "discrete_vae_weight_path", "nb_classes", "use_mean_pooling", "linear_probe", "probe_layer")


def missing_checkpoint(flag: str, path: str, what_to_do: str) -> str:
    """The message for a checkpoint flag whose path is not a file."""
    where = "is a folder, not a checkpoint file" if os.path.isdir(path) else "no such file"
    return f"{flag} {path}: {where}; {what_to_do}"


def resume_path(resume: str, auto_resume: bool, output_dir: str) -> str | None:
    """``--resume``, else with ``--auto_resume`` the newest whole checkpoint in ``--output_dir`` (a damaged
    newer one is skipped with a warning), else None. A damaged ``--resume`` file is an error."""
    path = resume
    if not path and auto_resume and output_dir:
        latest = ckpt_io.latest_good_checkpoint(output_dir)
        if latest is None and ckpt_io.list_resume_points(output_dir):
            raise InputError(f"auto-resume: every checkpoint in {output_dir} is damaged (see the warnings); "
                             "move them aside to start afresh, or pass --resume FILE")
        path = str(latest) if latest else ""
    if not path:
        return None
    if not os.path.isfile(path):
        raise InputError(missing_checkpoint("--resume", path, RESUME_HINT))
    if path.endswith(".pth") and (problem := ckpt_io.checkpoint_problem(path)) is not None:
        raise InputError(f"--resume {path}: {problem}; pass an earlier checkpoint")
    return path


def position_state(info: DistInfo, epoch: int, steps_done: int, steps_per_epoch: int) -> dict[str, Any]:
    """The position record after ``steps_done`` steps of ``epoch``. A collective (all ranks call it at
    the same step: their random states are gathered); rank 0 writes the result."""
    return {"epoch": epoch, "step_in_epoch": steps_done, "steps_per_epoch": steps_per_epoch,
            "global_step": epoch * steps_per_epoch + steps_done, "rng": gather_rng(info)}


def resume_position(ckpt: Mapping[str, Any], path: str, steps_per_epoch: int, info: DistInfo, start_epoch: int,
                    restore_random_state: bool = True) -> tuple[int, int]:
    """(epoch to continue, steps of it already done) from a checkpoint's position record, restoring
    this rank's random generators so the run goes on bit for bit. A checkpoint without a position
    (released files, older ones) counts as the end of its epoch."""
    if not isinstance(ckpt.get("epoch"), int):
        return start_epoch, 0
    epoch, done = int(ckpt["epoch"]), int(ckpt.get("step_in_epoch", steps_per_epoch))
    written_spe = int(ckpt.get("steps_per_epoch", steps_per_epoch))
    if done >= written_spe:
        start, first = epoch + 1, 0
    elif written_spe != steps_per_epoch:
        log.warning("%s stopped at step %d of %d in epoch %d, but this run has %d steps per epoch (another batch "
                    "size or number of processes): epoch %d restarts from its beginning", path, done, written_spe,
                    epoch, steps_per_epoch, epoch)
        start, first = epoch, 0
    else:
        start, first = epoch, done
    if restore_random_state:
        restore_rank_rng(ckpt.get("rng"), info, path)
    log.info("resumed from %s: continuing at epoch %d%s", path, start, f", step {first}" if first else "")
    return start, first


def load_resumed_weights(model: torch.nn.Module, state: Mapping[str, torch.Tensor], path: str,
                         flags: Mapping[str, Any], written: Any, shown: int = 8) -> None:
    """Load a resumed checkpoint's weights into ``model`` strictly. One of another architecture (another
    --model, width, depth, vocabulary, ...) raises StateDictMismatchError naming the checkpoint, the
    flags it was written with where they differ from this run's (``flags``; ``written``: the
    checkpoint's 'args'), the keys and shapes that differ (the first ``shown`` of each kind), and what to do."""
    try:
        load_into(model, state, strict=True)
    except StateDictMismatchError as exc:
        message = _architecture_message(exc.report, model, path, flags, written, shown)
        raise StateDictMismatchError(message, exc.report) from None


def _architecture_message(report, model: torch.nn.Module, path: str, flags: Mapping[str, Any], written: Any,
                          shown: int) -> str:
    if flags.get("resume"):
        source, fix = f"--resume {path}", "or pass a checkpoint of this run's model as --resume"
    else:
        source = f"auto-resume from {path} (the newest checkpoint in --output_dir {flags.get('output_dir')})"
        fix = "or start afresh with another --output_dir (or --start_over: its checkpoints are moved aside)"
    written = dict(vars(written) if hasattr(written, "__dict__") and not isinstance(written, Mapping)
                   else written or {})
    compared = [k for k in ARCHITECTURE_FLAGS if k in written and k in flags]
    differ = [f"--{k} {show(written[k])} (this run: {show(flags[k])})" for k in compared
              if not same_value(written[k], flags[k])]
    if differ:
        said = f"it was written with {', '.join(differ)}"
    elif compared:  # the flags agree: a file one of them names must hold another model now
        named = " (e.g. the tokenizer of --discrete_vae_weight_path: its vocabulary sizes the head)" \
            if "discrete_vae_weight_path" in compared else ""
        said = (f"its model flags ({', '.join('--' + k for k in compared)}) equal this run's, so a file they name "
                f"has changed since{named}")
    else:
        said = "the checkpoint does not record the flags that shape its model"
    lines = []
    for kind, items in (("shape mismatch", [f"{k}: checkpoint {tuple(c)} vs model {tuple(m)}"
                                            for k, c, m in report.mismatched]),
                        ("missing (in the model, not in the checkpoint)", report.missing),
                        ("unexpected (in the checkpoint, not in the model)", report.unexpected)):
        lines += [f"  {kind}: {item}" for item in items[:shown]]
        if len(items) > shown:
            lines.append(f"  ... and {len(items) - shown} more ({kind.split(' (')[0]})")
    return (f"{source} is a checkpoint of another architecture than this run's {type(model).__name__} ({said}): "
            f"{len(report.mismatched)} shape mismatches, {len(report.missing)} missing and {len(report.unexpected)} "
            "unexpected keys\n" + "\n".join(lines) + f"\nRun with the flags it was written with, {fix}")
