"""The one walk of image folders follows symbolic links without looping (issue 14, case 6).

A loop ``a/up -> ..`` used to turn 20 files into 820 samples, class b's files labelled a
(torchvision's ``os.walk(followlinks=True)``). Real folders, real links, real JPEGs, read through
the datasets every command builds.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from PIL import Image

from mcbeit.data.datasets import build_classification_dataset, build_pretraining_dataset
from mcbeit.data.file_index import image_folder_files
from mcbeit.data.folders import DataPathError
from mcbeit.errors import InputError


def _images(folder: Path, n: int, colour: tuple[int, int, int]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (16, 16), colour).save(folder / f"{i:02d}.jpg")


def _two_classes(root: Path) -> Path:
    """root/a: 10 red images, root/b: 10 blue ones."""
    _images(root / "a", 10, (255, 0, 0))
    _images(root / "b", 10, (0, 0, 255))
    return root


def _by_class(paths, labels) -> dict[str, set[int]]:
    """top folder of each path -> the labels it was given."""
    out: dict[str, set[int]] = {}
    for path, label in zip(paths, labels, strict=True):
        out.setdefault(path.split(os.sep)[0], set()).add(label)
    return out


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_a_loop_back_to_the_data_folder_is_skipped_and_named(tmp_path, caplog):
    root = _two_classes(tmp_path / "data")
    os.symlink("..", root / "a" / "up")                     # a/up -> the data folder: a loop
    os.symlink("..", root / "b" / "back")                   # b/back -> b itself: a loop inside one class
    caplog.set_level(logging.INFO)
    paths, labels, classes = image_folder_files(root)
    assert classes == ["a", "b"] and len(paths) == 20        # was 820
    assert _by_class(paths, labels) == {"a": {0}, "b": {1}}  # b's files were labelled a
    (message,) = _warnings(caplog)
    assert "skipped 2 paths" in message and "a/up" in message and "b/back" in message

    # Every dataset that reads an image folder gets the same 20 samples, and they load.
    caplog.clear()
    pretraining = build_pretraining_dataset(root, "image_folder", lambda img, rng: img)
    assert len(pretraining) == 20 and "a/up" in _warnings(caplog)[0]
    train = build_classification_dataset(root, "image_folder", "train", lambda img, rng: img,
                                         eval_data_path=root)
    assert len(train) == 20 and [train[i][1] for i in (0, 19)] == [0, 1]
    assert train[19][0].getpixel((8, 8))[2] > 200           # the last sample is a blue image of class b


def test_links_to_files_and_to_outside_folders_are_followed(tmp_path, caplog):
    root = _two_classes(tmp_path / "data")
    _images(tmp_path / "elsewhere", 3, (0, 255, 0))
    os.symlink(tmp_path / "elsewhere" / "00.jpg", root / "a" / "linked.jpg")   # a link to a file
    os.symlink(tmp_path / "elsewhere", root / "b" / "more")                     # a link to a folder outside
    os.symlink(tmp_path / "nothing.jpg", root / "b" / "broken.jpg")             # a broken link: named
    caplog.set_level(logging.INFO)
    paths, labels, _ = image_folder_files(root)
    assert os.path.join("a", "linked.jpg") in paths
    assert sum(p.startswith(os.path.join("b", "more") + os.sep) for p in paths) == 3
    assert len(paths) == 24 and _by_class(paths, labels) == {"a": {0}, "b": {1}}
    (message,) = _warnings(caplog)
    assert "1 broken or looping links: b/broken.jpg" in message
    dataset = build_pretraining_dataset(root, None, lambda img, rng: img)
    linked = dataset[paths.index(os.path.join("a", "linked.jpg"))][0]
    assert linked.getpixel((8, 8))[1] > 200                 # the linked file's green image was read


def test_a_folder_linked_twice_is_listed_once_and_never_under_another_class(tmp_path, caplog):
    root = _two_classes(tmp_path / "data")
    _images(tmp_path / "shared", 4, (0, 255, 0))
    os.symlink(tmp_path / "shared", root / "a" / "one")
    os.symlink(tmp_path / "shared", root / "a" / "two")     # the same folder again, in the same class
    os.symlink(root / "b", root / "a" / "into_b")            # class b's own folder, reached from a
    caplog.set_level(logging.INFO)
    paths, labels, _ = image_folder_files(root)
    assert len(paths) == 24 and _by_class(paths, labels) == {"a": {0}, "b": {1}}
    assert [p for p in paths if p.startswith(os.path.join("a", "t"))] == []   # a/two: not listed again
    (message,) = _warnings(caplog)
    assert "a/two" in message and "a/into_b" in message and "a/one" not in message

    # Reached from two classes, a folder's label would be a guess: refused, naming it.
    os.symlink(tmp_path / "shared", root / "b" / "also")
    with pytest.raises(DataPathError) as error:
        image_folder_files(root)
    assert str(tmp_path / "shared") in str(error.value) and "b/also" in str(error.value)
    assert isinstance(error.value, InputError)               # exit status 1, a one-line message


def test_many_skipped_paths_make_one_warning_that_counts_them(tmp_path, caplog):
    root = _two_classes(tmp_path / "data")
    for i in range(12):
        os.symlink(tmp_path / f"gone{i}.jpg", root / "b" / f"gone{i:02d}.jpg")
    caplog.set_level(logging.INFO)
    paths, _, _ = image_folder_files(root)
    assert len(paths) == 20
    (message,) = _warnings(caplog)
    assert "skipped 12 paths" in message and "b/gone04.jpg and 7 more" in message and "gone05" not in message


def test_a_class_folder_linking_to_the_data_folder_lists_nothing(tmp_path, caplog):
    root = _two_classes(tmp_path / "data")
    os.symlink(".", root / "c")                              # a "class" that is the data folder itself
    caplog.set_level(logging.INFO)
    paths, labels, classes = image_folder_files(root)
    assert classes == ["a", "b", "c"] and len(paths) == 20 and _by_class(paths, labels) == {"a": {0}, "b": {1}}
    (message,) = _warnings(caplog)
    assert "links to the data folder or above it (a loop): c" in message
