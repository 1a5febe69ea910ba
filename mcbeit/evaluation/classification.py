"""Top-1 / top-5 accuracy and cross-entropy of a classifier over a dataset, on one or many processes."""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F

from mcbeit.engine.distributed import all_reduce_sum
from mcbeit.engine.precision import autocast_context

__all__ = ["evaluate"]


@torch.inference_mode()
def evaluate(model: torch.nn.Module, loader: Iterable, device: torch.device, amp_dtype: torch.dtype | None = None,
             sharded: bool = False) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy over every image of ``loader``.

    ``sharded``: the loader holds this rank's shard (``ShardSampler``); sums are all-reduced, so
    each image counts exactly once. Otherwise every rank evaluates the whole set.
    """
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64, device=device)           # loss, top-1, top-5, images, skipped
    for batch in loader:
        images = batch[0].to(device, non_blocking=True)
        target = batch[1].to(device, non_blocking=True)
        with autocast_context(device, amp_dtype):
            logits = model(images)
        logits = logits.float()                                          # (B, C)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices        # (B, k)
        hit = top == target[:, None]
        sums += torch.stack([F.cross_entropy(logits, target, reduction="sum").double(),
                             hit[:, 0].sum().double(), hit.any(dim=1).sum().double(),
                             torch.tensor(float(target.numel()), dtype=torch.float64, device=device),
                             (batch[2].sum() if len(batch) > 2 else torch.tensor(0)).to(device).double()])
    if sharded:
        sums = all_reduce_sum(sums)
    loss, top1, top5, n, skipped = sums.tolist()
    if n == 0:
        raise RuntimeError("the evaluation set is empty")
    return {"loss": loss / n, "acc1": 100.0 * top1 / n, "acc5": 100.0 * top5 / n, "images": int(n),
            "skipped_images": int(skipped)}
