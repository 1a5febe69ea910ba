"""DeepSpeed training (``--enable_deepspeed``): ZeRO stage 0/1/2, AMP, gradient clipping, resumable checkpoints.

Unlike the original BEiT scripts (whose DeepSpeed config fixed Adam with betas (0.9, 0.999), eps
1e-8, fp16 and no clipping), the run's own optimizer is handed to DeepSpeed: the one
:func:`mcbeit.engine.optim.build_optimizer` builds, so ``--opt_betas``, ``--opt_eps``, the per-group
weight decay and the layer-decay ``lr_scale`` are the same as without DeepSpeed, and
:func:`mcbeit.engine.schedules.apply_schedules` on :attr:`DeepSpeedTrainer.optimizer` drives the
schedules. ``--clip_grad`` becomes DeepSpeed's ``gradient_clipping``; ``--update_freq`` its
``gradient_accumulation_steps``.

Precision: ``--amp bf16`` / ``fp16`` becomes DeepSpeed's ``torch_autocast`` section, so the weights
stay fp32 and the forward runs under ``torch.autocast``, the same numerics as the plain path (the
model EMA, evaluation and the exported weights see fp32 weights). DeepSpeed's own ``bf16`` /
``fp16`` sections (weights kept in half precision) are not used: timm's BEiT keeps an fp32
``k_bias`` buffer the conversion leaves alone, and on CUDA the engine switches off an outer
``torch.autocast`` in that mode, so the forward fails on mixed dtypes. fp16 needs ZeRO stage 0:
DeepSpeed 0.19.8 clips with the loss-scaled norm and steps its GradScaler once per parameter group
under ZeRO 1/2 with torch_autocast fp16 (updates and reported norms are wrong).

Machines without a GPU: DeepSpeed's CPU accelerator with gloo. :func:`prepare_accelerator` sets
``DS_ACCELERATOR=cpu`` when the run is on the CPU and the variable is unset; it must run before
``deepspeed`` is first imported (DeepSpeed picks its accelerator once per process). Started without
a launcher, the trainer opens a one-process group itself (DeepSpeed needs one).

Checkpoints are DeepSpeed's folders ``<output_dir>/checkpoint-<epoch>/`` with a ``latest`` file.
Every rank must call :meth:`DeepSpeedTrainer.save`. The ranks write into a hidden staging folder;
once all have, rank 0 adds ``mcbeit_checkpoint.json`` (epoch, processes, ZeRO stage, every file's
size) and renames the folder into place, so a crash or a full disk never leaves a half-written
folder under a checkpoint's name. Auto-resume checks the newest folder (files and sizes against
the marker, the zip CRCs of every ``.pt``) and falls back to the previous whole one with a warning
(:func:`find_resumable`); ``--keep_last`` prunes as for ``.pth`` files. Files are read back with
``weights_only=True``.
"""
from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.distributed as dist
from torch import nn

from mcbeit.models.checkpoint import UnsafeCheckpointError
from mcbeit.engine.checkpoint import CheckpointWriteError, write_failure, checkpoint_problem, write_atomic

log = logging.getLogger(__name__)

__all__ = [
    "MARKER", "prepare_accelerator", "import_deepspeed", "deepspeed_config", "DeepSpeedTrainer",
    "list_deepspeed_checkpoints", "find_resumable", "resume_checkpoint", "release_process_group",
    "deepspeed_checkpoint_problem", "prune_deepspeed_checkpoints",
]

#: written by rank 0 into a checkpoint folder once every rank has saved its part
MARKER = "mcbeit_checkpoint.json"
_TAG_RE = re.compile(r"^checkpoint-(\d+)$")
_MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
_STAGING, _REPLACED = ".saving-", ".replaced-"  # prefixes of the folders a save works in (hidden)
_INSTALL_HINT = 'pip install -e ".[deepspeed]"'
_created_group = False  # whether this module opened the process group (release_process_group closes it)


# ----------------------------------------------------------------------------------------------- setup

