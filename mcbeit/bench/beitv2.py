"""BEiT v2 (issue 16): the pre-training step and the VQ-KD tokenizer's training step, the product's
against a literal formulation of unilm's ``beit2/`` step, side by side on the same weights and inputs.

Pre-training step: the VQ-KD tokenizer's code ids of view B, the ``*_cls_pt`` student's two
predictions of the masked patches (last block and patch aggregation), CE + CE, backward, AdamW.

- ours: the engine's own update (:func:`mcbeit.engine.loop.run_update`) on a run the engine built
  from :class:`~mcbeit.config.pretrain.BeitV2PretrainConfig` (inference-mode tokenizer, fused
  attention, selective recompute, foreach AdamW, no host read);
- reference (``engine_for_pretraining.py``): the tokenizer's ids under ``no_grad`` in fp32,
  channels-first; attention by hand, every activation kept; ``nn.CrossEntropyLoss`` twice;
  per-tensor AdamW, ``clip_grad_norm_``, ``loss.item()`` every step.

VQ-KD step (``engine_for_vqkd.py``): the teacher's patch features, encoder, quantiser (its EMA
update), decoder, cosine loss, backward, AdamW; ours through the engine's update of
:class:`mcbeit.tasks.vqkd.VQKDTrainingTask`, the reference as the original's module order
(EMA update inside the forward, hand attention, per-tensor AdamW, ``loss.item()``).
"""
from __future__ import annotations

import copy
import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from mcbeit.bench.measure import quiet_loggers
from mcbeit.bench.reference import reference_model
from mcbeit.bench.step import Formulation, amp_dtype_of, side_by_side, step
from mcbeit.config import resolve
from mcbeit.data.masking import BlockMaskGenerator
from mcbeit.engine.optim import param_groups

SIZES = {"tiny": ("beit_tiny_patch16_224_8k_vocab_cls_pt", "vqkd_encoder_tiny_decoder_1x192x3"),
         "base": ("beit_base_patch16_224_8k_vocab_cls_pt", "vqkd_encoder_base_decoder_3x768x12_clip")}


def _masks(window: int, batch_size: int, seed: int) -> torch.Tensor:
    """v2's masks: exactly 75 of 196 patches at 224 px (the same share at other sizes)."""
    count = round(75 / 196 * window * window)
    gen = BlockMaskGenerator((window, window), count, min_num_patches=min(16, window * window // 4), exact=True)
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.stack([gen(rng).reshape(-1) for _ in range(batch_size)]))


class ReferenceV2Step:
    """One BEiT v2 pre-training step as unilm's ``train_one_epoch`` writes it."""

    def __init__(self, model: torch.nn.Module, tokenizer: torch.nn.Module, *, lr: float = 1.5e-3,
                 weight_decay: float = 0.05, clip_grad: float | None = 3.0, amp_dtype: torch.dtype | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98),
                                           foreach=False, fused=False)
        self.clip_grad, self.amp_dtype = clip_grad, amp_dtype
        self.criterion = torch.nn.CrossEntropyLoss()

    def __call__(self, batch, mark: Callable[[str], None] | None = None) -> float:
        mark = mark or (lambda phase: None)
        view_a, view_b, mask = batch
        mask = mask.flatten(1).bool()
        with torch.no_grad():
            labels = self.tokenizer.token_ids(view_b)[mask]                          # (M,) fp32 ids
        mark("tokenizer")
        device = view_a.device
        with torch.autocast(device.type, dtype=self.amp_dtype or torch.bfloat16, enabled=self.amp_dtype is not None):
            _, main, aggregated = self.model(view_a, mask)                         # (M,V), (M,V)
            mark("forward")
            loss_1, loss_2 = self.criterion(main.float(), labels), self.criterion(aggregated.float(), labels)
            loss = loss_1 + loss_2
        mark("loss")
        self.optimizer.zero_grad()
        loss.backward()
        mark("backward")
        if self.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
        self.optimizer.step()
        value = loss.item()
        if not math.isfinite(value):
            raise RuntimeError(f"reference loss is {value}")
        mark("optimizer")
        return value


