"""The labelled train and val splits that measure frozen features (``mcbeit-knn`` and the k-NN
monitor of pre-training), found from the flags a user already passes.

``data_path`` is read as the pre-training or classification commands read it:

* None: the embedded dataset's ``train/`` and ``val/``;
* a root with ``train/`` (class folders) or ``train_map.txt`` (the seeds' ImageNet layout): its
  ``train`` split, and its ``val/`` or ``val_map.txt``;
* a folder of class folders (``imagenet/train``): itself, and the sibling ``../val`` when that
  holds class folders too.

``eval_data_path`` names the val split instead (class folders, or a root with ``val/`` or
``val_map.txt``). Images that are not in class folders carry no labels:
:class:`NoLabelledSplit` says what was looked for.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
from torch.utils.data import Dataset, Subset

from mcbeit.data.datasets import build_classification_dataset
from mcbeit.data.folders import check_data_folder
from mcbeit.errors import InputError

__all__ = ["NoLabelledSplit", "labelled_splits", "per_class_subset"]

TRAIN_LAYOUTS = "a folder of class folders, or a root with train/ or train_map.txt"
VAL_LAYOUTS = "a folder of class folders, or a root with val/ or val_map.txt"


class NoLabelledSplit(InputError):
    """The flags name no labelled train and val split (the message says what was looked for)."""


def _has_split(root: Path, split: str) -> bool:
    return (root / split).is_dir() or (root / f"{split}_map.txt").is_file()


def _has_class_folders(root: Path) -> bool:
    try:
        return any(e.is_dir() and not e.name.startswith(".") for e in os.scandir(root))
    except OSError:
        return False


def labelled_splits(data_path: str | os.PathLike | None, eval_data_path: str | os.PathLike | None,
                    transform: Callable[..., Any]) -> tuple[Dataset, Dataset]:
    """(train, val) datasets of ``(image, label, n_skipped)`` items with ``transform`` (see the module
    docstring); raises :class:`NoLabelledSplit` when there is none, :class:`InputError` when a folder
    is missing or the splits' classes differ."""
    if data_path is None:
        if eval_data_path is not None:
            raise InputError("--eval_data_path needs --data_path (the labelled train split)")
        return (build_classification_dataset(None, None, "train", transform),
                build_classification_dataset(None, None, "val", transform))
    data = check_data_folder(data_path, expected=TRAIN_LAYOUTS)
    layout = "IMNET" if _has_split(data, "train") else "image_folder"
    if layout == "image_folder" and not _has_class_folders(data):
        raise NoLabelledSplit(f"--data_path {data_path} holds no class folders (nor train/ or train_map.txt): its "
                              "images carry no labels")
    train = build_classification_dataset(data, layout, "train", transform)
    if eval_data_path is not None:
        ev = check_data_folder(eval_data_path, "--eval_data_path", VAL_LAYOUTS)
        if _has_split(ev, "val"):
            val = build_classification_dataset(ev, "IMNET", "val", transform)
        else:
            val = build_classification_dataset(data, "image_folder", "val", transform, eval_data_path=ev)
    elif layout == "IMNET" and _has_split(data, "val"):
        val = build_classification_dataset(data, "IMNET", "val", transform)
    elif layout == "image_folder" and data.parent / "val" != data and _has_class_folders(data.parent / "val"):
        val = build_classification_dataset(data, "image_folder", "val", transform, eval_data_path=data.parent / "val")
    else:
        raise NoLabelledSplit(f"--data_path {data_path}: no val split found (neither val/ nor val_map.txt in it, nor a "
                              "sibling val/ of class folders): pass --eval_data_path")
    tc, vc = getattr(train, "classes", None), getattr(val, "classes", None)
    if tc and vc and list(tc) != list(vc):
        raise InputError(f"the val split's classes ({len(vc)}) are not the train split's ({len(tc)}): class folders "
                         "must have the same names in both splits")
    return train, val


def per_class_subset(dataset: Dataset, per_class: int, seed: int = 0) -> Dataset:
    """At most ``per_class`` items of each class of ``dataset`` (its ``labels`` array), drawn once with
    ``seed`` and kept in dataset order; the whole dataset when ``per_class`` is 0 or no class has
    more. The subset keeps ``num_classes``."""
    labels = getattr(dataset, "labels", None)
    if per_class <= 0 or labels is None:
        return dataset
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        keep.append(idx if len(idx) <= per_class else rng.choice(idx, per_class, replace=False))
    chosen = np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)
    if len(chosen) == len(labels):
        return dataset
    subset = Subset(dataset, chosen.tolist())
    subset.num_classes = dataset.num_classes
    subset.labels = labels[chosen]
    return subset