def prepare_accelerator(device: torch.device | str) -> None:
    """Point DeepSpeed at ``device``'s kind before it is imported: ``DS_ACCELERATOR=cpu`` for a CPU run.

    DeepSpeed would also fall back to its CPU accelerator on a machine without CUDA (with a
    warning), but a CPU run on a machine that has a GPU would silently move the model to the
    GPU. A conflicting ``DS_ACCELERATOR``, or a deepspeed already imported with another
    accelerator, is an error.
    """
    kind = torch.device(device).type
    if kind not in ("cpu", "cuda"):
        raise SystemExit(f"--enable_deepspeed supports CUDA and CPU devices here, not {kind!r}")
    current = os.environ.get("DS_ACCELERATOR")
    if current is None and kind == "cpu" and "deepspeed" not in sys.modules:
        os.environ["DS_ACCELERATOR"] = "cpu"
        log.info("DeepSpeed on the CPU: DS_ACCELERATOR=cpu (gloo for the process group)")
        current = "cpu"
    if current is not None and current != kind:
        raise SystemExit(f"DS_ACCELERATOR={current} but the run is on {kind}: unset DS_ACCELERATOR "
                         f"or set it to {kind} (or pass --device {current})")
    if "deepspeed.accelerator" in sys.modules:
        from deepspeed.accelerator import get_accelerator

        chosen = get_accelerator().device_name()
        if chosen != kind:
            raise SystemExit(f"deepspeed was imported with its {chosen} accelerator but the run is on {kind}: "
                             f"set DS_ACCELERATOR={kind} before anything imports deepspeed")


def import_deepspeed(device: torch.device | str | None = None):
    """``import deepspeed`` (after :func:`prepare_accelerator` when ``device`` is given), with a clear error."""
    if device is not None:
        prepare_accelerator(device)
    try:
        import deepspeed
    except ImportError as e:
        raise SystemExit(f"--enable_deepspeed needs DeepSpeed, which is not installed ({e}): {_INSTALL_HINT} "
                         "(on a machine without a GPU it runs on DeepSpeed's CPU accelerator)") from e
    return deepspeed


def _amp_name(amp: str | torch.dtype | None) -> str | None:
    if amp in (None, "off", "none", torch.float32):
        return None
    if amp in ("bf16", "bfloat16", torch.bfloat16):
        return "bf16"
    if amp in ("fp16", "float16", torch.float16):
        return "fp16"
    raise ValueError(f"amp must be None, 'off', 'bf16' or 'fp16' (or the torch dtype), got {amp!r}")


def deepspeed_config(*, batch_size: int, update_freq: int = 1, world_size: int = 1,
                     amp: str | torch.dtype | None = None, zero_stage: int = 0, clip_grad: float | None = None,
                     steps_per_print: int = 2**31 - 1, device: torch.device | str | None = None) -> dict[str, Any]:
    """The DeepSpeed config of a run: batch sizes, accumulation, ZeRO stage, clipping, precision.

    ``batch_size`` is per process and micro-batch (``--batch_size``); ``update_freq`` micro-batches
    make one update. ``amp`` is the *resolved* precision (``amp_settings``' dtype, or 'bf16' /
    'fp16' / None). There is no ``optimizer`` section: the run's own optimizer is passed to
    :class:`DeepSpeedTrainer` (betas, eps, per-group weight decay and lr scales included).
    ``device``, when given, rejects fp16 on the CPU as ``amp_settings`` does.
    """
    for name, value in (("batch_size", batch_size), ("update_freq", update_freq), ("world_size", world_size)):
        if int(value) < 1:
            raise SystemExit(f"--{name} must be at least 1 with --enable_deepspeed, got {value}")
    if zero_stage not in (0, 1, 2):
        hint = (" (stage 3 partitions the weights themselves, which the model EMA, evaluation on the bare "
                "model and the exported checkpoint would see as empty)" if zero_stage == 3 else "")
        raise SystemExit(f"--zero_stage {zero_stage} is not supported: use 0, 1 or 2{hint}")
    precision = _amp_name(amp)
    if precision == "fp16" and device is not None and torch.device(device).type != "cuda":
        raise SystemExit("--amp fp16 needs a CUDA device (fp16 needs a gradient scaler and is slow on CPU); "
                         "use --amp bf16 or --amp off on CPU")
    if precision == "fp16" and zero_stage > 0:
        raise SystemExit(f"--amp fp16 with --zero_stage {zero_stage}: DeepSpeed's torch_autocast fp16 under ZeRO 1/2 "
                         "clips with the loss-scaled gradient norm and updates its GradScaler once per parameter "
                         "group (wrong updates); use --amp bf16, or --zero_stage 0 with fp16")
    config: dict[str, Any] = {
        "train_batch_size": int(batch_size) * int(update_freq) * int(world_size),
        "train_micro_batch_size_per_gpu": int(batch_size),
        "gradient_accumulation_steps": int(update_freq),
        "gradient_clipping": float(clip_grad) if clip_grad else 0.0,
        "zero_optimization": {"stage": int(zero_stage)},
        "steps_per_print": int(steps_per_print),
        "wall_clock_breakdown": False,
    }
    if precision is not None:
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16" if precision == "bf16" else "float16"}
    return config