def run_beitv2_step(size: str = "base", batch_size: int = 8, input_size: int = 224, amp: str = "fp32",
                    steps: int = 3, warmup: int = 1, device: str = "cpu", memory: bool = True) -> dict:
    """Median seconds per phase, images/s, peak memory and FLOPs of the BEiT v2 step, ours and the reference's."""
    from mcbeit.config.pretrain import BeitV2PretrainConfig
    from mcbeit.engine.trainer import Trainer
    from mcbeit.tasks.pretrain import PretrainTask

    model, tokenizer_model = SIZES[size]
    window = input_size // 16
    restore = quiet_loggers("mcbeit.tokenizers.vqkd", "mcbeit.tokenizers.factory")
    try:
        config = resolve(BeitV2PretrainConfig, {
            "model": model, "tokenizer_model": tokenizer_model, "input_size": input_size,
            "second_input_size": input_size, "amp": "off" if amp == "fp32" else amp, "clip_grad": 3.0, "lr": 1.5e-3,
            "opt_betas": (0.9, 0.98), "drop_path": 0.0, "num_mask_patches": round(75 / 196 * window * window),
            "min_mask_patches_per_block": min(16, window * window // 4), "output_dir": "", "device": device})
        run = Trainer(config, PretrainTask(config)).ready(steps_per_epoch=10 ** 6)
    finally:
        restore()
    tokenizer = copy.deepcopy(run.task.method.tokenizer).to(memory_format=torch.contiguous_format)
    reference = ReferenceV2Step(reference_model(run.task.model), tokenizer, amp_dtype=amp_dtype_of(amp))
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(batch_size, 3, input_size, input_size, generator=g).to(run.device),
             tokenizer.input_transform(torch.rand(batch_size, 3, input_size, input_size, generator=g)).to(run.device),
             _masks(window, batch_size, 0).to(run.device))
    diff = None
    if amp == "fp32":  # the same loss on the same weights before any update (eval: no drop path)
        run.task.model.eval(), reference.model.eval()
        with torch.no_grad():
            ours = run.task.method.step(batch).metrics["loss"]
            _, main, aggregated = reference.model(batch[0], batch[2].bool())
            labels = tokenizer.token_ids(batch[1])[batch[2].bool()]
            theirs = F.cross_entropy(main, labels) + F.cross_entropy(aggregated, labels)
        diff = abs(float(ours) - float(theirs))
    run.task.model.train(), reference.model.train()
    optimizer = run.strategy.optimizer
    row = {"config": f"v2 {size}@{input_size} b{batch_size} {amp}", "model": model, "tokenizer": tokenizer_model,
           "batch_size": batch_size, "input_size": input_size, "amp": amp, "device": str(run.device),
           "steps": steps, "loss_abs_diff": diff}
    row.update(side_by_side(
        Formulation(lambda mark=None: step(run, batch, mark), lambda: optimizer.zero_grad(set_to_none=True)),
        Formulation(lambda mark=None: reference(batch, mark), lambda: reference.optimizer.zero_grad(set_to_none=True)),
        run.device, batch_size, warmup, steps, memory, memory))
    return row


# ----------------------------------------------------------------------------------- the VQ-KD tokenizer

VQKD_SIZES = {"tiny": ("vqkd_encoder_tiny_decoder_1x192x3_clip", (192, 4, 3)),
              "base": ("vqkd_encoder_base_decoder_3x768x12_clip", (768, 12, 12))}  # teacher: CLIP ViT width/depth/heads


class ReferenceVQKDStep:
    """One VQ-KD training step as unilm's ``engine_for_vqkd.py`` and ``modeling_vqkd.py`` write it: the
    teacher's targets under ``no_grad``, the codebook's EMA update inside the forward, hand attention,
    per-tensor AdamW, ``loss.item()``."""

    def __init__(self, model: torch.nn.Module, teacher: torch.nn.Module, *, lr: float = 2e-4,
                 weight_decay: float = 1e-4, amp_dtype: torch.dtype | None = None):
        self.model, self.teacher, self.amp_dtype = model, teacher, amp_dtype
        self.optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.99),
                                           foreach=False, fused=False)

    def __call__(self, images: torch.Tensor, mark: Callable[[str], None] | None = None) -> float:
        from mcbeit.objectives.codebook import code_statistics, ema_update_

        mark = mark or (lambda phase: None)
        with torch.no_grad():
            target = self.teacher(images)                                            # (B, N, C)
        mark("tokenizer")
        device = images.device
        with torch.autocast(device.type, dtype=self.amp_dtype or torch.bfloat16, enabled=self.amp_dtype is not None):
            out = self.model(images, target)
            q = self.model.quantize
            with torch.no_grad():                                                    # the EMA update in the forward
                counts, sums = code_statistics(out["features"], out["ids"], q.vocab)
                ema_update_(q.codebook, counts, sums, q.decay)
        mark("forward")
        self.optimizer.zero_grad()
        out["loss"].backward()
        mark("backward")
        self.optimizer.step()
        value = out["loss"].item()
        if not math.isfinite(value):
            raise RuntimeError(f"reference VQ-KD loss is {value}")
        mark("optimizer")
        return value


