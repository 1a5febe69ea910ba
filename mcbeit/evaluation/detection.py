"""COCO box and mask AP of a Mask R-CNN, as detectron2's ``COCOEvaluator`` reports it after MIMDet's
``lsj_postprocess`` (the mc-BEiT detection benchmark).

What the original does, per test image (detectron2 0.6 + MIMDet ``models/modeling/postprocessing.py``):

    input    ResizeShortestEdge(S, max_size=S) then FixedSizeCrop(S): the image resized by
             ``scale = min(S/h, S/w)`` to ``(int(h*scale + 0.5), int(w*scale + 0.5))`` in the top-left
             corner of an S x S input padded right / bottom
    boxes    xyxy at the input's pixels times ``max(w / S, h / S)`` (= 1 / scale), clipped to the
             original (h, w); boxes left empty by the clip are dropped with their masks
    masks    the 28 x 28 box-level mask probabilities pasted into the ORIGINAL image at the rescaled
             box (detectron2 ``paste_masks_in_image``: bilinear ``grid_sample``) and thresholded at 0.5
    json     ``instances_to_coco_json``: bbox as xywh, the mask as compressed RLE (counts a str), the
             contiguous label mapped back to the COCO category id, the score
    AP       pycocotools' ``COCOeval`` (detectron2's C++ copy of it) per iou type over every image of
             the gt json; for ``segm`` the results lose their ``bbox`` first, so the small / medium /
             large split uses the mask's area, not the box's. Reported x 100, ``-1`` (no ground truth
             in that area range) as NaN; per category: the mean precision over IoU 0.50:0.95 and
             recall, area all, 100 detections (``AP-<name>``), NaN for a category without ground truth

What we do:

    boxes    the same: ``/ scale`` (the target's, = MIMDet's ``max(w / S, h / S)`` for a square
             input), clipped, empty ones dropped
    masks    torchvision's ``MaskRCNN`` has already pasted its 28 x 28 masks into the S x S input
             (``roi_heads.paste_masks_in_image``: the box widened by one mask pixel each side, its
             corners truncated to integers, the mask resized bilinearly to ``x1 - x0 + 1`` by
             ``y1 - y0 + 1`` pixels, the legacy inclusive-corner convention); the box-level masks are
             gone. So the valid region of the input (the resized image, ``int(h*scale + 0.5) x
             int(w*scale + 0.5)``) is cropped out of the probabilities, resized bilinearly
             (``align_corners=False``) to (h, w), and thresholded ``>= 0.5`` as detectron2.
             The difference to detectron2: the mask passes through two bilinear resamplings instead of
             one, and its box through torchvision's integer rounding and ``+ 1`` at the input's
             resolution; the outline can move by up to about one input pixel (0.6 original pixels for a
             640 x 480 COCO image at S = 1024), against a box-level mask of 28 cells over the object.
             :func:`evaluate_detection` avoids that: it asks a detector with a ``transform.paste_masks``
             switch (:class:`mcbeit.models.detection.FixedSizeTransform`) for the box-level masks
             (``mask_kind='roi'``) and pastes them into the ORIGINAL image at the rescaled boxes, as
             detectron2 does (with torchvision's ``paste_masks_in_image``: the rounding above, at the
             original's resolution), which is also much faster than resizing S x S maps.
    AP       faster-coco-eval's ``COCOeval_faster`` (the same C++ evaluation detectron2 calls
             ``COCOeval_opt``), or pycocotools' ``COCOeval`` as the oracle; the same ``segm`` / NaN /
             per-category rules. Over the images actually evaluated (all of the gt json's when the
             loader covers the set), so a run limited to ``max_images`` is scored on those images only.
    empty    no detection at all: detectron2 skips COCOeval ("No predictions from the model!") and
             reports NaN for every metric. We run COCOeval on an empty result set instead, which gives
             what the definition gives: AP 0 wherever there is ground truth (nothing found), NaN only
             where there is none (as for any other result set). A model that finds nothing then
             scores 0, not NaN, so a best-checkpoint choice or a plot does not trip over it.

Distributed: each rank predicts its shard (``ShardSampler``: each image once), the per-image results
are gathered on rank 0 (``gather_object``; over a gloo group when the default one is NCCL, as
detectron2 does, so the json does not pass through GPU memory), deduplicated by ``image_id``
(the first rank's copy kept), evaluated there, and the metrics broadcast to every rank.
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from faster_coco_eval.core import mask as mask_api
from PIL import Image
from torch import Tensor, nn

from mcbeit.engine.checkpoint import write_atomic
from mcbeit.engine.precision import autocast_context
from mcbeit.errors import ConfigError, InputError
from mcbeit.evaluation.segmentation import palette

__all__ = ["AP_NAMES", "STAT_NAMES", "coco_evaluate", "evaluate_detection", "flat_metrics", "format_metrics", "load_gt",
           "box_level_masks", "in_original_pixels", "paste_box_masks", "save_detection_visualisation",
           "to_coco_results", "valid_size"]

log = logging.getLogger(__name__)

#: detectron2's headline metrics (``COCOEvaluator._derive_coco_results``), COCOeval's stats[0:6]
AP_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
#: the 12 numbers of ``COCOeval.summarize()`` for bbox / segm, in its order
STAT_NAMES = AP_NAMES + ("AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
IOU_TYPES = ("bbox", "segm")
BACKENDS = ("faster", "pycocotools")


# ---------------------------------------------------------------------- predictions -> COCO json
def _int(v) -> int:
    return int(v.item()) if isinstance(v, Tensor) else int(v)


def _size(target: Mapping) -> tuple[int, int]:
    try:
        h, w = (_int(v) for v in target["orig_size"])
    except KeyError:
        raise InputError("a detection target lacks 'orig_size' (h, w) of the original image: the evaluation "
                         "maps predictions back to it; build the dataset with train=False") from None
    return h, w


def _scale(target: Mapping) -> float:
    try:
        scale = float(target["scale"])
    except KeyError:
        raise InputError("a detection target lacks 'scale' (the resize factor of the original image): the "
                         "evaluation maps predictions back with it; build the dataset with train=False") from None
    if not scale > 0:
        raise InputError(f"a detection target has scale {scale}; it must be the positive resize factor")
    return scale


def valid_size(target: Mapping, input_size: tuple[int, int] | None = None) -> tuple[int, int]:
    """(rows, cols) of the input that hold the resized image: ``int(h * scale + 0.5)`` x ``int(w * scale + 0.5)``
    (detectron2 ``ResizeShortestEdge``'s rounding), at most ``input_size``."""
    h, w = _size(target)
    scale = _scale(target)
    rh, rw = max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))
    if input_size is not None:
        rh, rw = min(rh, int(input_size[0])), min(rw, int(input_size[1]))
    return rh, rw


