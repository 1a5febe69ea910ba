"""What every long-running command shares: starting the run, precision, seeds, warm-up length,
finding the checkpoint to resume from, and the plan logged before the first step."""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from mcbeit.data.folders import CLASSIFICATION_LAYOUTS, EVAL_LAYOUT, BadListFileError, DataPathError, check_data_folder
from mcbeit.data.images import TooManyBadImagesError
from mcbeit.engine import checkpoint as ckpt_io
from mcbeit.errors import InputError
from mcbeit.engine.distributed import DistInfo, init_distributed
from mcbeit.engine.logging import setup_logging
from mcbeit.engine.control import EXIT_PREEMPTED, Preempted, gather_rng, restore_rank_rng
from mcbeit.engine.meter import NonFiniteLossError
from mcbeit.models.beit import patch_size_of
from mcbeit.models.checkpoint import CheckpointError, StateDictMismatchError, load_into

log = logging.getLogger("mcbeit")


def start_run(args: argparse.Namespace, resolve: Callable[[argparse.Namespace], object], purpose: str) -> DistInfo:
    """Join the process group, set up logging, fill the defaults (``resolve(args)``), check the flags
    every command shares (:func:`check_flags`), create the output folder on rank 0 and log the arguments."""
    info = init_distributed(args.device, args.dist_on_itp, args.local_rank, args.dist_url, args.dist_timeout)
    args.world_size, args.rank = info.world_size, info.rank
    setup_logging(info.rank, args.debug)
    resolve(args)
    check_flags(args)
    if args.output_dir and info.is_main:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    log.info("args: %s", json.dumps(ckpt_io.plain_args(args), sort_keys=True))
    if args.data_path is None:
        log.info("no --data_path: %s on the embedded images (a quick demonstration run)", purpose)
    return info


