"""BEiT v2: hard VQ-KD code ids as targets, and patch aggregation (unilm ``beit2/``).

Per image: ColorJitter(0.4) of the whole image, a flip, one random-resized crop (area in
``[--min_crop_scale, 1]``) giving view A for the ViT (normalised) and view B for the tokenizer
([0, 1], which the VQ-KD tokenizer maps to [-1, 1]), and a block mask of exactly
``--num_mask_patches`` patches (v2's generator tops the drawing up).

The frozen VQ-KD tokenizer turns view B into code ids y (B, N) under inference mode; the M masked
patches' ids are the targets. A ``*_cls_pt`` student
(:class:`mcbeit.models.beit.BeitV2ForMaskedImageModeling`) predicts them twice, from its last block
and from its patch-aggregation head, and the loss is CE + CE, 1 : 1
(:class:`mcbeit.objectives.PatchAggregationLoss`), logged as loss, loss_1, loss_2, mlm_acc_1,
mlm_acc_2. Any other BEiT student trains the single CE of BEiT (loss, mlm_acc), as the original
script does for a model without ``cls_pt``.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Mapping

import numpy as np
import timm
import torch
from torch import nn

from mcbeit.data.color import JitterThenViews
from mcbeit.data.transforms import TwoViewTransform
from mcbeit.engine.task import Mark, MeterSpec, StepOutput
from mcbeit.errors import ConfigError, InputError
from mcbeit.methods.base import PretrainMethod, pooled_over_ranks
from mcbeit.methods.tokenizer_targets import TokenizerTargets, _mark
from mcbeit.models.recompute import set_recompute
from mcbeit.objectives import PatchAggregationLoss, token_cross_entropy

log = logging.getLogger("mcbeit.pretrain")

_AGGREGATED = ("loss", "loss_1", "loss_2", "mlm_acc_1", "mlm_acc_2")
_OPT = ("lr", "min_lr", "weight_decay", "grad_norm", "loss_scale")
AGGREGATION_METER = MeterSpec(
    (*_AGGREGATED, "grad_norm", "loss_scale"), _AGGREGATED, {"loss": _AGGREGATED, "opt": _OPT},
    {"loss": ("loss", "{:.4f}"), "acc1": ("mlm_acc_1", "{:.3f}"), "acc2": ("mlm_acc_2", "{:.3f}"),
     "lr": ("lr", "{:.2e}")})


class BeitV2Targets(TokenizerTargets):
    """BEiT v2: a frozen VQ-KD tokenizer's code ids; two cross-entropies for a patch-aggregation student.

    Shares :class:`TokenizerTargets`' tokenizer view, its ``downsample`` (16 for VQ-KD) and compiling of the
    objective; the tokenizer, the student's arguments, the views' crop scale, the masks and the loss are v2's."""

    name = "beitv2"
    exact_masks = True  # v2's block masks have exactly --num_mask_patches patches
    model_patterns = ("beit_*_8k_vocab", "beit_*_8k_vocab_cls_pt")

    def __init__(self, config: Any):
        super().__init__(config)
        self.aggregation = str(config.model).endswith("_cls_pt")
        self.meter = AGGREGATION_METER if self.aggregation else PretrainMethod.meter

    def check_inputs(self) -> None:
        weights = self.config.tokenizer_weight
        if weights and not os.path.exists(weights):
            raise InputError(f"--tokenizer_weight {weights} does not exist: pass a VQ-KD file (unilm's "
                             "vqkd_encoder_*.pth, mmpretrain's vqkd_encoder.pth or a checkpoint of mcbeit-vqkd), or "
                             "leave the flag out for a RANDOM tokenizer (smoke runs only)")

    def build(self, run) -> nn.Module:
        cfg = self.config
        self.run = run
        self.tokenizer = self._tokenizer().to(run.device)
        extra = dict(early_layers=cfg.early_layers, head_layers=cfg.head_layers,
                     shared_lm_head=cfg.shared_lm_head) if self.aggregation else {}
        try:
            student = timm.create_model(cfg.model, pretrained=False, drop_path_rate=cfg.drop_path,
                                        use_shared_rel_pos_bias=cfg.rel_pos_bias, use_abs_pos_emb=cfg.abs_pos_emb,
                                        init_values=cfg.layer_scale_init_value, vocab_size=self.tokenizer.vocab_size,
                                        img_size=cfg.input_size, **extra)
        except ValueError as exc:
            if "early_layers" in str(exc):
                raise ConfigError(f"--early_layers {cfg.early_layers} --model {cfg.model}: {exc}") from None
            raise
        self.objective = PatchAggregationLoss()
        log.info("tokenizer VQ-KD %s (%d codes x %d)%s", self.tokenizer.arch.name, self.tokenizer.vocab_size,
                 self.tokenizer.codebook_dim, "; patch aggregation: early_layers %d, head_layers %d, shared_lm_head %s" % (
                     cfg.early_layers, cfg.head_layers, cfg.shared_lm_head) if self.aggregation else "")
        return set_recompute(student, cfg.recompute)

    def _tokenizer(self) -> nn.Module:
        """The frozen VQ-KD tokenizer at --second_input_size; a file it cannot use is an error naming the flags."""
        from mcbeit.tokenizers.vqkd import build_vqkd_tokenizer

        cfg = self.config
        weights = f"--tokenizer_weight {cfg.tokenizer_weight} " if cfg.tokenizer_weight else ""
        try:
            tokenizer = build_vqkd_tokenizer(cfg.tokenizer_weight, cfg.second_input_size, model=cfg.tokenizer_model,
                                             codebook_size=cfg.codebook_size, codebook_dim=cfg.codebook_dim)
        except (OSError, ValueError, InputError) as exc:
            raise InputError(f"{weights}--tokenizer_model {cfg.tokenizer_model} --codebook_size {cfg.codebook_size} "
                             f"--codebook_dim {cfg.codebook_dim} --second_input_size {cfg.second_input_size}: "
                             f"{exc}") from None
        return tokenizer.channels_last()

    def transform(self, window: tuple[int, int], masks: Callable[[np.random.Generator], np.ndarray],
                  mean: tuple[float, ...], std: tuple[float, ...]) -> Callable:
        cfg = self.config
        views = TwoViewTransform(cfg.input_size, cfg.second_input_size, cfg.train_interpolation,
                                 cfg.second_interpolation, mean, std, self.tokenizer.input_transform, masks,
                                 scale=(cfg.min_crop_scale, 1.0))
        return JitterThenViews(views, cfg.color_jitter) if cfg.color_jitter > 0 else views

    # no temperature: hard targets
    def start_epoch(self, epoch: int, first: int = 0) -> None:
        pass

    def epoch_values(self, epoch: int) -> dict[str, float]:
        return {}

    def epoch_temperatures(self, epoch: int) -> dict[str, float]:
        return {}

    def step(self, batch: Any, mark: Mark | None = None) -> StepOutput:
        run = self.run
        view_a, view_b, mask = (t.to(run.device, non_blocking=True) for t in batch[:3])
        bool_masked_pos = mask.flatten(1).bool()                                     # (B, N)

        # The tokenizer is a fixed target network: inference mode, its ids only indexed afterwards.
        with torch.inference_mode(), run.precision.target_autocast():
            ids = self.tokenizer.token_ids(view_b)                                  # (B, N) int64
        labels = ids[bool_masked_pos]                                               # (M,) a normal tensor
        _mark(mark, "tokenizer")
        with run.precision.autocast():
            outputs = run.forward(view_a, bool_masked_pos)  # (B,N,D), (M,V)[, (M,V) aggregated]
            _mark(mark, "forward")
            if self.aggregation:
                out = self.objective(outputs[1], outputs[2], labels)
            else:
                out = token_cross_entropy(outputs[1], labels)
        _mark(mark, "loss")
        loss = out["loss"]
        return StepOutput(loss=pooled_over_ranks(loss, bool_masked_pos.sum(), run.info.world_size),
                          metrics={k: v.detach().float() for k, v in out.items()},
                          images=view_a.shape[0], skipped=batch[3].sum() if len(batch) > 3 else 0)

    def epoch_message(self, stats: Mapping[str, Any]) -> str:
        if not self.aggregation:
            return super().epoch_message(stats)
        return (f"loss {stats['train_loss']:.4f} (loss_1 {stats['train_loss_1']:.4f}, loss_2 "
                f"{stats['train_loss_2']:.4f}), mlm_acc_1 {stats['train_mlm_acc_1']:.4f}, mlm_acc_2 "
                f"{stats['train_mlm_acc_2']:.4f}, lr {stats['train_lr']:.2e}, {stats['train_skipped_images']} "
                "skipped images")
