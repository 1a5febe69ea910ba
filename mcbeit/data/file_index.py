"""Which images a dataset holds, and their labels: an ImageFolder tree (torchvision's rules) or
one of the seeds' list files (``train_map.txt``: a path relative to ``train/`` and a label per
line), and the table the paths are kept in.

The one walk of image folders (:func:`image_folder_files`, every ImageFolder layout of every
command goes through it) follows symbolic links, to files and to folders, but lists each folder
once and never loops: a folder reached again (``a/up -> ..``, two links to one folder), one
that holds the data folder itself, or one inside another class's folder is skipped, with one
warning that counts the skipped paths and names the first ones; a folder reached from two
classes, or two class folders that are one folder, is refused (its labels would be a guess).

List-file lines that are malformed, have a bad label or name a missing file are left out when the
dataset is built, with one warning naming them (:class:`DroppedEntries`); a list of which no line is
usable raises :class:`~mcbeit.data.folders.BadListFileError`.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes

from .folders import LIST_FILE, BadListFileError, DataPathError

__all__ = ["DroppedEntries", "PathTable", "image_folder_files", "read_list_file"]

logger = logging.getLogger("mcbeit.data.datasets")  # the warnings users already know by this name


class PathTable:
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


@dataclass(frozen=True)
class DroppedEntries:
    """The list-file lines a dataset left out: how many, why, and which (the first ones).

    ``reasons`` counts them by reason ("missing file", "bad label", "malformed");
    ``line_numbers`` holds the first ``MAX_REPORTED`` of them (1-based), ``examples`` a few
    lines with their reason. A dataset that is not read from a list file has ``count`` 0.
    """

    MAX_REPORTED = 1000

    source: str = ""
    count: int = 0
    total: int = 0  # non-blank lines read, kept and dropped
    reasons: dict[str, int] = field(default_factory=dict)
    line_numbers: tuple[int, ...] = ()
    examples: tuple[str, ...] = ()


def _relative(paths: Sequence[str], root: Path) -> list[str]:
    prefix = str(root) + os.sep
    return [p[len(prefix) :] if p.startswith(prefix) else os.path.relpath(p, root) for p in paths]


def image_folder_files(root: Path) -> tuple[list[str], list[int], list[str]]:
    """(relative paths, labels, class names) of an ImageFolder tree (torchvision's rules)."""
    try:
        classes, class_to_idx = find_classes(str(root))
    except FileNotFoundError:
        # No class folders: accept images directly inside root as one unnamed class.
        files = sorted(
            e.name for e in os.scandir(root) if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS)
        )
        return files, [0] * len(files), [""] if files else []
    walk = _ClassFolderWalk(root, classes)
    paths, labels = walk.files()
    walk.report()
    return _relative(paths, root), labels, classes