def _label_map(label_to_cat_id) -> dict[int, int]:
    """{contiguous label: COCO category id} from a mapping, a list of category ids (label i+1 = ids[i]) or
    a dataset's ``categories`` list of (id, name) pairs."""
    if isinstance(label_to_cat_id, Mapping):
        return {int(k): int(v) for k, v in label_to_cat_id.items()}
    out = {}
    for i, item in enumerate(label_to_cat_id):
        cat = item[0] if isinstance(item, (tuple, list)) else item
        out[i + 1] = int(cat)
    return out


def _encode(masks: np.ndarray) -> list[dict]:
    """Compressed RLEs (counts as str, as detectron2's json) of a bool (K,h,w) array."""
    rles = mask_api.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))  # (h,w,K) Fortran order
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii") if isinstance(rle["counts"], bytes) else rle["counts"]
    return rles


def _original_masks(probs: Tensor, valid: tuple[int, int], size: tuple[int, int], threshold: float,
                    chunk: int = 32) -> np.ndarray:
    """bool (K,h,w) on the CPU: the input-sized mask probabilities (K,1,S,S) cropped to ``valid``, resized
    bilinearly to the original ``size`` and thresholded (``>=``, as detectron2)."""
    rh, rw = valid
    out = []
    for start in range(0, probs.shape[0], chunk):
        m = probs[start:start + chunk, :, :rh, :rw].float()  # (k,1,rh,rw)
        m = F.interpolate(m, size=size, mode="bilinear", align_corners=False)  # (k,1,h,w)
        out.append((m[:, 0] >= threshold).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, *size), dtype=bool)


