"""The pre-training step (tokenizer + forward + loss + backward + optimizer) and the fine-tuning
step: the product's own code against the reference formulation, side by side on the same inputs.

The product's step is the engine's own update, :func:`mcbeit.engine.loop.run_update`, on a run the
engine built (:meth:`mcbeit.engine.trainer.Trainer.ready`), timed through its ``mark`` hook; the
reference is :class:`mcbeit.bench.reference.ReferenceStep` on a copy of the same model. The two alternate
step by step (so both see the same machine), after warm-up steps of each.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Callable

import numpy as np
import timm
import torch

import mcbeit.models  # noqa: F401  (registers the MIM models)
from mcbeit.bench.measure import PHASES, PhaseTimer, count_flops, peak_flops, peak_memory, quiet_loggers
from mcbeit.bench.reference import ReferenceStep, literal_loss, reference_model
from mcbeit.config import resolve
from mcbeit.config.finetune import FinetuneConfig
from mcbeit.config.pretrain import PretrainConfig
from mcbeit.data.masking import BlockMaskGenerator
from mcbeit.engine.context import RunContext
from mcbeit.engine.distributed import DistInfo
from mcbeit.engine.loop import run_update
from mcbeit.engine.precision import resolve_precision
from mcbeit.engine.trainer import Trainer
from mcbeit.models.recompute import DEFAULT_RECOMPUTE, FINETUNE_RECOMPUTE, set_recompute
from mcbeit.tasks.finetune import FinetuneTask
from mcbeit.tasks.pretrain import PretrainTask

TEMP = 4.0


@dataclass
class StepConfig:
    model: str = "beit_base_patch16_224_8k_vocab"
    tokenizer: str = "vqgan"
    batch_size: int = 8
    input_size: int = 224
    amp: str = "fp32"            # fp32 | bf16 | fp16 (CUDA)
    steps: int = 3
    warmup: int = 1
    device: str = "cpu"
    reference: bool = True
    memory: bool = True
    recompute: str = DEFAULT_RECOMPUTE  # the product's --recompute
    flops: bool = True                  # count each formulation's FLOPs (one more step of each)

    @property
    def name(self) -> str:
        short = self.model.replace("_patch16_224_8k_vocab", "").replace("beit_", "")
        return f"{short}@{self.input_size} b{self.batch_size} {self.amp}"


def amp_dtype_of(amp: str) -> torch.dtype | None:
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def make_batch(cfg: StepConfig, tokenizer, device: torch.device, seed: int = 0):
    """Images for both views and block masks of ~38% of the patches (75 of 196 at 224 px)."""
    g = torch.Generator().manual_seed(seed)
    window = cfg.input_size // 16
    second = window * tokenizer.downsample
    view_a = torch.randn(cfg.batch_size, 3, cfg.input_size, cfg.input_size, generator=g)
    view_b = tokenizer.input_transform(torch.rand(cfg.batch_size, 3, second, second, generator=g))
    rng = np.random.default_rng(seed)
    masks = BlockMaskGenerator((window, window), round(0.383 * window * window),
                               min_num_patches=min(16, window * window // 4))
    mask = torch.from_numpy(np.stack([masks(rng).reshape(-1) for _ in range(cfg.batch_size)]))
    return view_a.to(device), view_b.to(device), mask.to(device)


def _block_masking(input_size: int) -> tuple[int, int]:
    """(patches masked, smallest block) of :func:`make_batch`'s masks at ``input_size``."""
    window = input_size // 16
    return round(0.383 * window * window), min(16, window * window // 4)


def pretrain_config(cfg: StepConfig, **flags) -> PretrainConfig:
    """The pre-training configuration of a step configuration (a random tokenizer of ``cfg.tokenizer``)."""
    masked, smallest = _block_masking(cfg.input_size)
    return resolve(PretrainConfig, {
        "model": cfg.model, "input_size": cfg.input_size, "second_input_size": cfg.input_size // 2,
        "discrete_vae_type": cfg.tokenizer, "drop_path": 0.1, "layer_scale_init_value": 0.1, "recompute": cfg.recompute,
        "amp": "off" if cfg.amp == "fp32" else cfg.amp, "clip_grad": 3.0, "lr": 1e-4, "weight_decay": 0.05,
        "num_mask_patches": masked, "min_mask_patches_per_block": smallest, "output_dir": "", "device": cfg.device,
        **flags})


def build(cfg: StepConfig, info: DistInfo | None = None):
    """(the product's run, reference step, batch) on the same weights and inputs."""
    restore = quiet_loggers("mcbeit.tokenizers.factory")  # "RANDOM weights": intended here
    try:
        config = pretrain_config(cfg)
        run = Trainer(config, PretrainTask(config)).ready(steps_per_epoch=10 ** 6, info=info)
    finally:
        restore()
    tokenizer = copy.deepcopy(run.task.method.tokenizer).to(memory_format=torch.contiguous_format)  # reference: NCHW
    reference = ReferenceStep(reference_model(run.task.model), tokenizer, clip_grad=3.0,
                              amp_dtype=amp_dtype_of(cfg.amp)) if cfg.reference else None
    return run, reference, make_batch(cfg, tokenizer, run.device)


def step(run: RunContext, batch, mark=None) -> dict:
    """One optimizer update of the product (the engine's own, as in training)."""
    return run_update(run, [batch], mark)


def loss_difference(run: RunContext, reference: ReferenceStep, batch) -> float:
    """|product loss - literal loss| on the same weights and inputs, before any update (fp32)."""
    view_a, view_b, mask = batch
    mask = mask.flatten(1).bool()
    method = run.task.method
    with torch.no_grad():
        logits = method.tokenizer(view_b).float()
        features, masked_logits = run.task.model(view_a, mask)
        ours = method.objective(features, masked_logits, logits, mask, TEMP)["loss"]
        prefix = reference.model.num_prefix_tokens
        ref_features = reference.model.forward_features(view_a, mask)[:, prefix:]
        theirs, _ = literal_loss(ref_features, reference.model.lm_head(ref_features), logits, mask, TEMP, 0.2)
    return abs(float(ours) - float(theirs))


def run_step(cfg: StepConfig) -> dict:
    """Median time per phase and per step, images/s and peak step memory of both formulations."""
    run, reference, batch = build(cfg)
    diff = None
    if reference is not None and cfg.amp == "fp32":  # in eval mode: no drop path in the loss check
        run.task.model.eval(), reference.model.eval()
        diff = loss_difference(run, reference, batch)
    run.task.model.train()
    if reference is not None:
        reference.model.train()
    row = {"config": cfg.name, "model": cfg.model, "tokenizer": cfg.tokenizer, "recompute": cfg.recompute,
           "batch_size": cfg.batch_size, "input_size": cfg.input_size, "amp": cfg.amp, "device": str(run.device),
           "steps": cfg.steps, "loss_abs_diff": diff}
    optimizer = run.strategy.optimizer
    theirs = None if reference is None else Formulation(
        lambda mark=None: reference(batch, TEMP, mark=mark), lambda: reference.optimizer.zero_grad(set_to_none=True))
    row.update(side_by_side(Formulation(lambda mark=None: step(run, batch, mark),
                                        lambda: optimizer.zero_grad(set_to_none=True)),
                            theirs, run.device, cfg.batch_size, cfg.warmup, cfg.steps, cfg.memory, cfg.flops))
    return row


@dataclass
class Formulation:
    """One way of computing a step: ``run(mark)`` does it (calling ``mark(phase)`` as phases end);
    ``prepare()`` drops what the previous step left (its gradients) before a memory measurement."""

    run: Callable[..., object]
    prepare: Callable[[], object]


def side_by_side(ours: Formulation, theirs: Formulation | None, device: torch.device, batch_size: int,
                 warmup: int = 1, steps: int = 3, memory: bool = True, flops: bool = True) -> dict:
    """Both formulations timed alternately step by step (after ``warmup`` steps of each), then their
    peak step memory and FLOPs: ``{'ours': figures, 'reference': figures, 'speedup', 'memory_ratio'}``."""
    timers = {"ours": PhaseTimer(device)}
    jobs = {"ours": ours}
    if theirs is not None:
        timers["reference"], jobs["reference"] = PhaseTimer(device), theirs
    for i in range(warmup + steps):
        for who, job in jobs.items():
            timers[who].start()
            job.run(mark=timers[who].mark)
            timers[who].stop(i >= warmup)
    row: dict = {who: _figures(timers[who].medians(), batch_size) for who in jobs}
    for who, job in jobs.items():
        if memory:
            row[who]["peak_bytes"] = peak_memory(job.run, device, prepare=job.prepare)
        if flops:  # what the step computes, and how fast: explains a speed-up (or its absence)
            count = count_flops(job.run)
            row[who]["gflop"] = count / 1e9
            row[who]["gflop_per_s"] = count / 1e9 / row[who]["step_s"]
            peak = peak_flops(device)
            if peak:
                row[who]["mfu"] = count / row[who]["step_s"] / peak
    if theirs is not None:
        row["speedup"] = row["reference"]["step_s"] / row["ours"]["step_s"]
        if memory and row["ours"]["peak_bytes"] and row["reference"]["peak_bytes"]:
            row["memory_ratio"] = row["ours"]["peak_bytes"] / row["reference"]["peak_bytes"]
    return row


def run_compile(cfg: StepConfig, backend: str = "inductor") -> dict:
    """The product's step eager and under ``--compile`` (model and loss): the first compiled step's
    time (compilation included) and the median step time of each, on the same inputs."""
    run, _, batch = build(dataclasses.replace(cfg, reference=False))
    times = {}
    for name in ("eager", "compiled"):
        if name == "compiled":
            run.task.model.compile(backend=backend), run.task.method.objective.compile(backend=backend)
        timer = PhaseTimer(run.device)
        for i in range(1 + cfg.steps):
            timer.start()
            step(run, batch)
            timer.mark("step")
            timer.stop(i >= 1)
            if i == 0:
                times[f"{name}_first_s"] = timer.last_step()
        times[f"{name}_step_s"] = timer.medians()["step"]
    return {"config": cfg.name, "backend": backend, **times, "speedup": times["eager_step_s"] / times["compiled_step_s"]}


def _figures(medians: dict, batch_size: int) -> dict:
    out = {f"{phase}_s": medians.get(phase, 0.0) for phase in PHASES}
    out.update({f"{phase}_s": seconds for phase, seconds in medians.items()  # a section's own (ConMIM's teacher, ema)
                if phase not in PHASES and phase != "step"})
    out["step_s"] = medians["step"]
    out["images_per_s"] = batch_size / medians["step"]
    return out


# ----------------------------------------------------------------------------------- fine-tuning

def run_finetune_step(model: str = "beit_base_patch16_224", batch_size: int = 8, input_size: int = 224,
                      amp: str = "fp32", steps: int = 3, warmup: int = 1, device: str = "cpu") -> dict:
    """A fine-tuning update through the product's epoch loop (its meter and schedules included)
    against the reference loop (hand-written attention, per-tensor AdamW, ``loss.item()``)."""
    from mcbeit.engine.loop import train_one_epoch
    from mcbeit.engine.optim import param_groups
    from mcbeit.models.classifier import classifier_kwargs

    dev = torch.device(device)
    torch.manual_seed(0)
    net = timm.create_model(model, **classifier_kwargs(nb_classes=1000, input_size=input_size, drop_path=0.1)).to(dev)
    set_recompute(net, FINETUNE_RECOMPUTE)
    ref = reference_model(net)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(batch_size, 3, input_size, input_size, generator=g).to(dev),
                torch.randint(0, 1000, (batch_size,), generator=g).to(dev)) for _ in range(2)]
    amp_dtype = amp_dtype_of(amp)
    n = warmup + steps
    config = resolve(FinetuneConfig, {"model": model, "input_size": input_size, "lr": 1e-4, "weight_decay": 0.05,
                                      "layer_decay": 0.65, "clip_grad": 3.0, "print_freq": 10 ** 6, "output_dir": "",
                                      "amp": "off" if amp == "fp32" else amp, "device": device, "smoothing": 0.0})
    task = FinetuneTask(config)       # its model is the one above: no dataset to build
    run = RunContext(config, task, DistInfo(device=dev), resolve_precision(config.amp, dev))
    task.run, task.model, task.criterion = run, net, torch.nn.CrossEntropyLoss()
    Trainer(config, task).prepare(run, steps_per_epoch=n)
    ref_opt = torch.optim.AdamW(param_groups(ref, 0.05), lr=1e-4, foreach=False, fused=False)

    from mcbeit.engine import meter as meter_module

    def ours_step(batch):
        bar = meter_module.tqdm  # the epoch loop's progress bar, silenced for the benchmark's table
        meter_module.tqdm = lambda *a, **k: bar(*a, **{**k, "disable": True})
        try:
            train_one_epoch(run, [batch], 0)
        finally:
            meter_module.tqdm = bar

    def ref_step(batch):
        x, y = batch
        with torch.autocast(dev.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            loss = torch.nn.functional.cross_entropy(ref(x).float(), y)
        ref_opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 3.0)
        ref_opt.step()
        loss.item()

    timers = {"ours": PhaseTimer(dev), "reference": PhaseTimer(dev)}
    for i in range(n):
        for name, fn in (("ours", ours_step), ("reference", ref_step)):
            timers[name].start()
            fn(batches[i % 2])
            timers[name].mark("update")
            timers[name].stop(i >= warmup)
    ours_s, ref_s = (timers[k].medians()["step"] for k in ("ours", "reference"))
    return {"config": f"finetune {model.replace('beit_', '').replace('_patch16_224', '')}@{input_size} b{batch_size} {amp}",
            "ours": {"step_s": ours_s, "images_per_s": batch_size / ours_s},
            "reference": {"step_s": ref_s, "images_per_s": batch_size / ref_s}, "speedup": ref_s / ours_s}


def profile_step(cfg: StepConfig, rows: int = 12) -> dict:
    """torch.profiler's top operators (self CPU / CUDA time) of one step of each formulation."""
    from torch.profiler import ProfilerActivity, profile

    run, reference, batch = build(cfg)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if run.device.type == "cuda" else [])
    sort = "self_cuda_time_total" if run.device.type == "cuda" else "self_cpu_time_total"
    tables = {}
    for name, job in (("ours", lambda: step(run, batch)),
                      ("reference", (lambda: reference(batch, TEMP)) if reference is not None else None)):
        if job is None:
            continue
        job()  # warm-up
        with profile(activities=activities) as prof:
            job()
        tables[name] = prof.key_averages().table(sort_by=sort, row_limit=rows)
        print(f"\nTop operators, {name}, {cfg.name}:\n{tables[name]}")
    return tables