def _ensure_process_group(device: torch.device, local_rank: int) -> None:
    """DeepSpeed needs a process group and ``LOCAL_RANK``: open a one-process group when no launcher did."""
    global _created_group
    os.environ.setdefault("LOCAL_RANK", str(local_rank))
    if dist.is_initialized():
        return
    release_process_group()  # DeepSpeed may still hold groups of a process group closed since (same process)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        raise RuntimeError(f"WORLD_SIZE={world} but no process group: call mcbeit.engine.distributed.init_distributed "
                           "before creating the DeepSpeed trainer")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                            **({"device_id": device} if backend == "nccl" else {}))
    _created_group = True


def release_process_group() -> None:
    """Close the one-process group the trainer opened (if it did) and drop DeepSpeed's references to
    it, so a later run in the same process (an in-process test) starts clean. Also fine after
    ``mcbeit.engine.distributed.cleanup()`` closed it. A group a launcher opened is left alone."""
    global _created_group
    comm = sys.modules.get("deepspeed.comm.comm")
    if _created_group and dist.is_initialized():
        if comm is not None and comm.cdb is not None:
            comm.destroy_process_group()  # DeepSpeed's: also forgets the groups it derived from it
        else:
            dist.destroy_process_group()
    _created_group = False
    if comm is not None and not dist.is_initialized():
        groups = sys.modules.get("deepspeed.utils.groups")
        if groups is not None and hasattr(groups, "_release_process_group_references"):
            groups._release_process_group_references(group=None)
        comm.cdb = None


# ------------------------------------------------------------------------------------------- trainer

