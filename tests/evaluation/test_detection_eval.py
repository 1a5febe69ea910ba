"""Detection evaluation (issue 19): faster-coco-eval's box and mask AP against pycocotools on a small
synthetic COCO set, perfect and empty predictions, predictions at the padded input mapped back to the
original image (MIMDet's lsj_postprocess), the loop on one and two gloo processes (each image once),
and the picture."""
from __future__ import annotations

import copy
import json

import numpy as np
import pycocotools.mask as pmask
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.models.detection.roi_heads import paste_masks_in_image

from mcbeit.data.samplers import ShardSampler
from mcbeit.errors import ConfigError, InputError
from mcbeit.evaluation.detection import (AP_NAMES, coco_evaluate, evaluate_detection, flat_metrics, format_metrics,
                                         save_detection_visualisation, to_coco_results, valid_size)
from tests.tasks.conftest import free_port

pytestmark = [pytest.mark.usefixtures("one_thread"),
              # pycocotools.mask.decode under NumPy 2 (its __array__ takes no copy keyword): harmless, and not ours
              pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy:DeprecationWarning")]

S = 128  # network input side
CATEGORIES = [{"id": 1, "name": "circle"}, {"id": 3, "name": "square"}, {"id": 7, "name": "triangle"},
              {"id": 9, "name": "unused"}]
LABEL_TO_CAT = {i + 1: c["id"] for i, c in enumerate(CATEGORIES)}
CLASS_NAMES = [c["name"] for c in CATEGORIES]


# ---------------------------------------------------------------------- a small COCO set
def _rect(x0, y0, x1, y1):
    return [float(v) for v in (x0, y0, x1, y0, x1, y1, x0, y1)]


def _rle(segmentation, h, w):
    """Compressed RLE of polygons / an uncompressed RLE, counts as str."""
    rles = pmask.frPyObjects(segmentation, h, w)
    rle = pmask.merge(rles) if isinstance(rles, list) else rles
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _gt() -> dict:
    """4 images: a large, a medium and small objects (polygons, one in two parts), a crowd region (uncompressed
    RLE, as COCO stores crowds), an image without objects; category 9 has no annotation at all."""
    images = [{"id": 1, "height": 112, "width": 128, "file_name": "a.png"},
              {"id": 2, "height": 60, "width": 80, "file_name": "b.png"},
              {"id": 5, "height": 50, "width": 50, "file_name": "c.png"},
              {"id": 6, "height": 40, "width": 64, "file_name": "d.png"}]
    crowd = np.zeros((112, 128), dtype=np.uint8)
    crowd[4:20, 100:126] = 1
    crowd_counts = []  # column-major run lengths, starting with zeros
    flat, value, run = crowd.flatten(order="F"), 0, 0
    for v in flat:
        if v == value:
            run += 1
        else:
            crowd_counts.append(run)
            value, run = v, 1
    crowd_counts.append(run)
    objects = [  # image, category, segmentation, iscrowd
        (1, 1, [_rect(10, 8, 110, 104)], 0),                                   # large (9,600 px)
        (1, 3, [[100.0, 80.0, 120.0, 80.0, 110.0, 100.0]], 0),                 # small triangle
        (1, 1, {"size": [112, 128], "counts": crowd_counts}, 1),               # crowd
        (2, 7, [_rect(20, 10, 60, 50)], 0),                                    # medium
        (2, 3, [_rect(65, 40, 77, 50)], 0),                                    # small
        (5, 1, [_rect(2, 2, 20, 22), _rect(30, 30, 44, 46)], 0),               # two parts
        (5, 7, [_rect(25, 5, 47, 25)], 0),
    ]
    sizes = {im["id"]: (im["height"], im["width"]) for im in images}
    annotations = []
    for k, (image_id, cat, segm, crowd_flag) in enumerate(objects):
        h, w = sizes[image_id]
        rle = _rle(segm, h, w)
        annotations.append({"id": k + 1, "image_id": image_id, "category_id": cat, "segmentation": segm,
                            "area": float(pmask.area(rle)), "bbox": [float(v) for v in pmask.toBbox(rle)],
                            "iscrowd": crowd_flag})
    return {"images": images, "annotations": annotations, "categories": CATEGORIES}


def _perfect(gt: dict) -> list[dict]:
    sizes = {im["id"]: (im["height"], im["width"]) for im in gt["images"]}
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]), "score": 1.0,
             "segmentation": _rle(a["segmentation"], *sizes[a["image_id"]])}
            for a in gt["annotations"] if not a["iscrowd"]]


