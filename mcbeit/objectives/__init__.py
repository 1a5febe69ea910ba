"""Pre-training objectives: mc-BEiT multi-choice soft targets, BEiT hard visual tokens, BEiT v2's two streams,
ConMIM's denoising patch contrast."""
from __future__ import annotations

from torch import nn

from .aggregation import PatchAggregationLoss
from .denoising_contrast import DenoisingContrastLoss
from .hard_tokens import HardTokenLoss, token_cross_entropy
from .multichoice import MultiChoiceLoss

__all__ = ["DenoisingContrastLoss", "HardTokenLoss", "MultiChoiceLoss", "PatchAggregationLoss", "build_objective", "token_cross_entropy"]


def build_objective(
    hard_targets: bool,
    omega: float = 0.2,
    detach_similarity: bool = False,
    sim_temp: float = 1.0,
) -> nn.Module:
    """BEiT's :class:`HardTokenLoss` when ``hard_targets``, else mc-BEiT's :class:`MultiChoiceLoss`."""
    if hard_targets:
        return HardTokenLoss()
    return MultiChoiceLoss(omega=omega, sim_temp=sim_temp, detach_similarity=detach_similarity)