def paste_box_masks(probs: Tensor, boxes: Tensor, size: tuple[int, int], threshold: float = 0.5,
                    chunk: int = 32) -> np.ndarray:
    """bool (K,h,w) on the CPU: box-level mask probabilities (K,1,M,M) pasted into an image of ``size`` at ``boxes``
    (K,4) xyxy in its pixels (torchvision's ``paste_masks_in_image``) and thresholded ``>=``."""
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    out = []
    for start in range(0, probs.shape[0], chunk):
        pasted = paste_masks_in_image(probs[start:start + chunk].float().cpu(), boxes[start:start + chunk].float().cpu(),
                                      size, padding=1)  # (k,1,h,w)
        out.append(pasted[:, 0] >= threshold)
    return torch.cat(out).numpy() if out else np.zeros((0, *size), dtype=bool)


def in_original_pixels(out: Mapping, target: Mapping, mask_threshold: float = 0.5) -> dict:
    """One image's detections in its original pixels (``target``: ``orig_size`` (h, w), ``scale``; ``out`` as
    :func:`to_coco_results` takes it): ``boxes`` (K,4) xyxy float32 scaled back and clipped to the image, those
    clipped to nothing dropped (detectron2's ``Boxes.nonempty``); ``labels`` (K,), ``scores`` (K,) float32 of the
    kept ones; ``masks`` bool (K,h,w) numpy at the original size, or None without masks."""
    h, w = _size(target)
    boxes = out["boxes"].detach().float() / _scale(target)  # (K,4) original pixels
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # detectron2 Boxes.nonempty()
    boxes = boxes[keep]
    masks = None
    if out.get("masks") is not None:
        probs = out["masks"].detach()[keep]
        if probs.dim() == 3:
            probs = probs[:, None]
        if probs.dim() != 4 or probs.shape[1] != 1:
            raise InputError(f"detector masks must be (K,1,S,S) probabilities, got {tuple(out['masks'].shape)}")
        if out.get("mask_kind") == "roi":
            masks = paste_box_masks(probs, boxes, (h, w), mask_threshold)
        else:
            masks = _original_masks(probs, valid_size(target, tuple(probs.shape[-2:])), (h, w), mask_threshold)
    return {"boxes": boxes, "labels": out["labels"][keep], "scores": out["scores"][keep].float(), "masks": masks}


def to_coco_results(outputs: Sequence[Mapping], targets: Sequence[Mapping], label_to_cat_id,
                    mask_threshold: float = 0.5) -> list[dict]:
    """COCO result dicts, in the original images' pixels, of a batch of detector outputs.

    ``outputs``: torchvision's eval-mode detections per image, ``boxes`` (K,4) xyxy and ``masks``
    (K,1,S,S) probabilities at the network input's pixels, ``labels`` (K,) in 1..C, ``scores`` (K,);
    ``masks`` may be absent (box-only results); with ``mask_kind='roi'`` in the output, ``masks`` are the box-level
    (K,1,M,M) probabilities, pasted at the original size (detectron2's way). ``targets``: the matching target dicts (``image_id``,
    ``orig_size`` (h, w), ``scale``). ``label_to_cat_id``: {label: COCO category id}, a list of
    category ids (label i+1 = ids[i]), or the dataset's ``categories`` (id, name) pairs.

    Each dict: ``image_id``, ``category_id``, ``bbox`` [x, y, w, h], ``score`` and, with masks,
    ``segmentation`` (compressed RLE of size [h, w], counts a str). See the module docstring for the
    mapping and its difference to detectron2's.
    """
    if len(outputs) != len(targets):
        raise InputError(f"{len(outputs)} detector outputs for {len(targets)} targets")
    cat_of = _label_map(label_to_cat_id)
    results = []
    for out, target in zip(outputs, targets, strict=True):
        image_id = _int(target["image_id"])
        found = in_original_pixels(out, target, mask_threshold)
        boxes, labels, scores = found["boxes"], found["labels"].tolist(), found["scores"].tolist()
        rles = None if found["masks"] is None else _encode(found["masks"])
        xywh = boxes.clone()
        xywh[:, 2:] -= xywh[:, :2]
        for k, (box, label, score) in enumerate(zip(xywh.cpu().tolist(), labels, scores, strict=True)):
            if int(label) not in cat_of:
                raise InputError(f"the detector predicted label {label}, which has no COCO category "
                                 f"(labels {min(cat_of)}..{max(cat_of)}): check num_classes against the dataset")
            result = {"image_id": image_id, "category_id": cat_of[int(label)], "bbox": box, "score": score}
            if rles is not None:
                result["segmentation"] = rles[k]
            results.append(result)
    return results


