"""Process-group setup for one process, `torchrun`, `torch.distributed.launch`, ITP/OpenMPI and SLURM.

Every launcher ends in the same place: RANK / WORLD_SIZE / LOCAL_RANK known, a process group
(nccl on CUDA, gloo on CPU) and a device for this process.
"""
from __future__ import annotations

import datetime
import inspect
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or dist.is_initialized()

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _launcher_env(dist_on_itp: bool, local_rank_flag: int, dist_url: str) -> tuple[int, int, int, str] | None:
    """(rank, world_size, local_rank, init_method) from the launcher's environment, or None."""
    env = os.environ
    if dist_on_itp:
        missing = [k for k in ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                               "OMPI_COMM_WORLD_LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in env]
        if missing:
            raise RuntimeError(f"--dist_on_itp needs the OpenMPI/ITP variables {missing} in the environment; "
                               "run under mpirun or drop --dist_on_itp")
        rank, world = int(env["OMPI_COMM_WORLD_RANK"]), int(env["OMPI_COMM_WORLD_SIZE"])
        local = int(env["OMPI_COMM_WORLD_LOCAL_RANK"])
        return rank, world, local, f"tcp://{env['MASTER_ADDR']}:{env['MASTER_PORT']}"
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, torch.distributed.launch
        local = int(env.get("LOCAL_RANK", local_rank_flag if local_rank_flag >= 0 else 0))
        return int(env["RANK"]), int(env["WORLD_SIZE"]), local, dist_url
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        if dist_url == "env://" and "MASTER_ADDR" not in env:
            raise RuntimeError("SLURM job with several tasks but no MASTER_ADDR/MASTER_PORT and --dist_url env://: "
                               "export MASTER_ADDR (first node) and MASTER_PORT, or pass --dist_url tcp://HOST:PORT")
        return (int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]),
                int(env.get("SLURM_LOCALID", "0")), dist_url)
    return None


def resolve_device(requested: str | None) -> torch.device:
    """The device named by `--device`, defaulting to CUDA when present; a clear error when it is not."""
    if requested in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {requested} asked for CUDA but this machine has no usable GPU; "
                           "pass --device cpu (or leave --device out to pick automatically)")
    return device


def _restart_store(init_method: str, timeout: datetime.timedelta):
    """Under torchrun, the agent's store seen through a prefix of its own for each restart attempt.

    When torchrun (``--max-restarts``) restarts the workers after one died, the store it serves
    still holds the previous attempt's process-group keys, gloo's peer addresses among them: a new
    worker could read a dead worker's address and fail to connect ("Connection refused") or wait.
    A prefix per attempt (``TORCHELASTIC_RESTART_COUNT``) keeps every attempt's keys apart.
    """
    env = os.environ
    if init_method != "env://" or env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False, timeout=timeout)
    return dist.PrefixStore(f"mcbeit/attempt_{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def init_distributed(device: str | None, dist_on_itp: bool = False, local_rank: int = -1,
                     dist_url: str = "env://", timeout_minutes: float = 30.0) -> DistInfo:
    """Join the process group if a launcher started us; otherwise run as a single process."""
    base = resolve_device(device)
    found = _launcher_env(dist_on_itp, local_rank, dist_url)
    if found is None:
        return DistInfo(device=base)
    rank, world, local, init_method = found
    if base.type == "cuda":
        torch.cuda.set_device(local)
        base = torch.device("cuda", local)
    backend = "nccl" if base.type == "cuda" else "gloo"
    if not dist.is_initialized():
        timeout = datetime.timedelta(minutes=timeout_minutes)
        extra = {"device_id": base} if backend == "nccl" else {}
        store = _restart_store(init_method, timeout)
        if store is not None:
            dist.init_process_group(backend=backend, store=store, world_size=world, rank=rank, timeout=timeout, **extra)
        else:
            dist.init_process_group(backend=backend, init_method=init_method, world_size=world, rank=rank,
                                    timeout=timeout, **extra)
    log.info("distributed: rank %d/%d (local %d), backend %s, device %s", rank, world, local, backend, base)
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=base)


def wrap_ddp(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """``model`` in DistributedDataParallel when there are several processes, else ``model`` itself.

    Buffers are broadcast from rank 0 before every forward only when the model has batch norm
    (running statistics: the linear probe); BEiT's and the tokenizers' buffers are constants (the
    relative position index, fixed biases) or updated identically on every rank, so broadcasting
    them would cost one collective per step for nothing.
    """
    if info.world_size <= 1:
        return model
    from torch.nn.modules.batchnorm import _BatchNorm
    from torch.nn.parallel import DistributedDataParallel

    has_batch_norm = any(isinstance(m, _BatchNorm) for m in model.modules())
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:  # torch >= 2.14
        return DistributedDataParallel(model, forward_sync_buffers=has_batch_norm)
    return DistributedDataParallel(model, broadcast_buffers=has_batch_norm)


def sync_batch_norm_buffers(model: torch.nn.Module, info: DistInfo) -> None:
    """Give every rank rank 0's buffers, as DDP does before each forward of a model with batch norm (see
    :func:`wrap_ddp`): after the last update each rank holds the running statistics of its own batches, and an
    evaluation should measure the ones the checkpoint holds (rank 0's). Nothing to do for one process or a model
    without batch norm (its buffers are the same everywhere); training is unchanged (the next forward does it)."""
    from torch.nn.modules.batchnorm import _BatchNorm

    if info.world_size <= 1 or not dist.is_initialized() or not any(isinstance(m, _BatchNorm) for m in model.modules()):
        return
    for buffer in model.buffers():
        dist.broadcast(buffer, 0)


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    """Sum of `t` over ranks, on the backend's device (nccl needs CUDA tensors), back on `t`'s device."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return t
    on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else t.device
    out = t.detach().clone().to(on)
    dist.all_reduce(out)
    return out.to(t.device)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    return _all_reduce(t)


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of `t` over ranks (`t` itself when not distributed)."""
    if not dist.is_initialized():
        return t
    return _all_reduce(t) / dist.get_world_size()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
