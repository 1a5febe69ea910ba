"""COCO detection datasets read as detectron2 reads them for the benchmarking recipe: sorted-id labels, crowd
annotations and empty images dropped in training only, polygons and RLE decoded, bad files skipped in training
and an error in testing."""

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from torch.utils.data import DataLoader

from mcbeit.data.detection import CocoDetection, build_detection_dataset, decode_segmentation, det_collate
from mcbeit.errors import ConfigError, InputError

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools, numpy 2

SIZES = {10: (48, 64), 20: (40, 40), 30: (56, 40), 40: (64, 48), 50: (40, 40)}  # image id -> (h, w)
CATEGORIES = [{"id": 7, "name": "seven"}, {"id": 2, "name": "two"}, {"id": 4, "name": "four"}]  # unsorted


def compressed(mask):
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def uncompressed(mask):
    flat = mask.T.ravel().astype(np.int8)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    runs = np.diff(bounds).tolist()
    return {"size": list(mask.shape), "counts": ([0] if flat[0] else []) + runs}


def rect(h, w, y0, y1, x0, x1):
    mask = np.zeros((h, w), np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def annotation(ann_id, image_id, category_id, segmentation, iscrowd=0):
    h, w = SIZES[image_id]
    if isinstance(segmentation, list):
        rle = mask_util.merge(mask_util.frPyObjects(segmentation, h, w)) if len(segmentation[0]) >= 6 else None
    else:
        rle = mask_util.frPyObjects(segmentation, h, w) if isinstance(segmentation["counts"], list) else segmentation
    bbox = [float(v) for v in mask_util.toBbox(rle)] if rle is not None else [1.0, 1.0, 4.0, 4.0]
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "segmentation": segmentation,
            "bbox": bbox, "area": float(bbox[2] * bbox[3]), "iscrowd": iscrowd}


def write_coco(folder):
    """Five images: 10 (polygon, compressed RLE, uncompressed RLE, crowd), 20 (crowd only), 30 (nothing),
    40 (polygon + a polygon of 2 points), 50 (polygon)."""
    images_dir = folder / "images"
    images_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = []
    for image_id, (h, w) in SIZES.items():
        name = f"{image_id:06d}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(images_dir / name)
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
    anns = [
        annotation(1, 10, 7, [[5.0, 5.0, 30.0, 6.0, 20.0, 30.0]]),
        annotation(2, 10, 2, compressed(rect(48, 64, 20, 40, 35, 60))),
        annotation(3, 10, 7, uncompressed(rect(48, 64, 0, 10, 50, 64))),
        annotation(4, 10, 4, compressed(rect(48, 64, 30, 47, 2, 20)), iscrowd=1),
        annotation(5, 20, 2, compressed(rect(40, 40, 5, 30, 5, 30)), iscrowd=1),
        annotation(6, 40, 4, [[10.0, 10.0, 40.0, 10.0, 40.0, 50.0, 10.0, 50.0]]),
        annotation(7, 40, 7, [[1.0, 1.0, 5.0, 5.0]]),  # 2 points: no valid polygon
        annotation(8, 50, 2, [[3.0, 3.0, 30.0, 3.0, 16.0, 35.0]]),
    ]
    ann_file = folder / "instances.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": CATEGORIES}))
    return images_dir, ann_file


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return write_coco(tmp_path_factory.mktemp("coco"))


@pytest.fixture
def coco_copy(tmp_path, coco):
    images_dir, ann_file = coco
    shutil.copytree(images_dir, tmp_path / "images")
    shutil.copy(ann_file, tmp_path / "instances.json")
    return tmp_path / "images", tmp_path / "instances.json"


def test_labels_are_sorted_category_ids_and_round_trip(coco):
    images_dir, ann_file = coco
    ds = CocoDetection(images_dir, ann_file, train=False, size=64)
    assert ds.categories == [(2, "two"), (4, "four"), (7, "seven")]
    assert ds.label_to_cat_id == {1: 2, 2: 4, 3: 7} and ds.num_classes == 3
    assert all(ds.cat_id_to_label[c] == label for label, c in ds.label_to_cat_id.items())
    gt = COCO(str(ann_file))
    for index, image_id in enumerate(ds.image_ids):
        _, target = ds[index]
        assert target["image_id"] == image_id
        expected = [a["category_id"] for a in gt.imgToAnns[image_id]]
        assert [ds.label_to_cat_id[int(label)] for label in target["labels"]] == expected


