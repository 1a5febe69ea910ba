"""Semantic segmentation loss of UperNet, as mmseg 0.11 computes it.

For logits Z (B,C,h,w) and labels y (B,H,W) with ignored pixels ``y == 255``:

    Z'    = bilinear(Z, (H,W), align_corners=False)                 logits at the label's size
    l_p   = -log softmax(Z'_p)[y_p]   for valid p, 0 for ignored p  per-pixel cross-entropy
    loss  = weight * sum_p l_p / (B H W)      average="all_pixels"  (mmseg 0.11: ignored pixels count)
          = weight * sum_p l_p / #valid       average="valid"       (F.cross_entropy's 'mean')
    acc   = 100 * #{p : argmax Z'_p == y_p} / (B H W)              mmseg's ``accuracy``, in percent

mmseg's ``cross_entropy`` takes ``F.cross_entropy(reduction='none', ignore_index=255)`` and then
``weight_reduce_loss(..., 'mean')``, a mean over *every* pixel: ignored and padded pixels dilute the loss,
so a crop padded with 255 (a small-scale sample) weighs less. That is the default here; ``"valid"`` is the
usual mean over labelled pixels. The accuracy also divides by every pixel (an ignored one is never
correct); it is logged only.

UperNet's total (``UperNetLoss``) is ``loss(decode logits) + 0.4 loss(auxiliary logits)``, each computed as
above in float32 (mmseg's ``force_fp32``).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mcbeit.errors import ConfigError, InputError

__all__ = ['segmentation_loss', 'upernet_loss', 'UperNetLoss', 'AVERAGES']

AVERAGES = ('all_pixels', 'valid')


def _check(logits: Tensor, label: Tensor, average: str) -> None:
    if average not in AVERAGES:
        raise ConfigError(f'average={average!r}: use "all_pixels" (mmseg 0.11, the original) or "valid"')
    if logits.ndim != 4 or label.ndim != 3 or logits.shape[0] != label.shape[0]:
        raise InputError(f'segmentation loss: logits must be (B,C,h,w) and labels (B,H,W) with the same B; got '
                         f'{tuple(logits.shape)} and {tuple(label.shape)}')
    if label.dtype.is_floating_point:
        raise InputError(f'segmentation labels must be integer class indices, got {label.dtype}')


def segmentation_loss(logits: Tensor, label: Tensor, ignore_index: int = 255, weight: float = 1.0,
                      average: str = 'all_pixels') -> Tuple[Tensor, Tensor]:
    """(loss, acc) of logits (B,C,h,w) against labels (B,H,W); see the module doc. ``acc`` is detached, in percent."""
    _check(logits, label, average)
    with torch.autocast(device_type=logits.device.type, enabled=False):
        logits = F.interpolate(logits.float(), size=label.shape[-2:], mode='bilinear', align_corners=False)  # (B,C,H,W)
        label = label.long()
        per_pixel = F.cross_entropy(logits, label, reduction='none', ignore_index=ignore_index)  # (B,H,W), 0 ignored
        if average == 'all_pixels':
            loss = per_pixel.mean()
        else:
            loss = per_pixel.sum() / (label != ignore_index).sum().clamp(min=1)
        acc = (logits.detach().argmax(dim=1) == label).sum() * (100.0 / label.numel())
    return weight * loss, acc


def upernet_loss(logits: Tensor, aux_logits: Optional[Tensor], label: Tensor, aux_weight: float = 0.4,
                 average: str = 'all_pixels', ignore_index: int = 255) -> Tuple[Tensor, Dict[str, Tensor]]:
    """UperNet's total loss and its parts ``{"loss_seg", "loss_aux", "acc_seg"}`` (``loss_aux`` only when
    ``aux_logits`` is given: the auxiliary head runs in training only). ``loss_aux`` is already weighted."""
    loss_seg, acc_seg = segmentation_loss(logits, label, ignore_index, 1.0, average)
    parts = {'loss_seg': loss_seg, 'acc_seg': acc_seg}
    total = loss_seg
    if aux_logits is not None:
        parts['loss_aux'], _ = segmentation_loss(aux_logits, label, ignore_index, aux_weight, average)
        total = total + parts['loss_aux']
    return total, parts


class UperNetLoss(nn.Module):
    """:func:`upernet_loss` as a module: ``loss(logits, aux_logits, label) -> (total, parts)``."""

    def __init__(self, aux_weight: float = 0.4, average: str = 'all_pixels', ignore_index: int = 255):
        super().__init__()
        if average not in AVERAGES:
            raise ConfigError(f'average={average!r}: use "all_pixels" (mmseg 0.11, the original) or "valid"')
        self.aux_weight, self.average, self.ignore_index = float(aux_weight), average, int(ignore_index)

    def extra_repr(self) -> str:
        return f'aux_weight={self.aux_weight}, average={self.average!r}, ignore_index={self.ignore_index}'

    def forward(self, logits: Tensor, aux_logits: Optional[Tensor], label: Tensor) -> Tuple[Tensor, Dict[str, Tensor]]:
        return upernet_loss(logits, aux_logits, label, self.aux_weight, self.average, self.ignore_index)
