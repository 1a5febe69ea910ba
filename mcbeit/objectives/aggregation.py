"""BEiT v2 objective: cross-entropy on the tokenizer's code ids from both streams of patch aggregation.

For the M masked patches of a batch with VQ-KD code ids y (M,):

    loss_1 = CE(Z_main, y)         Z_main (M,V): lm_head of the last block's patch tokens
    loss_2 = CE(Z_aggregated, y)   Z_aggregated (M,V): lm_head of the patch-aggregation head's output
    loss   = loss_1 + loss_2       weight 1 : 1 (unilm beit2/engine_for_pretraining.py)

each a mean over the masked patches of the whole batch (pooled, not per image), as the original's
``nn.CrossEntropyLoss()`` on the concatenated masked rows.
"""
from __future__ import annotations

from torch import Tensor, nn

from .hard_tokens import token_cross_entropy


class PatchAggregationLoss(nn.Module):
    """``forward(masked_logits, masked_logits_cls_pt, target_ids)`` -> ``loss, loss_1, loss_2, mlm_acc_1, mlm_acc_2``."""

    def forward(self, masked_logits: Tensor, masked_logits_cls_pt: Tensor, target_ids: Tensor) -> dict[str, Tensor]:
        if target_ids.shape[0] == 0:
            raise ValueError("no masked patch in the batch: check --num_mask_patches")
        main = token_cross_entropy(masked_logits, target_ids)                 # (M,V), (M,) -> scalar
        aggregated = token_cross_entropy(masked_logits_cls_pt, target_ids)   # (M,V), (M,) -> scalar
        return dict(loss=main["loss"] + aggregated["loss"], loss_1=main["loss"], loss_2=aggregated["loss"],
                    mlm_acc_1=main["mlm_acc"], mlm_acc_2=aggregated["mlm_acc"])