def test_training_drops_crowd_annotations_and_images_left_without_any(coco, caplog):
    images_dir, ann_file = coco
    with caplog.at_level(logging.INFO, logger="mcbeit.data.datasets"):
        ds = CocoDetection(images_dir, ann_file, train=True, size=64)
    assert ds.image_ids == [10, 40, 50]  # 20 (crowd only) and 30 (nothing) left out
    assert ds.stats["crowd_dropped"] == 2 and ds.stats["empty_dropped"] == 2 and ds.stats["no_valid_mask"] == 1
    logged = [r.getMessage() for r in caplog.records if "COCO training data" in r.getMessage()]
    assert len(logged) == 1 and "2 crowd annotations" in logged[0] and "2 images without annotations" in logged[0]
    assert [a[1:3] for a in ds.record(0)["anns"]] == [(3, 0), (1, 0), (3, 0)]  # image 10 without its crowd
    assert len(ds.record(1)["anns"]) == 1  # the 2-point polygon is dropped
    for key in range(len(ds)):
        _, target = ds[(key, 0)]
        assert (target["iscrowd"] == 0).all()
        assert set(target["labels"].tolist()) <= {a[1] for a in ds.record(key)["anns"]}


def test_testing_keeps_every_image_and_annotation_with_the_json_iscrowd(coco):
    images_dir, ann_file = coco
    ds = CocoDetection(images_dir, ann_file, train=False, size=64)
    assert ds.image_ids == sorted(SIZES)
    gt = COCO(str(ann_file))
    for index, image_id in enumerate(ds.image_ids):
        _, target = ds[index]
        assert target["iscrowd"].tolist() == [a["iscrowd"] for a in gt.imgToAnns[image_id]]
    _, empty = ds[ds.image_ids.index(30)]
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 64, 64) and empty["labels"].shape == (0,)


def test_polygon_and_rle_masks_decode_as_pycocotools(coco):
    images_dir, ann_file = coco
    gt = COCO(str(ann_file))
    kinds = set()
    for ann in gt.dataset["annotations"]:
        h, w = SIZES[ann["image_id"]]
        seg = ann["segmentation"]
        kinds.add("polygon" if isinstance(seg, list) else type(seg["counts"]).__name__)
        mask = decode_segmentation(seg, h, w)
        assert mask.dtype == np.uint8 and mask.shape == (h, w)
        if ann["id"] != 7:
            assert np.array_equal(mask, gt.annToMask(ann)) and mask.sum() > 0
        else:
            assert mask.sum() == 0  # a 2-point "polygon" is no mask (pycocotools would read 4 numbers as a box)
    assert kinds == {"polygon", "str", "list"}
    # image 10 is 48 x 64: at S = 64 it is not resized, so the target masks are the json's, padded with 0
    ds = CocoDetection(images_dir, ann_file, train=False, size=64)
    _, target = ds[ds.image_ids.index(10)]
    assert target["scale"] == 1.0 and target["orig_size"] == (48, 64)
    for mask, ann in zip(target["masks"], gt.imgToAnns[10], strict=True):
        assert torch.equal(mask[:48], torch.from_numpy(gt.annToMask(ann))) and mask[48:].sum() == 0
    xywh = torch.tensor([a["bbox"] for a in gt.imgToAnns[10]])
    assert torch.allclose(target["boxes"], torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1))


def test_target_keys_types_and_seeded_items(coco):
    images_dir, ann_file = coco
    ds = CocoDetection(images_dir, ann_file, train=True, size=48, seed=5)
    image, target = ds[(0, 0)]
    assert set(target) == {"boxes", "labels", "masks", "iscrowd", "image_id", "orig_size", "scale", "n_skipped"}
    assert image.shape == (3, 48, 48) and image.dtype == torch.float32
    assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
    assert target["masks"].dtype == torch.uint8 and target["iscrowd"].dtype == torch.uint8
    assert isinstance(target["image_id"], int) and target["orig_size"] == SIZES[10] and target["n_skipped"] == 0
    again, same = ds[(0, 0)]
    assert torch.equal(image, again) and torch.equal(target["boxes"], same["boxes"])
    assert any(not torch.equal(image, ds[(0, epoch)][0]) for epoch in (1, 2, 3))
    images, targets = next(iter(DataLoader(ds, batch_size=2, collate_fn=det_collate)))
    assert isinstance(images, list) and len(images) == 2 and [t["image_id"] for t in targets] == [10, 40]