def check_at_least(args: argparse.Namespace, minimum: float, names) -> None:
    """``--name must be at least MINIMUM, got VALUE`` for the first of ``names`` below ``minimum``
    (flags the command does not have, or left at None, are skipped)."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < minimum:
            raise SystemExit(f"--{name} must be at least {minimum}, got {value}")


def check_patch_grid(input_size: int, patch: int, model: str) -> tuple[int, int]:
    """The (h, w) patch grid of ``--input_size`` for ``--model``'s ``patch`` size; an input that is
    not a positive multiple of the patch size is an error that says which sizes fit."""
    if input_size < patch or input_size % patch:
        lower, upper = input_size // patch * patch, (input_size // patch + 1) * patch
        fits = f"{upper} or {lower}" if lower >= patch else f"{upper}"
        raise SystemExit(f"--input_size {input_size} is not {'a positive size ' if input_size < patch else ''}"
                         f"divisible by the patch size {patch} of --model {model}: use --input_size {fits}")
    return input_size // patch, input_size // patch


def _missing_checkpoint(flag: str, path: str, what_to_do: str) -> str:
    where = "is a folder, not a checkpoint file" if os.path.isdir(path) else "no such file"
    return f"{flag} {path}: {where}; {what_to_do}"


RESUME_HINT = ("pass an existing checkpoint-<epoch>.pth, or leave --resume out (the newest checkpoint in --output_dir "
               "is then resumed, if there is one)")


def check_flags(args: argparse.Namespace) -> None:
    """The checks of the resolved flags that every long-running command shares, before anything is
    built: folders and files named by flags exist, --output_dir is not a file, numbers are in range,
    and --input_size is a multiple of --model's patch size. Each error names the flag and its value
    and says what to pass instead. A flag the command does not have is skipped."""
    output_dir = getattr(args, "output_dir", "")
    if output_dir and os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise SystemExit(f"--output_dir {output_dir} is a file, not a folder: pass a folder (it is created if "
                         "missing), or --output_dir '' to write nothing")
    try:
        if getattr(args, "data_path", None):
            expected = {"expected": CLASSIFICATION_LAYOUTS} if hasattr(args, "eval_data_path") else {}
            check_data_folder(args.data_path, **expected)
        if getattr(args, "eval_data_path", None):
            check_data_folder(args.eval_data_path, "--eval_data_path", EVAL_LAYOUT)
    except DataPathError as exc:
        raise SystemExit(str(exc)) from None
    resume = getattr(args, "resume", "")
    if resume and not os.path.exists(resume):
        raise SystemExit(_missing_checkpoint("--resume", resume, RESUME_HINT))
    finetune = getattr(args, "finetune", "")
    if finetune and not finetune.startswith(("https://", "http://")):
        from mcbeit.models.finetune_checkpoint import resolve_source

        try:
            resolve_source(finetune)  # a file, or a DeepSpeed folder with its model states
        except CheckpointError as exc:
            raise SystemExit(f"{exc}; or --finetune none to train from random initialisation") from None
    weights = getattr(args, "discrete_vae_weight_path", None)
    if weights and not os.path.exists(weights):
        from mcbeit.tokenizers.factory import _WEIGHT_HINTS, canonical_kind

        kind = getattr(args, "discrete_vae_type", None)
        try:
            expected = _WEIGHT_HINTS[canonical_kind(kind)]
        except (ValueError, KeyError):  # an unknown kind is said when the tokenizer is built
            expected = "the tokenizer's weights"
        raise SystemExit(f"--discrete_vae_weight_path {weights} does not exist: pass {expected}"
                         f"{f' (--discrete_vae_type {kind})' if kind else ''}, or leave the flag out for a RANDOM "
                         "tokenizer (smoke runs only)")
    check_at_least(args, 0, ("lr", "min_lr", "weight_decay", "warmup_epochs", "save_ckpt_steps", "save_ckpt_minutes",
                             "keep_last"))
    check_at_least(args, 1, ("print_freq",))
    model, input_size = getattr(args, "model", None), getattr(args, "input_size", None)
    if model and input_size is not None and (patch := patch_size_of(model)):
        check_patch_grid(input_size, patch, model)


ARCHITECTURE_FLAGS = ("model", "input_size", "rel_pos_bias", "abs_pos_emb", "layer_scale_init_value", "vocab_size",
                      "embed_dim", "hidden", "blocks_per_group", "discrete_vae_type", "nb_classes", "use_mean_pooling",
                      "linear_probe", "probe_layer")


def load_resumed_weights(model: torch.nn.Module, state: dict, path: str, args: argparse.Namespace, written_args,
                         shown: int = 8) -> None:
    """Load a resumed checkpoint's weights into ``model`` strictly. One of another architecture (another
    --model, width, depth, vocabulary, ...) raises StateDictMismatchError naming the checkpoint, the
    flags it was written with where they differ from this run's (``written_args``: the checkpoint's
    'args'), the keys and shapes that differ (the first ``shown`` of each kind), and what to do."""
    try:
        load_into(model, state, strict=True)
    except StateDictMismatchError as exc:
        raise StateDictMismatchError(_architecture_message(exc.report, model, path, args, written_args, shown),
                                     exc.report) from None


def _architecture_message(report, model: torch.nn.Module, path: str, args: argparse.Namespace, written_args,
                          shown: int) -> str:
    if getattr(args, "resume", ""):
        source, fix = f"--resume {path}", "or pass a checkpoint of this run's model as --resume"
    else:
        source = f"auto-resume from {path} (the newest checkpoint in --output_dir {args.output_dir})"
        fix = "or start afresh with another --output_dir (or --no_auto_resume)"
    written = vars(written_args) if isinstance(written_args, argparse.Namespace) else dict(written_args or {})
    differ = [f"--{k} {written[k]} (this run: {getattr(args, k)})" for k in ARCHITECTURE_FLAGS
              if k in written and hasattr(args, k) and written[k] != getattr(args, k)]
    flags = (f"it was written with {', '.join(differ)}" if differ else
             "its recorded flags equal this run's" if written else "the checkpoint does not record its flags")
    lines = []
    for kind, items in (("shape mismatch", [f"{k}: checkpoint {tuple(c)} vs model {tuple(m)}"
                                            for k, c, m in report.mismatched]),
                        ("missing (in the model, not in the checkpoint)", report.missing),
                        ("unexpected (in the checkpoint, not in the model)", report.unexpected)):
        lines += [f"  {kind}: {item}" for item in items[:shown]]
        if len(items) > shown:
            lines.append(f"  ... and {len(items) - shown} more ({kind.split(' (')[0]})")
    return (f"{source} is a checkpoint of another architecture than this run's {type(model).__name__} ({flags}): "
            f"{len(report.mismatched)} shape mismatches, {len(report.missing)} missing and {len(report.unexpected)} "
            "unexpected keys\n" + "\n".join(lines) + f"\nRun with the flags it was written with, {fix}")


def amp_settings(amp: str | None, device: torch.device) -> tuple[torch.dtype | None, torch.amp.GradScaler | None]:
    """(autocast dtype or None, GradScaler for fp16 or None) for ``--amp`` (None: bf16 on CUDA, off on CPU)."""
    if amp is None:
        if device.type != "cuda":
            return None, None
        amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if amp == "off":
        return None, None
    if amp == "bf16":
        return torch.bfloat16, None
    if device.type != "cuda":
        raise SystemExit("--amp fp16 needs a CUDA device (fp16 needs a gradient scaler and is slow on CPU); "
                         "use --amp bf16 or --amp off on CPU")
    return torch.float16, torch.amp.GradScaler("cuda")


def warmup_steps(args: argparse.Namespace, steps_per_epoch: int) -> int:
    """LR warm-up length in steps, shortened (with a warning) to the run when it is longer."""
    steps = args.warmup_steps if args.warmup_steps > 0 else args.warmup_epochs * steps_per_epoch
    total = args.epochs * steps_per_epoch
    if steps > total:
        log.warning("LR warm-up of %d steps is longer than the whole run (%d steps): warming up over the whole "
                    "run instead; set --warmup_epochs / --warmup_steps to choose", steps, total)
        steps = total
    return steps


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resume_path(args: argparse.Namespace) -> str | None:
    """``--resume``, else with ``--auto_resume`` the newest whole checkpoint in ``--output_dir`` (a damaged
    newer one is skipped with a warning), else None. A damaged ``--resume`` file is an error."""
    path = args.resume
    if not path and args.auto_resume and args.output_dir:
        latest = ckpt_io.latest_good_checkpoint(args.output_dir)
        if latest is None and ckpt_io.list_checkpoints(args.output_dir):
            raise SystemExit(f"auto-resume: every checkpoint in {args.output_dir} is damaged (see the warnings); "
                             "move them aside to start afresh, or pass --resume FILE")
        path = str(latest) if latest else ""
    if not path:
        return None
    if not os.path.isfile(path):
        raise SystemExit(_missing_checkpoint("--resume", path, RESUME_HINT))
    if path.endswith(".pth") and (problem := ckpt_io.checkpoint_problem(path)) is not None:
        raise SystemExit(f"--resume {path}: {problem}; pass an earlier checkpoint")
    return path


def position_state(info: DistInfo, epoch: int, steps_done: int, steps_per_epoch: int) -> dict:
    """The checkpoint entries that place a run: epoch, steps done in it, and every rank's random
    states. A collective (all ranks call it at the same step); rank 0 writes the result."""
    return {"epoch": epoch, "step_in_epoch": steps_done, "steps_per_epoch": steps_per_epoch,
            "global_step": epoch * steps_per_epoch + steps_done, "rng": gather_rng(info)}


def resume_position(ckpt: dict, path: str, steps_per_epoch: int, info: DistInfo, start_epoch: int,
                    restore_random_state: bool = True) -> tuple[int, int]:
    """(epoch to continue, steps of it already done) from a checkpoint's :func:`position_state`,
    restoring this rank's random generators so the run goes on bit for bit. A checkpoint without a
    position (released files, older ones) counts as the end of its epoch."""
    if "epoch" not in ckpt:
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


def save_checkpoint(args: argparse.Namespace, epoch: int, state: dict) -> Path:
    """Write `checkpoint-<epoch>.pth` atomically into --output_dir, then apply --keep_last."""
    path = ckpt_io.save_atomic(state, ckpt_io.checkpoint_path(args.output_dir, epoch))
    ckpt_io.prune_checkpoints(args.output_dir, getattr(args, "keep_last", 0), epoch)
    return path


def epoch_save_due(args: argparse.Namespace, epoch: int) -> bool:
    """Whether a checkpoint is written after ``epoch`` (the same answer on every rank): every
    --save_ckpt_freq epochs and after the last."""
    return bool(args.output_dir) and ((epoch + 1) % args.save_ckpt_freq == 0 or epoch + 1 == args.epochs)


def log_plan(args: argparse.Namespace, info: DistInfo, steps_per_epoch: int, amp_dtype: torch.dtype | None,
             start_epoch: int, resumed_from: str | None) -> None:
    """One line saying what the run will do, and a warning when a resumed run has nothing left to do."""
    log.info("%d steps per epoch, %d images per step (%d processes); amp %s; epochs %d..%d; output %s",
             steps_per_epoch, args.batch_size * info.world_size, info.world_size, amp_dtype or "off", start_epoch,
             args.epochs - 1, os.path.abspath(args.output_dir) if args.output_dir else "(none)")
    if start_epoch >= args.epochs:
        log.warning("nothing to do: %s already finished epoch %d of %d; pass --epochs N, --no_auto_resume "
                    "or another --output_dir to train again", resumed_from, start_epoch - 1, args.epochs)


def add_optimizer_arguments(p: argparse.ArgumentParser, *, opt_betas, min_lr: float, warmup_epochs_help: str,
                            lr: float = 5e-4) -> None:
    """The optimiser and schedule flags shared by pre-training and fine-tuning (the originals' names)."""
    p.add_argument("--opt", default="adamw", type=str, help="any optimizer timm knows")
    p.add_argument("--opt_eps", default=1e-8, type=float)
    p.add_argument("--opt_betas", default=opt_betas, type=float, nargs="+",
                   help="optimizer betas (default: the optimizer's own)" if opt_betas is None else None)
    p.add_argument("--clip_grad", type=float, default=None, help="clip the gradient norm (default: no clipping)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--weight_decay", type=float, default=0.05)
    p.add_argument("--weight_decay_end", type=float, default=None,
                   help="final weight decay of the cosine schedule (default: = --weight_decay)")
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--warmup_lr", type=float, default=1e-6,
                   help="accepted for compatibility: the original's warm-up starts at 0 and never reads it")
    p.add_argument("--min_lr", type=float, default=min_lr)
    p.add_argument("--warmup_epochs", type=int, default=None, help=warmup_epochs_help)
    p.add_argument("--warmup_steps", type=int, default=-1, help="LR warm-up in steps; overrides --warmup_epochs if > 0")


