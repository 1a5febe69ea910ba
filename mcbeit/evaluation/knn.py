"""Representation quality of a frozen backbone: weighted k-NN and a quick linear probe on its features.

The measurement of self-supervised libraries (DINO, solo-learn): run the frozen model over a
labelled train and test split, keep pooled features per image, and classify the test images

* by their ``k`` nearest train images (cosine similarity, votes weighted ``exp(sim / T)``:
  :func:`knn_accuracy`, the DINO protocol, k 20 and T 0.07 by default), and
* by a linear classifier fitted on the standardised train features (:func:`linear_probe_accuracy`).

Features (:func:`beit_features`) are the CLS token and the mean of the patch tokens, from the last
block after the final norm and, optionally, from one intermediate block before any norm (as
:class:`mcbeit.models.linear_probe.LinearProbe` takes them). :func:`extract` runs a loader of
``build_eval_loader`` (one rank's shard when distributed) and, with ``sharded``, gathers every
rank's rows back into dataset order: each image once, the same tensors as one process.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from mcbeit.engine.precision import autocast_context

__all__ = ["beit_features", "extract", "knn_accuracy", "linear_probe_accuracy"]


# ---------------------------------------------------------------------- features
def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel (or any ``.module`` wrapper)."""
    return getattr(model, "module", model)


def _pooled(tokens: Tensor, num_prefix: int, suffix: str = "") -> dict[str, Tensor]:
    """tokens (B, P+N, D) with P prefix tokens -> {"cls": (B, D) if P, "patch_mean": (B, D)}."""
    out = {}
    if num_prefix:
        out["cls" + suffix] = tokens[:, 0].float()                       # (B, D)
    out["patch_mean" + suffix] = tokens[:, num_prefix:].float().mean(dim=1)  # (B, N, D) -> (B, D)
    return out


def feature_keys(model: nn.Module, block: int | None = None) -> list[str]:
    """The keys :func:`beit_features` returns for ``model`` and ``block``, in that order."""
    keys = (["cls"] if _unwrap(model).num_prefix_tokens else []) + ["patch_mean"]
    return keys + ([f"{k}@{block}" for k in keys] if block is not None else [])


def beit_features(model: nn.Module, images: Tensor, block: int | None = None) -> dict[str, Tensor]:
    """Pooled frozen features of ``images`` (B, 3, H, W), unmasked, as float (B, D) tensors.

    ``model``: :class:`mcbeit.models.beit.BeitForMaskedImageModeling`, a timm ``Beit`` or any timm
    ViT with ``forward_intermediates`` (CLS first among its prefix tokens). Keys:

    * ``"cls"``, ``"patch_mean"``: the last block's CLS token and mean patch token after the final
      ``norm`` (the tokens of ``forward_features``); a model with ``fc_norm`` (timm's average-pooling
      classifiers, whose ``norm`` is the identity) has it applied to ``patch_mean``, as its head does;
    * ``"cls@<block>"``, ``"patch_mean@<block>"`` when ``block`` (0-based) is given: that block's
      output before any norm. No ``cls`` keys for a model without prefix tokens.

    Runs timm's ``forward_intermediates``: the model's own embedding, relative position bias and
    blocks, as its forward without a mask. The caller chooses the grad mode and ``eval()``.
    """
    net = _unwrap(model)
    depth = len(net.blocks)
    if block is not None and not 0 <= block < depth:
        raise ValueError(f"block {block}: the model has blocks 0..{depth - 1}")
    last, inter = net.forward_intermediates(
        images, indices=[block if block is not None else depth - 1], return_prefix_tokens=True, norm=False,
        output_fmt="NLC")                                                  # (B, P+N, D), [((B, N, D), (B, P, D))]
    prefix = net.num_prefix_tokens
    out = _pooled(last, prefix)
    fc_norm = getattr(net, "fc_norm", None)
    if isinstance(fc_norm, nn.Module) and not isinstance(fc_norm, nn.Identity):
        out["patch_mean"] = fc_norm(out["patch_mean"].to(last.dtype)).float()
    if block is not None:
        patches, prefix_tokens = inter[0]                                  # (B, N, D), (B, P, D)
        out.update(_pooled(torch.cat([prefix_tokens, patches], dim=1), prefix, f"@{block}"))
    return out


