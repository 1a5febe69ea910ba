"""Semantic-segmentation datasets: (image, label map) pairs in ADE20K's layout or a generic one.

Layouts (``build_segmentation_dataset`` detects them when ``data_set`` is None):

- ``ade20k``: ``<root>/images/{training,validation}/*.jpg`` with ``<root>/annotations/{training,
  validation}/*.png``; 150 classes; ``reduce_zero_label`` (ADE20K's 0 is "other": it becomes 255,
  ignored, and classes 1..150 become 0..149), as mmseg's ADE20KDataset forces it.
- ``folder``: ``<root>/images/{train,val}/X.(jpg|jpeg|png)`` with ``<root>/annotations/{train,val}/X.png``
  (or mmseg's custom-dataset names ``img_dir/`` and ``ann_dir/``), subfolders allowed; labels
  already ``0..C-1`` with 255 ignored; the class count given, or one name per line in
  ``<root>/classes.txt``.

Label maps are read with Pillow as stored (mode L or P give the indices, as mmseg's pillow
backend); images as 8-bit RGB by :mod:`mcbeit.data.images`. Items are keyed ``dataset[(index,
epoch)]`` and drawn from :func:`mcbeit.data.datasets.sample_rng`, and unreadable files (image or
label) are skipped, warned about once and counted in the item, as :class:`mcbeit.data.datasets.
ImageDataset` does. A label value that is not a class nor 255 is an error naming the file: training
on it would make the loss fail far from the cause, or silently learn a wrong class count.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from mcbeit.data.datasets import MAX_CONSECUTIVE_BAD, _shared_flags, sample_rng  # the bad-file policy's own
from mcbeit.data.images import load_rgb_image
from mcbeit.errors import ConfigError, InputError, TooManyBadImagesError

__all__ = [
    "ADE20K_CLASSES",
    "SEG_DATA_SETS",
    "SegmentationDataset",
    "build_segmentation_dataset",
    "list_segmentation_pairs",
    "read_label_map",
    "reduce_zero_label",
]

logger = logging.getLogger("mcbeit.data.datasets")  # the bad-file warnings users already know by this name

SEG_DATA_SETS = ("ade20k", "folder")  # None: detect
IGNORE_INDEX = 255
CLASSES_FILE = "classes.txt"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_ADE_SPLITS = {"train": "training", "val": "validation"}
_FOLDER_DIRS = (("images", "annotations"), ("img_dir", "ann_dir"))

# The 150 class names of ADE20K's SceneParsing benchmark (mmseg's ADE20KDataset.CLASSES, a data table;
# mmseg's 'bed ' has a stray trailing space, dropped here).
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag",
)  # fmt: skip


# ----------------------------------------------------------------------------- label maps


class LabelFileError(InputError):
    """A label file that decodes but cannot be a label map (colour, wrong size, values out of range)."""


def read_label_map(path: str | os.PathLike) -> np.ndarray:
    """The (H, W) uint8 class indices of a label file, as stored (mode L, P: the palette indices, 1, or
    16/32-bit with values <= 255); an RGB(A) or LA file is an error (a colour-coded mask needs
    converting to indices first). Undecodable files raise Pillow's errors (the dataset skips them)."""
    with Image.open(path) as image:
        image.load()
        mode = image.mode
        if mode in ("L", "P", "1"):
            return np.array(image, dtype=np.uint8)
        if mode.startswith("I") or mode == "F":
            values = np.asarray(image)
            if values.size and (values.min() < 0 or values.max() > 255):
                raise LabelFileError(
                    f"label file {path}: {mode} values {values.min()}..{values.max()} do not fit 0..255; "
                    "save class indices 0..254 (255 = ignore) as an 8-bit PNG"
                )
            return values.astype(np.uint8)
    raise LabelFileError(
        f"label file {path} is a {mode} image; labels must be single-channel class indices (PNG mode L or P), "
        "convert colour-coded masks to index maps first"
    )


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """ADE20K's convention: 0 ("other") becomes 255 (ignored), every other class moves down by one
    (255 stays 255)."""
    reduced = label.astype(np.uint8) - np.uint8(1)  # wraps: 0 -> 255
    reduced[reduced == IGNORE_INDEX - 1] = IGNORE_INDEX  # 255 (ignore) stays 255
    return reduced


def _check_label_values(label: np.ndarray, num_classes: int, path: Path, reduced: bool) -> None:
    if label.size == 0 or int(label.max()) < num_classes:
        return
    bad = np.unique(label[(label >= num_classes) & (label != IGNORE_INDEX)])
    if bad.size:
        shown = ", ".join(str(int(v) + (1 if reduced else 0)) for v in bad[:8])
        hint = ("this data set reduces the zero label (file value v is class v-1), " if reduced else "")
        raise LabelFileError(
            f"label file {path} holds value(s) {shown} (as stored), outside the {num_classes} classes "
            f"and not 255 (ignore); {hint}pass the right --num_classes (or classes.txt), or fix the file"
        )


# ----------------------------------------------------------------------------- listing pairs


