"""DeepSpeed in this process: its accelerator chosen before it is imported, the import, the process
group it needs, and the process-wide state it keeps between engines.

DeepSpeed picks its accelerator once per process, at import: :func:`prepare_accelerator` sets
``DS_ACCELERATOR=cpu`` for a CPU run (when unset) and must run before ``deepspeed`` is first
imported. Started without a launcher, :func:`ensure_process_group` opens a one-process group (DeepSpeed
needs one) and :func:`release_process_group` closes it again, so that several runs can share one
process (in-process tests). :func:`build_engine` is ``deepspeed.initialize`` after clearing what an
earlier engine of this process left behind.
"""
from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mcbeit.errors import ConfigError, InputError

log = logging.getLogger("mcbeit.engine.deepspeed")

__all__ = ["build_engine", "ensure_process_group", "import_deepspeed", "prepare_accelerator", "release_process_group"]

_INSTALL_HINT = 'pip install -e ".[deepspeed]"'
_created_group = False  # whether this module opened the process group (release_process_group closes it)
_engine_built = False   # whether a DeepSpeed engine was built since DeepSpeed last let go of its groups


def prepare_accelerator(device: torch.device | str) -> None:
    """Point DeepSpeed at ``device``'s kind before it is imported: ``DS_ACCELERATOR=cpu`` for a CPU run.

    DeepSpeed would also fall back to its CPU accelerator on a machine without CUDA (with a
    warning), but a CPU run on a machine that has a GPU would silently move the model to the
    GPU. A conflicting ``DS_ACCELERATOR``, or a deepspeed already imported with another
    accelerator, is an error.
    """
    kind = torch.device(device).type
    if kind not in ("cpu", "cuda"):
        raise ConfigError(f"--enable_deepspeed supports CUDA and CPU devices here, not {kind!r}")
    current = os.environ.get("DS_ACCELERATOR")
    if current is None and kind == "cpu" and "deepspeed" not in sys.modules:
        os.environ["DS_ACCELERATOR"] = "cpu"
        log.info("DeepSpeed on the CPU: DS_ACCELERATOR=cpu (gloo for the process group)")
        current = "cpu"
    if current is not None and current != kind:
        raise ConfigError(f"DS_ACCELERATOR={current} but the run is on {kind}: unset DS_ACCELERATOR "
                          f"or set it to {kind} (or pass --device {current})")
    if "deepspeed.accelerator" in sys.modules:
        from deepspeed.accelerator import get_accelerator

        chosen = get_accelerator().device_name()
        if chosen != kind:
            raise InputError(f"deepspeed was imported with its {chosen} accelerator but the run is on {kind}: "
                             f"set DS_ACCELERATOR={kind} before anything imports deepspeed")


def import_deepspeed(device: torch.device | str | None = None):
    """``import deepspeed`` (after :func:`prepare_accelerator` when ``device`` is given), with a clear error."""
    if device is not None:
        prepare_accelerator(device)
    try:
        import deepspeed
    except ImportError as e:
        raise InputError(f"--enable_deepspeed needs DeepSpeed, which is not installed ({e}): {_INSTALL_HINT} "
                         "(on a machine without a GPU it runs on DeepSpeed's CPU accelerator)") from e
    return deepspeed


def ensure_process_group(device: torch.device, local_rank: int) -> None:
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
    if backend == "nccl" and device.index is None:  # torch wants the device_id of a group with an index
        device = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                            **({"device_id": device} if backend == "nccl" else {}))
    _created_group = True


def release_process_group() -> None:
    """Close the one-process group the trainer opened (if it did) and have DeepSpeed let go of the
    groups it derived from it, so a later run in the same process (an in-process test) starts clean.
    Also fine after ``mcbeit.engine.distributed.cleanup()`` closed it. A group a launcher opened and
    that is still open is left alone."""
    global _created_group, _engine_built
    if _created_group and dist.is_initialized():
        _destroy_world()
    elif _engine_built and not dist.is_initialized():
        # DeepSpeed 0.19.x: deepspeed.utils.groups caches the groups deepspeed.initialize derives from the
        # world and drops them only in deepspeed.comm.destroy_process_group, which needs the world open;
        # after a plain torch.distributed.destroy_process_group (mcbeit's cleanup) a later engine would
        # reuse dead groups. Open a private one-process group only to close it DeepSpeed's way.
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        _destroy_world()
    _created_group = False
    if not dist.is_initialized():
        _engine_built = False


def _destroy_world() -> None:
    """Close the default process group through DeepSpeed when it knows the group (it then also forgets
    the groups it derived from it), else through torch."""
    comm = sys.modules.get("deepspeed.comm")
    if comm is not None and comm.is_initialized():
        comm.destroy_process_group()
    else:
        dist.destroy_process_group()


def _forget_previous_autocast() -> None:
    """Clear the torch_autocast dtype an earlier engine of this process recorded (see the comment)."""
    torch_autocast = sys.modules.get("deepspeed.runtime.torch_autocast")
    if torch_autocast is not None and torch_autocast.is_autocast_initialized():
        # DeepSpeed 0.19.x: an engine with torch_autocast records its dtype in these module globals and
        # nothing resets them; a later engine without torch_autocast still reads them (ZeRO then builds
        # a GradScaler for fp16, or reduces gradients in bf16). The new engine sets them if it autocasts.
        torch_autocast.TORCH_AUTOCAST_INITIALIZED = False
        torch_autocast.TORCH_AUTOCAST_DTYPE = None


def build_engine(deepspeed: Any, model: nn.Module, optimizer: torch.optim.Optimizer, config: Mapping[str, Any]):
    """``deepspeed.initialize`` of ``model`` and ``optimizer`` in the process group already open: the engine."""
    global _engine_built
    _forget_previous_autocast()
    _engine_built = True
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=dict(config))
    return engine