def test_unreadable_image_is_skipped_in_training_and_an_error_in_testing(coco_copy, caplog):
    images_dir, ann_file = coco_copy
    (images_dir / "000040.png").write_bytes(b"not an image")
    Image.new("RGB", (41, 40)).save(images_dir / "000050.png")  # not the json's 40 x 40
    train = CocoDetection(images_dir, ann_file, train=True, size=48)
    with caplog.at_level(logging.WARNING, logger="mcbeit.data.datasets"):
        _, target = train[1]           # 40 unreadable, 50 the wrong size: on to 10
        train[1]
    assert target["image_id"] == 10 and target["n_skipped"] == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2  # once per file, however often it is met
    assert "000040.png" in warnings[0] and "000050.png" in warnings[1] and "says 40x40" in warnings[1]
    test = CocoDetection(images_dir, ann_file, train=False, size=48)
    with pytest.raises(InputError, match=r"000040\.png.*replace the file"):
        test[test.image_ids.index(40)]
    with pytest.raises(InputError, match=r"000050\.png is 41x40"):
        test[test.image_ids.index(50)]


def test_missing_image_files(coco_copy, caplog):
    images_dir, ann_file = coco_copy
    (images_dir / "000050.png").unlink()
    with caplog.at_level(logging.WARNING, logger="mcbeit.data.datasets"):
        train = CocoDetection(images_dir, ann_file, train=True, size=48)
    assert train.image_ids == [10, 40] and train.stats["missing"] == 1
    assert any("000050.png" in r.getMessage() for r in caplog.records)
    with pytest.raises(InputError, match=r"1 of the 5 images .* not in .*000050\.png"):
        CocoDetection(images_dir, ann_file, train=False, size=48)


def test_bad_annotation_files(tmp_path, coco):
    images_dir, ann_file = coco
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(InputError, match="cannot read the COCO annotation file"):
        CocoDetection(images_dir, broken, train=True)
    data = json.loads(ann_file.read_text())
    data["annotations"][0]["category_id"] = 99
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps(data))
    with pytest.raises(InputError, match="category_id 99"):
        CocoDetection(images_dir, unknown, train=True)


def test_build_detection_dataset_coco_layout(tmp_path, coco):
    images_dir, ann_file = coco
    with pytest.raises(InputError) as missing:
        build_detection_dataset(tmp_path, "val", size=48)
    assert "val2017" in str(missing.value) and "instances_val2017.json" in str(missing.value)
    (tmp_path / "annotations").mkdir()
    for split in ("train", "val"):
        shutil.copytree(images_dir, tmp_path / f"{split}2017")
        shutil.copy(ann_file, tmp_path / "annotations" / f"instances_{split}2017.json")
    train = build_detection_dataset(tmp_path, "train", size=48)
    val = build_detection_dataset(tmp_path, "val", size=48)
    assert train.train and len(train) == 3 and not val.train and len(val) == 5
    assert val.coco_ann_file == tmp_path / "annotations" / "instances_val2017.json"
    explicit = build_detection_dataset(None, "val", image_dir=images_dir, ann_file=ann_file, size=48)
    assert explicit.image_dir == images_dir and len(explicit) == 5
    with pytest.raises(ConfigError, match="split"):
        build_detection_dataset(tmp_path, "test")


def test_boxes_only_training_clips_the_transformed_boxes(coco):
    images_dir, ann_file = coco
    ds = CocoDetection(images_dir, ann_file, train=True, size=32, with_masks=False)
    assert ds.transform.recompute_boxes is False
    seen = 0
    for epoch in range(8):
        _, target = ds[(0, epoch)]
        assert "masks" not in target
        boxes = target["boxes"]
        assert (boxes >= 0).all() and (boxes <= 32).all() and ((boxes[:, 2:] - boxes[:, :2]) >= 1).all()
        seen += len(boxes)
    assert seen > 0
