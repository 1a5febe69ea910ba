"""The fine-tuning objective: cross-entropy on class ids (label smoothing optional), or on the soft
targets mixup / cutmix make (timm's ``Mixup``, which also applies the smoothing)."""
from __future__ import annotations

from timm.data.mixup import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn

__all__ = ["build_criterion", "build_mixup"]


def build_criterion(smoothing: float, mixup: bool) -> nn.Module:
    """Loss of (logits (B, C), targets): soft targets (B, C) with mixup, class ids (B,) otherwise."""
    if mixup:
        return SoftTargetCrossEntropy()          # smoothing is in the mixed targets
    if smoothing > 0.0:
        return LabelSmoothingCrossEntropy(smoothing=smoothing)
    return nn.CrossEntropyLoss()


def build_mixup(config, num_classes: int) -> Mixup | None:
    """timm's Mixup of the ``--mixup`` / ``--cutmix`` flags (any object with those fields), or None when off."""
    if not (config.mixup > 0 or config.cutmix > 0 or config.cutmix_minmax is not None):
        return None
    return Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix, cutmix_minmax=config.cutmix_minmax,
                 prob=config.mixup_prob, switch_prob=config.mixup_switch_prob, mode=config.mixup_mode,
                 label_smoothing=config.smoothing, num_classes=num_classes)