def run_vqkd_step(size: str = "base", batch_size: int = 8, input_size: int = 224, amp: str = "fp32",
                  steps: int = 3, warmup: int = 1, device: str = "cpu", memory: bool = True) -> dict:
    """The VQ-KD training step (teacher + encoder + quantiser + decoder + loss + backward + AdamW), ours
    (the engine's update, the EMA after it) and the reference's, on the same weights, teacher and images.
    The teacher is a random CLIP image tower of the released recipe's size (ViT-B/16, 512-d) for base."""
    from mcbeit.config.vqkd import VQKDTrainConfig
    from mcbeit.engine.trainer import Trainer
    from mcbeit.tasks.vqkd import VQKDTrainingTask
    from mcbeit.tokenizers.teachers import CLIP_MEAN, CLIP_STD, Teacher, _clip_features, clip_visual_model

    model, (width, depth, heads) = VQKD_SIZES[size]
    restore = quiet_loggers("mcbeit.tokenizers.teachers", "mcbeit.vqkd")
    try:
        config = resolve(VQKDTrainConfig, {
            "model": model, "input_size": input_size, "teacher_input_size": input_size, "codebook_n_emd": 8192,
            "quantize_kmeans_init": True, "amp": "off" if amp == "fp32" else amp, "opt_betas": (0.9, 0.99),
            "output_dir": "", "device": device, "batch_size": batch_size})
        run = Trainer(config, VQKDTrainingTask(config)).ready(steps_per_epoch=10 ** 6)
    finally:
        restore()
    task = run.task
    task.start_epoch(0)
    torch.manual_seed(0)
    teacher = Teacher(clip_visual_model(width, depth, heads, 16, 512, input_size), _clip_features, "clip",
                      CLIP_MEAN, CLIP_STD, input_size, 512, 16).to(run.device)
    task.teacher = teacher
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(batch_size, 3, input_size, input_size, generator=g) * 2 - 1).to(run.device)  # [-1, 1]
    task.model.train()
    with torch.no_grad():                                     # the first forward's k-means, before either copy
        task.model(images, teacher(images))
    reference = ReferenceVQKDStep(reference_model(task.model), teacher, amp_dtype=amp_dtype_of(amp))
    optimizer = run.strategy.optimizer

    def ours(mark=None):
        renamed = None if mark is None else (lambda phase: mark("tokenizer" if phase == "teacher" else phase))
        return step(run, (images,), renamed)

    row = {"config": f"vqkd {size}@{input_size} b{batch_size} {amp}", "model": model, "batch_size": batch_size,
           "input_size": input_size, "amp": amp, "device": str(run.device), "steps": steps}
    row.update(side_by_side(Formulation(ours, lambda: optimizer.zero_grad(set_to_none=True)),
                            Formulation(lambda mark=None: reference(images, mark),
                                        lambda: reference.optimizer.zero_grad(set_to_none=True)),
                            run.device, batch_size, warmup, steps, memory, memory))
    return row
