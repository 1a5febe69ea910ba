"""Image datasets for pre-training and classification: ImageFolder trees, the seeds' list files,
CIFAR-100's python files, and the embedded default.

Every sample's randomness comes from ``numpy.random.default_rng([seed, epoch, index])``: the
crop, flip and mask of an image depend on its index and the epoch, never on which data-loader
worker loads it.

Bad data never stops a run of weeks, but is never silently trained on either:

- images that decode are converted to 8-bit RGB: grayscale, palette, alpha, CMYK, and 16-bit or
  float images (rescaled from their value range, not clipped);
- files that do not decode (corrupt, truncated, zero-byte, not an image, or larger than
  ``MAX_PIXELS``, checked before any pixel is decoded) are skipped: the next index is used, the
  path and the reason are warned about once per run, and the item counts them (``n_skipped``);
- list-file lines naming a missing file, or with a bad label or the wrong shape, are left out
  when the dataset is built, with one warning naming the lines (``dataset.dropped_entries``);
- the engine's :func:`mcbeit.engine.bad_data.check_bad_fraction` turns a skip rate above
  ``--max_bad_fraction`` into a clear error, and ``MAX_CONSECUTIVE_BAD`` unreadable files in a row
  stop the run as well (:class:`mcbeit.errors.TooManyBadImagesError`).

Truncated files must fail to decode, so Pillow's ``ImageFile.LOAD_TRUNCATED_IMAGES`` is kept off
(if another library turns it on, loading turns it off again, with a warning).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from mcbeit.data.images import (MAX_PIXELS, OpenedImage, TooManyBadImagesError, load_rgb_image,
                                 open_image)
from mcbeit.errors import ConfigError, InputError

from .embedded import embedded_dataset_root
from .file_index import DroppedEntries, PathTable, image_folder_files, read_list_file
from .folders import (CLASSIFICATION_LAYOUTS, EVAL_LAYOUT, LIST_FILE, BadListFileError, DataPathError, check_data_folder,
                      no_images_error)

__all__ = [
    "ImageDataset",
    "CifarDataset",
    "build_classification_dataset",
    "build_pretraining_dataset",
    "embedded_dataset_root",
    "load_rgb_image",
    "DATA_SETS",
    "CLASS_NAMES_FILE",
    "read_class_names",
    "MAX_CONSECUTIVE_BAD",
    "MAX_PIXELS",
    "BadListFileError",
    "DataPathError",
    "DroppedEntries",
    "TooManyBadImagesError",
]

logger = logging.getLogger(__name__)

DATA_SETS = ("IMNET", "image_folder", "CIFAR")  # None: detect the layout
CLASS_NAMES_FILE = "classes.txt"  # the list layout's class names, beside <split>_map.txt: line 1 names label 0
MAX_CONSECUTIVE_BAD = 50  # give up (clearly) after this many unreadable files in a row
_SPLIT_NAMES = {"train", "val", "validation", "test"}


# ----------------------------------------------------------------------------- dataset


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one sample: a pure function of (seed, epoch, index), whichever worker loads it."""
    mask64 = (1 << 64) - 1  # SeedSequence wants non-negative entropy
    return np.random.default_rng([int(seed) & mask64, int(epoch) & mask64, int(index)])