# ---------------------------------------------------------------------- extraction
def _gather_rows(local: Tensor, world: int) -> Tensor:
    """Every rank's ``local`` (n_r, ...) rows -> (sum n_r, ...) in dataset order.

    Rank r holds dataset indices r, r + world, ... (``ShardSampler``), so its i-th row is global row
    r + i * world. Rows are padded to the largest shard for ``all_gather``; gloo gathers CPU tensors,
    nccl CUDA ones.
    """
    on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    x = local.to(on)
    sizes = [torch.zeros(1, dtype=torch.long, device=on) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], dtype=torch.long, device=on))
    sizes = [int(s.item()) for s in sizes]
    padded = torch.zeros((max(sizes), *x.shape[1:]), dtype=x.dtype, device=on)  # (n_max, ...)
    padded[:x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    out = torch.empty((sum(sizes), *x.shape[1:]), dtype=x.dtype, device=on)     # (N, ...)
    for r, (part, n) in enumerate(zip(parts, sizes, strict=True)):
        out[r::world] = part[:n]
    return out.to(local.device)


@torch.inference_mode()
def _extract_local(model: nn.Module, loader: Iterable, device: torch.device, block: int | None,
                   amp_dtype: torch.dtype | None) -> tuple[dict[str, Tensor], Tensor]:
    """This process's features {key: (n, D)} and labels (n,), on the CPU, in loader order."""
    chunks: dict[str, list[Tensor]] = {k: [] for k in feature_keys(model, block)}
    labels = []
    weights = next(_unwrap(model).parameters()).dtype   # a model kept in bf16 / fp16 (DeepSpeed) takes its dtype
    for batch in loader:
        images = batch[0].to(device, non_blocking=True)                  # (B, 3, H, W)
        if amp_dtype is None and weights != images.dtype:
            images = images.to(weights)
        with autocast_context(device, amp_dtype):
            feats = beit_features(model, images, block)                  # {key: (B, D)}
        for key, value in feats.items():
            chunks[key].append(value.float().cpu())
        labels.append(torch.as_tensor(batch[1]).long().cpu())           # (B,)
    dim = _unwrap(model).num_features
    features = {k: torch.cat(v) if v else torch.zeros(0, dim) for k, v in chunks.items()}
    return features, torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)


def extract(model: nn.Module, loader: Iterable, device: torch.device, block: int | None = None,
            amp_dtype: torch.dtype | None = None, sharded: bool = False) -> tuple[dict[str, Tensor], Tensor]:
    """Frozen features of every image of ``loader``: ({key: (N, D) float32}, labels (N,) int64), on the CPU.

    ``loader`` yields ``(images, labels[, n_skipped])`` (``build_eval_loader``). The model runs in
    eval mode under ``inference_mode`` (autocast in ``amp_dtype`` if given); its previous train/eval
    mode is restored, so this can run in the middle of training. ``sharded``: the loader holds this
    rank's ``ShardSampler`` shard; every rank gets all N rows, in dataset order (a collective: every
    rank must call it). Keys: :func:`beit_features`.
    """
    was_training = model.training
    model.eval()
    try:
        features, labels = _extract_local(model, loader, device, block, amp_dtype)
    finally:
        model.train(was_training)
    features, labels = {k: v.clone() for k, v in features.items()}, labels.clone()  # normal tensors, not inference ones
    if sharded and dist.is_initialized() and dist.get_world_size() > 1:
        world = dist.get_world_size()
        features = {k: _gather_rows(v, world) for k, v in features.items()}
        labels = _gather_rows(labels, world)
    return features, labels


# ---------------------------------------------------------------------- classifiers
def _hits(scores: Tensor, target: Tensor, k: int) -> Tensor:
    """Per row, whether ``target`` is among the ``k`` best ``scores`` (C,): it has a positive score and
    fewer than ``k`` classes score strictly more (ties count in its favour; no arbitrary tie-break)."""
    own = scores.gather(1, target[:, None])                             # (c, 1)
    better = (scores > own).sum(dim=1)                                   # (c,)
    return (own[:, 0] > 0) & (better < k)