# ---------------------------------------------------------------------- COCOeval
def _api(backend: str):
    """(COCO, COCOeval) of the backend."""
    if backend == "faster":
        from faster_coco_eval import COCO, COCOeval_faster
        return COCO, COCOeval_faster
    if backend == "pycocotools":
        try:
            from pycocotools.coco import COCO
            from pycocotools.cocoeval import COCOeval
        except ImportError:
            raise ConfigError("backend='pycocotools' needs pycocotools: pip install pycocotools, or use the "
                              "default backend 'faster' (faster-coco-eval)") from None
        return COCO, COCOeval
    raise ConfigError(f"the COCO evaluation backend must be one of {BACKENDS}, got {backend!r}")


def _coco(dataset: dict, coco_cls):
    """A ``coco_cls`` object over ``dataset`` (not copied), its index built, pycocotools' prints silenced."""
    api = coco_cls()
    api.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        api.createIndex()
    return api


def load_gt(gt, backend: str = "faster"):
    """The ground truth as the backend's COCO object, from a json path, a dict, or a COCO object of
    either library (reused when it is the backend's own)."""
    coco_cls, _ = _api(backend)
    if isinstance(gt, coco_cls):
        return gt
    if isinstance(gt, (str, os.PathLike)):
        if not Path(gt).is_file():
            raise InputError(f"the COCO annotation file {gt} does not exist; pass the instances_*.json of the "
                             "evaluated split")
        import json
        with open(gt) as f:
            return _coco(json.load(f), coco_cls)
    # copies: pycocotools' COCOeval turns the ground truth's polygons into RLEs in place
    if isinstance(gt, dict):
        return _coco(copy.deepcopy(gt), coco_cls)
    if isinstance(getattr(gt, "dataset", None), dict):  # the other library's COCO object
        return _coco(copy.deepcopy(gt.dataset), coco_cls)
    raise InputError(f"the COCO ground truth must be a json path, a dict or a COCO object, got {type(gt).__name__}")


def _percent(v: float) -> float:
    return float(v) * 100.0 if v >= 0 else float("nan")


def _check_results(results: Sequence[dict], coco_gt, iou_types: Sequence[str]) -> None:
    images, cats = set(coco_gt.getImgIds()), set(coco_gt.getCatIds())
    for r in results:
        if r["image_id"] not in images:
            raise InputError(f"a result's image_id {r['image_id']} is not in the ground truth: evaluate against the "
                             "annotation file of the split the loader reads")
        if r["category_id"] not in cats:
            raise InputError(f"a result's category_id {r['category_id']} is not in the ground truth's categories "
                             f"{sorted(cats)}: check label_to_cat_id")
        if "segm" in iou_types and "segmentation" not in r:
            raise InputError("'segm' evaluation needs masks in every result; the detector returned none: "
                             "evaluate with iou_types=('bbox',)")