def _split_dirs(root: Path, split: str, layout: str) -> tuple[Path, Path]:
    """(image folder, annotation folder) of ``split`` under ``root`` in ``layout``."""
    if split not in _ADE_SPLITS:
        raise ConfigError(f"split must be 'train' or 'val', got {split!r}")
    if layout == "ade20k":
        name = _ADE_SPLITS[split]
        return root / "images" / name, root / "annotations" / name
    if layout == "folder":
        for images, annotations in _FOLDER_DIRS:
            if (root / images / split).is_dir():
                return root / images / split, root / annotations / split
        return root / "images" / split, root / "annotations" / split
    raise ConfigError(f"unknown segmentation layout {layout!r}: choose one of {', '.join(SEG_DATA_SETS)}")


def _image_files(folder: Path, suffixes: Sequence[str]) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in suffixes and p.is_file())


def list_segmentation_pairs(root: str | os.PathLike, split: str, layout: str) -> list[tuple[Path, Path]]:
    """Sorted (image path, label path) pairs of ``split``; an image without its label is an error."""
    root = Path(root)
    image_dir, ann_dir = _split_dirs(root, split, layout)
    for folder, what in ((image_dir, "image"), (ann_dir, "annotation")):
        if not folder.is_dir():
            raise InputError(f"no {what} folder {folder} for the {split} split of the {layout} layout at {root}; "
                             f"{_LAYOUT_HELP}")
    suffixes = (".jpg",) if layout == "ade20k" else IMAGE_SUFFIXES
    images = _image_files(image_dir, suffixes)
    if not images:
        raise InputError(f"no images ({'/'.join(suffixes)}) under {image_dir}; {_LAYOUT_HELP}")
    pairs, missing = [], []
    for image in images:
        label = ann_dir / image.relative_to(image_dir).with_suffix(".png")
        (pairs if label.is_file() else missing).append((image, label))
    if missing:
        shown = ", ".join(str(image.relative_to(image_dir)) for image, _ in missing[:5])
        raise InputError(
            f"{len(missing)} of {len(images)} images under {image_dir} have no label PNG of the same name under "
            f"{ann_dir} (e.g. {shown}{', ...' if len(missing) > 5 else ''}); add the labels or remove those images"
        )
    return pairs


_LAYOUT_HELP = (
    "expected ADE20K's layout (images/{training,validation}/*.jpg + annotations/{training,validation}/*.png) "
    "or a folder layout (images/{train,val}/X.jpg|png + annotations/{train,val}/X.png, or img_dir/ + ann_dir/)"
)


# ----------------------------------------------------------------------------- dataset