def knn_accuracy(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, test_labels: Tensor,
                 num_classes: int, k: int = 20, temperature: float = 0.07, chunk: int = 128) -> dict[str, float]:
    """Weighted k-NN top-1 / top-5 accuracy (%) of the test features against the train features.

    DINO's protocol: l2-normalised features, cosine similarity, the ``k`` most similar train images
    (``k`` clipped to the train size) vote for their labels with weight ``exp(sim / temperature)``;
    a test image is a top-1 (top-5) hit when its class's summed vote is positive and fewer than 1
    (5, clipped to ``num_classes``) classes have strictly more. Test images go ``chunk`` at a time
    (memory ``chunk x N_train``); computed on the features' device. Shapes: train (N, D), (N,);
    test (M, D), (M,).
    """
    if train_feats.shape[0] == 0 or test_feats.shape[0] == 0:
        raise ValueError("k-NN needs at least one train and one test image")
    train = F.normalize(train_feats.float(), dim=1)                      # (N, D)
    train_labels = train_labels.to(train.device).long()                  # (N,)
    k = min(int(k), train.shape[0])
    top5 = min(5, int(num_classes))
    hits1 = hits5 = 0
    for start in range(0, test_feats.shape[0], chunk):
        test = F.normalize(test_feats[start:start + chunk].float().to(train.device), dim=1)  # (c, D)
        target = test_labels[start:start + chunk].to(train.device).long()                    # (c,)
        sim, idx = (test @ train.T).topk(k, dim=1)                                           # (c, k)
        weights = ((sim - sim[:, :1]).double() / temperature).exp()     # (c, k), exp(sim/T) up to a row scale
        votes = torch.zeros(test.shape[0], num_classes, dtype=torch.float64, device=train.device)
        votes.scatter_add_(1, train_labels[idx], weights)                # (c, C)
        hits1 += int(_hits(votes, target, 1).sum())
        hits5 += int(_hits(votes, target, top5).sum())
    n = test_feats.shape[0]
    return {"top1": 100.0 * hits1 / n, "top5": 100.0 * hits5 / n}


def _standardise(train: Tensor, test: Tensor) -> tuple[Tensor, Tensor]:
    """Both sets centred and scaled per dimension by the train set's mean and std (BatchNorm without affine)."""
    mean = train.mean(dim=0, keepdim=True)                               # (1, D)
    std = train.std(dim=0, unbiased=False, keepdim=True).clamp_min(1e-6)
    return (train - mean) / std, (test - mean) / std


def linear_probe_accuracy(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, test_labels: Tensor,
                          num_classes: int, epochs: int = 100, lr: float = 0.01, weight_decay: float = 1e-4,
                          batch_size: int = 1024, seed: int = 0) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) of a linear classifier fitted on the frozen train features.

    Recipe: features standardised with the train set's per-dimension mean and std (what
    ``BatchNorm1d(affine=False)`` does at test time); a ``Linear(D, num_classes)`` initialised at
    zero; AdamW (``lr``, ``weight_decay`` on the weight only) on the cross-entropy, ``epochs``
    passes over the train set in mini-batches of ``batch_size`` shuffled by a generator seeded
    with ``seed``, learning rate on a cosine from ``lr`` to 0. Deterministic for a seed on a given
    device; runs on the features' device (a few thousand x 192 features: about a second on a CPU).
    Top-k hits as in :func:`knn_accuracy` (ties in the true class's favour).
    """
    x, x_test = _standardise(train_feats.float(), test_feats.float().to(train_feats.device))  # (N, D), (M, D)
    y = train_labels.to(x.device).long()                                 # (N,)
    head = nn.Linear(x.shape[1], num_classes).to(x.device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = torch.optim.AdamW([{"params": [head.weight], "weight_decay": weight_decay},
                             {"params": [head.bias], "weight_decay": 0.0}], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(x.shape[0] / batch_size)
    total, step = epochs * steps_per_epoch, 0
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(x.shape[0], generator=gen).to(x.device)
            for start in range(0, x.shape[0], batch_size):
                for group in opt.param_groups:
                    group["lr"] = 0.5 * lr * (1 + math.cos(math.pi * step / total))
                rows = order[start:start + batch_size]
                loss = F.cross_entropy(head(x[rows]), y[rows])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
    with torch.no_grad():
        logits = head(x_test).double()                                   # (M, C)
    target = test_labels.to(x.device).long()
    shifted = logits - logits.min(dim=1, keepdim=True).values + 1        # positive scores, same order
    n = x_test.shape[0]
    return {"top1": 100.0 * float(_hits(shifted, target, 1).sum()) / n,
            "top5": 100.0 * float(_hits(shifted, target, min(5, num_classes)).sum()) / n}