def _result_set(coco_gt, results: list[dict], iou_type: str, coco_cls):
    """The backend's result COCO object; an empty one (images and categories, no annotation) when
    there are no results (pycocotools' ``loadRes`` cannot take an empty list)."""
    if iou_type == "segm":  # detectron2: with a bbox, COCOeval would take the box's area for the mask's
        anns = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    else:
        anns = [{k: v for k, v in r.items() if k != "segmentation"} for r in results]
    if not anns:
        return _coco({"images": list(coco_gt.dataset["images"]), "categories": list(coco_gt.dataset["categories"]),
                      "annotations": []}, coco_cls)
    with contextlib.redirect_stdout(io.StringIO()):
        return coco_gt.loadRes(anns)  # fresh dicts: loadRes writes ids, areas into them


def coco_evaluate(gt, results: Sequence[dict], iou_types: Sequence[str] = IOU_TYPES, backend: str = "faster",
                  img_ids: Iterable[int] | None = None) -> dict:
    """COCO AP of ``results`` (:func:`to_coco_results`'s dicts) against ``gt`` (json path, dict or COCO object).

    Returns ``{iou_type: {'AP', 'AP50', 'AP75', 'APs', 'APm', 'APl': percent (NaN where the set has no
    ground truth in that range), 'per_category': {name: AP percent}, 'stats': COCOeval's 12 numbers as it
    gives them (fractions, -1 where undefined)}}``. ``img_ids``: evaluate over these images only (default:
    every image of ``gt``). No results at all give AP 0 where there is ground truth (module docstring).
    """
    for t in iou_types:
        if t not in IOU_TYPES:
            raise ConfigError(f"iou_types must be among {IOU_TYPES}, got {t!r}")
    coco_cls, eval_cls = _api(backend)
    coco_gt = load_gt(gt, backend)
    results = list(results)
    _check_results(results, coco_gt, iou_types)
    if not results:
        log.warning("no detections at all: AP is 0 wherever there is ground truth")
    out = {}
    for iou_type in iou_types:
        coco_dt = _result_set(coco_gt, results, iou_type, coco_cls)
        kwargs = {"print_function": log.debug} if backend == "faster" else {}
        evaluator = eval_cls(coco_gt, coco_dt, iou_type, **kwargs)
        if img_ids is not None:
            evaluator.params.imgIds = sorted({int(i) for i in img_ids})
        with contextlib.redirect_stdout(io.StringIO()):
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        stats = [float(s) for s in evaluator.stats[:len(STAT_NAMES)]]
        metrics = {name: _percent(stats[i]) for i, name in enumerate(AP_NAMES)}
        precision = np.asarray(evaluator.eval["precision"])  # (T iou, R recall, K category, A area, M max dets)
        per_category = {}
        for k, cat_id in enumerate(evaluator.params.catIds):
            p = precision[:, :, k, 0, -1]
            p = p[p > -1]
            per_category[coco_gt.cats[cat_id]["name"]] = float(p.mean()) * 100.0 if p.size else float("nan")
        out[iou_type] = {**metrics, "per_category": per_category, "stats": stats}
    return out


def flat_metrics(metrics: Mapping) -> dict[str, float]:
    """``{'bbox/AP': .., 'bbox/AP-person': .., 'segm/AP50': ..}`` (detectron2's names) of :func:`coco_evaluate`'s
    (or :func:`evaluate_detection`'s) dict, for logs and TensorBoard."""
    flat = {}
    for iou_type in IOU_TYPES:
        if iou_type not in metrics:
            continue
        m = metrics[iou_type]
        flat.update({f"{iou_type}/{name}": m[name] for name in AP_NAMES})
        flat.update({f"{iou_type}/AP-{name}": ap for name, ap in m["per_category"].items()})
    return flat


def format_metrics(metrics: Mapping, per_category: bool = True) -> str:
    """detectron2-like text tables: the six APs of each iou type, then per-category AP."""
    lines = []
    for iou_type in IOU_TYPES:
        if iou_type not in metrics:
            continue
        m = metrics[iou_type]
        lines.append(f"Evaluation results for {iou_type}:")
        lines.append(" | ".join(f"{name:>6}" for name in AP_NAMES))
        lines.append(" | ".join(f"{m[name]:6.3f}" for name in AP_NAMES))
        if per_category and m["per_category"]:
            lines.append(f"Per-category {iou_type} AP:")
            items = [f"{name[:16]:<16} {ap:6.3f}" for name, ap in m["per_category"].items()]
            lines.extend(" | ".join(items[i:i + 3]) for i in range(0, len(items), 3))
    return "\n".join(lines)