def add_runtime_arguments(p: argparse.ArgumentParser, *, output_dir: str, print_freq: int = 20) -> None:
    """Output, resume, device, precision, loader and launcher flags shared by the long-running commands."""
    p.add_argument("--output_dir", default=output_dir, help="where checkpoints and log.txt go; '' writes nothing")
    p.add_argument("--log_dir", default=None, help="TensorBoard folder (default: <output_dir>/tensorboard)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--seed", default=0, type=int)
    p.add_argument("--resume", default="", help="resume from this checkpoint")
    p.add_argument("--auto_resume", action="store_true", help="resume from the newest checkpoint in --output_dir (default)")
    p.add_argument("--no_auto_resume", action="store_false", dest="auto_resume")
    p.set_defaults(auto_resume=True)
    p.add_argument("--save_ckpt_steps", default=0, type=int,
                   help="also write a checkpoint every N optimizer steps, inside epochs (0: only at epoch ends); "
                        "a preempted run then loses at most N steps")
    p.add_argument("--save_ckpt_minutes", default=0.0, type=float,
                   help="also write a checkpoint when this many minutes passed since the last one (0: off)")
    p.add_argument("--keep_last", default=0, type=int,
                   help="keep only the newest K checkpoint-<epoch>.pth files (0 keeps all, as the original); "
                        "older ones are removed only after a new one is safely written")
    p.add_argument("--debug", action="store_true", help="debug logging")
    p.add_argument("--start_epoch", default=0, type=int)
    p.add_argument("--num_workers", default=min(10, os.cpu_count() or 1), type=int)
    p.add_argument("--pin_mem", action="store_true", help="pin host memory (default on; used with CUDA only)")
    p.add_argument("--no_pin_mem", action="store_false", dest="pin_mem")
    p.set_defaults(pin_mem=True)
    p.add_argument("--amp", default=None, choices=["bf16", "fp16", "off"],
                   help="mixed precision; default bf16 on CUDA (fp16 where bf16 is unsupported), off on CPU")
    p.add_argument("--print_freq", default=print_freq, type=int, help="steps between progress/TensorBoard updates")
    p.add_argument("--max_bad_fraction", default=0.01, type=float,
                   help="unreadable images (skipped, counted, logged by path) may be at most this share of an "
                        "epoch's files; more stops the run (1 disables the check)")
    p.add_argument("--max_bad_steps", default=20, type=int,
                   help="a step with a non-finite gradient is skipped and counted; this many in a row stop the run")
    p.add_argument("--world_size", default=1, type=int, help="number of processes (set by the launcher)")
    p.add_argument("--local_rank", "--local-rank", default=-1, type=int, dest="local_rank",
                   help="set by torch.distributed.launch; torchrun uses LOCAL_RANK")
    p.add_argument("--dist_on_itp", action="store_true")
    p.add_argument("--dist_url", default="env://", help="url used to set up distributed training")
    p.add_argument("--dist_timeout", default=30.0, type=float,
                   help="minutes a process waits in a collective for the others (a rank that hangs or died); "
                        "then it stops with an error, and torchrun --max-restarts can restart the group")


