"""The k-NN monitor of pre-training: how good the features are while the run trains (issue 15).

Every ``every`` epochs and after the last, the frozen student (the method's ViT, whatever its
targets) is run over a labelled train and val split (:mod:`mcbeit.data.labelled`), each rank
extracting its shard and the features gathered so that every image counts once
(:func:`mcbeit.evaluation.knn.extract`); then weighted k-NN (DINO's protocol) and, optionally, a
quick linear probe classify the val images (:mod:`mcbeit.evaluation.knn`). The figures are those
``mcbeit-knn`` prints for the same checkpoint.

What one measurement returns (flat, for ``log.txt`` and TensorBoard's ``knn/`` group)::

    knn_top1, knn_top5                      the headline: k-NN on the last block's mean patch token
    knn_<feature>_k<k>_top1 / _top5         every feature (cls, patch_mean, cls@B, patch_mean@B) and k
    linear_<feature>_top1 / _top5           with the linear probe
    knn_train_images, knn_val_images, knn_time_s

The measurement runs under its own random state (``torch.random.fork_rng``): a run trains the same
with the monitor on or off.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from mcbeit.data.samplers import build_eval_loader
from mcbeit.evaluation.knn import extract, knn_accuracy, linear_probe_accuracy

log = logging.getLogger("mcbeit.monitor")

__all__ = ["KnnMonitor", "MonitorSettings", "default_block"]

HEADLINE = "patch_mean"  # masked image modelling trains the patch tokens; its CLS token gets no loss of its own


def default_block(depth: int) -> int:
    """The intermediate block measured by default, 0-based: three quarters deep (block 9 of 12, where
    BEiT's linear probe peaks)."""
    return max(0, round(0.75 * depth) - 1)


@dataclass(frozen=True)
class MonitorSettings:
    every: int = 10                     # epochs between measurements (and after the last); 0: never
    block: int | None = None            # the intermediate block (0-based); None: default_block(depth)
    nb_knn: tuple[int, ...] = (20,)     # k of the k-NN votes; the first is the headline's
    temperature: float = 0.07           # vote weights exp(cosine / T)
    linear: bool = False                # also fit a linear probe
    images_per_class: int = 100         # train images per class the classifiers fit (0: all)
    batch_size: int = 64                # images per extraction batch and process
    num_workers: int = 4
    seed: int = 0                       # which train images, and the linear probe's shuffling


class KnnMonitor:
    """Measures a backbone on ``train`` / ``val`` (``(image, label, n_skipped)`` datasets, the train
    split already cut to ``images_per_class``) as ``settings`` say."""

    def __init__(self, train, val, num_classes: int, settings: MonitorSettings):
        self.train, self.val, self.num_classes, self.settings = train, val, int(num_classes), settings

    def due(self, epoch: int, epochs: int) -> bool:
        """Whether the monitor measures at the end of ``epoch`` (0-based) of a run of ``epochs``."""
        every = self.settings.every
        return every > 0 and ((epoch + 1) % every == 0 or epoch + 1 == epochs)

    def block_of(self, model: nn.Module) -> int:
        depth = len(getattr(model, "module", model).blocks)
        block = self.settings.block if self.settings.block is not None else default_block(depth)
        if not 0 <= block < depth:
            raise ValueError(f"--eval_block {block}: the model has blocks 0..{depth - 1}")
        return block

    def measure(self, model: nn.Module, device: torch.device, amp_dtype: torch.dtype | None = None,
                world_size: int = 1, rank: int = 0) -> dict[str, float]:
        """The figures of the module docstring for ``model`` (every rank calls it: a collective when
        ``world_size`` > 1; every rank returns the same figures)."""
        s, started = self.settings, time.perf_counter()
        block = self.block_of(model)
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            feats = []
            for dataset in (self.train, self.val):
                loader = build_eval_loader(dataset, s.batch_size, s.num_workers, pin_memory=device.type == "cuda",
                                           world_size=world_size, rank=rank)
                feats.append(extract(model, loader, device, block=block, amp_dtype=amp_dtype, sharded=True))
            (train_feats, train_labels), (val_feats, val_labels) = feats
            out = self._classify(train_feats, train_labels, val_feats, val_labels, device)
        out.update(knn_train_images=int(train_labels.shape[0]), knn_val_images=int(val_labels.shape[0]),
                   knn_time_s=round(time.perf_counter() - started, 3))
        return out

    def _classify(self, train_feats: Mapping[str, torch.Tensor], train_labels: torch.Tensor,
                  val_feats: Mapping[str, torch.Tensor], val_labels: torch.Tensor,
                  device: torch.device) -> dict[str, float]:
        s, out = self.settings, {}
        train_labels, val_labels = train_labels.to(device), val_labels.to(device)
        for key in train_feats:
            x, x_val = train_feats[key].to(device), val_feats[key].to(device)    # (N, D), (M, D)
            for k in s.nb_knn:
                acc = knn_accuracy(x, train_labels, x_val, val_labels, self.num_classes, k=k,
                                   temperature=s.temperature)
                out[f"knn_{key}_k{k}_top1"], out[f"knn_{key}_k{k}_top5"] = acc["top1"], acc["top5"]
            if s.linear:
                acc = linear_probe_accuracy(x, train_labels, x_val, val_labels, self.num_classes, seed=s.seed)
                out[f"linear_{key}_top1"], out[f"linear_{key}_top5"] = acc["top1"], acc["top5"]
        k = s.nb_knn[0]
        out["knn_top1"], out["knn_top5"] = out[f"knn_{HEADLINE}_k{k}_top1"], out[f"knn_{HEADLINE}_k{k}_top5"]
        return out

    @staticmethod
    def message(stats: Mapping[str, Any]) -> str:
        """The epoch line's part: ``k-NN top-1 41.5% (cls 38.0%, block 8: 44.0% / 40.5%), linear 52.0%``;
        empty when ``stats`` holds no measurement."""
        if "knn_top1" not in stats:
            return ""
        keys = [k for k in stats if k.startswith("knn_") and k.endswith("_top1") and k != "knn_top1"]
        first_k = keys[0].rsplit("_k", 1)[1].split("_")[0] if keys else "20"

        def knn(feature: str) -> float | None:
            return stats.get(f"knn_{feature}_k{first_k}_top1")

        blocks = sorted({k.split("@", 1)[1].split("_", 1)[0] for k in keys if "@" in k})
        parts = [f"cls {knn('cls'):.1f}%"] if knn("cls") is not None else []
        for b in blocks:
            inner = [f"{v:.1f}%" for v in (knn(f"patch_mean@{b}"), knn(f"cls@{b}")) if v is not None]
            parts.append(f"block {b}: {' / '.join(inner)}")
        text = f"k-NN top-1 {stats['knn_top1']:.1f}%" + (f" ({', '.join(parts)})" if parts else "")
        if f"linear_{HEADLINE}_top1" in stats:
            text += f", linear {stats[f'linear_{HEADLINE}_top1']:.1f}%"
        return text