class ImageDataset(Dataset):
    """Images under ``root`` with a ``transform(pil_image, rng)``; items keyed by ``(index, epoch)``.

    ``dataset[(index, epoch)]`` (or ``dataset[index]``, epoch 0) returns
    ``(view_a, view_b, mask, n_skipped)``: the transform's outputs for the image at ``index``
    (or, if that one is unreadable, the next readable one) and how many unreadable files were
    skipped to get there. A transform returning a tuple gives ``(*outputs, n_skipped)``, one
    returning a single tensor ``(output, n_skipped)`` (the tokenizer's one-view training).
    With ``return_labels`` (classification) an item is ``(output, label, n_skipped)``, the label
    being that of the image actually loaded.

    A transform with ``accepts_opened_image = True`` gets an
    :class:`~mcbeit.data.images.OpenedImage` instead, and decodes it itself (e.g. a JPEG at
    reduced scale); a decoding failure there is a bad file like any other.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        relative_paths: Sequence[str],
        labels: Sequence[int],
        transform: Callable[[Image.Image, np.random.Generator], Any],
        seed: int = 0,
        layout: str = "image_folder",
        classes: Sequence[str] | None = None,
        return_labels: bool = False,
        dropped_entries: DroppedEntries | None = None,
    ) -> None:
        if len(relative_paths) != len(labels):
            raise ValueError("relative_paths and labels differ in length")
        if transform is None or not callable(transform):
            raise TypeError("ImageDataset needs a transform(pil_image, rng) callable")
        self.root = Path(root)
        self._paths = PathTable(relative_paths)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform
        self.seed = int(seed)
        self.layout = layout
        self.classes = list(classes) if classes is not None else None
        self.return_labels = bool(return_labels)
        self.dropped_entries = dropped_entries if dropped_entries is not None else DroppedEntries()
        self._warned = _shared_flags(len(self._paths))

    def __len__(self) -> int:
        return len(self._paths)

    @property
    def num_classes(self) -> int:
        if self.classes is not None:
            return len(self.classes)
        return int(self.labels.max()) + 1 if len(self.labels) else 0

    def path(self, index: int) -> Path:
        return self.root / self._paths[index]

    def __repr__(self) -> str:
        return (
            f"ImageDataset({self.layout} at {self.root}, {len(self)} images, "
            f"{self.num_classes} classes, seed={self.seed},\n  transform={self.transform!r})"
        )

    def rng(self, index: int, epoch: int) -> np.random.Generator:
        """The generator of sample ``index`` in ``epoch`` (a pure function of seed, epoch, index)."""
        return sample_rng(self.seed, epoch, index)

    def __getitem__(self, key: int | tuple[int, int]):
        index, epoch = key if isinstance(key, (tuple, list)) else (key, 0)
        index, n = int(index), len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        index %= n
        tries = min(MAX_CONSECUTIVE_BAD, n)
        decodes_itself = getattr(self.transform, "accepts_opened_image", False)
        for skipped in range(tries):
            loaded = (index + skipped) % n
            path = self.path(loaded)
            rng = self.rng(index, epoch)  # afresh: a failed decode may have drawn from it
            opened: OpenedImage | None = None
            try:
                with open_image(path) as opened:
                    out = self.transform(opened if decodes_itself else opened.decode(), rng)
            except MemoryError:
                raise
            except Exception as exc:  # noqa: BLE001 - any decoder failure means "bad file"
                if opened is not None and opened.error is None:
                    raise  # the file decoded (or was not decoded yet): the transform's own failure
                error = exc if opened is None else opened.error
                self._warn_unreadable(loaded, path, error)
                last_error = f"{path} ({_reason(error)})"
                continue
            if self.return_labels:
                return out, int(self.labels[loaded]), skipped
            return (*out, skipped) if isinstance(out, tuple) else (out, skipped)
        raise TooManyBadImagesError(
            f"{tries} consecutive images could not be read, from {self.path(index)} (index {index}) to "
            f"{last_error}: this many in a row means a broken data folder or list file rather than a "
            f"few bad files; check the files under {self.root}, their permissions, and --data_path"
        )

    def _warn_unreadable(self, index: int, path: Path, error: Exception) -> None:
        """Warn about an unreadable file once per run: the flags are shared by the data-loader
        workers (the counts in ``n_skipped`` still go up each time it is skipped)."""
        if not self._warned[index]:
            self._warned[index] = 1
            logger.warning("skipping unreadable image %s: %s", path, _reason(error))


def _reason(error: Exception) -> str:
    return f"{type(error).__name__}: {error}"


def _shared_flags(length: int) -> torch.Tensor:
    """One byte per image, in shared memory where possible so that forked (or spawned)
    data-loader workers, persistent or not, see each other's writes."""
    flags = torch.zeros(max(length, 1), dtype=torch.uint8)
    try:
        return flags.share_memory_()
    except (RuntimeError, OSError) as error:  # e.g. no /dev/shm: warn once per worker instead
        logger.debug("unreadable-image warnings not shared between workers (%s)", error)
        return flags


# ----------------------------------------------------------------------------- layouts


def _canonical_data_set(data_set: str | None) -> str | None:
    """``--data_set`` in its canonical spelling (case-insensitive), None kept, anything else an error."""
    if data_set is None:
        return None
    matches = [d for d in DATA_SETS if d.lower() == str(data_set).lower()]
    if not matches:
        raise ValueError(f"unknown data_set {data_set!r}: choose one of {', '.join(DATA_SETS)}")
    return matches[0]


def _detect_layout(data_path: Path) -> tuple[str, Path, str]:
    """(layout, image root, reason) for ``--data_set`` left unset."""
    if (data_path / LIST_FILE).is_file():
        return "IMNET", data_path, f"found {LIST_FILE}"
    train = data_path / "train"
    if train.is_dir() and any(e.is_dir() for e in os.scandir(train)):
        return "image_folder", train, f"no {LIST_FILE}, and {train} holds class folders"
    return "image_folder", data_path, f"no {LIST_FILE} and no class folders under train/"