def _safe_globals() -> list:
    """The classes (besides plain containers and tensors) DeepSpeed pickles into its checkpoints."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _safe_load(path: str, map_location: Any = None) -> Any:
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        refused = sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(e))))
        why = f"it needs {', '.join(refused)}" if refused else str(e).splitlines()[0]
        raise UnsafeCheckpointError(f"{path}: not readable with weights_only=True ({why}); a DeepSpeed checkpoint "
                                    "holding other objects is not loaded here (unpickling could run code)") from e


def _reset_autocast_globals() -> None:
    """DeepSpeed records torch_autocast's dtype in module globals that outlive the engine; a later engine
    without torch_autocast would still see them (ZeRO would then build a GradScaler for fp16 or reduce
    gradients in bf16). Clear them before each engine: the new one sets them again if it autocasts."""
    module = sys.modules.get("deepspeed.runtime.torch_autocast")
    if module is not None and hasattr(module, "TORCH_AUTOCAST_INITIALIZED"):
        module.TORCH_AUTOCAST_INITIALIZED = False
        module.TORCH_AUTOCAST_DTYPE = None


class DeepSpeedTrainer:
    """A DeepSpeed engine over the run's model and optimizer.

    ``optimizer``: the optimizer of the plain path (:func:`mcbeit.engine.optim.build_optimizer`); its
    parameter groups (``lr_scale``, per-group ``weight_decay``) survive inside DeepSpeed, so
    ``apply_schedules(trainer.optimizer, lr, wd)`` sets this update's values. Under ZeRO 1/2 only
    the elementwise optimizers DeepSpeed has tested (Adam, AdamW, Adagrad) are accepted: ZeRO
    flattens parameters, which breaks per-tensor optimizers such as LAMB.

    Per micro-batch: forward through :attr:`engine` (or the trainer itself), then
    :meth:`step` with the micro-batch's loss (not divided by ``update_freq``: DeepSpeed does that).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, config: Mapping[str, Any], *,
                 device: torch.device | str | None = None, local_rank: int = 0):
        if device is None:
            device = next(model.parameters()).device
        device = torch.device(device)
        deepspeed = import_deepspeed(device)
        config = dict(config)
        self.zero_stage = int(config.get("zero_optimization", {}).get("stage", 0))
        if self.zero_stage > 0:
            from deepspeed.runtime.zero.utils import ZERO_SUPPORTED_OPTIMIZERS

            if type(optimizer) not in ZERO_SUPPORTED_OPTIMIZERS:
                raise SystemExit(f"{type(optimizer).__name__} with --zero_stage {self.zero_stage}: ZeRO flattens "
                                 "parameters into partitions, which only the elementwise optimizers DeepSpeed "
                                 "has tested handle (Adam, AdamW, Adagrad); use --opt adamw or --zero_stage 0")
        _ensure_process_group(device, local_rank)
        per_update = config["train_micro_batch_size_per_gpu"] * config.get("gradient_accumulation_steps", 1)
        if config.get("train_batch_size", per_update * dist.get_world_size()) != per_update * dist.get_world_size():
            raise SystemExit(f"DeepSpeed config for {config['train_batch_size'] // per_update} processes but "
                             f"{dist.get_world_size()} are running: pass world_size=<number of processes> "
                             "to deepspeed_config")
        autocast = config.get("torch_autocast", {})
        self.autocast_dtype: torch.dtype | None = (
            {"bfloat16": torch.bfloat16, "float16": torch.float16}[autocast.get("dtype", "bfloat16")]
            if autocast.get("enabled") else None)
        _reset_autocast_globals()
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        self.config = config
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()
        ckpt_engine = getattr(self.engine, "checkpoint_engine", None)
        if ckpt_engine is not None and hasattr(ckpt_engine, "load"):
            ckpt_engine.load = _safe_load  # weights_only=True instead of DeepSpeed's full unpickling

    # -- training

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The engine's optimizer (ZeRO's wrapper under ZeRO 1/2); its ``param_groups`` are the run's groups."""
        return self.engine.optimizer

    @property
    def module(self) -> nn.Module:
        """The bare model (fp32 weights, whole on every rank): for EMA, evaluation and exports."""
        return self.engine.module

    @property
    def device(self) -> torch.device:
        return torch.device(self.engine.device)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.engine(*args, **kwargs)

    def step(self, loss: torch.Tensor) -> torch.Tensor | None:
        """Backward for this micro-batch; on the last of ``update_freq`` also clip and step.

        Returns the gradient norm before clipping (a 0-d float tensor; ``inf`` when fp16 overflowed
        and the update was skipped) on the update's last micro-batch, None on the others.
        """
        engine = self.engine
        boundary = engine.is_gradient_accumulation_boundary()
        engine.backward(loss)
        norm = self._stage0_norm() if boundary and self.zero_stage == 0 else None
        engine.step()
        if not boundary:
            return None
        if norm is None:
            reported = engine.get_global_grad_norm()
            norm = torch.as_tensor(float("nan") if reported is None else reported)
        return norm.detach().to(self.device, torch.float32).reshape(())

    def _stage0_norm(self) -> torch.Tensor:
        """Without ZeRO DeepSpeed does not report the norm: the all-reduced gradients' norm (unscaled)."""
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.device)
        scaler = getattr(self.engine, "torch_autocast_z0_gradscaler", None)
        if scaler is not None:
            norm = norm.float() / scaler._get_scale_async().reshape(()).to(norm.device)
        return norm

    def loss_scale(self) -> torch.Tensor:
        """The fp16 loss scale (1 without fp16), as a 0-d tensor."""
        scaler = (getattr(self.engine, "torch_autocast_z0_gradscaler", None)
                  or getattr(self.engine.optimizer, "torch_autocast_gradscaler", None))
        if scaler is None:
            return torch.ones((), device=self.device)
        scale = scaler._get_scale_async()  # a device tensor (no sync); None before the first backward
        return torch.tensor(float(scaler.get_scale())) if scale is None else scale.detach().reshape(()).float()

    # -- checkpoints

    def save(self, output_dir: str | os.PathLike, epoch: int | str,
             client_state: Mapping[str, Any] | None = None, *, keep_last: int = 0) -> Path:
        """Write ``<output_dir>/checkpoint-<epoch>/`` (every rank must call this).

        Every rank writes its files into a staging folder; once all have (DeepSpeed's save ends with
        a barrier), rank 0 adds :data:`MARKER` listing every file and its size, and swaps the staging
        folder in for ``checkpoint-<epoch>/``. A crash or a full disk mid-save leaves the previous
        folder of that name whole (a mid-epoch save rewrites its epoch's folder).

        ``latest`` names the newest numbered checkpoint (a resume point): saving ``epoch='best'``
        leaves it alone. ``keep_last`` > 0 then removes all but the newest ``keep_last`` numbered
        folders up to this epoch. ``client_state`` (plain containers and tensors: it is read back
        with ``weights_only=True``; e.g. ``args`` through ``plain_args``, the EMA's state dict) comes
        back from :meth:`load`; ``epoch`` is added to it unless given.
        """
        output_dir = Path(output_dir)
        tag = f"checkpoint-{epoch}"
        staging, folder = output_dir / f"{_STAGING}{tag}", output_dir / tag
        state = dict(client_state or {})
        state.setdefault("epoch", epoch)
        if self.rank == 0:
            output_dir.mkdir(parents=True, exist_ok=True)
            _remove_leftovers(output_dir, tag)  # of a save a crash interrupted
        dist.barrier()
        try:
            self.engine.save_checkpoint(str(output_dir), tag=staging.name, client_state=state, save_latest=False)
        except BaseException as exc:
            cause = write_failure(exc)
            if cause is None:
                raise
            raise CheckpointWriteError(f"could not write {folder}: {cause}; the previous checkpoints are untouched "
                                       f"(the partial {staging.name} is removed at the next save). Free space, "
                                       "then run again (auto-resume continues from the newest good one)") from exc
        if self.rank == 0:  # every rank's files are written
            info = {"epoch": epoch, "tag": tag, "world_size": self.world_size, "zero_stage": self.zero_stage,
                    "amp": {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.autocast_dtype),
                    "deepspeed": importlib.metadata.version("deepspeed"), "files": _file_sizes(staging)}
            _write_atomic(staging / MARKER, json.dumps(info, indent=1) + "\n")
            _swap_in(staging, folder)
            if str(epoch).isdigit():
                _write_atomic(output_dir / "latest", tag)
                prune_deepspeed_checkpoints(output_dir, keep_last, int(epoch))
        dist.barrier()
        return folder

    def load(self, checkpoint: str | os.PathLike, *, weights_only: bool = False) -> dict[str, Any]:
        """Restore a checkpoint folder (``.../checkpoint-<epoch>``, or an output folder with ``latest``).

        Model, optimizer and DeepSpeed's step counters; ``weights_only=True`` restores the model
        weights only (a fresh optimizer), which also works when the checkpoint's ZeRO stage or
        number of processes differs. Returns the ``client_state`` given to :meth:`save`.
        """
        folder = _checkpoint_folder(Path(checkpoint))
        saved = _read_marker(folder)
        if saved is not None and not weights_only:
            problem = None
            if saved.get("zero_stage") != self.zero_stage:
                problem = f"ZeRO stage {saved.get('zero_stage')}, this run uses {self.zero_stage}"
            elif self.zero_stage > 0 and saved.get("world_size") != self.world_size:
                problem = (f"{saved.get('world_size')} processes under ZeRO stage {self.zero_stage} (the optimizer "
                           f"state is split {saved.get('world_size')} ways), this run has {self.world_size}")
            if problem:
                raise SystemExit(f"cannot resume from {folder}: it was written with {problem}. Resume with the same "
                                 "--zero_stage and number of processes, or start from its weights only "
                                 "(--finetune with the folder, or load(..., weights_only=True))")
        from deepspeed.runtime.zero.utils import ZeRORuntimeException

        try:
            path, client_state = self.engine.load_checkpoint(
                str(folder.parent), tag=folder.name, load_optimizer_states=not weights_only,
                load_lr_scheduler_states=False, load_module_only=weights_only)
        except ZeRORuntimeException as e:
            raise SystemExit(f"cannot resume from {folder}: {e} Load its weights only instead.") from e
        if path is None:
            raise SystemExit(f"{folder} is not a DeepSpeed checkpoint (no {_MODEL_STATES[0]})")
        log.info("resumed from %s%s", folder, " (weights only)" if weights_only else "")
        return dict(client_state or {})


