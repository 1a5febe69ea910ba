"""The pre-training step (tokenizer + forward + loss + backward + optimizer) and the fine-tuning
step: the product's own code against the reference formulation, side by side on the same inputs.

The product's step is :func:`mcbeit.engine.loop.pretrain_step` itself, timed through its ``mark``
hook; the reference is :class:`bench.reference.ReferenceStep` on a copy of the same model. The
two alternate step by step (so both see the same machine), after warm-up steps of each.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import timm
import torch

import mcbeit.models  # noqa: F401  (registers the MIM models)
from bench.measure import PHASES, PhaseTimer, count_flops, peak_flops, peak_memory
from bench.reference import ReferenceStep, literal_loss, reference_model
from mcbeit.data.masking import BlockMaskGenerator
from mcbeit.engine.distributed import DistInfo
from mcbeit.engine.loop import PretrainState, pretrain_step
from mcbeit.engine.optim import build_optimizer
from mcbeit.models.recompute import DEFAULT_RECOMPUTE, FINETUNE_RECOMPUTE, set_recompute
from mcbeit.objectives import build_objective
from mcbeit.tokenizers import build_tokenizer

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


def build(cfg: StepConfig):
    """(product state, reference step, batch) on the same weights and inputs."""
    device = torch.device(cfg.device)
    torch.manual_seed(0)
    second = cfg.input_size // 2
    factory_log = logging.getLogger("mcbeit.tokenizers.factory")
    level = factory_log.level
    factory_log.setLevel(logging.ERROR)  # "RANDOM weights": intended here
    try:
        tokenizer = build_tokenizer(cfg.tokenizer, None, second).to(device)
    finally:
        factory_log.setLevel(level)
    model = timm.create_model(cfg.model, img_size=cfg.input_size, vocab_size=tokenizer.vocab_size,
                              use_shared_rel_pos_bias=True, init_values=0.1, drop_path_rate=0.1).to(device)
    set_recompute(model, cfg.recompute)
    reference = ReferenceStep(reference_model(model), tokenizer, clip_grad=3.0, amp_dtype=amp_dtype_of(cfg.amp)) \
        if cfg.reference else None
    optimizer = build_optimizer(model, opt="adamw", lr=1e-4, weight_decay=0.05)
    total = 10 ** 6
    scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None
    ours_tokenizer = copy.deepcopy(tokenizer).channels_last()  # as the task builds it; the reference keeps NCHW
    state = PretrainState(model=model, model_without_ddp=model, tokenizer=ours_tokenizer, objective=build_objective(False),
                          optimizer=optimizer, scaler=scaler, lr_schedule=np.full(total, 1e-4),
                          wd_schedule=np.full(total, 0.05), dist=DistInfo(device=device), amp_dtype=amp_dtype_of(cfg.amp),
                          clip_grad=3.0, params=[q for q in model.parameters() if q.requires_grad])
    return state, reference, make_batch(cfg, tokenizer, device)


def loss_difference(state: PretrainState, reference: ReferenceStep, batch) -> float:
    """|product loss - literal loss| on the same weights and inputs, before any update (fp32)."""
    view_a, view_b, mask = batch
    mask = mask.flatten(1).bool()
    with torch.no_grad():
        logits = state.tokenizer(view_b).float()
        features, masked_logits = state.model(view_a, mask)
        ours = state.objective(features, masked_logits, logits, mask, TEMP)["loss"]
        prefix = reference.model.num_prefix_tokens
        ref_features = reference.model.forward_features(view_a, mask)[:, prefix:]
        theirs, _ = literal_loss(ref_features, reference.model.lm_head(ref_features), logits, mask, TEMP, 0.2)
    return abs(float(ours) - float(theirs))


def run_step(cfg: StepConfig) -> dict:
    """Median time per phase and per step, images/s and peak step memory of both formulations."""
    state, reference, batch = build(cfg)
    device = state.dist.device
    diff = None
    if reference is not None and cfg.amp == "fp32":  # in eval mode: no drop path in the loss check
        state.model.eval(), reference.model.eval()
        diff = loss_difference(state, reference, batch)
    state.model.train()
    ours = PhaseTimer(device)
    theirs = PhaseTimer(device) if reference is not None else None
    for i in range(cfg.warmup + cfg.steps):
        keep = i >= cfg.warmup
        ours.start()
        pretrain_step(state, batch, TEMP, mark=ours.mark)
        ours.stop(keep)
        if reference is not None:
            reference.model.train()
            theirs.start()
            reference(batch, TEMP, mark=theirs.mark)
            theirs.stop(keep)
    row = {"config": cfg.name, "model": cfg.model, "tokenizer": cfg.tokenizer, "recompute": cfg.recompute,
           "batch_size": cfg.batch_size,
           "input_size": cfg.input_size, "amp": cfg.amp, "device": str(device), "steps": cfg.steps,
           "loss_abs_diff": diff, "ours": _figures(ours.medians(), cfg.batch_size)}
    if cfg.memory:
        row["ours"]["peak_bytes"] = peak_memory(lambda: pretrain_step(state, batch, TEMP), device,
                                                prepare=lambda: state.optimizer.zero_grad(set_to_none=True))
    if reference is not None:
        row["reference"] = _figures(theirs.medians(), cfg.batch_size)
        if cfg.memory:
            row["reference"]["peak_bytes"] = peak_memory(lambda: reference(batch, TEMP), device,
                                                         prepare=lambda: reference.optimizer.zero_grad(set_to_none=True))
        row["speedup"] = row["reference"]["step_s"] / row["ours"]["step_s"]
        if cfg.memory and row["ours"]["peak_bytes"] and row["reference"]["peak_bytes"]:
            row["memory_ratio"] = row["ours"]["peak_bytes"] / row["reference"]["peak_bytes"]
    if cfg.flops:  # what the step computes, and how fast: explains a speed-up (or its absence)
        peak = peak_flops(device)
        runs = {"ours": lambda: pretrain_step(state, batch, TEMP)}
        if reference is not None:
            runs["reference"] = lambda: reference(batch, TEMP)
        for who, run in runs.items():
            flops = count_flops(run)
            row[who]["gflop"] = flops / 1e9
            row[who]["gflop_per_s"] = flops / 1e9 / row[who]["step_s"]
            if peak:
                row[who]["mfu"] = flops / row[who]["step_s"] / peak
    return row


def run_compile(cfg: StepConfig, backend: str = "inductor") -> dict:
    """The product's step eager and under ``--compile`` (model and loss): the first compiled step's
    time (compilation included) and the median step time of each, on the same inputs."""
    state, _, batch = build(dataclasses.replace(cfg, reference=False))
    times = {}
    for name in ("eager", "compiled"):
        if name == "compiled":
            state.model.compile(backend=backend), state.objective.compile(backend=backend)
        timer = PhaseTimer(state.dist.device)
        for i in range(1 + cfg.steps):
            timer.start()
            pretrain_step(state, batch, TEMP)
            timer.mark("step")
            timer.stop(i >= 1)
            if i == 0:
                times[f"{name}_first_s"] = timer.last_step()
        times[f"{name}_step_s"] = timer.medians()["step"]
    return {"config": cfg.name, "backend": backend, **times, "speedup": times["eager_step_s"] / times["compiled_step_s"]}


def _figures(medians: dict, batch_size: int) -> dict:
    out = {f"{phase}_s": medians.get(phase, 0.0) for phase in PHASES}
    out["step_s"] = medians["step"]
    out["images_per_s"] = batch_size / medians["step"]
    return out


# ----------------------------------------------------------------------------------- fine-tuning

def run_finetune_step(model: str = "beit_base_patch16_224", batch_size: int = 8, input_size: int = 224,
                      amp: str = "fp32", steps: int = 3, warmup: int = 1, device: str = "cpu") -> dict:
    """A fine-tuning update through the product's epoch loop (its meter and schedules included)
    against the reference loop (hand-written attention, per-tensor AdamW, ``loss.item()``)."""
    from mcbeit.engine.finetune_loop import FinetuneState, train_one_epoch
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
    optimizer = build_optimizer(net, opt="adamw", lr=1e-4, weight_decay=0.05, layer_decay=0.65)
    n = warmup + steps
    state = FinetuneState(model=net, model_without_ddp=net, optimizer=optimizer,
                          criterion=torch.nn.CrossEntropyLoss(), lr_schedule=np.full(n, 1e-4),
                          wd_schedule=np.full(n, 0.05), dist=DistInfo(device=dev), amp_dtype=amp_dtype,
                          clip_grad=3.0, print_freq=10 ** 6,
                          params=[p for p in net.parameters() if p.requires_grad])
    ref_opt = torch.optim.AdamW(param_groups(ref, 0.05), lr=1e-4, foreach=False, fused=False)

    from mcbeit.engine import meter as meter_module

    def ours_step(batch):
        bar = meter_module.tqdm  # the epoch loop's progress bar, silenced for the benchmark's table
        meter_module.tqdm = lambda *a, **k: bar(*a, **{**k, "disable": True})
        try:
            train_one_epoch(state, [batch], 0, 1)
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

    state, reference, batch = build(cfg)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if state.dist.device.type == "cuda" else [])
    sort = "self_cuda_time_total" if state.dist.device.type == "cuda" else "self_cpu_time_total"
    tables = {}
    for name, step in (("ours", lambda: pretrain_step(state, batch, TEMP)),
                       ("reference", (lambda: reference(batch, TEMP)) if reference is not None else None)):
        if step is None:
            continue
        step()  # warm-up
        with profile(activities=activities) as prof:
            step()
        tables[name] = prof.key_averages().table(sort_by=sort, row_limit=rows)
        print(f"\nTop operators, {name}, {cfg.name}:\n{tables[name]}")
    return tables