def add_recompute_argument(p: argparse.ArgumentParser, default: str) -> None:
    """``--recompute``: how much of each block's activations backward keeps (mcbeit.models.recompute)."""
    from mcbeit.models.recompute import RECOMPUTE_MODES

    p.add_argument("--recompute", default=default, choices=RECOMPUTE_MODES,
                   help=f"default {default}. selective: keep matrix-product outputs, recompute layer norms, GELU, "
                        "softmax in backward (a third less activation memory, ~3%% slower on a CPU); full: recompute "
                        "whole blocks (least memory); none: keep everything (fastest)")


def add_compile_arguments(p: argparse.ArgumentParser) -> None:
    """``--compile``: torch.compile the model and the loss (mcbeit.tasks.common.compile_modules)."""
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model and the loss: faster steps after the first ones, which compile "
                        "(minutes on a CPU); see `python -m bench --sections compile`")
    p.add_argument("--compile_backend", default="inductor",
                   help="torch.compile backend (inductor; aot_eager or eager find tracing problems fast)")
    p.add_argument("--compile_mode", default=None, choices=["default", "reduce-overhead", "max-autotune"],
                   help="torch.compile mode (default: torch's default)")


def compile_modules(args: argparse.Namespace, *modules: torch.nn.Module) -> None:
    """Compile each module's forward in place (``nn.Module.compile``: state dict keys unchanged)."""
    if not getattr(args, "compile", False):
        return
    for module in modules:
        module.compile(backend=args.compile_backend, mode=args.compile_mode)
    log.info("torch.compile (backend %s, mode %s): the first steps compile", args.compile_backend,
             args.compile_mode or "default")