# ---------------------------------------------------------------------- the loop
@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _autocast_dtype(device: torch.device, amp, amp_dtype: torch.dtype | None) -> torch.dtype | None:
    """The model's autocast dtype. ``amp``: False / None (fp32), True (bf16 where CUDA supports it, else fp16;
    on CUDA only: a CPU gains nothing from emulated half precision), or a dtype; ``amp_dtype``: a dtype used
    as is on any device (``evaluate_segmentation``'s argument, e.g. the run's ``Precision.dtype``)."""
    if amp_dtype is not None:
        if amp not in (None, False):
            raise ConfigError("pass amp or amp_dtype, not both")
        return amp_dtype
    if amp is None or amp is False:
        return None
    if amp is True:
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if not isinstance(amp, torch.dtype):
        raise ConfigError(f"amp must be True, False or a torch dtype, got {amp!r}")
    return amp


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


_GLOO_GROUPS: dict[int, object] = {}


def _object_group():
    """The group objects travel through: the default one when it is gloo, else a gloo group (made once per
    default group; every rank must call this together)."""
    if dist.get_backend() == "gloo":
        return None
    key = id(dist.group.WORLD)
    if key not in _GLOO_GROUPS:
        _GLOO_GROUPS[key] = dist.new_group(backend="gloo")
    return _GLOO_GROUPS[key]


def _cpu_output(out: Mapping, score_threshold: float, mask_threshold: float, size: tuple[int, int]) -> dict:
    """A small CPU copy of one image's detections for the picture: those scoring >= ``score_threshold``,
    masks at the input's ``size`` thresholded to bool."""
    keep = out["scores"] >= score_threshold
    small = {k: out[k][keep].detach().cpu() for k in ("boxes", "labels", "scores")}
    small["boxes"] = small["boxes"].float()
    small["scores"] = small["scores"].float()
    if out.get("masks") is not None:
        if out.get("mask_kind") == "roi":
            small["masks"] = torch.from_numpy(paste_box_masks(out["masks"][keep], small["boxes"], size,
                                                            mask_threshold))[:, None]
        else:
            small["masks"] = (out["masks"][keep] >= mask_threshold).cpu()
    return small


@contextlib.contextmanager
def box_level_masks(model: nn.Module):
    """Yields whether ``model`` returns box-level masks inside: a detector whose transform has the ``paste_masks``
    switch is asked for them (and set back after)."""
    from mcbeit.engine.optim import unwrap_model

    transform = getattr(unwrap_model(model), "transform", None)
    if not hasattr(transform, "paste_masks"):
        yield False
        return
    before = transform.paste_masks
    transform.paste_masks = False
    try:
        yield True
    finally:
        transform.paste_masks = before


