"""Image datasets for pre-training and classification: ImageFolder trees, the seeds' list files,
CIFAR-100's python files, and the embedded default.

Every sample's randomness comes from ``numpy.random.default_rng([seed, epoch, index])``: the
crop, flip and mask of an image depend on its index and the epoch, never on which data-loader
worker loads it. Unreadable files are skipped (the next index is used), warned about and
counted, so a bad file never stops a run of weeks.
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
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from .embedded import embedded_dataset_root

__all__ = [
    "ImageDataset",
    "CifarDataset",
    "build_classification_dataset",
    "build_pretraining_dataset",
    "embedded_dataset_root",
    "load_rgb_image",
    "DATA_SETS",
    "MAX_CONSECUTIVE_BAD",
]

logger = logging.getLogger(__name__)

DATA_SETS = ("IMNET", "image_folder", "CIFAR")  # None: detect the layout
MAX_CONSECUTIVE_BAD = 50  # give up (clearly) after this many unreadable files in a row
LIST_FILE = "train_map.txt"
_SPLIT_NAMES = {"train", "val", "validation", "test"}


# ----------------------------------------------------------------------------- image loading


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any decoded PIL image as 8-bit RGB (16-bit and float images rescaled, not clipped)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode in ("I", "F"):
        array = np.asarray(image, dtype=np.float64)
        if mode.startswith("I;16"):
            array = array / 257.0
        elif mode == "I" and array.size and array.max() > 255:
            array = array / 257.0 if array.max() <= 65535 else array * (255.0 / array.max())
        elif mode == "F" and array.size and array.max() <= 1.0:
            array = array * 255.0
        gray = Image.fromarray(np.clip(np.round(array), 0, 255).astype(np.uint8))
        return gray.convert("RGB")
    if mode in ("P", "PA") and (mode == "PA" or "transparency" in image.info):
        image = image.convert("RGBA")  # avoids Pillow's palette-transparency warning
    return image.convert("RGB")


def load_rgb_image(path: str | os.PathLike) -> Image.Image:
    """Decode an image file fully and return it as RGB; raises if it is not a decodable image."""
    with Image.open(path) as image:
        image.load()
        return _to_rgb(image)


class _PathTable:
    """Relative paths packed into one byte buffer: small, and no per-string Python objects,
    so forked data-loader workers do not copy the table page by page (refcount writes)."""

    def __init__(self, paths: Sequence[str]) -> None:
        encoded = [os.fsencode(p) for p in paths]
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=self._offsets[1:])
        self._buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> str:
        return os.fsdecode(self._buffer[self._offsets[i] : self._offsets[i + 1]].tobytes())


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
    ) -> None:
        if len(relative_paths) != len(labels):
            raise ValueError("relative_paths and labels differ in length")
        if transform is None or not callable(transform):
            raise TypeError("ImageDataset needs a transform(pil_image, rng) callable")
        self.root = Path(root)
        self._paths = _PathTable(relative_paths)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform
        self.seed = int(seed)
        self.layout = layout
        self.classes = list(classes) if classes is not None else None
        self.return_labels = bool(return_labels)
        self._warned: set[str] = set()

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
        rng = self.rng(index, epoch)
        tries = min(MAX_CONSECUTIVE_BAD, n)
        for skipped in range(tries):
            loaded = (index + skipped) % n
            path = self.path(loaded)
            try:
                image = load_rgb_image(path)
            except MemoryError:
                raise
            except Exception as error:  # noqa: BLE001 - any decoder failure means "bad file"
                self._warn_unreadable(path, error)
                last_error = f"{path}: {error}"
                continue
            out = self.transform(image, rng)
            if self.return_labels:
                return out, int(self.labels[loaded]), skipped
            return (*out, skipped) if isinstance(out, tuple) else (out, skipped)
        raise RuntimeError(
            f"{tries} consecutive images from index {index} under {self.root} could not be "
            f"read (last: {last_error}); check the files, their permissions, or --data_path"
        )

    def _warn_unreadable(self, path: Path, error: Exception) -> None:
        key = str(path)
        if key not in self._warned:  # once per file and process: counts still go up each time
            self._warned.add(key)
            logger.warning("skipping unreadable image %s (%s: %s)", path, type(error).__name__, error)


# ----------------------------------------------------------------------------- layouts


def _relative(paths: Sequence[str], root: Path) -> list[str]:
    prefix = str(root) + os.sep
    return [p[len(prefix) :] if p.startswith(prefix) else os.path.relpath(p, root) for p in paths]


def _image_folder(root: Path) -> tuple[list[str], list[int], list[str]]:
    """(relative paths, labels, class names) of an ImageFolder tree (torchvision's rules)."""
    try:
        classes, class_to_idx = find_classes(str(root))
    except FileNotFoundError:
        # No class folders: accept images directly inside root as one unnamed class.
        files = sorted(
            e.name for e in os.scandir(root) if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS)
        )
        return files, [0] * len(files), [""] if files else []
    samples = make_dataset(str(root), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    return _relative([p for p, _ in samples], root), [c for _, c in samples], classes


def _list_file(data_path: Path, name: str = LIST_FILE, split: str = "train") -> tuple[Path, list[str], list[int]]:
    """(image base folder, relative paths, labels) from ``<data_path>/<name>`` (default train_map.txt)."""
    map_file = data_path / name
    paths: list[str] = []
    labels: list[int] = []
    with open(map_file, encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            text = line.strip()
            if not text:
                continue
            parts = text.rsplit(None, 1)
            try:
                label = int(parts[1]) if len(parts) == 2 else None
            except ValueError:
                label = None
            if label is None:
                raise ValueError(
                    f"{map_file}, line {line_number}: expected '<relative/path> <integer label>', "
                    f"got {text!r}"
                )
            paths.append(parts[0])
            labels.append(label)
    base = data_path / split
    if paths and not (base / paths[0]).exists() and (data_path / paths[0]).exists():
        logger.info("%s: paths are relative to %s, not to %s/", map_file, data_path, split)
        base = data_path
    return base, paths, labels


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

    if data_path is None:
        root = embedded_dataset_root() / "train"
        layout, reason = "embedded", "no --data_path given"
        if data_set is not None:
            reason += f"; --data_set {data_set} ignored"
        paths, labels, classes = _image_folder(root)
    else:
        data_path = Path(data_path).expanduser()
        if not data_path.exists():
            raise FileNotFoundError(
                f"--data_path {data_path} does not exist: pass a folder holding an ImageFolder "
                f"tree (class sub-folders), or train/ plus {LIST_FILE}; omit --data_path to use "
                "the embedded dataset"
            )
        if not data_path.is_dir():
            raise NotADirectoryError(f"--data_path {data_path} is not a folder")
        if data_set is None:
            layout, root, reason = _detect_layout(data_path)
        elif data_set == "IMNET":
            if not (data_path / LIST_FILE).is_file():
                raise FileNotFoundError(
                    f"--data_set IMNET reads {data_path / LIST_FILE} (lines '<path> <label>', "
                    f"paths relative to {data_path / 'train'}), which is missing; for class "
                    "folders use --data_set image_folder or leave --data_set unset"
                )
            layout, root, reason = "IMNET", data_path, "--data_set IMNET"
        else:
            layout, root, reason = "image_folder", data_path, f"--data_set {data_set}"

        if layout == "IMNET":
            root, paths, labels = _list_file(data_path)
            classes = None
        else:
            paths, labels, classes = _image_folder(root)
            if classes and set(classes) <= _SPLIT_NAMES:
                logger.warning(
                    "the class folders of %s are %s, which look like dataset splits: pass the "
                    "training split as --data_path, or leave --data_set unset to detect it",
                    root, classes,
                )

    if not paths:
        raise FileNotFoundError(
            f"no images found for the {layout} layout at {root} (extensions: "
            f"{', '.join(IMG_EXTENSIONS)}); check --data_path"
        )
    dataset = ImageDataset(root, paths, labels, transform, seed, layout, classes)
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

    def __init__(self, root: str | os.PathLike, train: bool, transform, seed: int = 0) -> None:
        from torchvision.datasets import CIFAR100

        try:
            base = CIFAR100(str(root), train=train, download=False)
        except RuntimeError as error:
            raise FileNotFoundError(
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
      layout ``<data_path>/<split>_map.txt`` with images under ``<data_path>/<split>/``;
    - ``image_folder``: class folders at ``data_path`` for training and ``eval_data_path`` for
      evaluation (as the original);
    - ``CIFAR``: CIFAR-100's python files under ``data_path``;
    - ``None``: IMNET when ``<data_path>/train`` (or ``train_map.txt``) exists, else image_folder.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    data_set = _canonical_data_set(data_set)
    if data_path is None:
        root = embedded_dataset_root() / split
        paths, labels, classes = _image_folder(root)
        layout = "embedded"
    else:
        data_path = Path(data_path).expanduser()
        if not data_path.is_dir():
            raise FileNotFoundError(f"--data_path {data_path} is not an existing folder")
        if data_set == "CIFAR":
            dataset = CifarDataset(data_path, split == "train", transform, seed)
            logger.info("data (%s): CIFAR-100 at %s: %d images, 100 classes", split, data_path, len(dataset))
            return dataset
        if data_set is None:
            data_set = ("IMNET" if (data_path / split).is_dir() or (data_path / f"{split}_map.txt").is_file()
                        else "image_folder")
        list_file = data_path / f"{split}_map.txt"
        if data_set == "IMNET" and list_file.is_file():
            root, paths, labels = _list_file(data_path, list_file.name, split)
            classes, layout = None, "IMNET list"
        elif data_set == "IMNET":
            root = data_path / split
            if not root.is_dir():
                raise FileNotFoundError(
                    f"--data_set IMNET reads {root}/ (class folders) or {list_file}; neither exists. For one "
                    f"folder of classes per split use --data_set image_folder (with --eval_data_path)")
            paths, labels, classes = _image_folder(root)
            layout = "IMNET"
        else:
            if split == "train":
                root = data_path
            elif eval_data_path is None:
                raise SystemExit("--data_set image_folder evaluates on --eval_data_path, which is not given; "
                                 "pass it, or --disable_eval_during_finetuning")
            else:
                root = Path(eval_data_path).expanduser()
                if not root.is_dir():
                    raise FileNotFoundError(f"--eval_data_path {root} is not an existing folder")
            paths, labels, classes = _image_folder(root)
            layout = "image_folder"
    if not paths:
        raise FileNotFoundError(f"no images found for the {split} split at {root} (extensions: "
                                f"{', '.join(IMG_EXTENSIONS)})")
    dataset = ImageDataset(root, paths, labels, transform, seed, layout, classes, return_labels=True)
    logger.info("data (%s): %s layout at %s: %d images, %d classes", split, layout, root, len(dataset),
                dataset.num_classes)
    return dataset