def fill_defaults(args: argparse.Namespace, embedded: dict, real: dict) -> None:
    """Flags left at None take the embedded run's value without --data_path, the real run's with it."""
    table = embedded if args.data_path is None else real
    for key, value in table.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def finish_log(stats: dict, started: float, output_dir: str) -> None:
    """The run's last line: how long it took and where its files are."""
    if stats:
        log.info("done in %.1f s; checkpoints and log.txt in %s", time.perf_counter() - started,
                 os.path.abspath(output_dir) if output_dir else "(nowhere: --output_dir '')")


EXIT_DIVERGED = 3  # the run stopped on non-finite losses / gradients (its message names the last good checkpoint)
EXIT_BAD_DATA = 4  # too many unreadable images (their paths are in the warnings)
# Errors of the input (data folders, list files, checkpoints read or loaded) whose messages name the
# flag or file and say what to do: a SystemExit with the message, no traceback.
INPUT_ERRORS = (InputError, DataPathError, BadListFileError, CheckpointError)
EXIT_PEER_LOST = 5  # a collective failed: another process hung past --dist_timeout or died

# How gloo / NCCL / the store word a peer that stopped answering (their errors are plain RuntimeErrors)
_PEER_LOST = ("timeout", "timed out", "connection reset", "connection closed", "broken pipe", "pair closure",
              "connection refused")


