"""Training BEiT v2's VQ-KD tokenizer through the run engine (unilm ``beit2/run_vqkd_training.py`` and
``engine_for_vqkd.py``).

A step: the frozen teacher's patch features of the images (no gradient) are the target; the model
(:class:`mcbeit.tokenizers.vqkd.VQKD`) encodes, quantises (k-means initialisation of the codebook in the
first training forward when ``--quantize_kmeans_init``), decodes and returns quant_loss + rec_loss; the engine
does backward and the optimizer step; :meth:`VQKDTrainingTask.after_update` then moves the codebook by EMA
with the step's features (counts and sums summed over ranks) and, with ``--dead_code_steps N``, re-seeds codes
unused for N steps. Logged per step: loss, quant_loss, rec_loss, rec_cosine (mean cosine to the teacher),
code_usage and perplexity of the global batch, lr; per epoch: codes used over the epoch (of V), their
perplexity, and the original's "unused code" count (``quantize.cluster_size == 0``; that buffer is reset at
every epoch start, as the original does).

Deliberate differences from the original: the EMA update happens after the optimizer step instead of inside
the forward (the same arithmetic on the same features: the codebook is not read in between), and a step the
engine skips (non-finite gradients) leaves the codebook alone too; k-means runs on rank 0's batch and is
broadcast (see :mod:`mcbeit.objectives.codebook`); the teacher's input is resized to ``--teacher_input_size``
when that differs.

Checkpoints: ``model`` is the VQ-KD state dict in unilm's layout (no teacher keys), so a
``checkpoint-<epoch>.pth`` is a tokenizer file as it is (``--tokenizer_weight`` / ``--discrete_vae_type vqkd
--discrete_vae_weight_path``).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from mcbeit.config.vqkd import VQKDTrainConfig
from mcbeit.data.folders import check_data_folder
from mcbeit.data.transforms import OneViewTransform
from mcbeit.engine.checkpoint import latest_good_checkpoint, save_atomic
from mcbeit.engine.optim import build_optimizer
from mcbeit.engine.resume import load_resumed_weights
from mcbeit.engine.task import Mark, MeterSpec, StepOutput, Task, TrainData
from mcbeit.errors import ConfigError, InputError
from mcbeit.objectives.codebook import all_reduce_sum, check_replicas, code_statistics, ema_update_, perplexity, reseed_dead_
from mcbeit.objectives.vqvae import usage_figures
from mcbeit.tokenizers.base import Normalize
from mcbeit.tokenizers.teachers import IMAGENET_MEAN, IMAGENET_STD, Teacher, build_teacher
from mcbeit.tokenizers.vqkd import VQKD, parse_vqkd_name

log = logging.getLogger("mcbeit.vqkd")

CHECKPOINT_FORMAT = "mcbeit-vqkd-v1"
TOKENIZER_FILE = "tokenizer.pth"  # written beside the checkpoints: the newest tokenizer
_LOSSES = ("loss", "quant_loss", "rec_loss", "rec_cosine")
_USAGE = ("code_usage", "perplexity", "dead_codes_reinit")


class VQKDTrainingTask(Task):
    """Train a VQ-KD tokenizer as ``config`` says."""

    checkpoint_format = CHECKPOINT_FORMAT
    purpose = "training the VQ-KD tokenizer"
    meter = MeterSpec((*_LOSSES, *_USAGE, "grad_norm"), _LOSSES,
                      {"loss": _LOSSES, "codebook": _USAGE, "opt": ("lr", "grad_norm")},
                      {"rec_cos": ("rec_cosine", "{:.3f}"), "ppl": ("perplexity", "{:.0f}"),
                       "used": ("code_usage", "{:.2f}")}, stop_hint="Lower --lr or set --clip_grad")

    def __init__(self, config: VQKDTrainConfig):
        super().__init__(config)
        self.teacher: Teacher | None = None
        self.last: dict[str, torch.Tensor] = {}
        self.unused_steps: torch.Tensor | None = None
        self.val_loader = None

    @property
    def base_lr(self) -> float:
        """``--lr`` x total batch / 128, as the original (``args.lr = total_batch_size / 128 * args.lr``)."""
        cfg = self.config
        return cfg.lr * cfg.batch_size * self.run.info.world_size / 128.0

    def check_inputs(self) -> None:
        cfg = self.config
        if cfg.data_path:
            check_data_folder(cfg.data_path)
        if cfg.color_jitter:
            raise ConfigError("--color_jitter > 0 is not supported by the VQ-KD data pipeline here (the original's "
                              "default and README use 0)")
        parse_vqkd_name(cfg.model)

    # -- building -----------------------------------------------------------------------------------------
    def build_model(self, run) -> nn.Module:
        cfg = self.config
        kind = cfg.teacher_kind
        teacher = build_teacher(kind, teacher_file(cfg.teacher_weight), cfg.teacher_input_size,
                                random_ok=self.embedded_data)
        if teacher.grid != cfg.input_size // 16:
            raise InputError(f"the {kind} teacher gives a {teacher.grid}x{teacher.grid} patch grid at "
                             f"--teacher_input_size {cfg.teacher_input_size}, the tokenizer a {cfg.input_size // 16}x"
                             f"{cfg.input_size // 16} one at --input_size {cfg.input_size}: make them equal")
        self.teacher = teacher.to(run.device)
        model = VQKD(cfg.model, cfg.input_size, cfg.codebook_n_emd, cfg.codebook_emd_dim, cfg.ema_decay,
                     cfg.quantize_kmeans_init, teacher_dim=teacher.out_dim, rec_loss_type=cfg.rec_loss_type)
        self.unused_steps = torch.zeros(cfg.codebook_n_emd, dtype=torch.long, device=run.device)
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info("VQ-KD %s: %d codes x %d, %.2fM trainable parameters; teacher %s (%d-d, %s); LR = %.8f (--lr %g x "
                 "total batch %d / 128)", model.arch.name, cfg.codebook_n_emd, cfg.codebook_emd_dim, n / 1e6, kind,
                 teacher.out_dim, "RANDOM" if teacher.random_weights else cfg.teacher_weight, self.base_lr, cfg.lr,
                 cfg.batch_size * run.info.world_size)
        return model

    def input_transform(self):
        if self.config.process_type == "imagenet_norm":
            return Normalize(IMAGENET_MEAN, IMAGENET_STD)
        return Normalize((0.5,) * 3, (0.5,) * 3)                                   # [0, 1] -> [-1, 1]

    def build_data(self, run) -> TrainData:
        cfg = self.config
        transform = OneViewTransform(cfg.input_size, scale=(cfg.min_crop_scale, 1.0),
                                     interpolation=cfg.train_interpolation, output_transform=self.input_transform())
        data = self.image_training_data(run, transform)
        log.info("data: %s, %s", data.described, transform)
        self.val_loader = self._val_loader(run)
        return data

    @property
    def evaluates(self) -> bool:  # with --eval_data_path, a run stopped before an epoch's evaluation makes it up
        return self.val_loader is not None

    def _val_loader(self, run):
        """The original's evaluation data: --eval_data_path's images resized to --input_size / 0.875 and centre
        cropped (bicubic), in the tokenizer's input normalisation; None without it or with --disable_eval."""
        from mcbeit.data.classification_transforms import SeededTransform
        from mcbeit.data.datasets import build_pretraining_dataset
        from mcbeit.data.samplers import build_eval_loader

        cfg = self.config
        if not cfg.eval_data_path or cfg.disable_eval:
            return None
        check_data_folder(cfg.eval_data_path, "--eval_data_path")
        transform = SeededTransform(vqkd_eval_transform(cfg.input_size, self.input_transform()))
        dataset = build_pretraining_dataset(cfg.eval_data_path, None, transform, cfg.seed)
        log.info("evaluation after every epoch: %d images of --eval_data_path %s", len(dataset), cfg.eval_data_path)
        return build_eval_loader(dataset, cfg.batch_size, cfg.num_workers, cfg.pin_mem and run.device.type == "cuda",
                                 run.info.world_size, run.info.rank)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The val images through teacher and model in eval mode (no k-means, no EMA): mean loss, quant_loss,
        rec_loss and reconstruction cosine per image, codes used and unused over all of them (summed over ranks)."""
        run, model = self.run, self.model
        vocab = self.config.codebook_n_emd
        sums = torch.zeros(5, dtype=torch.float64, device=run.device)             # loss, quant, rec, cos, images
        counts = torch.zeros(vocab, dtype=torch.float64, device=run.device)
        was_training = model.training
        model.eval()
        try:
            for batch in self.val_loader:
                images = batch[0].to(run.device, non_blocking=True)              # (B, 3, H, W)
                with run.precision.autocast():
                    out = model(images, self.teacher(images))
                n = images.shape[0]
                sums += torch.stack([out[k].double() * n for k in ("loss", "quant_loss", "rec_loss", "rec_cosine")]
                                    + [sums.new_tensor(float(n))])
                counts += torch.bincount(out["ids"].flatten(), minlength=vocab).double()
        finally:
            model.train(was_training)
        sums, counts = all_reduce_sum(sums), all_reduce_sum(counts)
        images = max(float(sums[4]), 1.0)
        used = int((counts > 0).sum())
        return {"loss": float(sums[0]) / images, "quant_loss": float(sums[1]) / images,
                "rec_loss": float(sums[2]) / images, "rec_cosine": float(sums[3]) / images, "codes_used": used,
                "unused_code": vocab - used, "images": int(sums[4])}

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        cfg = self.config
        return build_optimizer(model, cfg.opt, lr=self.base_lr, weight_decay=cfg.weight_decay, opt_eps=cfg.opt_eps,
                               opt_betas=cfg.opt_betas, momentum=cfg.momentum)

    # -- training -----------------------------------------------------------------------------------------
    def start_epoch(self, epoch: int, first: int = 0) -> None:
        if first == 0:
            self.model.quantize.cluster_size.zero_()                               # the original's per-epoch reset
        self.epoch_counts = torch.zeros(self.config.codebook_n_emd, dtype=torch.float64, device=self.run.device)
        self.epoch_reinit = torch.zeros((), device=self.run.device)

    def train_step(self, batch: Any, mark: Mark | None = None) -> StepOutput:
        run = self.run
        images = batch[0].to(run.device, non_blocking=True)                     # (B, 3, H, W) tokenizer input
        with run.precision.autocast():
            target = self.teacher(images)                                        # (B, N, C), no gradient
            if mark is not None:
                mark("teacher")
            out = run.forward(images, target)
            if mark is not None:
                mark("forward")
        self.last = {"features": out["features"], "ids": out["ids"]}
        return StepOutput(out["loss"], {k: out[k].detach() for k in _LOSSES}, images.shape[0],
                          batch[1].sum() if len(batch) > 1 else 0)

    @torch.no_grad()
    def after_update(self, stepped: Any) -> dict[str, torch.Tensor]:
        """The codebook's EMA update with the step's features (only when the step was applied)."""
        q = self.model.quantize
        zero = torch.zeros((), device=self.run.device)
        if not bool(stepped) or not self.last:
            return {k: zero for k in _USAGE}
        counts, sums = code_statistics(self.last["features"], self.last["ids"], q.vocab)
        used = ema_update_(q.codebook, counts, sums, q.decay)
        q.cluster_size.mul_(q.decay).add_(counts, alpha=1.0 - q.decay)           # unilm's usage statistic
        self.unused_steps = torch.where(used, torch.zeros_like(self.unused_steps), self.unused_steps + 1)
        reinit = zero
        n = self.config.dead_code_steps
        if n > 0:
            dead = self.unused_steps >= n
            reseed_dead_(q.codebook, dead, self.last["features"])
            self.unused_steps.masked_fill_(dead, 0)
            reinit = dead.sum().float()
        self.epoch_counts += counts.to(torch.float64)
        self.epoch_reinit += reinit
        return {"code_usage": used.float().mean(), "perplexity": perplexity(counts), "dead_codes_reinit": reinit}

    def end_epoch(self, epoch: int, train_stats: dict[str, Any]) -> dict[str, Any]:
        check_replicas(self.model.quantize.codebook, "the VQ-KD codebook")
        stats = dict(train_stats)
        if train_stats:  # empty: an epoch trained before a resume, owing only its evaluation
            self._training_figures(epoch, stats)
        record = {**super().end_epoch(epoch, stats), "codebook_size": self.config.codebook_n_emd,
                  "n_parameters": self.run.n_parameters}
        if self.val_loader is not None:
            test = {f"test_{k}": v for k, v in self.evaluate().items()}
            record.update(test)
            if self.run.info.is_main:
                self.run.writer.scalars((epoch + 1) * self.run.steps_per_epoch, test, "test")
        return record

    def _training_figures(self, epoch: int, stats: dict[str, Any]) -> None:
        stats["dead_codes_reinit"] = float(self.epoch_reinit)
        usage = usage_figures(self.epoch_counts)                                   # counts are already global
        stats.update(epoch_codes_used=usage["codes_used"], epoch_code_usage=usage["code_usage"],
                     epoch_perplexity=usage["perplexity"],
                     unused_code=int((self.model.quantize.cluster_size == 0).sum()))
        if self.run.info.is_main:
            self.run.writer.scalars((epoch + 1) * self.run.steps_per_epoch,
                                    {k: float(stats[k]) for k in ("epoch_code_usage", "epoch_perplexity")}, "codebook")

    def epoch_message(self, s: Mapping[str, Any]) -> str:
        test = (f"; eval: rec cosine {s['test_rec_cosine']:.3f}, codes used {s['test_codes_used']}/"
                f"{self.config.codebook_n_emd} on {s['test_images']} images") if "test_rec_cosine" in s else ""
        if "train_loss" not in s:                                                  # an owed evaluation only
            return f"evaluated only (trained before){test}"
        return self._train_message(s) + test

    def _train_message(self, s: Mapping[str, Any]) -> str:
        return (f"loss {s['train_loss']:.4f} (quant {s['train_quant_loss']:.4f}, rec {s['train_rec_loss']:.4f}), "
                f"rec cosine {s['train_rec_cosine']:.3f}, codes used {s['train_epoch_codes_used']}/"
                f"{self.config.codebook_n_emd}, perplexity {s['train_epoch_perplexity']:.1f}, unused code "
                f"{s['train_unused_code']}, {s['train_dead_codes_reinit']:.0f} re-seeded, lr {s['train_lr']:.2e}")

    # -- checkpoints --------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"vqkd_unused_steps": self.unused_steps.detach().cpu()}

    def load_state(self, ckpt: Mapping[str, Any], path: str) -> None:
        if "vqkd_unused_steps" in ckpt:
            self.unused_steps = ckpt["vqkd_unused_steps"].to(self.run.device)

    def saved(self, path: str, epoch: int | str) -> None:
        """``tokenizer.pth`` beside every checkpoint: the newest tokenizer under a name that does not change
        (unilm's layout under ``'model'``, with the training flags: ``--tokenizer_weight`` takes it)."""
        save_atomic({"model": self.model.state_dict(), "args": self.flags(), "epoch": epoch},
                    Path(self.config.output_dir) / TOKENIZER_FILE)

    def load_weights(self, ckpt: Mapping[str, Any], path: str) -> bool:
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise InputError(f"{path} is not a checkpoint of mcbeit-vqkd (format {ckpt.get('format')!r}, expected "
                             f"{CHECKPOINT_FORMAT!r}); pass a checkpoint-<epoch>.pth of mcbeit-vqkd, or start afresh "
                             f"with another --output_dir (or --start_over)")
        load_resumed_weights(self.model, ckpt["model"], path, self.flags(), ckpt.get("args"))
        return True


def teacher_file(weight: str | None) -> str | None:
    """``--teacher_weight``: a file, or a run's folder (its newest whole checkpoint-<N>.pth, as --finetune
    takes the newest pre-training checkpoint)."""
    if not weight or not os.path.isdir(weight):
        return weight
    newest = latest_good_checkpoint(weight)
    if newest is None:
        raise InputError(f"--teacher_weight {weight}: a folder without a checkpoint-<epoch>.pth; pass the teacher's "
                         "weights file")
    log.info("--teacher_weight %s: its newest checkpoint, %s", weight, newest.name)
    return str(newest)


def vqkd_eval_transform(size: int, normalise: Normalize):
    """The original's VQ-KD evaluation view: short side to ``size / 0.875`` (bicubic; ``size`` from 384 px on),
    centre crop ``size``, [0, 1], then the tokenizer's input normalisation."""
    from torchvision import transforms as T

    resize = int(size / (224 / 256)) if size < 384 else size
    return T.Compose([T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size), T.ToTensor(),
                      T.Normalize(normalise.mean, normalise.std)])
