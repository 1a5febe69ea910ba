"""COCO detection and instance-segmentation data: a COCO ``instances`` json read as detectron2's
``load_coco_json`` + ``get_detection_dataset_dicts`` + ``DatasetMapper`` read it for the mc-BEiT / MIMDet
benchmarking recipe (``detection/configs/coco.py`` and the LSJ configs).

What the original does, and this module with it:

- categories are mapped to contiguous labels in sorted category-id order (detectron2's
  ``thing_dataset_id_to_contiguous_id``); here label ``i + 1`` is ``categories[i]`` (0 = background, as
  torchvision's detectors count);
- images are read in sorted image-id order; polygons of fewer than 3 points are dropped, and an
  annotation left with no polygon is dropped in training (counted in the log line);
- training (``train=True``) drops crowd annotations (``DatasetMapper``) and leaves out the images that have
  no other annotation (``filter_empty=True``, the train loader's default); testing keeps every image and
  every annotation (``filter_empty=False``): COCO AP is computed against the json itself, crowd regions
  included;
- masks: polygons and RLE (compressed or not) decoded at the image's size with faster-coco-eval's copy of
  the ``pycocotools.mask`` API (pycocotools' own warns under numpy 2), then transformed with the image
  (:mod:`mcbeit.data.det_transforms`).

Bad files, as every dataset of this package (:mod:`mcbeit.data.datasets`): in training an image that does
not decode (or whose size is not the json's) is skipped for the next one, warned about once and counted
in the item (``target['n_skipped']``, for the engine's ``--max_bad_fraction`` check); image files missing
from the folder are left out when the dataset is built, with one warning. In testing either is an error
that names the file: an image left out of evaluation would silently change the AP.

The json is read with faster-coco-eval's ``COCO``; the records are then kept as one pickled byte buffer
(as detectron2's ``DatasetFromList(serialize=True)``), so that data-loader workers share them instead of
copying a million Python objects each.

Items: ``dataset[(index, epoch)]`` (or ``dataset[index]``) -> ``(image (3,S,S) float32 in 0..1, target)``,
the sample's randomness drawn from ``sample_rng(seed, epoch, index)``; target keys: ``boxes`` (N,4) float32
xyxy, ``labels`` (N,) int64 in 1..C, ``masks`` (N,S,S) uint8, ``iscrowd`` (N,) uint8, ``image_id`` int,
``orig_size`` (h, w), ``scale`` float and ``n_skipped`` int.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from faster_coco_eval.core import mask as mask_util  # pycocotools.mask API (without its numpy 2 warning)
from torch.utils.data import Dataset

from mcbeit.data.datasets import MAX_CONSECUTIVE_BAD, _shared_flags, sample_rng  # the bad-file policy's own
from mcbeit.data.det_transforms import LSJTrainTransform, ResizePadTestTransform
from mcbeit.data.images import load_rgb_image
from mcbeit.errors import ConfigError, InputError, TooManyBadImagesError

__all__ = [
    "COCO_SPLITS",
    "CocoDetection",
    "ImageSizeError",
    "build_detection_dataset",
    "decode_segmentation",
    "det_collate",
]

logger = logging.getLogger("mcbeit.data.datasets")  # the bad-file warnings users already know by this name

COCO_SPLITS = ("train", "val")
_LAYOUT_HELP = (
    "expected COCO 2017's layout: <root>/train2017/, <root>/val2017/ and <root>/annotations/"
    "instances_{train,val}2017.json (train2017.zip, val2017.zip and annotations_trainval2017.zip from "
    "cocodataset.org, unpacked into one folder), or pass image_dir and ann_file explicitly"
)


# ----------------------------------------------------------------------------- masks


def _valid_polygons(polygons: Sequence[Sequence[float]]) -> list[Sequence[float]]:
    """detectron2's filter: polygons with an even number of coordinates and at least 3 points."""
    return [p for p in polygons if len(p) % 2 == 0 and len(p) >= 6]


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """(H, W) uint8 mask of a COCO ``segmentation``: a list of polygons (an empty list gives an empty mask),
    an uncompressed RLE (``counts`` a list) or a compressed one (``counts`` a string)."""
    if isinstance(segmentation, list):
        polygons = _valid_polygons(segmentation)
        if not polygons:
            return np.zeros((height, width), np.uint8)
        rle = mask_util.merge(mask_util.frPyObjects(polygons, height, width))
    elif isinstance(segmentation, dict):
        size = [int(s) for s in segmentation.get("size", ())]
        if size != [height, width]:
            raise ValueError(f"RLE of size {size} on an image of {height}x{width} (h x w)")
        counts = segmentation["counts"]
        rle = mask_util.frPyObjects(segmentation, height, width) if isinstance(counts, list) else segmentation
    else:
        raise ValueError(f"segmentation is neither polygons nor RLE: {type(segmentation).__name__}")
    return np.ascontiguousarray(mask_util.decode(rle), dtype=np.uint8)                  # (H, W)