def _noisy(gt: dict, seed: int = 0) -> list[dict]:
    """Shifted copies of the objects (box and mask), random scores, a wrong class, false positives and a
    detection on the crowd region (ignored by COCOeval, not a false positive)."""
    rng = np.random.default_rng(seed)
    sizes = {im["id"]: (im["height"], im["width"]) for im in gt["images"]}
    out = []
    for a in gt["annotations"]:
        h, w = sizes[a["image_id"]]
        mask = pmask.decode(_rle(a["segmentation"], h, w))
        for _ in range(2):
            dy, dx = (int(v) for v in rng.integers(-3, 4, 2))
            shifted = np.roll(mask, (dy, dx), axis=(0, 1))
            rle = pmask.encode(np.asfortranarray(shifted))
            rle["counts"] = rle["counts"].decode("ascii")
            box = [float(v) for v in pmask.toBbox(rle)]
            cat = a["category_id"] if rng.random() > 0.2 else 3
            out.append({"image_id": a["image_id"], "category_id": cat, "bbox": box, "score": float(rng.random()),
                        "segmentation": rle})
    for image_id, (h, w) in sizes.items():
        x0, y0 = (int(v) for v in rng.integers(0, min(h, w) // 2, 2))
        m = np.zeros((h, w), dtype=np.uint8, order="F")
        m[y0:y0 + 9, x0:x0 + 11] = 1
        rle = pmask.encode(m)
        rle["counts"] = rle["counts"].decode("ascii")
        out.append({"image_id": image_id, "category_id": 7, "bbox": [float(x0), float(y0), 11.0, 9.0],
                    "score": float(rng.random()), "segmentation": rle})
    return out


# ---------------------------------------------------------------------- COCOeval
def test_faster_coco_eval_matches_pycocotools_on_boxes_and_masks():
    gt, results = _gt(), _noisy(_gt())
    before = copy.deepcopy(results)
    fast = coco_evaluate(gt, results, backend="faster")
    ref = coco_evaluate(gt, results, backend="pycocotools")
    assert results == before                                           # the caller's results are not written to
    for iou_type in ("bbox", "segm"):
        assert len(fast[iou_type]["stats"]) == 12
        np.testing.assert_allclose(fast[iou_type]["stats"], ref[iou_type]["stats"], rtol=1e-12, atol=1e-12)
        assert fast[iou_type]["per_category"].keys() == ref[iou_type]["per_category"].keys()
        np.testing.assert_allclose(list(fast[iou_type]["per_category"].values()),
                                   list(ref[iou_type]["per_category"].values()), rtol=1e-12, equal_nan=True)
        for i, name in enumerate(AP_NAMES):                            # percent of COCOeval's stats
            assert fast[iou_type][name] == pytest.approx(100 * ref[iou_type]["stats"][i])
        assert 5 < fast[iou_type]["AP"] < 95                           # a non-trivial score
        assert np.isnan(fast[iou_type]["per_category"]["unused"])     # no ground truth: NaN, as detectron2
    # the mask split small / medium / large uses the mask's area: bbox and segm differ on the triangle's image
    assert fast["bbox"]["stats"] != fast["segm"]["stats"]


def _pycocotools_stats(gt, results, iou_type):
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        evaluator = COCOeval(coco, coco.loadRes(copy.deepcopy(results)), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return list(evaluator.stats)


def test_mask_ap_sizes_detections_by_their_mask_not_their_box_as_detectron2():
    """A false positive whose mask is small (an L, 79 px) but whose box is medium (40 x 40): detectron2 drops
    the results' boxes for segm, so it counts against APs; with the box kept COCOeval would call it medium."""
    gt = {"images": [{"id": 1, "height": 64, "width": 64}], "categories": CATEGORIES[:1],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": [_rect(2, 2, 12, 12)],
                           "area": 100.0, "bbox": [2.0, 2.0, 10.0, 10.0], "iscrowd": 0}]}
    ell = np.zeros((64, 64), dtype=np.uint8, order="F")
    ell[20:60, 20:22] = 1
    ell[58:60, 20:60] = 1
    fp = pmask.encode(ell)
    fp["counts"] = fp["counts"].decode("ascii")
    results = [{"image_id": 1, "category_id": 1, "bbox": [2.0, 2.0, 10.0, 10.0], "score": 0.9,
                "segmentation": _rle([_rect(2, 2, 12, 12)], 64, 64)},
               {"image_id": 1, "category_id": 1, "bbox": [20.0, 20.0, 40.0, 40.0], "score": 0.95, "segmentation": fp}]
    without_box = _pycocotools_stats(gt, [{k: v for k, v in r.items() if k != "bbox"} for r in results], "segm")
    with_box = _pycocotools_stats(gt, results, "segm")
    assert without_box[3] < 0.9 and with_box[3] == pytest.approx(1.0)  # APs
    for backend in ("faster", "pycocotools"):
        got = coco_evaluate(gt, results, iou_types=("segm",), backend=backend)["segm"]["stats"]
        np.testing.assert_allclose(got, without_box, rtol=1e-12)


def test_perfect_predictions_score_100_and_a_dict_path_or_coco_object_give_the_same(tmp_path):
    gt = _gt()
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    from faster_coco_eval import COCO
    from pycocotools.coco import COCO as PyCOCO
    for source in (gt, path, COCO(str(path)), PyCOCO(str(path))):
        for backend in ("faster", "pycocotools"):
            m = coco_evaluate(source, _perfect(gt), backend=backend)
            for iou_type in ("bbox", "segm"):
                assert [m[iou_type][k] for k in AP_NAMES] == pytest.approx([100.0] * 6)
                assert [m[iou_type]["per_category"][c] for c in CLASS_NAMES[:3]] == pytest.approx([100.0] * 3)
    assert gt == _gt()                                                 # the gt dict is left as it was


def test_no_detections_give_zero_ap_where_there_is_ground_truth():
    gt = _gt()
    for backend in ("faster", "pycocotools"):
        m = coco_evaluate(gt, [], backend=backend)
        for iou_type in ("bbox", "segm"):
            assert [m[iou_type][k] for k in AP_NAMES] == [0.0] * 6
            assert m[iou_type]["per_category"]["circle"] == 0.0
            assert np.isnan(m[iou_type]["per_category"]["unused"])
    # only image 6 (no objects): no ground truth anywhere, NaN as COCOeval's -1
    m = coco_evaluate(gt, [], iou_types=("bbox",), img_ids=[6])
    assert all(np.isnan(m["bbox"][k]) for k in AP_NAMES)


def test_img_ids_restrict_the_evaluation_and_bad_results_are_named():
    gt = _gt()
    results = _noisy(gt)
    only = coco_evaluate(gt, results, img_ids=[2])
    sub = {**gt, "images": [im for im in gt["images"] if im["id"] == 2],
           "annotations": [a for a in gt["annotations"] if a["image_id"] == 2]}
    want = coco_evaluate(sub, [r for r in results if r["image_id"] == 2], backend="pycocotools")
    np.testing.assert_allclose(only["segm"]["stats"], want["segm"]["stats"], rtol=1e-12)
    with pytest.raises(InputError, match="image_id 99"):
        coco_evaluate(gt, [{**results[0], "image_id": 99}])
    with pytest.raises(InputError, match="category_id 4"):
        coco_evaluate(gt, [{**results[0], "category_id": 4}])
    with pytest.raises(InputError, match="iou_types=\\('bbox',\\)"):
        coco_evaluate(gt, [{k: v for k, v in results[0].items() if k != "segmentation"}])
    flat = flat_metrics(only)
    assert flat["segm/AP"] == only["segm"]["AP"] and "bbox/AP-triangle" in flat
    assert "Evaluation results for segm" in format_metrics(only)


# ---------------------------------------------------------------------- predictions at the input -> original pixels
def _target(image_id, h, w, size=S):
    return {"image_id": image_id, "orig_size": (h, w), "scale": min(size / h, size / w)}


def test_to_coco_results_maps_boxes_and_masks_back_to_the_original_image():
    """Original 60 x 80 at S = 128: scale 1.6, the resized image is the input's top 96 rows."""
    target = _target(4, 60, 80)
    assert valid_size(target, (S, S)) == (96, 128)
    masks = torch.zeros(3, 1, S, S)
    masks[0, 0, 32:64, 16:48] = 1.0        # = original rows 20:40, cols 10:30
    masks[0, 0, 70:80, 0:50] = 0.4         # below the 0.5 threshold
    masks[0, 0, 100:, :] = 1.0             # in the padding: cropped away
    masks[1, 0, 90:120, 0:24] = 1.0        # runs into the padding: original rows 56.25:60, cols 0:15
    masks[2, 0, 100:120, 10:30] = 1.0
    outputs = [{"boxes": torch.tensor([[16.0, 32.0, 48.0, 64.0],    # -> [10, 20, 30, 40]
                                       [0.0, 90.0, 24.0, 120.0],    # -> clipped to y 60
                                       [10.0, 100.0, 30.0, 120.0]]),  # only padding: empty after the clip
                "labels": torch.tensor([1, 3, 1]), "scores": torch.tensor([0.9, 0.8, 0.7]), "masks": masks}]
    results = to_coco_results(outputs, [target], LABEL_TO_CAT)
    assert len(results) == 2
    first, second = results
    assert (first["image_id"], first["category_id"], second["category_id"]) == (4, 1, 7)
    assert first["bbox"] == pytest.approx([10.0, 20.0, 20.0, 20.0])
    assert second["bbox"] == pytest.approx([0.0, 56.25, 15.0, 3.75])
    assert first["score"] == pytest.approx(0.9) and isinstance(first["score"], float)
    assert isinstance(first["segmentation"]["counts"], str) and first["segmentation"]["size"] == [60, 80]
    want = np.zeros((60, 80), dtype=np.uint8)
    want[20:40, 10:30] = 1
    assert np.array_equal(pmask.decode(first["segmentation"]), want)
    want = np.zeros((60, 80), dtype=np.uint8)
    want[56:60, 0:15] = 1
    assert np.array_equal(pmask.decode(second["segmentation"]), want)
    # a dataset's categories list and a list of ids give the same mapping; a label with no category is named
    as_pairs = to_coco_results(outputs, [target], [(c["id"], c["name"]) for c in CATEGORIES])
    assert as_pairs == results == to_coco_results(outputs, [target], [c["id"] for c in CATEGORIES])
    with pytest.raises(InputError, match="label 3"):
        to_coco_results(outputs, [target], {1: 1})
    # boxes only
    boxes_only = to_coco_results([{k: v for k, v in outputs[0].items() if k != "masks"}], [target], LABEL_TO_CAT)
    assert [r["bbox"] for r in boxes_only] == [r["bbox"] for r in results] and "segmentation" not in boxes_only[0]
    assert to_coco_results([{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
                             "scores": torch.zeros(0), "masks": torch.zeros(0, 1, S, S)}], [target], LABEL_TO_CAT) == []


def test_a_mask_pasted_by_torchvision_lands_on_its_box_in_the_original_image():
    """torchvision's MaskRCNN pastes its 28 x 28 masks into the input (paste_masks_in_image): mapped back,
    the mask fills the box mapped back, up to one input pixel (1.6 original pixels here): the paste rounds the
    box to integers and counts its right / bottom edge in (the legacy ``x1 - x0 + 1`` width)."""
    target = _target(2, 60, 80)
    boxes = torch.tensor([[20.0, 30.0, 70.0, 60.0], [64.0, 8.0, 120.0, 90.0]])
    pasted = paste_masks_in_image(torch.ones(2, 1, 28, 28), boxes, (S, S))  # (2,1,S,S)
    results = to_coco_results([{"boxes": boxes, "labels": torch.tensor([1, 2]), "scores": torch.tensor([0.9, 0.6]),
                                "masks": pasted}], [target], LABEL_TO_CAT)
    for r, box in zip(results, (boxes / 1.6).tolist(), strict=True):
        assert r["bbox"] == pytest.approx([box[0], box[1], box[2] - box[0], box[3] - box[1]])
        x, y, w, h = pmask.toBbox(r["segmentation"])
        np.testing.assert_allclose([x, y, x + w, y + h], box, atol=1.6)


def test_box_level_masks_are_pasted_at_the_original_size_and_agree_with_the_input_sized_route():
    """mask_kind='roi' (what evaluate_detection asks the detector for): the 28 x 28 masks pasted straight into
    the original image at the boxes mapped back, as detectron2; the same masks pasted into the input first and
    mapped back give the same outline up to the resampling (IoU > 0.9), and the same boxes."""
    target = _target(2, 60, 80)
    boxes = torch.tensor([[20.0, 30.0, 70.0, 60.0], [64.0, 8.0, 120.0, 90.0]])
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 28), torch.linspace(-1, 1, 28), indexing="ij")
    raw = torch.stack([(xx ** 2 + yy ** 2 < 0.8).float(), (xx.abs() + yy.abs() < 1.0).float()])[:, None]  # (2,1,28,28)
    out = {"boxes": boxes, "labels": torch.tensor([1, 2]), "scores": torch.tensor([0.9, 0.6])}
    roi = to_coco_results([{**out, "masks": raw, "mask_kind": "roi"}], [target], LABEL_TO_CAT)
    via_input = to_coco_results([{**out, "masks": paste_masks_in_image(raw, boxes, (S, S))}], [target], LABEL_TO_CAT)
    for a, b in zip(roi, via_input, strict=True):
        assert a["bbox"] == b["bbox"] and a["segmentation"]["size"] == [60, 80]
        iou = pmask.iou([a["segmentation"]], [b["segmentation"]], [0])[0, 0]
        assert iou > 0.9
    expected = paste_masks_in_image(raw, boxes / 1.6, (60, 80))[:, 0] >= 0.5  # the original-size paste itself
    for r, m in zip(roi, expected, strict=True):
        np.testing.assert_array_equal(pmask.decode(r["segmentation"]).astype(bool), m.numpy())