def _write_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def _file_sizes(folder: Path) -> dict[str, int]:
    """Every file under ``folder`` (relative path -> bytes): the marker's manifest."""
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def _remove_leftovers(output_dir: Path, tag: str) -> None:
    """Staging / replaced folders of ``tag`` that an interrupted save left behind."""
    for prefix in (_STAGING, _REPLACED):
        leftover = output_dir / f"{prefix}{tag}"
        if leftover.exists():
            log.warning("removing %s, left by a save that did not finish", leftover)
            shutil.rmtree(leftover)


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


# --------------------------------------------------------------------------------- finding checkpoints

def _read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _has_model_states(folder: Path) -> bool:
    return any((folder / name).is_file() for name in _MODEL_STATES)


def deepspeed_checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """Why ``folder`` is not a whole DeepSpeed checkpoint (None when it is): no model states, a file
    the marker lists missing or of another size, or a ``.pt`` file that is truncated or fails its
    CRC. Reads every file once; unpickles nothing."""
    folder = Path(folder)
    if not _has_model_states(folder):
        return f"no {_MODEL_STATES[0]}"
    marker = _read_marker(folder)
    listed = (marker or {}).get("files") or {}
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


def _checkpoint_folder(path: Path) -> Path:
    """``path`` itself when it holds model states, else the tag its ``latest`` file names."""
    if _has_model_states(path):
        return path
    latest = path / "latest"
    if latest.is_file():
        folder = path / latest.read_text().strip()
        if _has_model_states(folder):
            return folder
    raise SystemExit(f"{path} is not a DeepSpeed checkpoint: pass a checkpoint-<epoch> folder "
                     f"(holding {_MODEL_STATES[0]}) or an output folder whose 'latest' file names one")