# ----------------------------------------------------------------------------- records


class _Records:
    """A list of dicts kept as one pickled byte buffer (shared, not copied, by forked loader workers)."""

    def __init__(self, records: Sequence[dict]) -> None:
        blobs = [np.frombuffer(pickle.dumps(r, protocol=pickle.HIGHEST_PROTOCOL), dtype=np.uint8) for r in records]
        self._ends = np.cumsum([len(b) for b in blobs], dtype=np.int64)
        self._buffer = np.concatenate(blobs) if blobs else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, index: int) -> dict:
        start = int(self._ends[index - 1]) if index > 0 else 0
        return pickle.loads(memoryview(self._buffer[start:int(self._ends[index])]))


def _read_coco(ann_file: Path):
    """faster-coco-eval's COCO index of ``ann_file``; a file that is not a COCO instances json is an InputError."""
    from faster_coco_eval import COCO

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(str(ann_file))
    except (ValueError, OSError) as error:  # json.JSONDecodeError is a ValueError
        raise InputError(f"cannot read the COCO annotation file {ann_file}: {type(error).__name__}: {error}") from error
    except (KeyError, TypeError, AssertionError) as error:
        raise InputError(f"{ann_file} is not a COCO instances json ({type(error).__name__}: {error}); it needs "
                         "'images', 'annotations' and 'categories' lists") from error
    missing = [key for key in ("images", "annotations", "categories") if key not in coco.dataset]
    if missing:
        raise InputError(f"{ann_file} is not a COCO instances json: no {', '.join(missing)}")
    if not coco.cats:
        raise InputError(f"{ann_file} defines no categories")
    return coco


def _files_present(image_dir: Path, file_names: Sequence[str]) -> list[bool]:
    """Whether each file exists, from one listing of the folder (plus a stat for names with a folder)."""
    try:
        listed = {entry.name for entry in os.scandir(image_dir)}
    except OSError as error:
        raise InputError(f"cannot list the image folder {image_dir}: {error}") from error
    return [name in listed if "/" not in name else (image_dir / name).is_file() for name in file_names]


# ----------------------------------------------------------------------------- dataset


