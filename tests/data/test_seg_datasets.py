"""Segmentation datasets on real files: layouts and their detection, reduce_zero_label, label checks, bad
files skipped and counted, per-sample determinism."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mcbeit.data.seg_transforms import SegTestTransform, SegTrainTransform, seg_collate
from mcbeit.data.segmentation import (ADE20K_CLASSES, LabelFileError, SegmentationDataset, build_segmentation_dataset,
                                      read_label_map, reduce_zero_label)
from mcbeit.errors import ConfigError, InputError


def as_arrays(image, label, rng):
    """A transform returning what the dataset loaded."""
    return image, label


def write_pair(image_path, label_path, label, seed=0, fmt=None):
    """An RGB image (random pixels) of the label's size and the label as an 8-bit PNG."""
    rng = np.random.default_rng(seed)
    image_path.parent.mkdir(parents=True, exist_ok=True)
    label_path.parent.mkdir(parents=True, exist_ok=True)
    pixels = rng.integers(0, 256, (*label.shape, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(image_path, **({"quality": 95} if image_path.suffix == ".jpg" else {}))
    Image.fromarray(label.astype(np.uint8)).save(label_path)
    return pixels


def make_ade(root, n_train=3, n_val=2):
    for split, folder, n in (("train", "training", n_train), ("val", "validation", n_val)):
        for i in range(n):
            label = np.random.default_rng([i, len(split)]).integers(0, 151, (20, 24))
            name = f"ADE_{split}_{i:08d}"
            write_pair(root / "images" / folder / f"{name}.jpg", root / "annotations" / folder / f"{name}.png", label)
    return root


def make_folder(root, images="images", annotations="annotations", n=3, classes=("a", "b", "c"), suffix=".png"):
    """A folder layout of 3 classes; ``classes`` None: no classes.txt."""
    for split in ("train", "val"):
        for i in range(n):
            label = np.random.default_rng(i).integers(0, 3, (16, 12))
            label[0, 0] = 255
            write_pair(root / images / split / f"x{i}{suffix}", root / annotations / split / f"x{i}.png", label, seed=i)
    if classes is not None:
        (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


def test_reduce_zero_label_is_adek20ks_rule():
    label = np.array([[0, 1, 2], [150, 254, 255]], np.uint8)
    # literal restatement of mmseg 0.11 loading.py L139-143
    gt = label.copy()
    gt[gt == 0] = 255
    gt = gt - 1
    gt[gt == 254] = 255
    np.testing.assert_array_equal(reduce_zero_label(label), gt)
    np.testing.assert_array_equal(reduce_zero_label(label), [[255, 0, 1], [149, 253, 255]])


def test_ade20k_layout_detected_with_150_classes_and_reduced_labels(tmp_path):
    root = make_ade(tmp_path / "ADEChallengeData2016")
    train = build_segmentation_dataset(root, "train", as_arrays)
    val = build_segmentation_dataset(root, "val", as_arrays)
    assert (train.layout, len(train), len(val)) == ("ade20k", 3, 2)
    assert train.num_classes == 150 and train.classes == list(ADE20K_CLASSES) and train.classes[7] == "bed"
    assert train.reduce_zero_label and train.ignore_index == 255
    image, label, skipped = train[(1, 0)]
    stored = np.asarray(Image.open(root / "annotations/training/ADE_train_00000001.png"))
    np.testing.assert_array_equal(label, reduce_zero_label(stored))
    assert image.dtype == np.uint8 and image.shape == (20, 24, 3) and skipped == 0
    unreduced = build_segmentation_dataset(root, "train", as_arrays, reduce_zero_label=False, num_classes=151)
    assert unreduced[0][1].max() == 150 and unreduced.classes is None
    with pytest.raises(LabelFileError, match="value"):
        build_segmentation_dataset(root, "train", as_arrays, reduce_zero_label=False)[0]  # 150 is not a class


def test_folder_layouts_and_classes_file(tmp_path):
    root = make_folder(tmp_path / "a")
    data = build_segmentation_dataset(root, "val", as_arrays)
    assert (data.layout, data.num_classes, data.classes, data.reduce_zero_label) == ("folder", 3, ["a", "b", "c"], False)
    image, label, _ = data[0]
    np.testing.assert_array_equal(image, write_pair(tmp_path / "t.png", tmp_path / "t_l.png", label, seed=0))
    assert label[0, 0] == 255  # kept as ignore
    mmseg_names = make_folder(tmp_path / "b", images="img_dir", annotations="ann_dir", suffix=".jpg", classes=None)
    data = build_segmentation_dataset(mmseg_names, "train", as_arrays, num_classes=3)
    assert data.num_classes == 3 and data.classes is None and len(data) == 3
    assert data.pairs[0][1] == mmseg_names / "ann_dir" / "train" / "x0.png"


def test_folder_layout_without_a_class_count_is_a_clear_error(tmp_path):
    root = make_folder(tmp_path, classes=None)
    with pytest.raises(ConfigError, match="classes.txt"):
        build_segmentation_dataset(root, "train", as_arrays)
    (root / "classes.txt").write_text("a\nb\n")
    with pytest.raises(ConfigError, match="--num_classes 3 but .* names 2"):
        build_segmentation_dataset(root, "train", as_arrays, num_classes=3)


def test_layout_errors(tmp_path):
    with pytest.raises(InputError, match="cannot tell the segmentation layout"):
        build_segmentation_dataset(tmp_path, "train", as_arrays)
    with pytest.raises(InputError, match="not a folder"):
        build_segmentation_dataset(tmp_path / "nope", "train", as_arrays)
    with pytest.raises(ConfigError, match="unknown segmentation data_set"):
        build_segmentation_dataset(tmp_path, "train", as_arrays, data_set="coco")
    make_folder(tmp_path)
    with pytest.raises(InputError, match="no image folder .*training"):
        build_segmentation_dataset(tmp_path, "train", as_arrays, data_set="ade20k")
    with pytest.raises(ConfigError, match="split"):
        build_segmentation_dataset(tmp_path, "test", as_arrays)


def test_missing_annotations_are_listed(tmp_path):
    root = make_folder(tmp_path, n=8)
    for i in (2, 5, 6):
        (root / "annotations" / "train" / f"x{i}.png").unlink()
    with pytest.raises(InputError, match=r"3 of 8 images .* \(e\.g\. x2\.png, x5\.png, x6\.png\)"):
        build_segmentation_dataset(root, "train", as_arrays)


def test_label_values_outside_the_classes_name_the_file(tmp_path):
    root = make_folder(tmp_path)
    bad = np.zeros((16, 12), np.uint8)
    bad[3, 3] = 7
    Image.fromarray(bad).save(root / "annotations" / "train" / "x1.png")
    data = build_segmentation_dataset(root, "train", as_arrays)
    data[0]  # fine
    with pytest.raises(LabelFileError, match=r"x1\.png holds value\(s\) 7"):
        data[1]
    ade = make_ade(tmp_path / "ade", n_train=1)
    Image.fromarray(np.full((20, 24), 151, np.uint8)).save(ade / "annotations/training/ADE_train_00000000.png")
    with pytest.raises(LabelFileError, match=r"value\(s\) 151 .*reduces the zero label"):
        build_segmentation_dataset(ade, "train", as_arrays)[0]


def test_label_files_palette_colour_and_size(tmp_path):
    indices = np.array([[0, 1], [2, 255]], np.uint8)
    palette = Image.fromarray(indices, mode="L").convert("P")
    palette.putpalette([v for i in range(256) for v in (i, 255 - i, 7)])
    palette.save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_label_map(tmp_path / "p.png"), indices)  # indices, not colours
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(LabelFileError, match="RGB image; labels must be single-channel"):
        read_label_map(tmp_path / "rgb.png")
    root = make_folder(tmp_path / "f")
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(root / "annotations" / "val" / "x0.png")
    with pytest.raises(LabelFileError, match="5x5 but its image .* is 12x16"):
        build_segmentation_dataset(root, "val", as_arrays)[0]


def test_unreadable_files_are_skipped_counted_and_warned_once(tmp_path, caplog):
    root = make_folder(tmp_path, n=4)
    (root / "images" / "train" / "x1.png").write_bytes(b"not an image")
    good = (root / "annotations" / "train" / "x2.png").read_bytes()
    (root / "annotations" / "train" / "x2.png").write_bytes(good[: len(good) // 2])  # truncated label
    data = build_segmentation_dataset(root, "train", as_arrays, return_index=True)
    with caplog.at_level(logging.WARNING, logger="mcbeit.data.datasets"):
        *_, loaded, skipped = data[(1, 0)]
        assert (loaded, skipped) == (3, 2)
        *_, loaded, skipped = data[(1, 5)]
        assert (loaded, skipped) == (3, 2)  # counted every time
        assert data[(0, 0)][2:] == (0, 0)
    warnings = [r.getMessage() for r in caplog.records if "skipping unreadable" in r.getMessage()]
    assert len(warnings) == 2 and "x1.png" in warnings[0] and "x2.png" in warnings[1]


def test_items_are_deterministic_per_index_and_epoch(tmp_path):
    root = make_folder(tmp_path, n=2)
    transform = SegTrainTransform(crop_size=8, img_scale=(32, 8))
    a = SegmentationDataset(root, "train", transform, seed=3, layout="folder", reduce_zero_label=False, num_classes=3)
    b = SegmentationDataset(root, "train", transform, seed=3, layout="folder", reduce_zero_label=False, num_classes=3)
    first, again, other_epoch = a[(1, 4)], b[(1, 4)], a[(1, 5)]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1]) and first[2] == 0
    assert not torch.equal(first[0], other_epoch[0])
    assert first[0].shape == (3, 8, 8) and first[1].dtype == torch.int64


def test_eval_items_through_a_loader(tmp_path):
    root = make_folder(tmp_path, n=3)
    data = build_segmentation_dataset(root, "val", SegTestTransform(img_scale=(64, 16), crop_size=16),
                                      return_index=True)
    batches = list(DataLoader(data, batch_size=1, collate_fn=seg_collate))
    assert len(batches) == 3
    views, labels, index, skipped = batches[2]
    assert index.tolist() == [2] and skipped.tolist() == [0]
    image, flipped = views[0][0]
    assert image.shape == (3, 21, 16) and flipped is False and labels[0].shape == (16, 12)