def evaluate_detection(model: nn.Module, loader: Iterable, device: torch.device, gt, label_to_cat_id,
                       amp: bool | torch.dtype | None = False, max_images: int | None = None, visualise: int = 0,
                       iou_types: Sequence[str] = IOU_TYPES, backend: str = "faster", mask_threshold: float = 0.5,
                       vis_score_threshold: float = 0.5, amp_dtype: torch.dtype | None = None) -> dict:
    """COCO box and mask AP of ``model`` over the images of ``loader`` (every rank's shard together).

    ``loader`` yields ``(images, targets)`` as ``det_collate`` does (lists: (3,S,S) float 0-1 images,
    target dicts with ``image_id``, ``orig_size``, ``scale``); ``model(images)`` in eval mode returns
    torchvision's detections (the model's mode is restored after). ``gt``: the annotation json path, dict
    or COCO object (read on rank 0 only). ``amp`` / ``amp_dtype``: the model's autocast (``_autocast_dtype``;
    scores, boxes and masks are then taken as float32). ``max_images``: only the first
    ``max_images`` images of the dataset (each rank stops after its share of them, as ``ShardSampler``
    deals them out) and AP over those. Distributed: every rank must call this; results are gathered on
    rank 0, which evaluates; every rank returns the same metrics.

    Returns :func:`coco_evaluate`'s dict plus ``images`` (evaluated, each once), ``detections``,
    ``seconds`` (this rank's prediction time) and ``visualisation``: on rank 0 the first ``visualise``
    images of its shard as ``{'images': [...], 'outputs': [...], 'targets': [...]}`` (detections scoring
    >= ``vis_score_threshold``, masks bool), for ``save_detection_visualisation(path, **v, class_names=...)``.
    """
    rank, world = _world()
    dtype = _autocast_dtype(device, amp, amp_dtype)
    limit = None if max_images is None else len(range(rank, int(max_images), world))
    per_image: list[tuple[int, list[dict]]] = []  # (image_id, its results) in loader order
    shown = {"images": [], "outputs": [], "targets": []}
    keep_shown = int(visualise) if rank == 0 else 0
    start = time.perf_counter()
    with _eval_mode(model), torch.no_grad(), box_level_masks(model) as roi_masks:
        for images, targets in loader:
            if limit is not None and len(per_image) >= limit:
                break
            if limit is not None:
                images, targets = list(images)[:limit - len(per_image)], list(targets)[:limit - len(per_image)]
            images = [image.to(device, non_blocking=True) for image in images]
            with autocast_context(device, dtype):
                outputs = model(images)
            if roi_masks:
                outputs = [{**out, "mask_kind": "roi"} for out in outputs]
            for image, out, target in zip(images, outputs, targets, strict=True):
                per_image.append((_int(target["image_id"]),
                                  to_coco_results([out], [target], label_to_cat_id, mask_threshold)))
                if len(shown["images"]) < keep_shown:
                    shown["images"].append((image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu())
                    shown["outputs"].append(_cpu_output(out, vis_score_threshold, mask_threshold,
                                                        tuple(image.shape[-2:])))
                    shown["targets"].append({k: target[k] for k in ("image_id", "orig_size", "scale") if k in target})
    seconds = time.perf_counter() - start

    if world > 1:
        group = _object_group()
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(per_image, gathered, dst=0, group=group)
    else:
        gathered = [per_image]
    reply = [None]
    if rank == 0:
        try:
            seen, results = set(), []
            for shard in gathered:
                for image_id, image_results in shard:
                    if image_id not in seen:  # an image predicted twice (a padded sampler) counts once
                        seen.add(image_id)
                        results.extend(image_results)
            if not seen:
                raise InputError("the detection evaluation set is empty")
            metrics = coco_evaluate(gt, results, iou_types, backend, img_ids=seen)
            reply = [{**metrics, "images": len(seen), "detections": len(results)}]
        except Exception as exc:  # every rank must learn of it, or the others wait on the broadcast forever
            if world == 1:
                raise
            reply = [exc]
    if world > 1:
        dist.broadcast_object_list(reply, src=0, group=_object_group())
    if isinstance(reply[0], Exception):
        if rank == 0:
            raise reply[0]
        raise InputError(f"the detection evaluation failed on rank 0: {reply[0]}")
    metrics = reply[0]
    log.info("detection evaluation: %d images, %d detections, bbox AP %.2f%s (this rank predicted %d images in "
             "%.1f s)", metrics["images"], metrics["detections"], metrics.get("bbox", {}).get("AP", float("nan")),
             f", segm AP {metrics['segm']['AP']:.2f}" if "segm" in metrics else "", len(per_image), seconds)
    return {**metrics, "seconds": seconds, "visualisation": shown}


# ---------------------------------------------------------------------- pictures
def _as_uint8(image: Tensor) -> Tensor:
    """(3,H,W) uint8 from a uint8 or 0-1 float image."""
    if image.dtype == torch.uint8:
        return image.cpu()
    return (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)


def _draw(image: Tensor, out: Mapping, class_names: Sequence[str], colours: np.ndarray, target: Mapping | None,
          score_threshold: float, mask_threshold: float, max_side: int, alpha: float) -> np.ndarray:
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    image = _as_uint8(image)  # (3,S,S)
    keep = out["scores"].detach().cpu().float() >= score_threshold
    boxes = out["boxes"].detach().cpu().float()[keep]  # (K,4) input pixels
    labels = out["labels"].detach().cpu()[keep].tolist()
    scores = out["scores"].detach().cpu().float()[keep].tolist()
    masks = out.get("masks")
    if masks is not None:
        masks = masks.detach().cpu()[keep]
        masks = masks[:, 0] if masks.dim() == 4 else masks  # (K,S,S)
    rh, rw = image.shape[-2:]
    if target is not None:  # the resized image only, not the padding
        rh, rw = valid_size(target, (rh, rw))
        image = image[:, :rh, :rw]
        masks = None if masks is None else masks[:, :rh, :rw]
    f = min(1.0, max_side / max(rh, rw))
    size = (max(1, round(rh * f)), max(1, round(rw * f)))
    if size != (rh, rw):
        image = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False,
                              antialias=True)[0].round().clamp(0, 255).to(torch.uint8)
        boxes = boxes * f
        if masks is not None and len(masks):
            masks = F.interpolate(masks[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, size[1] - 1)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, size[0] - 1)
    colour = [tuple(int(c) for c in colours[(int(lb) - 1) % len(colours)]) for lb in labels]
    if labels and masks is not None:
        binary = masks >= mask_threshold if masks.is_floating_point() else masks.bool()
        image = draw_segmentation_masks(image, binary, alpha=alpha, colors=colour)
    if labels:
        names = [f"{class_names[int(lb) - 1] if 0 < int(lb) <= len(class_names) else lb} {s:.2f}"
                 for lb, s in zip(labels, scores, strict=True)]
        image = draw_bounding_boxes(image, boxes, labels=names, colors=colour, width=2)
    return image.permute(1, 2, 0).numpy()


