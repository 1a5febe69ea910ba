"""Linear probing: a frozen BEiT, features of one block, BatchNorm without affine, one linear layer.

The protocol of MAE / BEiT v2's linear evaluation: the backbone never trains (its weights are
frozen and it always runs in eval mode, so dropout / drop-path are off); the features are the
patch tokens of block ``layer`` (1-based, default the last) averaged, or that block's CLS token,
before any final norm; ``BatchNorm1d(affine=False)`` standardises them and a linear head
(initialised with std 0.01) classifies. Only the head trains.
"""
from __future__ import annotations

import torch
from timm.layers import trunc_normal_
from timm.models.beit import Beit
from torch import nn

__all__ = ["LinearProbe"]


class LinearProbe(nn.Module):
    def __init__(self, backbone: Beit, num_classes: int, layer: int | None = None, pool: str = "avg"):
        super().__init__()
        depth = len(backbone.blocks)
        layer = depth if layer is None else int(layer)
        if not 1 <= layer <= depth:
            raise ValueError(f"--probe_layer {layer}: the model has blocks 1..{depth}")
        if pool not in ("avg", "cls"):
            raise ValueError(f"--probe_pool must be 'avg' or 'cls', got {pool!r}")
        self.backbone, self.layer, self.pool = backbone, layer, pool
        self.backbone.requires_grad_(False)
        dim = backbone.num_features
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def train(self, mode: bool = True) -> "LinearProbe":
        super().train(mode)
        self.backbone.eval()                                            # frozen: no dropout, no drop-path
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D): block ``layer``'s mean patch token (or CLS token)."""
        with torch.no_grad():
            (patches, prefix), = self.backbone.forward_intermediates(
                x, indices=[self.layer - 1], return_prefix_tokens=True, norm=False, output_fmt="NLC",
                intermediates_only=True)                                # (B, N, D), (B, 1, D)
        return patches.mean(dim=1) if self.pool == "avg" else prefix[:, 0]

    def extract_feat(self, x: torch.Tensor) -> torch.Tensor:
        """mmpretrain's name for :meth:`features`: (B, 3, H, W) -> (B, D), what the probe's BN and head read."""
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(self.features(x)))                     # (B, num_classes)
