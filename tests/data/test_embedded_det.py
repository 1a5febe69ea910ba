"""The embedded detection data: generated once, atomically and deterministically, as valid COCO json that
pycocotools reads, with polygons, RLE, crowd regions and empty scenes; the detection dataset reads it."""

import json
import os
import time

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from mcbeit.data import embedded_det
from mcbeit.data.detection import build_detection_dataset
from mcbeit.data.embedded_det import EMBEDDED_DET_CATEGORIES, embedded_detection_root, generate_embedded_detection

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools, numpy 2


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    cache = tmp_path_factory.mktemp("mcbeit_cache")
    start = time.perf_counter()
    root = embedded_detection_root(cache)
    return cache, root, time.perf_counter() - start


def test_generated_once_in_coco_layout(generated, monkeypatch):
    cache, root, elapsed = generated
    assert elapsed < 5, elapsed
    assert root == cache / embedded_det.VERSION
    assert not [p for p in cache.iterdir() if ".tmp-" in p.name]
    assert sorted(p.name for p in (root / "annotations").iterdir()) == ["instances_train2017.json",
                                                                       "instances_val2017.json"]
    stamp = os.stat(root / "annotations" / "instances_val2017.json").st_mtime_ns

    def fail(dest):
        raise AssertionError("regenerated a complete tree")

    monkeypatch.setattr(embedded_det, "generate_embedded_detection", fail)
    assert embedded_detection_root(cache) == root
    assert os.stat(root / "annotations" / "instances_val2017.json").st_mtime_ns == stamp


@pytest.mark.parametrize("split, count", [("train", 96), ("val", 24)])
def test_valid_coco_with_polygons_rle_crowds_and_empty_scenes(generated, split, count):
    _, root, _ = generated
    gt = COCO(str(root / "annotations" / f"instances_{split}2017.json"))
    assert len(gt.imgs) == count and {c["id"] for c in gt.loadCats(gt.getCatIds())} == {3, 5, 8, 13}
    assert [c["id"] for c in gt.dataset["categories"]] == [c[0] for c in EMBEDDED_DET_CATEGORIES]
    kinds, shapes, per_image = set(), set(), []
    for image_id, info in gt.imgs.items():
        image = Image.open(root / f"{split}2017" / info["file_name"])
        assert image.size == (info["width"], info["height"]) and image.mode == "RGB"
        assert 128 in image.size and all(96 <= s <= 160 for s in image.size)
        shapes.add(image.size)
        anns = gt.imgToAnns[image_id]
        per_image.append((sum(1 - a["iscrowd"] for a in anns), sum(a["iscrowd"] for a in anns)))
        for ann in anns:
            mask = gt.annToMask(ann)
            seg = ann["segmentation"]
            kinds.add(("crowd " if ann["iscrowd"] else "") + ("polygon" if isinstance(seg, list)
                                                              else type(seg["counts"]).__name__))
            assert ann["area"] == mask.sum() > 0
            ys, xs = np.nonzero(mask)
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    assert len(shapes) > 5  # varied sizes and aspect ratios
    assert {"polygon", "str", "list", "crowd str"} <= kinds
    objects = [n for n, _ in per_image]
    assert max(objects) <= 4 and objects.count(0) >= 2  # a few scenes with no object (empty or crowd only)
    assert sum(c for _, c in per_image) >= 2
    if split == "train":
        assert any(n == 0 and c > 0 for n, c in per_image) and sum(n >= 2 for n in objects) > 20


def test_objects_overlap_and_differ_by_category(generated):
    _, root, _ = generated
    gt = COCO(str(root / "annotations" / "instances_train2017.json"))
    occluded = sum(isinstance(a["segmentation"], dict) for a in gt.dataset["annotations"] if not a["iscrowd"])
    assert occluded >= 10  # overlaps: the visible part of an occluded object is an RLE
    counts = {c: len(gt.getAnnIds(catIds=[c], iscrowd=False)) for c in (3, 5, 8, 13)}
    assert min(counts.values()) >= 30, counts


def test_deterministic(generated, tmp_path):
    _, root, _ = generated
    generate_embedded_detection(tmp_path)
    for split in ("train", "val"):
        name = f"annotations/instances_{split}2017.json"
        assert json.loads((tmp_path / name).read_text()) == json.loads((root / name).read_text())


def test_detection_dataset_reads_it(generated):
    _, root, _ = generated
    train = build_detection_dataset(root, "train", size=64)
    val = build_detection_dataset(root, "val", size=64)
    assert len(val) == 24 and 80 <= len(train) < 96  # the scenes with no object are not trained on
    assert train.categories == [(3, "disc"), (5, "square"), (8, "triangle"), (13, "cross")]  # sorted ids
    image, target = train[(0, 0)]
    assert image.shape == (3, 64, 64) and target["masks"].shape[1:] == (64, 64)
