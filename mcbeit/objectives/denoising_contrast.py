"""ConMIM objective: denoising patch-level contrast between a masked view and an EMA teacher's
unmasked, perturbed view of the same crop (TencentARC/ConMIM ``engine_for_pretraining.py``).

For a batch of B images of N patches, with the student's projected patch tokens S (B,N,P) and the
teacher's T (B,N,P) (the projector's outputs, CLS dropped), and the mask (B,N) with M masked patches::

    s = S / |S|,  t = T / |T|                     l2-normalised per patch
    logits[b] = s[b] @ t[b]^T / tau               (B,N,N): every student patch against every
                                                  teacher patch of the SAME image
    rows = logits[mask]                           (M,N): the masked patches' rows
    labels = position of each masked patch in its image   (M,), in 0..N-1
    loss = CE(rows, labels)                       mean over the batch's M masked patches (pooled)

The positive of a masked patch is the teacher's patch at its own position; its negatives are the
teacher's other N-1 patches of the same image (masked and visible alike): never other images, never
CLS. ``tau`` is ``--temp`` (0.1). Logged with it: ``acc``, the share of masked patches whose most
similar teacher patch is their own.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DenoisingContrastLoss(nn.Module):
    """``forward(student, teacher, bool_masked_pos)`` -> ``{'loss', 'acc'}``; see the module docstring."""

    def __init__(self, temp: float = 0.1):
        super().__init__()
        if temp <= 0:
            raise ValueError(f"the contrast temperature must be positive, got {temp}")
        self.temp = float(temp)

    def forward(self, student: Tensor, teacher: Tensor, bool_masked_pos: Tensor) -> dict[str, Tensor]:
        B, N, _ = student.shape
        if teacher.shape != student.shape or bool_masked_pos.shape != (B, N):
            raise ValueError(f"student {tuple(student.shape)}, teacher {tuple(teacher.shape)} and mask "
                             f"{tuple(bool_masked_pos.shape)} must be (B,N,P), (B,N,P) and (B,N)")
        s = F.normalize(student, dim=-1)                                   # (B,N,P)
        t = F.normalize(teacher.detach(), dim=-1)                          # (B,N,P): no gradient to the teacher
        logits = torch.bmm(s, t.transpose(1, 2)) / self.temp               # (B,N,N)
        rows = logits[bool_masked_pos]                                     # (M,N)
        if rows.shape[0] == 0:
            raise ValueError("no masked patch in the batch: check --mask_ratio / --num_mask_patches")
        labels = bool_masked_pos.nonzero()[:, 1]                           # (M,) each row's own position
        loss = F.cross_entropy(rows.to(torch.promote_types(rows.dtype, torch.float32)), labels)  # fp16/bf16 up, fp64 kept
        with torch.no_grad():
            acc = (rows.argmax(-1) == labels).float().mean()
        return {"loss": loss, "acc": acc}
