"""ConMIM: masked image modelling with denoising contrast (TencentARC/ConMIM, ICLR 2023).

Per image (:class:`mcbeit.data.perturbation.DenoisingViews`): one flip and crop give the student's
view x (normalised only) and the teacher's view x' (the same crop, photometrically perturbed), and a
patch mask (``--mask_type random_mps32`` in the recipe: 2x2-patch cells, 148 of 196 patches).

    student (trained):   s = projectors(norm(ViT(x with masked patches -> mask_token)))[:, 1:]   (B,N,P)
    teacher (EMA, no grad, train mode): t = projectors(norm(ViT(x')))[:, 1:]                    (B,N,P)
    loss = CE over the masked patches of (s_i . t_j / |s_i||t_j| / --temp)_j, label j = i     (per image)

(:class:`mcbeit.objectives.DenoisingContrastLoss`). After every optimizer update the teacher's
parameters (not its buffers) move to the student's: ``t = m t + (1 - m) s``, ``m`` a cosine from
``--t_momentum`` (0.996) to 1 over all updates of the run, indexed by the global update, so a resumed
run continues the schedule where it stopped. The teacher starts as a copy of the student (buffers
too) and is never put in eval mode, as the original: its projector's BatchNorms use the batch's
statistics. ``lm_head`` exists in the model (the original's files have it) and is never used: it is
frozen (the original leaves it without gradient, which AdamW skips: the same).

Checkpoints: ``checkpoint-<epoch>.pth`` holds the student under ``model`` and the teacher under
``teacher`` (with the optimizer and the run's position: it resumes everything), and beside each,
``checkpoint_copy-<epoch>.pth`` holds the teacher under ``model``, as the original names it: the file
fine-tuning takes (``--finetune checkpoint_copy-799.pth``). ``--resume checkpoint_copy-<E>.pth`` resumes
from its ``checkpoint-<E>.pth``, with the teacher from the copy; ``--resume_copy FILE`` takes the
teacher from FILE (the original's flag); a student file of the original (no ``teacher`` entry) takes
the teacher from the ``checkpoint_copy`` beside it, as the original's auto-resume does.
"""
from __future__ import annotations

import copy
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import timm
import torch
from torch import nn

from mcbeit.data.perturbation import DenoisingViews
from mcbeit.engine.checkpoint import save_atomic
from mcbeit.engine.schedules import cosine_scheduler
from mcbeit.engine.task import Mark, MeterSpec, StepOutput
from mcbeit.errors import InputError
from mcbeit.methods.base import PretrainMethod, pooled_over_ranks
from mcbeit.models.checkpoint import load_into
from mcbeit.models.recompute import set_recompute
from mcbeit.objectives import DenoisingContrastLoss

log = logging.getLogger("mcbeit.pretrain")

COPY_PREFIX = "checkpoint_copy-"
_COPY_RE = re.compile(r"^checkpoint_copy-(.+)\.pth$")
_STUDENT_RE = re.compile(r"^checkpoint-(.+)\.pth$")

CONMIM_METER = MeterSpec(
    ("loss", "acc", "grad_norm", "loss_scale"), ("loss", "acc"),
    {"loss": ("loss", "acc"), "opt": ("lr", "min_lr", "weight_decay", "grad_norm", "loss_scale")},
    {"loss": ("loss", "{:.4f}"), "acc": ("acc", "{:.3f}"), "lr": ("lr", "{:.2e}")})


def copy_path(student_path: str | os.PathLike) -> Path:
    """``checkpoint_copy-<E>.pth`` beside ``checkpoint-<E>.pth``."""
    path = Path(student_path)
    match = _STUDENT_RE.match(path.name)
    return path.with_name(f"{COPY_PREFIX}{match.group(1) if match else path.stem}.pth")