def save_detection_visualisation(path: str | os.PathLike | None, images: Sequence[Tensor], outputs: Sequence[Mapping],
                                 class_names: Sequence[str], score_threshold: float = 0.5,
                                 targets: Sequence[Mapping] | None = None, mask_threshold: float = 0.5,
                                 max_side: int = 512, columns: int = 2, alpha: float = 0.45,
                                 gap: int = 4) -> np.ndarray:
    """A uint8 (H,W,3) grid of ``images`` ((3,S,S) float 0-1 or uint8) with their detections scoring >=
    ``score_threshold``: translucent masks, boxes labelled ``name score``, one colour per class. With
    ``targets`` each image is cropped to its resized image (the padding left out). Each picture is shrunk
    so its longer side is at most ``max_side``, ``columns`` a row. Written atomically as a PNG to ``path``
    (unless None) and returned (for TensorBoard)."""
    if not images:
        raise InputError("no image to draw: evaluate with visualise > 0")
    if len(outputs) != len(images) or (targets is not None and len(targets) != len(images)):
        raise InputError(f"{len(images)} images for {len(outputs)} outputs"
                         + ("" if targets is None else f" and {len(targets)} targets"))
    colours = palette(max(1, len(class_names)))
    pictures = [_draw(image, out, class_names, colours, None if targets is None else targets[i], score_threshold,
                      mask_threshold, max_side, alpha) for i, (image, out) in enumerate(zip(images, outputs,
                                                                                           strict=True))]
    columns = max(1, min(int(columns), len(pictures)))
    cell_h, cell_w = max(p.shape[0] for p in pictures), max(p.shape[1] for p in pictures)
    rows = math.ceil(len(pictures) / columns)
    grid = np.full((rows * cell_h + (rows - 1) * gap, columns * cell_w + (columns - 1) * gap, 3), 255,
                   dtype=np.uint8)
    for i, picture in enumerate(pictures):
        top, left = (i // columns) * (cell_h + gap), (i % columns) * (cell_w + gap)
        grid[top:top + picture.shape[0], left:left + picture.shape[1]] = picture
    if path is not None:
        write_atomic(path, lambda f: Image.fromarray(grid).save(f, format="PNG"))
    return grid
