"""ConMIM (issue 17): the pre-training step, the product's against a literal formulation of
TencentARC/ConMIM's ``engine_for_pretraining.py`` step, side by side on the same weights and inputs.

The step: the EMA teacher's projected patch tokens of the perturbed view (no gradient), the
student's of the masked view, the denoising patch contrast over the masked rows, backward, clip,
AdamW, then the teacher's EMA update. Phases: ``teacher``, ``forward``, ``loss``, ``backward``,
``optimizer`` (clip + AdamW), ``ema``.

- ours: the engine's own update (:func:`mcbeit.engine.loop.run_update`) on a run the engine built
  from :class:`~mcbeit.config.pretrain.ConMIMPretrainConfig` (fused attention, selective recompute,
  foreach AdamW, the EMA as two ``torch._foreach`` calls over pairs found once, no host read). The
  engine marks ``optimizer`` after the task's ``after_update`` (the EMA); to time the EMA apart the
  benchmark wraps that one method of its run's task (:class:`_OursSplitEMA`): ``optimizer`` is marked
  before the EMA and the engine's mark becomes ``ema``. The engine itself is unchanged.
- reference (the original's ``train_one_epoch`` body): the boolean masks and ``arange`` labels built
  every step, the teacher under ``no_grad`` called with an all-False mask, the student, both
  ``F.normalize``-d, ``matmul`` to (B,N,N), ``logits[mask]``, ``nn.CrossEntropyLoss``, ``loss.item()``;
  ``zero_grad``, backward, ``clip_grad_norm_``, per-tensor AdamW; then the EMA as the original writes
  it: the two models' names and parameters listed, their names intersected through a set, and one
  ``param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)`` per parameter. Both networks are the
  run's (the same weights) with attention by hand and every activation kept
  (:func:`mcbeit.bench.reference.reference_model`). The original's ``length = 196`` becomes the mask's
  patch count, so the tiny configuration runs; its loss scaler is not modelled (fp32 on the CPU: off).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mcbeit.bench.reference import reference_model
from mcbeit.bench.step import Formulation, amp_dtype_of, side_by_side, step
from mcbeit.config import resolve
from mcbeit.data.masking import CellMaskGenerator
from mcbeit.engine.optim import param_groups

SIZES = {"tiny": "conmim_tiny_patch16_224", "base": "conmim_base_patch16_224"}
SHORT = {"tiny": "Ti", "base": "B"}
CONMIM_PHASES = ("teacher", "forward", "loss", "backward", "optimizer", "ema")

LR, WEIGHT_DECAY, BETAS, CLIP_GRAD, TEMP = 5e-4, 0.05, (0.9, 0.98), 1.0, 0.1  # the original's defaults, the README's clip


def _masks(window: int, batch_size: int, seed: int) -> torch.Tensor:
    """The recipe's random_mps32 masks: 2x2-patch cells, 37 of 49 at 224 px (148 of 196 patches). (B,N) bool."""
    gen = CellMaskGenerator(window, 0.75, cell=2)
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.stack([gen(rng).reshape(-1) for _ in range(batch_size)]))


class ReferenceConMIMStep:
    """One ConMIM pre-training step as TencentARC/ConMIM's ``train_one_epoch`` writes it."""

    def __init__(self, model: nn.Module, teacher: nn.Module, momentum_schedule: np.ndarray, *, lr: float = LR,
                 weight_decay: float = WEIGHT_DECAY, clip_grad: float | None = CLIP_GRAD, temp: float = TEMP,
                 amp_dtype: torch.dtype | None = None):
        self.model, self.teacher = model, teacher
        self.optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=BETAS,
                                           foreach=False, fused=False)
        self.momentum_schedule, self.it = momentum_schedule, 0
        self.clip_grad, self.temp, self.amp_dtype = clip_grad, temp, amp_dtype

    def __call__(self, batch, mark: Callable[[str], None] | None = None) -> float:
        mark = mark or (lambda phase: None)
        samples, samples_aug, bool_masked_pos = batch
        device = samples.device
        bs = samples.shape[0]
        bool_masked_pos = bool_masked_pos.flatten(1).to(torch.bool)                              # (B,N)
        bool_masked_pos_zero = torch.zeros(bool_masked_pos.shape).to(device).to(torch.bool)      # (B,N) all False
        length = bool_masked_pos.shape[1]                                                         # the original: 196
        labels = torch.arange(length).unsqueeze(0).expand(bs, -1).to(device)[bool_masked_pos]    # (M,)
        autocast = dict(device_type=device.type, dtype=self.amp_dtype or torch.bfloat16,
                        enabled=self.amp_dtype is not None)
        with torch.autocast(**autocast), torch.no_grad():
            _, feat_full = self.teacher(samples_aug, bool_masked_pos_zero)                        # (B,N,P)
        mark("teacher")
        with torch.autocast(**autocast):
            _, feat = self.model(samples, bool_masked_pos)                                        # (B,N,P)
            mark("forward")
            feat_full = F.normalize(feat_full, p=2, dim=-1)
            feat = F.normalize(feat, p=2, dim=-1)
            logits = torch.matmul(feat, feat_full.permute(0, 2, 1)) / self.temp                  # (B,N,N)
            logits = logits[bool_masked_pos]                                                      # (M,N)
            loss = nn.CrossEntropyLoss()(logits, labels)
        value = loss.item()                                                                       # every step
        if not math.isfinite(value):
            raise RuntimeError(f"reference ConMIM loss is {value}")
        mark("loss")
        self.optimizer.zero_grad()
        loss.backward()
        mark("backward")
        if self.clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
        self.optimizer.step()
        mark("optimizer")
        with torch.no_grad():                                                                     # the EMA update
            m = float(self.momentum_schedule[min(self.it, len(self.momentum_schedule) - 1)])
            names_q, params_q, names_k, params_k = [], [], [], []
            for name_q, param_q in self.model.named_parameters():
                names_q.append(name_q)
                params_q.append(param_q)
            for name_k, param_k in self.teacher.named_parameters():
                names_k.append(name_k)
                params_k.append(param_k)
            names_common = list(set(names_q) & set(names_k))
            params_q = [p for n, p in zip(names_q, params_q, strict=True) if n in names_common]
            params_k = [p for n, p in zip(names_k, params_k, strict=True) if n in names_common]
            for param_q, param_k in zip(params_q, params_k, strict=True):
                param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)
        self.it += 1
        mark("ema")
        return value