def peer_lost(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed because another process hung or died."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    return isinstance(exc, dist.DistError) or (isinstance(exc, RuntimeError)
                                               and any(p in str(exc).lower() for p in _PEER_LOST))


def run_main(parser: argparse.ArgumentParser, argv, run: Callable[[argparse.Namespace], object],
             on_exit: Callable[[argparse.Namespace], None] | None = None) -> int:
    """Parse, then :func:`run_parsed`."""
    return run_parsed(parser.parse_args(argv), run, on_exit)


def run_parsed(args: argparse.Namespace, run: Callable[[argparse.Namespace], object],
               on_exit: Callable[[argparse.Namespace], None] | None = None) -> int:
    """Run, turn the stops that explain themselves into a message and an exit status (divergence 3,
    bad data 4, a lost peer 5, preemption 75; wrong input, whose message names the flag or file and says what
    to pass: SystemExit with the message, status 1, like the flag checks), and always leave the process group
    (and what ``on_exit`` releases)."""
    from mcbeit.engine.distributed import cleanup

    try:
        run(args)
    except INPUT_ERRORS as exc:  # a data folder without images, a checkpoint that does not fit, ...
        raise SystemExit(str(exc)) from None
    except NonFiniteLossError as exc:  # the message says what happened and which checkpoint is good
        log.error("%s", exc)
        return EXIT_DIVERGED
    except TooManyBadImagesError as exc:
        log.error("%s", exc)
        return EXIT_BAD_DATA
    except Preempted as exc:
        log.warning("%s", exc)
        return EXIT_PREEMPTED
    except Exception as exc:
        if not peer_lost(exc):
            raise
        log.error("this process (rank %s) lost the others: %s. Another process hung for more than --dist_timeout "
                  "(%g min) or died (its own log says why). Checkpoints already written are whole; run the same "
                  "command again, or let torchrun --max-restarts restart the group: it resumes from the newest one",
                  getattr(args, "rank", "?"), str(exc).splitlines()[0][:200], getattr(args, "dist_timeout", 30.0))
        return EXIT_PEER_LOST
    finally:
        if on_exit is not None:
            on_exit(args)
        cleanup()
    return 0