class CocoDetection(Dataset):
    """The images of a COCO instances json (module docstring) with ``transform(image, target, rng)``.

    Args:
        image_dir: the folder the json's ``file_name`` entries are relative to.
        ann_file: the ``instances_*.json``.
        train: training (crowd annotations and images without annotations dropped, unreadable images skipped,
            default transform LSJ) or testing (everything kept, unreadable images an error, default transform
            ResizeShortestEdge + pad).
        size: S, the side of the square network input.
        transform: ``(PIL image, target, rng) -> (image, target)`` to use instead of the default;
            the target it gets holds ``boxes`` (N,4) xyxy, ``labels``, ``iscrowd`` and ``masks`` (N,H,W) in the
            original image's pixels.
        seed: the data seed of ``sample_rng(seed, epoch, index)``.
        with_masks: decode instance masks (Mask R-CNN); False: boxes only (no ``masks`` key; training boxes
            are then the transformed boxes, clipped, not the masks' extents).
        scale_range, flip_prob: the LSJ's, for the default training transform.
    """

    def __init__(
        self,
        image_dir: str | os.PathLike,
        ann_file: str | os.PathLike,
        train: bool,
        size: int = 1024,
        transform: Callable[[Image.Image, dict, np.random.Generator], tuple[torch.Tensor, dict]] | None = None,
        seed: int = 0,
        with_masks: bool = True,
        scale_range: Sequence[float] = (0.1, 2.0),
        flip_prob: float = 0.5,
    ) -> None:
        self.image_dir = Path(image_dir)
        self.coco_ann_file = Path(ann_file)
        self.train = bool(train)
        self.size = int(size)
        self.seed = int(seed)
        self.with_masks = bool(with_masks)
        if transform is None:
            transform = (LSJTrainTransform(self.size, scale_range, flip_prob, recompute_boxes=self.with_masks)
                         if self.train else ResizePadTestTransform(self.size))
        self.transform = transform
        if not self.image_dir.is_dir():
            raise InputError(f"image folder {self.image_dir} does not exist; {_LAYOUT_HELP}")
        if not self.coco_ann_file.is_file():
            raise InputError(f"annotation file {self.coco_ann_file} does not exist; {_LAYOUT_HELP}")

        coco = _read_coco(self.coco_ann_file)
        cat_ids = sorted(coco.cats)
        self.categories: list[tuple[int, str]] = [(int(c), str(coco.cats[c].get("name", c))) for c in cat_ids]
        self.cat_id_to_label: dict[int, int] = {cat: i + 1 for i, (cat, _) in enumerate(self.categories)}
        self.label_to_cat_id: dict[int, int] = {label: cat for cat, label in self.cat_id_to_label.items()}
        records, self.stats = self._records(coco)
        del coco
        self._records_table = _Records(records)
        self.image_ids: list[int] = [r["image_id"] for r in records]
        self._warned = _shared_flags(len(records))
        self._log_stats()

    # -- building

    def _records(self, coco) -> tuple[list[dict], dict[str, int]]:
        stats = dict.fromkeys(("images", "crowd_dropped", "no_valid_mask", "empty_dropped", "missing"), 0)
        image_ids = sorted(coco.imgs)
        stats["images"] = len(image_ids)
        images = [coco.imgs[i] for i in image_ids]
        for image in images:
            for key in ("file_name", "height", "width"):
                if key not in image:
                    raise InputError(f"image {image.get('id')} of {self.coco_ann_file} has no '{key}'")
        present = _files_present(self.image_dir, [str(image["file_name"]) for image in images])
        missing = [str(image["file_name"]) for image, ok in zip(images, present, strict=True) if not ok]
        if missing:
            shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
            where = f"{len(missing)} of the {len(images)} images of {self.coco_ann_file} are not in {self.image_dir}"
            if not self.train or len(missing) == len(images):
                raise InputError(f"{where} ({shown}): point image_dir at the folder that holds them (COCO's "
                                 f"{self.coco_ann_file.stem.split('_')[-1]}/), or re-extract the images")
            logger.warning("%s (%s): left out of training", where, shown)
            stats["missing"] = len(missing)

        records = []
        for image, ok in zip(images, present, strict=True):
            if not ok:
                continue
            anns = [self._annotation(ann, image, stats) for ann in coco.imgToAnns.get(image["id"], [])]
            anns = [a for a in anns if a is not None]
            if self.train and not anns:
                stats["empty_dropped"] += 1
                continue
            records.append({"image_id": int(image["id"]), "file_name": str(image["file_name"]),
                            "height": int(image["height"]), "width": int(image["width"]), "anns": anns})
        if not records:
            raise InputError(f"no image of {self.coco_ann_file} has an annotation to train on"
                             if self.train else f"{self.coco_ann_file} lists no images")
        return records, stats

    def _annotation(self, ann: dict, image: dict, stats: dict[str, int]) -> tuple | None:
        """(bbox xywh, label, iscrowd, segmentation) of one annotation; None: dropped (counted)."""
        where = f"annotation {ann.get('id')} of image {image['id']} in {self.coco_ann_file}"
        label = self.cat_id_to_label.get(ann.get("category_id"))
        if label is None:
            raise InputError(f"{where} has category_id {ann.get('category_id')!r}, which is not among the json's "
                             f"categories {[c for c, _ in self.categories]}")
        bbox = ann.get("bbox")
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
            raise InputError(f"{where} has no 'bbox' [x, y, width, height] (got {bbox!r})")
        iscrowd = int(ann.get("iscrowd", 0))
        if iscrowd and self.train:
            stats["crowd_dropped"] += 1
            return None
        segmentation = None
        if self.with_masks:
            segmentation = ann.get("segmentation")
            if segmentation is None:
                raise InputError(f"{where} has no 'segmentation': Mask R-CNN needs instance masks "
                                 "(with_masks=False trains boxes only)")
            if isinstance(segmentation, list):
                segmentation = _valid_polygons(segmentation)
                if not segmentation:
                    stats["no_valid_mask"] += 1
                    if self.train:
                        return None
            elif not isinstance(segmentation, dict) or "counts" not in segmentation:
                raise InputError(f"{where} has a 'segmentation' that is neither polygons nor RLE")
            elif [int(s) for s in segmentation.get("size", ())] != [int(image["height"]), int(image["width"])]:
                raise InputError(f"{where}: its RLE size {segmentation.get('size')} is not the image's "
                                 f"[{image['height']}, {image['width']}]")
        return tuple(float(v) for v in bbox), label, iscrowd, segmentation

    def _log_stats(self) -> None:
        s = self.stats
        parts = []
        if s["crowd_dropped"]:
            parts.append(f"{s['crowd_dropped']} crowd annotations ignored (as detectron2 trains)")
        if s["no_valid_mask"]:
            parts.append(f"{s['no_valid_mask']} annotations without a polygon of 3+ points "
                         + ("dropped" if self.train else "given empty masks"))
        if s["empty_dropped"]:
            parts.append(f"{s['empty_dropped']} images without annotations left out (detectron2's filter_empty)")
        if s["missing"]:
            parts.append(f"{s['missing']} missing image files left out")
        logger.info("COCO %s data %s: %d of %d images, %d categories%s", "training" if self.train else "test",
                    self.coco_ann_file, len(self), s["images"], self.num_classes,
                    "; " + "; ".join(parts) if parts else "")

    # -- access

    def __len__(self) -> int:
        return len(self._records_table)

    @property
    def num_classes(self) -> int:
        """C, the number of categories (labels are 1..C)."""
        return len(self.categories)

    @property
    def class_names(self) -> list[str]:
        return [name for _, name in self.categories]

    def record(self, index: int) -> dict:
        """The json's record of image ``index``: image_id, file_name, height, width and its kept annotations
        as (bbox xywh, label, iscrowd, segmentation)."""
        return self._records_table[index]

    def __repr__(self) -> str:
        return (f"CocoDetection({'train' if self.train else 'test'}, {self.coco_ann_file} on {self.image_dir}, "
                f"{len(self)} images, {self.num_classes} categories, size={self.size}, seed={self.seed},\n"
                f"  transform={self.transform!r})")

    def load(self, index: int) -> tuple[Image.Image, dict, dict]:
        """The PIL RGB image, its target in the original pixels (``boxes`` xyxy, ``labels``, ``iscrowd``,
        ``masks``) and the record of image ``index``. An unreadable file raises the decoder's error, a size
        other than the json's :class:`ImageSizeError`."""
        record = self.record(index)
        path = self.image_dir / record["file_name"]
        image = load_rgb_image(path)
        height, width = record["height"], record["width"]
        if image.size != (width, height):
            raise ImageSizeError(f"{path} is {image.size[0]}x{image.size[1]} but {self.coco_ann_file} says "
                                 f"{width}x{height}")
        anns = record["anns"]
        boxes = np.array([a[0] for a in anns], np.float32).reshape(-1, 4)                  # (N,4) xywh
        boxes[:, 2:] += boxes[:, :2]                                                        # xyxy
        target = {
            "boxes": boxes,
            "labels": np.array([a[1] for a in anns], np.int64),
            "iscrowd": np.array([a[2] for a in anns], np.uint8),
        }
        if self.with_masks:
            masks = np.zeros((len(anns), height, width), np.uint8)                          # (N,H,W)
            for i, ann in enumerate(anns):
                masks[i] = decode_segmentation(ann[3], height, width)
            target["masks"] = masks
        return image, target, record

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, dict]:
        index, epoch = key if isinstance(key, (tuple, list)) else (key, 0)
        index, n = int(index), len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        index %= n
        tries = min(MAX_CONSECUTIVE_BAD, n) if self.train else 1
        last_error = ""
        for skipped in range(tries):
            loaded = (index + skipped) % n
            try:
                image, target, record = self.load(loaded)
            except MemoryError:
                raise
            except Exception as error:  # noqa: BLE001 - any decoder failure means "bad file"
                path = self.image_dir / self.record(loaded)["file_name"]
                reason = f"{type(error).__name__}: {error}"
                if not self.train:
                    raise InputError(
                        f"cannot read the test image {path} ({reason}); COCO AP needs every image of "
                        f"{self.coco_ann_file}: replace the file (e.g. extract it again from the archive) or remove "
                        "the image and its annotations from the json") from error
                last_error = f"{path} ({reason})"
                if not self._warned[loaded]:
                    self._warned[loaded] = 1
                    logger.warning("skipping unreadable training image %s: %s", path, reason)
                continue
            pixels, out = self.transform(image, target, sample_rng(self.seed, epoch, index))
            out.update(image_id=record["image_id"], orig_size=(record["height"], record["width"]), n_skipped=skipped)
            return pixels, out
        raise TooManyBadImagesError(
            f"{tries} consecutive images could not be read, from {self.image_dir / self.record(index)['file_name']} "
            f"to {last_error}: check the files under {self.image_dir}"
        )