class _OursSplitEMA:
    """The engine's update on ``batch``, with the EMA timed as its own phase: the run's task's
    ``after_update`` (the EMA) is wrapped to mark ``optimizer`` first, and the engine's ``optimizer``
    mark that follows it is renamed ``ema``. The loss of the first call is kept (a device tensor:
    no host read inside the timed step)."""

    def __init__(self, run, batch):
        self.run, self.batch, self.mark, self.first_loss = run, batch, None, None
        task = run.task
        after_update = task.after_update

        def timed_after_update(stepped):
            if self.mark is not None:
                self.mark("optimizer")
            return after_update(stepped)

        task.after_update = timed_after_update

    def __call__(self, mark: Callable[[str], None] | None = None):
        self.mark = mark
        try:
            out = step(self.run, self.batch,
                       None if mark is None else (lambda phase: mark("ema" if phase == "optimizer" else phase)))
        finally:
            self.mark = None
        if self.first_loss is None:
            self.first_loss = out["loss"]
        return out


def run_conmim_step(size: str = "base", batch_size: int = 8, input_size: int = 224, amp: str = "fp32",
                    steps: int = 3, warmup: int = 1, device: str = "cpu", memory: bool = True) -> dict:
    """Median seconds per phase, images/s, peak memory and FLOPs of the ConMIM step (teacher + student +
    projectors + loss + backward + AdamW + EMA), ours and the reference's, on the same weights and inputs.
    ``loss_abs_diff``: |ours - reference| of the first step's loss (fp32; same weights, train mode), printed
    as the step table's ``|loss - literal loss|``."""
    from mcbeit.config.pretrain import ConMIMPretrainConfig
    from mcbeit.engine.trainer import Trainer
    from mcbeit.tasks.pretrain import PretrainTask

    model = SIZES[size]
    window = input_size // 16
    config = resolve(ConMIMPretrainConfig, {
        "model": model, "input_size": input_size, "amp": "off" if amp == "fp32" else amp, "clip_grad": CLIP_GRAD,
        "lr": LR, "weight_decay": WEIGHT_DECAY, "opt_betas": BETAS, "drop_path": 0.0, "temp": TEMP,
        "mask_type": "random_mps32", "mask_ratio": 0.75, "epochs": 1, "warmup_epochs": 0, "output_dir": "",
        "device": device})
    run = Trainer(config, PretrainTask(config)).ready(steps_per_epoch=10 ** 6)
    run.task.start_epoch(0)                                   # the momentum schedule (a cosine from 0.996)
    method = run.task.method
    reference = ReferenceConMIMStep(reference_model(run.task.model), reference_model(method.teacher),
                                    method.momentum, amp_dtype=amp_dtype_of(amp))
    run.task.model.train(), reference.model.train()           # both teachers stay in train mode (the original's)
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(batch_size, 3, input_size, input_size, generator=g).to(run.device),
             torch.randn(batch_size, 3, input_size, input_size, generator=g).to(run.device),
             _masks(window, batch_size, 0).to(run.device))
    ours = _OursSplitEMA(run, batch)
    first_reference: list[float] = []

    def theirs(mark=None):
        value = reference(batch, mark)
        if not first_reference:
            first_reference.append(value)
        return value

    optimizer = run.strategy.optimizer
    row = {"config": f"conmim {SHORT[size]}@{input_size} b{batch_size} {amp}", "model": model, "batch_size": batch_size,
           "input_size": input_size, "amp": amp, "device": str(run.device), "steps": steps,
           "masked_patches": int(batch[2][0].sum())}
    row.update(side_by_side(Formulation(ours, lambda: optimizer.zero_grad(set_to_none=True)),
                            Formulation(theirs, lambda: reference.optimizer.zero_grad(set_to_none=True)),
                            run.device, batch_size, warmup, steps, memory, memory))
    row["first_loss"] = {"ours": float(ours.first_loss), "reference": first_reference[0]}
    row["loss_abs_diff"] = abs(row["first_loss"]["ours"] - first_reference[0]) if amp == "fp32" else None
    return row