def list_deepspeed_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(epoch, folder) of every complete ``checkpoint-<epoch>/`` in ``output_dir``, oldest first.

    Complete: holds :data:`MARKER` (written after every rank saved). A folder from other DeepSpeed
    code (no marker) counts only when ``latest`` names it and it holds the model states. A folder
    moved aside by a save that a crash stopped before its second rename counts under its epoch
    when no folder of that name exists.
    """
    root = Path(output_dir)
    if not root.is_dir():
        return []
    latest = (root / "latest").read_text().strip() if (root / "latest").is_file() else None
    found = {}
    for folder in root.iterdir():
        name = folder.name.removeprefix(_REPLACED)
        match = _TAG_RE.match(name)
        if not match or not folder.is_dir() or (name != folder.name and (root / name).exists()):
            continue
        if (folder / MARKER).is_file() or (folder.name == latest and _has_model_states(folder)):
            found[int(match.group(1))] = folder
    return sorted(found.items())


def find_resumable(output_dir: str | os.PathLike) -> Path | None:
    """The newest whole DeepSpeed checkpoint folder in ``output_dir``, or None. A newer damaged one
    (:func:`deepspeed_checkpoint_problem`) is named in a warning, left in place, and skipped."""
    found = list_deepspeed_checkpoints(output_dir)
    for _, folder in reversed(found):
        problem = deepspeed_checkpoint_problem(folder)
        if problem is None:
            return folder
        log.warning("auto-resume: skipping %s: %s; trying the previous checkpoint", folder, problem)
    if found:
        raise SystemExit(f"auto-resume: every DeepSpeed checkpoint in {output_dir} is damaged (see the warnings); "
                         "move them aside to start afresh, or pass --resume FOLDER")
    return None


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
            raise SystemExit(f"--resume {resume}: no such folder")
        folder = _checkpoint_folder(path)
        problem = deepspeed_checkpoint_problem(folder)
        if problem is not None:
            raise SystemExit(f"--resume {folder}: {problem}; pass an earlier checkpoint folder")
        return folder
    if auto_resume and output_dir:
        return find_resumable(output_dir)
    return None