class ImageSizeError(ValueError):
    """An image whose decoded size is not the one its annotation file gives (its annotations would not fit)."""


def det_collate(batch: Sequence[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """A batch of (image, target) items as (list of images, list of targets), the detectors' input."""
    images, targets = [], []
    for image, target in batch:
        images.append(image)
        targets.append(target)
    return images, targets


# ----------------------------------------------------------------------------- building


def build_detection_dataset(
    root: str | os.PathLike | None = None,
    split: str = "train",
    train: bool | None = None,
    size: int = 1024,
    seed: int = 0,
    image_dir: str | os.PathLike | None = None,
    ann_file: str | os.PathLike | None = None,
    **kwargs: Any,
) -> CocoDetection:
    """The ``split`` ("train" or "val") of COCO 2017 at ``root``: ``<root>/{split}2017/`` with
    ``<root>/annotations/instances_{split}2017.json``; ``image_dir`` / ``ann_file`` replace either.
    ``root`` None (and neither given): the embedded generated data (:mod:`mcbeit.data.embedded_det`).
    ``train`` defaults to ``split == "train"``; other keyword arguments go to :class:`CocoDetection`."""
    if split not in COCO_SPLITS:
        raise ConfigError(f"split must be one of {', '.join(COCO_SPLITS)}, got {split!r}")
    train = split == "train" if train is None else bool(train)
    if root is None and image_dir is None and ann_file is None:
        from mcbeit.data.embedded_det import embedded_detection_root

        root = embedded_detection_root()
    if root is None and (image_dir is None or ann_file is None):
        raise ConfigError("without a data root, give both image_dir and ann_file")
    base = Path(root).expanduser() if root is not None else None
    image_dir = Path(image_dir).expanduser() if image_dir is not None else base / f"{split}2017"
    ann_file = Path(ann_file).expanduser() if ann_file is not None else base / "annotations" / f"instances_{split}2017.json"
    missing = [f"{what} {path}" for what, path, ok in (
        ("data folder", base, base is None or base.is_dir()),
        ("image folder", image_dir, image_dir.is_dir()),
        ("annotation file", ann_file, ann_file.is_file()),
    ) if not ok]
    if missing:
        raise InputError(f"missing {'; '.join(missing)} for the COCO {split} split; {_LAYOUT_HELP}")
    return CocoDetection(image_dir, ann_file, train=train, size=size, seed=seed, **kwargs)