# ---------------------------------------------------------------------- the loop, 1 and 2 processes
class _Scenes(Dataset):
    """The gt's images as the test pipeline gives them (S x S, resized image top-left), plus a fifth image
    id 7 (added to the gt by _gt5); the image's index is written into its bottom-right padding pixel."""

    def __init__(self, gt):
        self.images = gt["images"]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        im = self.images[index]
        g = torch.Generator().manual_seed(index)
        image = torch.rand(3, S, S, generator=g)
        image[:, -1, -1] = index / 255.0
        return image, _target(im["id"], im["height"], im["width"])


class _Oracle(nn.Module):
    """A 'detector' that returns, for the image it is shown, imperfect copies of that image's ground truth at
    the input's pixels (torchvision's eval output format): the loop's bookkeeping is what is tested."""

    def __init__(self, gt):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))  # a module with a parameter, as a model has
        self.detections = []
        rng = np.random.default_rng(1)
        cat_to_label = {c: lb for lb, c in LABEL_TO_CAT.items()}
        for im in gt["images"]:
            h, w = im["height"], im["width"]
            t = _target(im["id"], h, w)
            scale, (rh, rw) = t["scale"], valid_size(t, (S, S))
            boxes, labels, scores, masks = [], [], [], []
            for a in gt["annotations"]:
                if a["image_id"] != im["id"] or a["iscrowd"] or rng.random() < 0.2:
                    continue
                x, y, bw, bh = (v + rng.uniform(-2, 2) for v in a["bbox"])
                boxes.append([x * scale, y * scale, (x + bw) * scale, (y + bh) * scale])
                labels.append(cat_to_label[a["category_id"]] if rng.random() > 0.15 else 2)
                scores.append(float(rng.uniform(0.3, 1.0)))
                m = torch.from_numpy(pmask.decode(_rle(a["segmentation"], h, w))).float()
                full = torch.zeros(1, S, S)
                full[0, :rh, :rw] = F.interpolate(m[None, None], size=(rh, rw), mode="bilinear")[0, 0]
                masks.append(full)
            boxes.append([4.0, 4.0, 30.0, 24.0])                       # a false positive everywhere
            labels.append(3)
            scores.append(0.5)
            full = torch.zeros(1, S, S)
            full[0, 4:24, 4:30] = 1.0
            masks.append(full)
            self.detections.append({"boxes": torch.tensor(boxes), "labels": torch.tensor(labels),
                                    "scores": torch.tensor(scores), "masks": torch.stack(masks)})

    def forward(self, images):
        assert not self.training, "evaluation must run in eval mode"
        self.autocast = torch.is_autocast_enabled("cpu")
        return [copy.deepcopy(self.detections[round(float(image[0, -1, -1]) * 255)]) for image in images]