class _ClassFolderWalk:
    """The image files under each class folder of ``root``, following symbolic links without loops.

    torchvision's ``make_dataset`` (``os.walk(followlinks=True)``) walks ``a/up -> ..`` until the
    path is too long: 20 files became 820 samples, class b's files labelled a. Here each folder is
    identified by ``(st_dev, st_ino)`` and owned by the class whose (real) folder holds it; a class
    walk enters only folders it owns, never reached before, that do not hold the data folder.
    Files (and links to files) are listed as torchvision does: folders in sorted path order, files
    sorted within a folder, extensions ``IMG_EXTENSIONS`` in any case.
    """

    MAX_NAMED = 5  # skipped paths named per reason in the warning; the rest are counted

    def __init__(self, root: Path, classes: Sequence[str]) -> None:
        self.root, self.classes = root, list(classes)
        self.real_root = os.path.realpath(root)
        self.owners: dict[str, int] = {}  # real class folder -> class index
        self.reached: dict[tuple[int, int], tuple[int, str]] = {}  # folder id -> (class, path it was listed at)
        self.skipped: dict[str, list[str]] = {}  # reason -> paths relative to root
        for index, name in enumerate(self.classes):
            real = os.path.realpath(root / name)
            if self._holds_root(real):  # a class folder linking to the data folder: walked, it would list all
                continue
            if real in self.owners:
                other = self.classes[self.owners[real]]
                raise DataPathError(
                    f"{root}: the class folders {other!r} and {name!r} are one folder ({real}), so its images "
                    "would get two labels: give each class a folder of its own (remove or re-point the link)")
            self.owners[real] = index

    def files(self) -> tuple[list[str], list[int]]:
        paths: list[str] = []
        labels: list[int] = []
        for index, name in enumerate(self.classes):
            for folder, names in sorted(self._walk(index, os.path.join(self.root, name))):
                paths.extend(os.path.join(folder, n) for n in sorted(names))
                labels.extend([index] * len(names))
        return paths, labels

    def _walk(self, index: int, top: str) -> list[tuple[str, list[str]]]:
        """(folder path, image file names) of every folder class ``index`` owns under ``top``."""
        found: list[tuple[str, list[str]]] = []
        stack = [top]
        while stack:
            folder = stack.pop()
            if not self._enter(index, folder):
                continue
            names, subfolders = [], []
            try:
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError as error:  # a folder that cannot be listed: named, not fatal
                self._skip(f"cannot be listed ({error.strerror})", folder)
                continue
            for entry in entries:
                if entry.is_dir():  # follows links, as is_file() below
                    subfolders.append(entry.path)
                elif entry.is_file():
                    if entry.name.lower().endswith(IMG_EXTENSIONS):
                        names.append(entry.name)
                elif entry.is_symlink():
                    self._skip("broken or looping links", entry.path)
            found.append((folder, names))
            stack.extend(reversed(subfolders))
        return found

    def _enter(self, index: int, folder: str) -> bool:
        """Whether class ``index`` lists ``folder`` (reached at that path); records why not."""
        try:
            st = os.stat(folder)
        except OSError as error:
            self._skip(f"cannot be read ({error.strerror})", folder)
            return False
        key = (st.st_dev, st.st_ino)
        if key in self.reached:
            owner, first = self.reached[key]
            if owner != index:
                raise DataPathError(
                    f"{self.root}: the folder {os.path.realpath(folder)} is reached from two classes, as "
                    f"{self._rel(first)} and as {self._rel(folder)} (symbolic links), so its images would get two "
                    "labels: keep it under one class only")
            self._skip("already listed (a loop, or a second link to one folder)", folder)
            return False
        real = os.path.realpath(folder)
        if self._holds_root(real):
            self._skip("links to the data folder or above it (a loop)", folder)
            return False
        owner = self._owner(real)
        if owner is not None and owner != index:
            self._skip("inside another class's folder (listed there)", folder)
            return False
        self.reached[key] = (index, folder)
        return True

    def _holds_root(self, real: str) -> bool:
        """Whether the real folder ``real`` is the data folder or holds it."""
        return real == self.real_root or self.real_root.startswith(real.rstrip(os.sep) + os.sep)

    def _owner(self, real: str) -> int | None:
        """The class whose real folder holds ``real`` (the innermost one), or None (e.g. outside the data)."""
        path = real
        while path not in self.owners:  # up the path: as many look-ups as the folder is deep
            parent = os.path.dirname(path)
            if parent == path:
                return None
            path = parent
        return self.owners[path]

    def _skip(self, reason: str, path: str) -> None:
        self.skipped.setdefault(reason, []).append(self._rel(path))

    def _rel(self, path: str) -> str:
        return os.path.relpath(path, self.root)

    def report(self) -> None:
        """One warning: the skipped paths counted by reason, the first ``MAX_NAMED`` of each named."""
        if not self.skipped:
            return
        parts = []
        for reason, paths in self.skipped.items():
            more = f" and {len(paths) - self.MAX_NAMED} more" if len(paths) > self.MAX_NAMED else ""
            parts.append(f"{len(paths)} {reason}: {', '.join(paths[: self.MAX_NAMED])}{more}")
        total = sum(len(p) for p in self.skipped.values())
        logger.warning("%s: skipped %d path%s while listing the images: %s. Their images are listed once, where "
                       "they belong, or not at all; fix the links to silence this", self.root, total,
                       "s" if total > 1 else "", "; ".join(parts))


def read_list_file(
    data_path: Path, name: str = LIST_FILE, split: str = "train"
) -> tuple[Path, list[str], list[int], DroppedEntries]:
    """(image base folder, relative paths, labels, dropped lines) from ``<data_path>/<name>``.

    Lines are ``<path relative to <data_path>/<split>/> <integer label >= 0>``; blank lines are
    ignored. Lines that are malformed, have a bad label or name a missing file are left out with
    one warning naming them; a list of which no line is usable raises :class:`BadListFileError`.
    """
    map_file = data_path / name
    paths, labels, line_numbers, bad = _parse_list_file(map_file)
    base = _list_base(data_path, split, paths)
    if base == data_path:
        logger.info("%s: paths are relative to %s, not to %s/", map_file, data_path, split)
    exists = _existing(base, paths)
    if not exists.all():
        for i in np.flatnonzero(~exists):
            bad.append((line_numbers[i], f"{paths[i]} {labels[i]}", "missing file"))
        bad.sort()
        paths = [p for p, ok in zip(paths, exists, strict=True) if ok]
        labels = [label for label, ok in zip(labels, exists, strict=True) if ok]
    _report_dropped(map_file, base, bad, len(paths))
    return base, paths, labels, _dropped_entries(map_file, bad, len(paths))