class SegmentationDataset(Dataset):
    """(image, label map) pairs of one split, with ``transform(image_rgb_uint8, label_uint8, rng)``.

    ``dataset[(index, epoch)]`` (or ``dataset[index]``, epoch 0) returns the transform's outputs
    (a tuple is unpacked), then the index of the sample actually loaded if ``return_index``, then
    ``n_skipped``: the number of unreadable files skipped to reach a readable pair (the next index
    is tried, as :class:`mcbeit.data.datasets.ImageDataset`). Labels are reduced
    (``reduce_zero_label``) before the transform and checked against ``num_classes``.
    """

    ignore_index = IGNORE_INDEX

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        transform: Callable[[np.ndarray, np.ndarray, np.random.Generator], Any],
        seed: int = 0,
        layout: str = "ade20k",
        reduce_zero_label: bool = True,
        num_classes: int = 150,
        classes: Sequence[str] | None = None,
        return_index: bool = False,
    ) -> None:
        if transform is None or not callable(transform):
            raise TypeError("SegmentationDataset needs a transform(image, label, rng) callable")
        if int(num_classes) < 1 or int(num_classes) > IGNORE_INDEX:
            raise ConfigError(f"num_classes must be 1..{IGNORE_INDEX}, got {num_classes}")
        if classes is not None and len(classes) != int(num_classes):
            raise ConfigError(f"{len(classes)} class names for {num_classes} classes")
        self.root = Path(root)
        self.split = split
        self.layout = layout
        self.pairs = list_segmentation_pairs(self.root, split, layout)
        self.transform = transform
        self.seed = int(seed)
        self.reduce_zero_label = bool(reduce_zero_label)
        self.num_classes = int(num_classes)
        self.classes = list(classes) if classes is not None else None
        self.return_index = bool(return_index)
        self._warned = _shared_flags(len(self.pairs))

    def __len__(self) -> int:
        return len(self.pairs)

    def __repr__(self) -> str:
        return (f"SegmentationDataset({self.layout} {self.split} at {self.root}, {len(self)} images, "
                f"{self.num_classes} classes, reduce_zero_label={self.reduce_zero_label}, seed={self.seed},\n"
                f"  transform={self.transform!r})")

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The (H, W, 3) uint8 RGB image and (H, W) uint8 label (reduced, checked) of pair ``index``;
        decoding errors propagate (Pillow's), wrong label files raise :class:`LabelFileError`."""
        image_path, label_path = self.pairs[index]
        image = np.asarray(load_rgb_image(image_path))
        label = read_label_map(label_path)
        if label.shape != image.shape[:2]:
            raise LabelFileError(
                f"label {label_path} is {label.shape[1]}x{label.shape[0]} but its image {image_path} is "
                f"{image.shape[1]}x{image.shape[0]}; a label map must have its image's size"
            )
        if self.reduce_zero_label:
            label = reduce_zero_label(label)
        _check_label_values(label, self.num_classes, label_path, self.reduce_zero_label)
        return image, label

    def __getitem__(self, key: int | tuple[int, int]):
        index, epoch = key if isinstance(key, (tuple, list)) else (key, 0)
        index, n = int(index), len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        index %= n
        tries = min(MAX_CONSECUTIVE_BAD, n)
        last_error = ""
        for skipped in range(tries):
            loaded = (index + skipped) % n
            try:
                image, label = self.load(loaded)
            except (MemoryError, LabelFileError):
                raise
            except Exception as error:  # noqa: BLE001 - any decoder failure means "bad file"
                last_error = f"{self.pairs[loaded][0]} ({type(error).__name__}: {error})"
                if not self._warned[loaded]:
                    self._warned[loaded] = 1
                    logger.warning("skipping unreadable image/label pair %s: %s: %s", self.pairs[loaded][0],
                                   type(error).__name__, error)
                continue
            out = self.transform(image, label, sample_rng(self.seed, epoch, index))
            out = out if isinstance(out, tuple) else (out,)
            return (*out, loaded, skipped) if self.return_index else (*out, skipped)
        raise TooManyBadImagesError(
            f"{tries} consecutive image/label pairs could not be read, from {self.pairs[index][0]} to {last_error}: "
            f"check the files under {self.root}"
        )




# ----------------------------------------------------------------------------- building


def _detect_layout(root: Path) -> tuple[str, str]:
    """(layout, reason) of a data folder with ``data_set`` left unset."""
    if (root / "images" / "training").is_dir():
        return "ade20k", "found images/training/"
    for images, _ in _FOLDER_DIRS:
        if (root / images / "train").is_dir() or (root / images / "val").is_dir():
            return "folder", f"found {images}/train/ or {images}/val/"
    raise InputError(f"cannot tell the segmentation layout of {root}: {_LAYOUT_HELP}")


def _read_classes_file(root: Path) -> list[str] | None:
    path = root / CLASSES_FILE
    if not path.is_file():
        return None
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names:
        raise InputError(f"{path} names no classes; write one class name per line")
    return names


def build_segmentation_dataset(
    data_path: str | os.PathLike | None,
    split: str,
    transform: Callable[[np.ndarray, np.ndarray, np.random.Generator], Any],
    seed: int = 0,
    data_set: str | None = None,
    num_classes: int | None = None,
    reduce_zero_label: bool | None = None,
    return_index: bool = False,
) -> SegmentationDataset:
    """The ``split`` ("train" or "val") of the segmentation data at ``data_path`` (see the module
    docstring); ``data_path`` None: the embedded generated scenes. ``data_set``: "ade20k", "folder"
    or None to detect. ``num_classes``/``reduce_zero_label`` None: the layout's (ADE20K: 150, True;
    folder: classes.txt, False). ``return_index``: items carry the loaded sample's index (evaluation)."""
    if data_set is not None and str(data_set).lower() not in SEG_DATA_SETS:
        raise ConfigError(f"unknown segmentation data_set {data_set!r}: choose one of {', '.join(SEG_DATA_SETS)}")
    if data_path is None:
        from mcbeit.data.embedded_seg import embedded_segmentation_root

        root, layout, reason = embedded_segmentation_root(), "folder", "no --data_path given: the embedded scenes"
        if data_set is not None:
            reason += f"; --data_set {data_set} ignored"
    else:
        root = Path(data_path).expanduser()
        if not root.is_dir():
            raise InputError(f"--data_path {root} is not a folder; {_LAYOUT_HELP}")
        if data_set is None:
            layout, reason = _detect_layout(root)
        else:
            layout, reason = str(data_set).lower(), "--data_set"

    file_classes = _read_classes_file(root)
    layout_classes = file_classes or (ADE20K_CLASSES if layout == "ade20k" else None)
    if num_classes is None:
        if layout_classes is None:
            raise ConfigError(
                f"the folder-layout data at {root} does not say how many classes it has: pass --num_classes "
                f"or write {root / CLASSES_FILE} with one class name per line"
            )
        num_classes = len(layout_classes)
    elif file_classes is not None and len(file_classes) != num_classes:
        raise ConfigError(f"--num_classes {num_classes} but {root / CLASSES_FILE} names {len(file_classes)} classes; "
                          "drop one or make them agree")
    names = layout_classes if layout_classes is not None and len(layout_classes) == num_classes else None
    default_reduce = layout == "ade20k"
    dataset = SegmentationDataset(
        root, split, transform, seed=seed, layout=layout,
        reduce_zero_label=default_reduce if reduce_zero_label is None else reduce_zero_label,
        num_classes=num_classes, classes=names, return_index=return_index,
    )
    logger.info("segmentation %s data: %s layout at %s (%s), %d images, %d classes", split, layout, root, reason,
                len(dataset), dataset.num_classes)
    return dataset