def build_pretraining_dataset(
    data_path: str | os.PathLike | None,
    data_set: str | None,
    transform: Callable[[Image.Image, np.random.Generator], Any],
    seed: int = 0,
) -> ImageDataset:
    """The pre-training dataset of ``--data_path``/``--data_set`` (see the module docstring).

    data_path None: the embedded generated dataset. data_set: ``IMNET`` (list file
    ``train_map.txt`` with images under ``train/``), ``image_folder`` or ``CIFAR`` (an
    ImageFolder tree at data_path, as the original pre-training read both), or None to detect.
    """
    data_set = _canonical_data_set(data_set)
    dropped = None

    if data_path is None:
        root = embedded_dataset_root() / "train"
        layout, reason = "embedded", "no --data_path given"
        if data_set is not None:
            reason += f"; --data_set {data_set} ignored"
        paths, labels, classes = image_folder_files(root)
    else:
        data_path = check_data_folder(data_path)
        if data_set is None:
            layout, root, reason = _detect_layout(data_path)
        elif data_set == "IMNET":
            if not (data_path / LIST_FILE).is_file():
                raise DataPathError(
                    f"--data_set IMNET reads {data_path / LIST_FILE} (lines '<path> <label>', "
                    f"paths relative to {data_path / 'train'}), which is missing; for class "
                    "folders use --data_set image_folder or leave --data_set unset"
                )
            layout, root, reason = "IMNET", data_path, "--data_set IMNET"
        else:
            layout, root, reason = "image_folder", data_path, f"--data_set {data_set}"

        if layout == "IMNET":
            root, paths, labels, dropped = read_list_file(data_path)
            classes = None
        else:
            paths, labels, classes = image_folder_files(root)
            if classes and set(classes) <= _SPLIT_NAMES:
                logger.warning(
                    "the class folders of %s are %s, which look like dataset splits: pass the "
                    "training split as --data_path, or leave --data_set unset to detect it",
                    root, classes,
                )

    if not paths:
        raise no_images_error("--data_path", data_path, root, f"the {layout} layout", classes,
                              Path(dropped.source) if dropped is not None and dropped.source else None)
    dataset = ImageDataset(root, paths, labels, transform, seed, layout, classes, dropped_entries=dropped)
    logger.info(
        "data: %s layout at %s (%s): %d images, %d classes",
        layout, root, reason, len(dataset), dataset.num_classes,
    )
    return dataset


# ----------------------------------------------------------------------------- classification

SPLITS = ("train", "val")


class CifarDataset(Dataset):
    """CIFAR-100 from its python files under ``root`` (torchvision's layout; never downloaded),
    with the same item format as :class:`ImageDataset` with ``return_labels``."""

    dropped_entries = DroppedEntries()  # no list file: nothing left out

    def __init__(self, root: str | os.PathLike, train: bool, transform, seed: int = 0) -> None:
        from torchvision.datasets import CIFAR100

        try:
            base = CIFAR100(str(root), train=train, download=False)
        except RuntimeError as error:
            raise DataPathError(
                f"--data_set CIFAR: no CIFAR-100 python files under {root} ({error}). Put the extracted "
                f"cifar-100-python/ folder there (nothing is downloaded at run time)") from None
        self.data, self.labels = base.data, np.asarray(base.targets, dtype=np.int64)
        self.classes, self.transform, self.seed = list(base.classes), transform, int(seed)
        self.root, self.layout = Path(root), "CIFAR"

    def __len__(self) -> int:
        return len(self.data)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, (tuple, list)) else (key, 0)
        return (self.transform(Image.fromarray(self.data[index]), sample_rng(self.seed, epoch, index)),
                int(self.labels[index]), 0)