def _parse_list_file(map_file: Path) -> tuple[list[str], list[int], list[int], list[tuple[int, str, str]]]:
    """(paths, labels, their line numbers, unusable lines as (line number, line, reason)) of a list file."""
    paths: list[str] = []
    labels: list[int] = []
    line_numbers: list[int] = []  # of the kept lines, until the existence check
    bad: list[tuple[int, str, str]] = []
    with open(map_file, encoding="utf-8-sig", errors="surrogateescape") as lines:
        for line_number, line in enumerate(lines, start=1):
            text = line.strip()
            if not text:
                continue
            path, label, problem = _parse_list_line(text)
            if problem:
                bad.append((line_number, text, problem))
            else:
                paths.append(path)
                labels.append(label)
                line_numbers.append(line_number)
    return paths, labels, line_numbers, bad


def _reasons(bad: Sequence[tuple[int, str, str]]) -> dict[str, int]:
    return {r: sum(1 for *_, reason in bad if reason == r) for r in ("missing file", "bad label", "malformed")}


def _dropped_entries(map_file: Path, bad: Sequence[tuple[int, str, str]], kept: int) -> DroppedEntries:
    return DroppedEntries(
        source=str(map_file),
        count=len(bad),
        total=len(bad) + kept,
        reasons={r: c for r, c in _reasons(bad).items() if c},
        line_numbers=tuple(n for n, _, _ in bad[: DroppedEntries.MAX_REPORTED]),
        examples=tuple(f"line {n}: {text!r} ({reason})" for n, text, reason in bad[:5]),
    )


def _report_dropped(map_file: Path, base: Path, bad: Sequence[tuple[int, str, str]], kept: int) -> None:
    """One warning naming the left-out lines; :class:`BadListFileError` when no line is usable."""
    if not bad:
        return
    dropped = _dropped_entries(map_file, bad, kept)
    expected = f"'<path relative to {base}/> <integer label >= 0>'"
    if not kept:
        raise BadListFileError(
            f"{map_file}: none of its {len(bad)} lines is usable ({_describe(_reasons(bad))}), e.g. "
            f"{'; '.join(dropped.examples[:3])}. Each line must be {expected}; fix the list file, "
            "or point --data_path at the folder holding it and the images"
        )
    shown = ", ".join(str(n) for n in dropped.line_numbers[:20])
    more = f" and {len(bad) - 20} more" if len(bad) > 20 else ""
    logger.warning(
        "%s: left out %d of %d lines (%s): line%s %s%s; e.g. %s. Lines must be %s",
        map_file, len(bad), dropped.total, _describe(_reasons(bad)), "s" if len(bad) > 1 else "", shown, more,
        "; ".join(dropped.examples), expected,
    )


def _parse_list_line(text: str) -> tuple[str, int | None, str]:
    """(path, label or None, what is wrong) of one non-blank line ``<relative/path> <label>``.
    The label is the last field, so paths may hold spaces."""
    parts = text.rsplit(None, 1)
    if len(parts) != 2:
        return text, None, "malformed"
    path, label = parts
    try:
        value = int(label)
    except ValueError:
        return path, None, "bad label"
    return (path, value, "") if value >= 0 else (path, None, "bad label")


def _existing(base: Path, paths: Sequence[str]) -> np.ndarray:
    """Which ``base/path`` exist, as a boolean array.

    One ``os.scandir`` per distinct folder instead of a ``stat`` per file: ImageNet's 1.28 M
    lines cost about a thousand directory listings (cheap on network file systems too) and
    memory for one folder's names at a time. A name the listing lacks is confirmed with
    ``os.path.exists`` (case-insensitive file systems, paths with ``..``); a folder that does
    not exist marks its paths missing without a ``stat`` each.
    """
    folder_ids: dict[str, int] = {}
    ids = np.empty(len(paths), dtype=np.int64)
    for i, path in enumerate(paths):
        ids[i] = folder_ids.setdefault(os.path.dirname(path), len(folder_ids))
    exists = np.zeros(len(paths), dtype=bool)
    order = np.argsort(ids, kind="stable")
    ends = np.cumsum(np.bincount(ids, minlength=len(folder_ids)))
    start = 0
    for folder, end in zip(folder_ids, ends, strict=True):
        try:
            names = {entry.name for entry in os.scandir(os.path.join(base, folder))}
        except (FileNotFoundError, NotADirectoryError):
            start = end
            continue
        except OSError:  # e.g. a folder that may be traversed but not listed
            names = set()
        for i in order[start:end]:
            exists[i] = os.path.basename(paths[i]) in names or os.path.exists(os.path.join(base, paths[i]))
        start = end
    return exists


def _list_base(data_path: Path, split: str, paths: Sequence[str]) -> Path:
    """The folder a list file's paths are relative to: ``<data_path>/<split>/`` as the original,
    or ``data_path`` itself where the first few paths exist only there."""
    base = data_path / split
    sample = paths[:16]
    if sample and not any((base / p).exists() for p in sample) and any((data_path / p).exists() for p in sample):
        return data_path
    return base


def _describe(reasons: dict[str, int]) -> str:
    return ", ".join(f"{count} {reason}" for reason, count in reasons.items() if count)