class ConMIM(PretrainMethod):
    """Denoising patch contrast against an EMA teacher (see the module docstring)."""

    name = "conmim"
    meter = CONMIM_METER
    model_patterns = ("conmim_*",)

    def __init__(self, config: Any):
        super().__init__(config)
        self.teacher: nn.Module | None = None
        self.objective = DenoisingContrastLoss(config.temp)
        self.momentum: np.ndarray | None = None
        self.iteration = 0
        self.teacher_file: str | None = config.resume_copy or None

    def check_inputs(self) -> None:
        path = self.config.resume_copy
        if path and not os.path.isfile(path):
            raise InputError(f"--resume_copy {path} does not exist: pass a checkpoint_copy-<epoch>.pth (the EMA "
                             "teacher), or leave the flag out (the teacher is in checkpoint-<epoch>.pth)")
        if self.config.resume:
            _student_of_copy(self.config.resume)

    def build(self, run) -> nn.Module:
        cfg = self.config
        self.run = run
        student = timm.create_model(cfg.model, pretrained=False, drop_path_rate=cfg.drop_path,
                                    use_shared_rel_pos_bias=cfg.rel_pos_bias, use_abs_pos_emb=cfg.abs_pos_emb,
                                    init_values=cfg.layer_scale_init_value, img_size=cfg.input_size,
                                    proj_dim=cfg.proj_dim, proj_hidden_dim=cfg.proj_hidden_dim)
        student.lm_head.requires_grad_(False)  # never used (the original's: no gradient, so AdamW skips it)
        # The teacher: the student's copy (buffers too), no gradient, left in train mode as the original.
        self.teacher = copy.deepcopy(student).requires_grad_(False).to(run.device).train()
        self._pairs = None
        if cfg.resume_copy:  # the original loads it whether or not the student resumes
            self._load_teacher(cfg.resume_copy)
        log.info("ConMIM: EMA teacher (momentum %g -> 1, cosine over the run), projector %d -> %d -> %d, "
                 "contrast temperature %g", cfg.t_momentum, student.embed_dim, student.projectors[0].out_features,
                 student.projectors[6].out_features, cfg.temp)
        return set_recompute(student, cfg.recompute)

    def transform(self, window: tuple[int, int], masks: Callable[[np.random.Generator], np.ndarray],
                  mean: tuple[float, ...], std: tuple[float, ...]) -> Callable:
        return DenoisingViews(self.config.input_size, self.config.train_interpolation, mean, std, masks)

    def monitored(self, student: nn.Module) -> nn.Module:
        """The k-NN monitor measures the teacher: the network ConMIM hands to fine-tuning."""
        return self.teacher

    # -- the momentum schedule -------------------------------------------------------------------------
    def start_epoch(self, epoch: int, first: int = 0) -> None:
        spe = self.run.steps_per_epoch
        if self.momentum is None or len(self.momentum) != self.config.epochs * spe:
            self.momentum = cosine_scheduler(self.config.t_momentum, 1.0, self.config.epochs, spe)
        self.iteration = epoch * spe + first

    def current_momentum(self) -> float:
        return float(self.momentum[min(self.iteration, len(self.momentum) - 1)])

    def epoch_values(self, epoch: int) -> dict[str, float]:
        spe = self.run.steps_per_epoch if self.run is not None else 0
        if self.momentum is None or not spe:
            return {}
        return {"momentum": float(self.momentum[min((epoch + 1) * spe, len(self.momentum)) - 1])}

    # -- one step ----------------------------------------------------------------------------------------
    def step(self, batch: Any, mark: Mark | None = None) -> StepOutput:
        run = self.run
        view_s, view_t, mask = (t.to(run.device, non_blocking=True) for t in batch[:3])
        bool_masked_pos = mask.flatten(1).bool()                                  # (B, N)
        with torch.no_grad(), run.precision.autocast():
            _, teacher = self.teacher(view_t)                                     # (B, N, P), unmasked view
        _mark(mark, "teacher")
        with run.precision.autocast():
            _, student = run.forward(view_s, bool_masked_pos)                     # (B, N, P), masked view
            _mark(mark, "forward")
            out = self.objective(student, teacher, bool_masked_pos)
        _mark(mark, "loss")
        return StepOutput(loss=pooled_over_ranks(out["loss"], bool_masked_pos.sum(), run.info.world_size),
                          metrics={k: v.detach().float() for k, v in out.items()},
                          images=view_s.shape[0], skipped=batch[3].sum() if len(batch) > 3 else 0)

    @torch.no_grad()
    def after_update(self, stepped: Any) -> dict[str, torch.Tensor]:
        """The EMA update of the teacher's parameters after every update (the original's: also after one
        the loss scaler skipped, which leaves the student as it was)."""
        if self._pairs is None:  # (teacher, student) parameter lists by name, built once
            student = dict(self.run.task.model.named_parameters())
            names = [n for n, _ in self.teacher.named_parameters()]  # the same names, all of them
            self._pairs = ([p for _, p in self.teacher.named_parameters()], [student[n].detach() for n in names])
        m = self.current_momentum()
        teacher, student = self._pairs
        torch._foreach_mul_(teacher, m)
        torch._foreach_add_(teacher, student, alpha=1.0 - m)
        self.iteration += 1
        return {}

    def modules_to_compile(self) -> list[nn.Module]:
        return [self.teacher]

    def epoch_message(self, stats: Mapping[str, Any]) -> str:
        return (f"loss {stats['train_loss']:.4f}, acc {stats['train_acc']:.4f}, momentum "
                f"{stats.get('momentum', float('nan')):.5f}, lr {stats['train_lr']:.2e}, "
                f"{stats['train_skipped_images']} skipped images")

    # -- checkpoints ---------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"teacher": self.teacher.state_dict()}

    def resume_source(self, path: str) -> str:
        """``--resume checkpoint_copy-<E>.pth``: the run resumes from ``checkpoint-<E>.pth`` beside it (the
        student, optimizer and position), with the teacher from the copy."""
        student = _student_of_copy(path)
        if student is None:
            return path
        log.info("--resume %s: the student, optimizer and position from %s, the teacher from the copy", path, student)
        if not self.config.resume_copy:
            self.teacher_file = path
        return student

    def load_state(self, ckpt: Mapping[str, Any], path: str) -> None:
        """The teacher: from --resume_copy (or the copy --resume named), else the checkpoint's ``teacher``, else
        the ``checkpoint_copy`` beside the file (the original's layout), else a copy of the loaded student."""
        source = self.teacher_file
        if source is None and "teacher" in ckpt:
            load_into(self.teacher, ckpt["teacher"], strict=True)
            return
        if source is None and copy_path(path).is_file():
            source = str(copy_path(path))
        if source is None:
            log.warning("%s has no EMA teacher (no 'teacher' entry, no %s beside it): the teacher starts as a copy "
                        "of the loaded student", path, copy_path(path).name)
            self.teacher.load_state_dict(self.run.task.model.state_dict())
            return
        self._load_teacher(source)

    def _load_teacher(self, source: str) -> None:
        """The teacher's weights from a file's ``model`` (strictly: every key named when one does not fit)."""
        from mcbeit.models.checkpoint import filter_pretraining_state_dict, read_checkpoint

        state = filter_pretraining_state_dict(read_checkpoint(source), self.teacher)
        load_into(self.teacher, state, strict=True)
        log.info("EMA teacher from %s", source)

    def saved(self, path: str, name: int | str, flags: Mapping[str, Any]) -> None:
        """``checkpoint_copy-<E>.pth`` (the teacher, as the original writes it) beside each epoch's checkpoint;
        copies whose checkpoint ``--keep_last`` removed go with it."""
        if not isinstance(name, int) or not path.endswith(".pth"):
            return
        teacher = {k: v.detach().cpu() for k, v in self.teacher.state_dict().items()}
        save_atomic({"model": teacher, "epoch": name, "args": dict(flags), "role": "teacher",
                     "student": os.path.basename(path)}, copy_path(path))
        folder = Path(path).parent
        for copy_file in folder.glob(f"{COPY_PREFIX}*.pth"):
            match = _COPY_RE.match(copy_file.name)
            if match and not (folder / f"checkpoint-{match.group(1)}.pth").exists():
                copy_file.unlink(missing_ok=True)


def _student_of_copy(path: str) -> str | None:
    """``checkpoint-<E>.pth`` beside ``path`` when ``path`` is a ``checkpoint_copy-<E>.pth`` (None otherwise); a
    missing one is an error that says what to pass."""
    match = _COPY_RE.match(os.path.basename(path))
    if not match:
        return None
    student = os.path.join(os.path.dirname(path), f"checkpoint-{match.group(1)}.pth")
    if not os.path.isfile(student):
        raise InputError(f"--resume {path} holds the EMA teacher only; the student, the optimizer and the run's "
                         f"position are in {student}, which is missing: pass --resume with a checkpoint-<epoch>.pth "
                         f"(and --resume_copy {path} for this teacher)")
    return student


def _mark(mark: Mark | None, phase: str) -> None:
    if mark is not None:
        mark(phase)