def _gt5():
    gt = _gt()
    gt["images"].append({"id": 7, "height": 90, "width": 70, "file_name": "e.png"})
    gt["annotations"].append({"id": 100, "image_id": 7, "category_id": 3, "segmentation": [_rect(10, 20, 50, 80)],
                              "area": 2400.0, "bbox": [10.0, 20.0, 40.0, 60.0], "iscrowd": 0})
    return gt


def _lists(batch):
    """det_collate: (list of images, list of targets)."""
    return tuple(list(field) for field in zip(*batch, strict=True))


def _loader(gt, world=1, rank=0, sharded=True):
    data = _Scenes(gt)
    sampler = ShardSampler(len(data), world, rank) if sharded else None
    return DataLoader(data, sampler=sampler, batch_size=2, collate_fn=_lists)


def _evaluate(gt, path, loader, **kwargs):
    return evaluate_detection(_Oracle(gt), loader, torch.device("cpu"), path, LABEL_TO_CAT, **kwargs)


def _numbers(m):
    return {t: m[t]["stats"] for t in ("bbox", "segm")}, m["images"], m["detections"]


def _worker(rank, world, port, path, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        gt = _gt5()
        out = {"sharded": _evaluate(gt, path, _loader(gt, world, rank), visualise=2),
               "whole": _evaluate(gt, path, _loader(gt, sharded=False)),     # every rank every image
               "first3": _evaluate(gt, path, _loader(gt, world, rank), max_images=3)}
        shown = out["sharded"]["visualisation"]
        out = {k: _numbers(v) for k, v in out.items()}
        out["shown_ids"] = [t["image_id"] for t in shown["targets"]]
        torch.save(out, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_evaluate_counts_each_image_once_on_one_and_two_processes(tmp_path):
    gt = _gt5()
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    model = _Oracle(gt).train()
    single = evaluate_detection(model, _loader(gt), torch.device("cpu"), path, LABEL_TO_CAT, amp=True, visualise=3)
    assert model.training                                              # its mode restored
    # the loop's metrics are those of the COCO results of every image, evaluated directly
    outputs = [model.detections[i] for i in range(5)]
    targets = [_Scenes(gt)[i][1] for i in range(5)]
    direct = coco_evaluate(gt, to_coco_results(outputs, targets, LABEL_TO_CAT), backend="pycocotools")
    for t in ("bbox", "segm"):
        np.testing.assert_allclose(single[t]["stats"], direct[t]["stats"], rtol=1e-12)
        assert 10 < single[t]["AP"] < 95
    assert single["images"] == 5 and single["detections"] == sum(len(o["scores"]) for o in outputs)
    shown = single["visualisation"]
    assert [t["image_id"] for t in shown["targets"]] == [1, 2, 5]
    assert shown["images"][0].dtype == torch.uint8 and shown["images"][0].shape == (3, S, S)
    assert all(o["scores"].min() >= 0.5 and o["masks"].dtype == torch.bool for o in shown["outputs"])
    assert not model.autocast                                          # amp=True: CUDA only
    grid = save_detection_visualisation(None, **shown, class_names=CLASS_NAMES, max_side=64, columns=3)
    assert grid.shape == (64, 3 * 64 + 2 * 4, 3)                       # the kept images, cropped to their valid part
    evaluate_detection(model, _loader(gt), torch.device("cpu"), gt, LABEL_TO_CAT, amp_dtype=torch.bfloat16,
                       iou_types=("bbox",), max_images=1)
    assert model.autocast and model.training
    with pytest.raises(ConfigError, match="not both"):
        evaluate_detection(model, _loader(gt), torch.device("cpu"), gt, LABEL_TO_CAT, amp=True,
                           amp_dtype=torch.bfloat16)
    first3 = evaluate_detection(_Oracle(gt), _loader(gt), torch.device("cpu"), path, LABEL_TO_CAT, max_images=3)
    want3 = coco_evaluate(gt, to_coco_results(outputs[:3], targets[:3], LABEL_TO_CAT), img_ids=[1, 2, 5])
    assert first3["images"] == 3 and first3["bbox"]["stats"] == want3["bbox"]["stats"]
    assert first3["bbox"]["stats"] != single["bbox"]["stats"]

    mp.spawn(_worker, args=(2, free_port(), str(path), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for result in ranks:
        assert result["sharded"] == _numbers(single)                   # shards 3 + 2 images, each counted once
        assert result["whole"] == _numbers(single)                     # both ranks saw all: deduplicated
        assert result["first3"] == _numbers(first3)                    # images 0, 2 on rank 0 and 1 on rank 1
    assert ranks[0]["shown_ids"] == [1, 5] and ranks[1]["shown_ids"] == []  # rank 0 shows its shard's first


def test_an_empty_loader_is_an_error():
    gt = _gt()
    with pytest.raises(InputError, match="empty"):
        evaluate_detection(_Oracle(gt), [], torch.device("cpu"), gt, LABEL_TO_CAT)


# ---------------------------------------------------------------------- pictures
def test_visualisation_draws_masks_boxes_and_labels_into_a_png(tmp_path):
    gt = _gt5()
    data, oracle = _Scenes(gt), _Oracle(gt)
    images = [data[i][0] for i in range(3)]
    targets = [data[i][1] for i in range(3)]
    outputs = [oracle.detections[i] for i in range(3)]
    outputs[2] = {**outputs[2], "scores": outputs[2]["scores"].clone()}
    outputs[2]["scores"][:] = 0.1                                      # nothing to draw on the third
    path = tmp_path / "vis" / "det.png"
    grid = save_detection_visualisation(path, images, outputs, CLASS_NAMES, targets=targets, max_side=64, columns=2)
    # valid regions 112 x 128, 96 x 128 and 128 x 128 shrunk to at most 64: cells of 64 x 64, 2 columns, 2 rows
    assert grid.shape == (64 + 4 + 64, 64 + 4 + 64, 3) and grid.dtype == np.uint8
    with Image.open(path) as im:
        assert im.format == "PNG" and np.array_equal(np.asarray(im.convert("RGB")), grid)
    assert sorted(p.name for p in path.parent.iterdir()) == ["det.png"]  # no temporary file left
    plain = F.interpolate(images[2][None], size=(64, 64), mode="bilinear", antialias=True)[0]
    plain = (plain * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    third = grid[68:, :64]
    assert np.abs(third.astype(int) - plain.astype(int)).max() <= 1     # the third image untouched
    first_plain = F.interpolate(images[0][None, :, :112], size=(56, 64), mode="bilinear", antialias=True)[0]
    first_plain = (first_plain * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    drawn = grid[:56, :64]
    assert np.abs(drawn.astype(int) - first_plain.astype(int)).mean() > 10  # masks and boxes drawn on the first
    assert (grid[56:64, :64] == 255).all()                             # the cell's rest is white
    assert save_detection_visualisation(None, images[:1], outputs[:1], CLASS_NAMES).shape == (S, S, 3)
