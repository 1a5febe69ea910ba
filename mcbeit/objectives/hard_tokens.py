"""BEiT objective: cross-entropy of the masked patches against the tokenizer's hard visual tokens."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .multichoice import _at_least_float32, hard_token_ids, masked_accuracy, masked_rows


class HardTokenLoss(nn.Module):
    """Mean over all masked patches of the batch (pooled) of CE(Z, argmax_v L).

    Same call signature as :class:`~mcbeit.objectives.MultiChoiceLoss`; ``features`` and
    ``temp`` are unused (hard ids do not depend on the temperature).
    """

    def forward(
        self,
        features: Tensor,  # (B,N,D), unused
        masked_logits: Tensor,  # (M,V) row order of bool_masked_pos.nonzero()
        tokenizer_logits: Tensor,  # (B,V,h,w) with h*w = N
        bool_masked_pos: Tensor,  # (B,N) bool
        temp: float | None = None,
    ) -> dict[str, Tensor]:
        if masked_logits.shape[0] == 0:
            raise ValueError("no masked patch in the batch: check --num_mask_patches / --mask_ratio")
        img_idx, patch_idx = masked_rows(bool_masked_pos.flatten(1).bool())  # (M,), (M,)
        with torch.no_grad():
            target_ids = hard_token_ids(tokenizer_logits, img_idx, patch_idx)  # (M,)
        return token_cross_entropy(masked_logits, target_ids)


def token_cross_entropy(masked_logits: Tensor, target_ids: Tensor) -> dict[str, Tensor]:
    """``loss`` = mean over the M masked patches of CE(Z (M,V), ids (M,)) in at least float32 (autocast off),
    ``mlm_acc`` = the fraction whose argmax is the id (detached)."""
    with torch.autocast(device_type=masked_logits.device.type, enabled=False):
        loss = F.cross_entropy(_at_least_float32(masked_logits), target_ids)  # (M,V), (M,) -> scalar
    return dict(loss=loss, mlm_acc=masked_accuracy(masked_logits, target_ids))
