"""Finding the labelled train and val splits that mcbeit-knn and the k-NN monitor measure on."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mcbeit.data.labelled import NoLabelledSplit, labelled_splits, per_class_subset
from mcbeit.errors import InputError


def _images(folder: Path, classes: dict[str, int]) -> Path:
    for name, n in classes.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(folder / name / f"{i}.png")
    return folder


def _ident(image, rng=None):
    return image


def _files(dataset) -> list[str]:
    return [str(dataset.path(i).relative_to(dataset.root)) for i in range(len(dataset))]


def test_a_root_with_train_and_val_class_folders(tmp_path):
    _images(tmp_path / "train", {"a": 3, "b": 2})
    _images(tmp_path / "val", {"a": 1, "b": 1})
    train, val = labelled_splits(tmp_path, None, _ident)
    assert (len(train), len(val)) == (5, 2) and train.root == tmp_path / "train" and val.root == tmp_path / "val"


def test_a_train_folder_of_classes_finds_its_sibling_val(tmp_path):
    _images(tmp_path / "train", {"a": 2, "b": 2})
    _images(tmp_path / "val", {"a": 1, "b": 1})
    train, val = labelled_splits(tmp_path / "train", None, _ident)   # --data_path /data/imagenet/train
    assert (len(train), len(val)) == (4, 2) and val.root == tmp_path / "val"


def test_the_seeds_list_files(tmp_path):
    _images(tmp_path / "train", {"a": 2, "b": 2})
    _images(tmp_path / "val", {"x": 2})
    (tmp_path / "train_map.txt").write_text("a/0.png 0\nb/1.png 1\n")
    (tmp_path / "val_map.txt").write_text("x/0.png 1\n")
    train, val = labelled_splits(tmp_path, None, _ident)
    assert (len(train), len(val)) == (2, 1) and list(val.labels) == [1]


def test_eval_data_path_names_the_val_split(tmp_path):
    _images(tmp_path / "pool", {"a": 2, "b": 2})
    _images(tmp_path / "held_out", {"a": 1, "b": 2})
    train, val = labelled_splits(tmp_path / "pool", tmp_path / "held_out", _ident)
    assert (len(train), len(val)) == (4, 3)


def test_no_labels_or_no_val_split_is_said(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (8, 8)).save(flat / "0.png")
    with pytest.raises(NoLabelledSplit, match="no class folders"):
        labelled_splits(flat, None, _ident)
    _images(tmp_path / "only_train", {"a": 1, "b": 1})
    with pytest.raises(NoLabelledSplit, match="pass --eval_data_path"):
        labelled_splits(tmp_path / "only_train", None, _ident)


def test_splits_with_other_classes_are_refused(tmp_path):
    _images(tmp_path / "train", {"a": 1, "b": 1})
    _images(tmp_path / "val", {"a": 1, "c": 1})
    with pytest.raises(InputError, match="same names in both splits"):
        labelled_splits(tmp_path, None, _ident)


def test_per_class_subset_keeps_at_most_n_of_each_class_the_same_every_time(tmp_path):
    _images(tmp_path / "train", {"a": 6, "b": 2, "c": 5})
    _images(tmp_path / "val", {"a": 1, "b": 1, "c": 1})
    train, _ = labelled_splits(tmp_path, None, _ident)
    sub = per_class_subset(train, 3, seed=1)
    labels = np.asarray(sub.labels)
    assert np.bincount(labels).tolist() == [3, 2, 3] and sub.num_classes == 3
    assert list(sub.indices) == sorted(sub.indices)                              # dataset order
    assert [int(sub[i][1]) for i in range(len(sub))] == labels.tolist()          # the items carry those labels
    assert list(per_class_subset(train, 3, seed=1).indices) == list(sub.indices)
    assert per_class_subset(train, 0) is train and per_class_subset(train, 6) is train
