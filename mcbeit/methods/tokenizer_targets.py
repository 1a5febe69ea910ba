"""mc-BEiT and BEiT: targets from a frozen visual tokenizer.

Per image: two views of one crop (view A for the ViT, view B for the tokenizer) and a patch mask.
The tokenizer turns view B into logits L (B, V, h, w); the student replaces masked patches by its
mask token and predicts Z (M, V) for the M masked patches through ``lm_head``. The objective:

- mc-BEiT (:class:`mcbeit.objectives.MultiChoiceLoss`): soft targets softmax(L / T) refined by
  inter-patch similarity, T warmed per epoch from ``--temp_warmup`` to ``--temp``;
- BEiT (``--hard_targets``, :class:`mcbeit.objectives.HardTokenLoss`): cross-entropy on argmax L.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable

import numpy as np
import timm
import torch
from torch import nn

from mcbeit.data.color import JitterThenViews
from mcbeit.data.transforms import TwoViewTransform
from mcbeit.engine.schedules import temperature_schedule
from mcbeit.engine.task import Mark, StepOutput
from mcbeit.errors import InputError
from mcbeit.methods.base import PretrainMethod, pooled_over_ranks
from mcbeit.models.recompute import set_recompute
from mcbeit.objectives import build_objective
from mcbeit.tokenizers import build_tokenizer
from mcbeit.tokenizers.factory import _WEIGHT_HINTS, canonical_kind

log = logging.getLogger("mcbeit.pretrain")


class TokenizerTargets(PretrainMethod):
    """A frozen tokenizer's logits as targets: mc-BEiT (soft, default) or BEiT (``hard_targets``)."""

    name = "mcbeit"
    tokenizer_view = True

    def __init__(self, config: Any):
        super().__init__(config)
        self.tokenizer: nn.Module | None = None
        self.objective: nn.Module | None = None
        self.temperatures = temperature_schedule(config.temp_warmup, config.temp, config.epochs,
                                                 config.temp_warmup_epochs)
        self.temp = float(self.temperatures[0]) if len(self.temperatures) else float(config.temp)

    def check_inputs(self) -> None:
        cfg = self.config
        weights, kind = cfg.discrete_vae_weight_path, cfg.discrete_vae_type
        if weights and not os.path.exists(weights):
            try:
                expected = _WEIGHT_HINTS[canonical_kind(kind)]
            except (ValueError, KeyError):  # an unknown kind is said when the tokenizer is built
                expected = "the tokenizer's weights"
            raise InputError(f"--discrete_vae_weight_path {weights} does not exist: pass {expected}"
                             f"{f' (--discrete_vae_type {kind})' if kind else ''}, or leave the flag out for a "
                             "RANDOM tokenizer (smoke runs only)")

    def build(self, run) -> nn.Module:
        cfg = self.config
        self.run = run
        self.tokenizer = self._tokenizer().to(run.device)
        student = timm.create_model(cfg.model, pretrained=False, drop_path_rate=cfg.drop_path,
                                    use_shared_rel_pos_bias=cfg.rel_pos_bias, use_abs_pos_emb=cfg.abs_pos_emb,
                                    init_values=cfg.layer_scale_init_value, vocab_size=self.tokenizer.vocab_size,
                                    img_size=cfg.input_size)
        self.objective = build_objective(cfg.hard_targets, cfg.omega, cfg.detach_similarity)
        log.info("tokenizer %s (vocabulary %d)", cfg.discrete_vae_type, self.tokenizer.vocab_size)
        return set_recompute(student, cfg.recompute)

    def _tokenizer(self) -> nn.Module:
        """The frozen tokenizer at --second_input_size (pre-training needs only its logits, channels-last);
        weights it cannot read are an error naming the flags."""
        cfg = self.config
        try:
            return build_tokenizer(cfg.discrete_vae_type, cfg.discrete_vae_weight_path, cfg.second_input_size,
                                   load_decoder=False).channels_last()
        except (OSError, ValueError) as exc:
            path = cfg.discrete_vae_weight_path
            weights = f" --discrete_vae_weight_path {path}" if path else ""
            raise InputError(f"--discrete_vae_type {cfg.discrete_vae_type}{weights} --second_input_size "
                             f"{cfg.second_input_size}: {exc}") from None

    @property
    def downsample(self) -> int | None:
        """Pixels of view B per target token."""
        return None if self.tokenizer is None else self.tokenizer.downsample

    def transform(self, window: tuple[int, int], masks: Callable[[np.random.Generator], np.ndarray],
                  mean: tuple[float, ...], std: tuple[float, ...]) -> Callable:
        cfg = self.config
        views = TwoViewTransform(cfg.input_size, cfg.second_input_size, cfg.train_interpolation,
                                 cfg.second_interpolation, mean, std, self.tokenizer.input_transform, masks)
        return JitterThenViews(views, cfg.color_jitter) if cfg.color_jitter > 0 else views

    def start_epoch(self, epoch: int, first: int = 0) -> None:
        self.temp = float(self.temperatures[epoch])

    def epoch_values(self, epoch: int) -> dict[str, float]:
        return {"temp": float(self.temperatures[epoch])}

    def epoch_temperatures(self, epoch: int) -> dict[str, float]:
        """mc-BEiT: the tokenizer-softmax temperature (warmed per epoch) and the inter-patch similarity's;
        hard targets (BEiT) use neither."""
        if self.config.hard_targets:
            return {}
        return {"tokenizer_softmax": float(self.temperatures[epoch]),
                "patch_similarity": float(getattr(self.objective, "sim_temp", 1.0))}

    def step(self, batch: Any, mark: Mark | None = None) -> StepOutput:
        run = self.run
        view_a, view_b, mask = (t.to(run.device, non_blocking=True) for t in batch[:3])
        bool_masked_pos = mask.flatten(1).bool()                                  # (B, N)

        # The tokenizer is a fixed target network: inference mode (no autograd bookkeeping at all).
        # Its logits are only read afterwards (softmax / argmax under no_grad), never saved for backward.
        with torch.inference_mode(), run.precision.target_autocast():
            tokenizer_logits = self.tokenizer(view_b).float()                    # (B, V, h, w)
        _mark(mark, "tokenizer")
        with run.precision.autocast():
            features, masked_logits = run.forward(view_a, bool_masked_pos)     # (B, N, D), (M, V)
            _mark(mark, "forward")
            out = self.objective(features, masked_logits, tokenizer_logits, bool_masked_pos, self.temp)
        _mark(mark, "loss")
        loss = out["loss"]
        return StepOutput(loss=pooled_over_ranks(loss, bool_masked_pos.sum(), run.info.world_size),
                          metrics={"loss": loss.detach().float(), "mlm_acc": out["mlm_acc"].detach().float()},
                          images=view_a.shape[0], skipped=batch[3].sum() if len(batch) > 3 else 0)

    def modules_to_compile(self) -> list[nn.Module]:
        return [self.objective]


class BeitTargets(TokenizerTargets):
    """BEiT: hard visual tokens (``--hard_targets`` is always on)."""

    name = "beit"


def _mark(mark: Mark | None, phase: str) -> None:
    if mark is not None:
        mark(phase)
