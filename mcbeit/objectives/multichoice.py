"""mc-BEiT multi-choice objective: soft tokenizer targets refined by inter-patch similarity.

For the masked patches of a batch (M of them, a ragged count per image):

    P      = softmax(L / T) over the vocabulary           tokenizer's soft choice per patch
    W      = softmax(F F^T / sim_temp) over the patches   F = l2-normalised student features
    target = omega * W P + (1 - omega) * P
    loss   = mean over the M masked patches (pooled over the batch) of -sum_v target_v log_softmax(Z)_v

Only the M masked rows of ``W`` and ``W P`` enter the loss, so only those are computed: each
image's masked rows are padded to the widest image of the batch (K rows) and multiplied against
all N patches of that image with one ``bmm``; the full B x N x V product ``W P`` is never formed.
Gradients flow through ``W`` into the features, as in the reference implementation, unless
``detach_similarity`` is set.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _at_least_float32(x: Tensor) -> Tensor:
    """float16/bfloat16 -> float32; float32 and float64 are kept (float64 is for exact checks)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def masked_rows(bool_masked_pos: Tensor) -> tuple[Tensor, Tensor]:
    """(image index, patch index) of every masked patch, in the row order of ``masked_logits``.

    That order is ``bool_masked_pos.nonzero()``: image by image, patches ascending; it is also
    the order of ``features[bool_masked_pos]``.
    """
    img_idx, patch_idx = bool_masked_pos.nonzero(as_tuple=True)  # (M,), (M,)
    return img_idx, patch_idx


def hard_token_ids(tokenizer_logits: Tensor, img_idx: Tensor, patch_idx: Tensor) -> Tensor:
    """Visual-token id (argmax over the vocabulary) of each masked patch: (M,)."""
    ids = tokenizer_logits.argmax(dim=1).flatten(1)  # (B,V,h,w) -> (B,h,w) -> (B,N)
    return ids[img_idx, patch_idx]  # (M,)


def masked_accuracy(masked_logits: Tensor, target_ids: Tensor) -> Tensor:
    """Fraction of masked patches whose predicted token is the tokenizer's; detached, no host sync."""
    return (masked_logits.detach().argmax(dim=-1) == target_ids).float().mean()


class MultiChoiceLoss(nn.Module):
    """mc-BEiT loss.

    Args:
        omega: weight of the similarity-refined target (0 = plain soft targets, 1 = only ``W P``).
        sim_temp: temperature of the inter-patch similarity softmax (1.0 in the paper).
        detach_similarity: stop gradients through ``W`` (the reference lets them flow).
    """

    def __init__(self, omega: float = 0.2, sim_temp: float = 1.0, detach_similarity: bool = False):
        super().__init__()
        if not 0.0 <= omega <= 1.0:
            raise ValueError(f"omega must be in [0, 1], got {omega}")
        if sim_temp <= 0:
            raise ValueError(f"sim_temp must be positive, got {sim_temp}")
        self.omega = float(omega)
        self.sim_temp = float(sim_temp)
        self.detach_similarity = bool(detach_similarity)

    def extra_repr(self) -> str:
        return f"omega={self.omega}, sim_temp={self.sim_temp}, detach_similarity={self.detach_similarity}"

    def forward(
        self,
        features: Tensor,  # (B,N,D) final-norm student features, CLS removed
        masked_logits: Tensor,  # (M,V) lm_head on the masked rows, row order of bool_masked_pos.nonzero()
        tokenizer_logits: Tensor,  # (B,V,h,w) with h*w = N
        bool_masked_pos: Tensor,  # (B,N) bool
        temp: float,
    ) -> dict[str, Tensor]:
        if masked_logits.shape[0] == 0:
            raise ValueError("no masked patch in the batch: check --num_mask_patches / --mask_ratio")
        if temp <= 0:
            raise ValueError(f"temperature must be positive, got {temp}")
        bool_masked_pos = bool_masked_pos.flatten(1).bool()  # (B,N)
        img_idx, patch_idx = masked_rows(bool_masked_pos)  # (M,), (M,)

        # The loss is computed in float32 (at least) even under autocast.
        with torch.autocast(device_type=features.device.type, enabled=False):
            with torch.no_grad():
                probs = F.softmax(_at_least_float32(tokenizer_logits) / temp, dim=1)  # (B,V,h,w)
                probs = probs.flatten(2).transpose(1, 2)  # (B,N,V)
                target_ids = hard_token_ids(tokenizer_logits, img_idx, patch_idx)  # (M,)

            target = probs[img_idx, patch_idx]  # (M,V)
            if self.omega > 0:
                refined = self._similarity_refined(features, probs, bool_masked_pos, img_idx, patch_idx)  # (M,V)
                target = self.omega * refined + (1.0 - self.omega) * target  # (M,V)

            log_probs = F.log_softmax(_at_least_float32(masked_logits), dim=-1)  # (M,V)
            loss = -(target * log_probs).sum(dim=-1).mean()  # (M,) -> scalar, pooled over the batch

        return dict(loss=loss, mlm_acc=masked_accuracy(masked_logits, target_ids))

    def _similarity_refined(
        self,
        features: Tensor,  # (B,N,D)
        probs: Tensor,  # (B,N,V)
        bool_masked_pos: Tensor,  # (B,N)
        img_idx: Tensor,  # (M,)
        patch_idx: Tensor,  # (M,)
    ) -> Tensor:
        """Rows of ``W P`` for the masked patches only: (M,V)."""
        B, N = bool_masked_pos.shape
        feats = F.normalize(_at_least_float32(features), dim=-1)  # (B,N,D)
        if self.detach_similarity:
            feats = feats.detach()

        # Slot of each masked patch among its image's masked patches, and the widest image.
        slot = (bool_masked_pos.cumsum(dim=1) - 1)[img_idx, patch_idx]  # (M,)
        widest = int(bool_masked_pos.sum(dim=1).max())  # K (one host sync; the masked indexing syncs anyway)

        queries = feats.new_zeros(B, widest, feats.shape[-1])  # (B,K,D); padding rows stay zero
        queries = queries.index_put((img_idx, slot), feats[img_idx, patch_idx])  # (B,K,D)
        sim = torch.bmm(queries, feats.transpose(1, 2)) / self.sim_temp  # (B,K,D) x (B,D,N) -> (B,K,N)
        weights = F.softmax(sim, dim=-1)  # (B,K,N) over the patches of the same image
        refined = torch.bmm(weights, probs)  # (B,K,N) x (B,N,V) -> (B,K,V)
        return refined[img_idx, slot]  # (M,V); padding rows dropped
