"""How the product's pre-training step scales: with the batch size, with the input size, and from
one process to two (gloo on the CPU, NCCL on GPUs) at a fixed batch per process."""
from __future__ import annotations

import dataclasses
import os
import socket
import statistics
import time

import torch
import torch.multiprocessing as mp

from mcbeit.bench.measure import PhaseTimer
from mcbeit.bench.step import StepConfig, build, step

TINY, BASE = "beit_tiny_patch16_224_8k_vocab", "beit_base_patch16_224_8k_vocab"


def _time_steps(cfg: StepConfig) -> float:
    run, _, batch = build(cfg)
    timer = PhaseTimer(run.device)
    for i in range(cfg.warmup + cfg.steps):
        timer.start()
        step(run, batch, mark=timer.mark)
        timer.stop(i >= cfg.warmup)
    return timer.medians()["step"]


def _worker(rank: int, world: int, port: int, cfg: StepConfig, out) -> None:
    import torch.distributed as dist

    from mcbeit.engine.distributed import DistInfo

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world) if cfg.device == "cpu" else 1)
    backend = "gloo" if cfg.device == "cpu" else "nccl"
    device = torch.device(cfg.device if cfg.device == "cpu" else f"cuda:{rank}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        cfg = dataclasses.replace(cfg, device=str(device))
        run, _, batch = build(cfg, info=DistInfo(rank=rank, world_size=world, device=device))  # DDP, as in training
        times = []
        for i in range(cfg.warmup + cfg.steps):
            dist.barrier()
            t0 = time.perf_counter()
            step(run, batch)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= cfg.warmup:
                times.append(time.perf_counter() - t0)
        if rank == 0:
            out.put(statistics.median(times))
    finally:
        dist.destroy_process_group()


def time_processes(cfg: StepConfig, world: int) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(world, port, cfg, out), nprocs=world, join=True, start_method="spawn")
    return out.get()


def run_scaling(device: str, quick: bool = False) -> dict:
    model = TINY if device == "cpu" else BASE
    base = dict(model=model, tokenizer="customized" if quick else "vqgan", device=device, reference=False,
                memory=False, steps=1 if quick else 2, warmup=0 if quick else 1)
    batches = (2, 4) if quick else (4, 8, 16)
    sizes = (64, 96) if quick else (160, 224, 288)
    fixed_size = 64 if quick else 224
    result = {"model": model, "batch": [], "input_size": [], "processes": []}
    print(f"\nScaling of the product's step ({model.replace('_patch16_224_8k_vocab', '')}, {base['tokenizer']} tokenizer, "
          f"fp32): seconds per step")
    for b in batches:
        s = _time_steps(StepConfig(batch_size=b, input_size=fixed_size, **base))
        result["batch"].append({"batch_size": b, "step_s": s, "images_per_s": b / s})
        print(f"  batch {b:>3} at {fixed_size}px: {s:7.3f} s  ({b / s:6.1f} img/s)")
    for size in sizes:
        s = _time_steps(StepConfig(batch_size=batches[0], input_size=size, **base))
        result["input_size"].append({"input_size": size, "step_s": s})
        print(f"  input {size:>3}px at batch {batches[0]}: {s:7.3f} s")
    worlds = (1, 2) if device == "cpu" or torch.cuda.device_count() >= 2 else (1,)
    for world in worlds:
        cfg = StepConfig(batch_size=batches[0], input_size=fixed_size, **base)
        s = time_processes(cfg, world)
        result["processes"].append({"processes": world, "batch_per_process": batches[0], "step_s": s,
                                    "images_per_s": world * batches[0] / s})
        print(f"  {world} process{'es' if world > 1 else ''} x batch {batches[0]}: {s:7.3f} s per step "
              f"({world * batches[0] / s:6.1f} img/s)")
    return result