def build_classification_dataset(
    data_path: str | os.PathLike | None,
    data_set: str | None,
    split: str,
    transform: Callable[[Image.Image, np.random.Generator], Any],
    seed: int = 0,
    eval_data_path: str | os.PathLike | None = None,
):
    """The ``split`` ('train' or 'val') of a labelled dataset, items ``(image, label, n_skipped)``.

    - no ``data_path``: the embedded dataset's ``train/`` or ``val/``;
    - ``IMNET`` (the original's default): ``<data_path>/<split>/`` as class folders, or the list
      layout ``<data_path>/<split>_map.txt`` with images under ``<data_path>/<split>/`` (class names
      from ``<data_path>/classes.txt`` when it exists: :func:`read_class_names`; else ``classes`` is None);
    - ``image_folder``: class folders at ``data_path`` for training and ``eval_data_path`` for
      evaluation (as the original);
    - ``CIFAR``: CIFAR-100's python files under ``data_path``;
    - ``None``: IMNET when ``<data_path>/train`` (or ``train_map.txt``) exists, else image_folder.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    data_set = _canonical_data_set(data_set)
    if data_path is not None:
        data_path = check_data_folder(data_path, expected=CLASSIFICATION_LAYOUTS)
        if data_set == "CIFAR":
            dataset = CifarDataset(data_path, split == "train", transform, seed)
            logger.info("data (%s): CIFAR-100 at %s: %d images, 100 classes", split, data_path, len(dataset))
            return dataset
    layout, root, paths, labels, classes, dropped = _classification_files(data_path, data_set, split, eval_data_path)
    if not paths:
        flag, value = (("--eval_data_path", eval_data_path) if split == "val" and layout == "image_folder"
                       else ("--data_path", data_path))
        raise no_images_error(flag, value, root, f"the {split} split", classes,
                              Path(dropped.source) if dropped is not None and dropped.source else None)
    dataset = ImageDataset(root, paths, labels, transform, seed, layout, classes, return_labels=True,
                           dropped_entries=dropped)
    logger.info("data (%s): %s layout at %s: %d images, %d classes", split, layout, root, len(dataset),
                dataset.num_classes)
    return dataset


def _classification_files(data_path: Path | None, data_set: str | None, split: str,
                          eval_data_path: str | os.PathLike | None):
    """(layout, image root, relative paths, labels, class names or None, dropped list lines or None)
    of a split in one of the layouts :func:`build_classification_dataset` reads (all but CIFAR)."""
    if data_path is None:
        root = embedded_dataset_root() / split
        return ("embedded", root, *image_folder_files(root), None)
    if data_set is None:
        data_set = ("IMNET" if (data_path / split).is_dir() or (data_path / f"{split}_map.txt").is_file()
                    else "image_folder")
    list_file = data_path / f"{split}_map.txt"
    if data_set == "IMNET" and list_file.is_file():
        root, paths, labels, dropped = read_list_file(data_path, list_file.name, split)
        classes = read_class_names(data_path / CLASS_NAMES_FILE, labels, list_file)
        return "IMNET list", root, paths, labels, classes, dropped
    if data_set == "IMNET":
        root = data_path / split
        if not root.is_dir():
            raise DataPathError(
                f"--data_set IMNET reads {root}/ (class folders) or {list_file}; neither exists. For one "
                f"folder of classes per split use --data_set image_folder (with --eval_data_path)")
        return ("IMNET", root, *image_folder_files(root), None)
    if split == "train":
        root = data_path
    elif eval_data_path is None:
        raise ConfigError("--data_set image_folder evaluates on --eval_data_path, which is not given; "
                          "pass it, or --disable_eval_during_finetuning")
    else:
        root = check_data_folder(eval_data_path, "--eval_data_path", EVAL_LAYOUT)
    return ("image_folder", root, *image_folder_files(root), None)


def read_class_names(path: Path, labels: Sequence[int], list_file: Path) -> list[str] | None:
    """The class names of the list layout: ``path`` (``classes.txt`` beside ``list_file``), one name a line,
    the first line naming label 0; None when there is no such file (the labels then have no names).

    Every label of ``list_file`` must have its line (more lines than labels are classes without images
    in this split); blank lines inside the file and a name given twice are refused: either would shift or
    merge labels silently.
    """
    if not path.is_file():
        return None
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as error:
        raise InputError(f"{path} is not UTF-8 text ({error}): write one class name per line, in UTF-8") from None
    names = [line.strip() for line in lines]
    while names and not names[-1]:
        names.pop()
    fix = f"write one class name per line, the first line naming label 0 (or remove {path} to train without names)"
    blank = [i + 1 for i, name in enumerate(names) if not name]
    if blank:
        raise InputError(f"{path}: line(s) {', '.join(map(str, blank[:5]))} are blank, which would shift every later "
                         f"label's name; {fix}")
    seen: dict[str, int] = {}
    for i, name in enumerate(names, start=1):
        if name in seen:
            raise InputError(f"{path}: {name!r} names two classes (lines {seen[name]} and {i}); each label needs "
                             f"its own name")
        seen[name] = i
    needed = int(max(labels)) + 1 if len(labels) else 0
    if len(names) < needed:
        raise InputError(f"{path} names {len(names)} classes, but {list_file} has labels up to {needed - 1} "
                         f"({needed} classes): add the missing names; {fix}")
    return names
