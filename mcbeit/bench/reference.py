"""The reference formulation the benchmark measures the product against: the original research
code's way of computing the same things, run in the same process on the same inputs.

- attention by hand (q k^T, softmax, v): timm's non-fused branch of the same modules;
- ``lm_head`` and log-softmax on all N tokens, the full B x N x N similarity and B x N x V target
  product, the loss then picked at the masked positions (``engine_for_pretraining.py``);
- the tokenizer in fp32 under ``torch.no_grad`` (not inference mode), channels-first;
- AdamW as a per-tensor loop, ``clip_grad_norm_``, and ``loss.item()`` read every step;
- the data pipeline of ``datasets.py`` / ``transforms.py``: full decode, flip of the whole image,
  crop-then-resize for each view, ``ToTensor`` + ``Normalize`` per view.

:func:`literal_loss` is also the formula the objective's equivalence test checks against.
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = ["literal_loss", "reference_model", "ReferenceStep", "ReferenceTwoViews"]


def literal_loss(features: torch.Tensor, logits: torch.Tensor, tokenizer_logits: torch.Tensor,
                 mask: torch.Tensor, temp: float, omega: float,
                 detach_similarity: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """mc-BEiT's loss as the original step writes it, on the full tensors.

    features (B,N,D) student features; logits (B,N,V) = lm_head on ALL tokens; tokenizer_logits
    (B,V,h,w); mask (B,N) bool. Returns (loss, mlm_acc).
    """
    with torch.no_grad():
        input_ids = torch.argmax(tokenizer_logits, dim=1).flatten(1)                    # (B,N)
        probs = F.softmax(tokenizer_logits / temp, dim=1).flatten(2).permute(0, 2, 1)   # (B,N,V)
    normed = F.normalize(features, dim=-1)                                              # (B,N,D)
    if detach_similarity:
        normed = normed.detach()
    similarity = F.softmax(torch.bmm(normed, normed.permute(0, 2, 1)) / 1.0, dim=-1)  # (B,N,N)
    target = omega * torch.bmm(similarity, probs) + (1 - omega) * probs                # (B,N,V)
    loss = (-target * F.log_softmax(logits, dim=-1))[mask].sum(-1).mean()
    acc = (logits[mask].argmax(-1) == input_ids[mask]).float().mean()
    return loss, acc


def reference_model(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` (same weights) whose attention is computed by hand and whose blocks keep
    every activation for backward (no recompute)."""
    from mcbeit.models.recompute import set_recompute

    ref = set_recompute(copy.deepcopy(model), "none")
    for module in ref.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    return ref


class ReferenceStep:
    """One pre-training step the original way; ``mark(phase)`` is called as each phase ends."""

    def __init__(self, model: torch.nn.Module, tokenizer: torch.nn.Module, *, lr: float = 1e-4,
                 weight_decay: float = 0.05, clip_grad: float | None = 3.0, omega: float = 0.2,
                 amp_dtype: torch.dtype | None = None):
        from mcbeit.engine.optim import param_groups

        self.model, self.tokenizer = model, tokenizer
        self.optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, foreach=False, fused=False)
        self.clip_grad, self.omega, self.amp_dtype = clip_grad, omega, amp_dtype
        self.params = [p for p in model.parameters() if p.requires_grad]

    def __call__(self, batch: Sequence[torch.Tensor], temp: float,
                 mark: Callable[[str], None] | None = None) -> float:
        mark = mark or (lambda phase: None)
        view_a, view_b, mask = batch[:3]
        mask = mask.flatten(1).bool()
        device = view_a.device
        with torch.no_grad():
            tokenizer_logits = self.tokenizer(view_b).float()                         # fp32, (B,V,h,w)
        mark("tokenizer")
        with torch.autocast(device.type, dtype=self.amp_dtype or torch.bfloat16, enabled=self.amp_dtype is not None):
            prefix = getattr(self.model, "num_prefix_tokens", 1)
            features = self.model.forward_features(view_a, mask)[:, prefix:]            # (B,N,D)
            logits = self.model.lm_head(features)                                       # (B,N,V): every token
            mark("forward")
            loss, _ = literal_loss(features.float(), logits.float(), tokenizer_logits, mask, temp, self.omega)
        mark("loss")
        self.optimizer.zero_grad()
        loss.backward()
        mark("backward")
        if self.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad)
        self.optimizer.step()
        value = loss.item()                                                             # the original's per-step read
        if not math.isfinite(value):
            raise RuntimeError(f"reference loss is {value}")
        mark("optimizer")
        return value


class ReferenceTwoViews:
    """The original pre-training transform: flip the whole image, one random-resized-crop box
    resized twice (crop, then resize, per view), ToTensor + Normalize per view, then the mask."""

    def __init__(self, input_size: int, second_input_size: int, mask_generator, *,
                 mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), second_mean=(0.5, 0.5, 0.5), second_std=(0.5, 0.5, 0.5)):
        from torchvision import transforms as T

        self.flip = T.RandomHorizontalFlip(p=0.5)
        self.crop = T.RandomResizedCrop(input_size)
        self.sizes = (input_size, second_input_size)
        self.patch = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
        self.visual = T.Compose([T.ToTensor(), T.Normalize(second_mean, second_std)])
        self.mask_generator = mask_generator

    def __call__(self, path: str, rng: np.random.Generator):
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        with open(path, "rb") as f:
            image = Image.open(f).convert("RGB")                                        # full decode
        image = self.flip(image)
        top, left, h, w = self.crop.get_params(image, self.crop.scale, self.crop.ratio)
        view_a = TF.resized_crop(image, top, left, h, w, [self.sizes[0]] * 2, InterpolationMode.BICUBIC)
        view_b = TF.resized_crop(image, top, left, h, w, [self.sizes[1]] * 2, InterpolationMode.LANCZOS)
        mask = torch.from_numpy(np.ascontiguousarray(self.mask_generator(rng), dtype=np.bool_).reshape(-1))
        return self.patch(view_a), self.visual(view_b), mask
