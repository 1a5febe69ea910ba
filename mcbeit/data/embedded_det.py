"""The embedded detection data: generated scenes with boxes and instance masks in COCO's json format, so
``mcbeit-det`` trains and evaluates with no download.

Each scene is 128 px on one side and 96-160 px on the other (either orientation): a background of irregular
low-contrast blobs with one to four objects on it, later ones occluding earlier ones (by at most half of
what is visible of each). An object's category is its shape *and* its texture, drawn in two grey levels far
apart (the textures of the embedded pre-training data, :mod:`mcbeit.data.embedded`):

====  ========  ==============================  ==========
id    name      shape                           texture
====  ========  ==============================  ==========
3     disc      ellipse, aspect 0.7-1           stripes
5     square    rotated rectangle, aspect 0.8-1 checkers
8     triangle  rotated triangle                dots
13    cross     rotated plus sign               grid
====  ========  ==============================  ==========

The category ids are not contiguous and the json lists them unsorted (8, 3, 13, 5), as real data may: the
datasets map them to labels 1..4 in sorted-id order. Annotations are COCO's: an object seen whole is a
polygon (the very polygon its pixels were rasterised from, through ``pycocotools.mask``), an occluded one the
RLE of its visible pixels (compressed or, every other one, uncompressed ``counts`` lists); ``bbox`` and
``area`` are those of the mask. Some scenes hold a crowd (a cluster of small objects of one category
annotated as one ``iscrowd=1`` RLE region, alone in a few scenes) and some hold no object at all.

Layout: ``train2017/*.jpg``, ``val2017/*.jpg``, ``annotations/instances_{train,val}2017.json`` (96 and 24
scenes), read by :func:`mcbeit.data.detection.build_detection_dataset`. Generated once, deterministically,
into a temporary folder beside the root and renamed into place (:mod:`mcbeit.data.generated`), with a
``COMPLETE.json`` marker, so concurrent processes never see half of it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter
from faster_coco_eval.core import mask as mask_util  # pycocotools.mask API (without its numpy 2 warning)

from .embedded import _pattern as texture_pattern  # the pre-training data's textures, on purpose the same
from .generated import generated_root, marker_matches

__all__ = ["EMBEDDED_DET_CATEGORIES", "embedded_detection_root", "generate_embedded_detection", "render_scene"]

VERSION = "embedded-det-v1"
# (category id, name, texture) in the order the json lists them (deliberately not sorted by id)
EMBEDDED_DET_CATEGORIES = ((8, "triangle", "dots"), (3, "disc", "stripes"), (13, "cross", "grid"),
                           (5, "square", "checkers"))
SPLITS = {"train": 96, "val": 24}  # scenes per split
FIRST_IMAGE_ID = {"train": 1, "val": 1001}
MARKER = "COMPLETE.json"
_SEED = 20240619
_JPEG_QUALITY = 90
_STRIPES = ("stripes_h", "stripes_v", "stripes_diag", "stripes_anti")
_MAX_OCCLUDED = 0.5  # a new object may hide at most this share of what is visible of an earlier one


def _expected_marker() -> dict:
    return {"version": VERSION, "categories": [list(c[:2]) for c in EMBEDDED_DET_CATEGORIES], "scenes": SPLITS}


def _is_complete(root: Path) -> bool:
    """The marker matches, both jsons exist and every split folder holds its number of images."""
    if not marker_matches(root / MARKER, _expected_marker()):
        return False
    for split, count in SPLITS.items():
        if not (root / "annotations" / f"instances_{split}2017.json").is_file():
            return False
        try:
            found = sum(1 for e in os.scandir(root / f"{split}2017") if e.name.endswith(".jpg"))
        except OSError:
            return False
        if found != count:
            return False
    return True


def embedded_detection_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Root of the embedded detection data (``$MCBEIT_CACHE`` or ``~/.cache/mcbeit`` by default), generating
    it if needed."""
    return generated_root(cache_dir, VERSION, _is_complete,
                          lambda dest: generate_embedded_detection(dest),  # looked up at call time: tests replace it
                          "embedded detection data")


def generate_embedded_detection(dest: str | os.PathLike) -> Path:
    """Write the whole tree (both splits, their jsons, the marker) into ``dest``; deterministic."""
    dest = Path(dest)
    (dest / "annotations").mkdir(parents=True, exist_ok=True)
    ann_id = 1
    for split_id, (split, count) in enumerate(SPLITS.items()):
        (dest / f"{split}2017").mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            image_id = FIRST_IMAGE_ID[split] + i
            image, anns = render_scene(np.random.default_rng([_SEED, split_id, i]), _kind(i))
            file_name = f"{image_id:012d}.jpg"
            image.save(dest / f"{split}2017" / file_name, quality=_JPEG_QUALITY)
            images.append({"id": image_id, "file_name": file_name, "width": image.size[0], "height": image.size[1],
                           "license": 1})
            for ann in anns:
                annotations.append({"id": ann_id, "image_id": image_id, **ann})
                ann_id += 1
        data = {
            "info": {"description": "mcbeit embedded detection scenes", "version": VERSION, "year": 2024},
            "licenses": [{"id": 1, "name": "generated", "url": ""}],
            "images": images,
            "annotations": annotations,
            "categories": [{"id": cid, "name": name, "supercategory": "shape"}
                           for cid, name, _ in EMBEDDED_DET_CATEGORIES],
        }
        (dest / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(data))
    (dest / MARKER).write_text(json.dumps(_expected_marker()))
    return dest


def _kind(i: int) -> str:
    """What scene ``i`` of a split holds: no object, only a crowd, objects and a crowd, or objects."""
    if i % 16 == 5:
        return "empty"
    if i % 24 == 11:
        return "crowd_only"
    if i % 16 == 2:
        return "crowd"
    return "objects"


# ----------------------------------------------------------------------------- drawing


def _shape_polygon(category: str, rng: np.random.Generator, cx: float, cy: float, size: float) -> list[float]:
    """The flat [x0, y0, x1, y1, ...] polygon of one object of ``category`` centred at (cx, cy), about
    ``size`` px across, at a random rotation."""
    if category == "disc":
        aspect = rng.uniform(0.7, 1.0)
        t = np.linspace(0, 2 * math.pi, 28, endpoint=False)
        points = np.stack([np.cos(t) * 0.5, np.sin(t) * 0.5 * aspect], axis=1)
    elif category == "square":
        aspect = rng.uniform(0.8, 1.0)
        points = np.array([(-0.5, -0.5), (0.5, -0.5), (0.5, 0.5), (-0.5, 0.5)]) * (1.0, aspect) * 0.9
    elif category == "triangle":
        points = np.array([(0.0, -0.55), (0.5, 0.4), (-0.5, 0.4)])
    elif category == "cross":
        a, b = 0.5, 0.17  # arm half-length and half-width
        points = np.array([(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b),
                           (-a, b), (-a, -b), (-b, -b)])
    else:
        raise KeyError(category)
    angle = rng.uniform(0, 2 * math.pi)
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    xy = points @ rotation.T * size + (cx, cy)                                             # (P,2)
    return [round(float(v), 2) for v in xy.ravel()]


def _polygon_mask(polygon: list[float], h: int, w: int) -> np.ndarray:
    """(h, w) bool: the pixels COCO's tools give the polygon (the image is painted from the same mask)."""
    return mask_util.decode(mask_util.merge(mask_util.frPyObjects([polygon], h, w))).astype(bool)


def _two_greys(rng: np.random.Generator, low: float, high: float) -> tuple[float, float]:
    dark = rng.uniform(0, 255 - low)
    return dark, min(255.0, dark + rng.uniform(low, high))


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE of a bool mask: run lengths in column-major order, starting with zeros."""
    flat = mask.T.ravel().astype(np.int8)                                                  # column-major
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        runs = [0, *runs]
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(r) for r in runs]}


def _compressed_rle(mask: np.ndarray) -> dict:
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _annotation(mask: np.ndarray, category_id: int, segmentation, iscrowd: int) -> dict:
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"category_id": category_id, "segmentation": segmentation, "area": float(mask_util.area(rle)),
            "bbox": [float(v) for v in mask_util.toBbox(rle)], "iscrowd": iscrowd}


def _place(rng: np.random.Generator, h: int, w: int, size: float) -> tuple[float, float]:
    margin = size * 0.66  # the farthest vertex of any shape, at any rotation, stays inside
    return rng.uniform(margin, w - margin), rng.uniform(margin, h - margin)


def render_scene(rng: np.random.Generator, kind: str = "objects") -> tuple[Image.Image, list[dict]]:
    """One scene drawn from ``rng`` (``kind``: "objects", "crowd", "crowd_only" or "empty"): the RGB image
    and its annotations (COCO dicts without ``id`` / ``image_id``)."""
    short = int(rng.integers(12, 21)) * 8                                                   # 96..160
    h, w = (128, short) if rng.random() < 0.5 else (short, 128)
    dark, light = _two_greys(rng, 25, 50)
    image = np.where(texture_pattern("spots", rng, h, w), np.float32(dark), np.float32(light))   # (h, w)
    # drawn objects, earliest first: [category_id, full mask, polygon or None (crowd), iscrowd]
    objects: list[list] = []

    def paint(mask: np.ndarray, texture: str) -> None:
        nonlocal image
        name = str(rng.choice(_STRIPES)) if texture == "stripes" else texture
        low, high = _two_greys(rng, 100, 170)
        image = np.where(mask, np.where(texture_pattern(name, rng, h, w), np.float32(low), np.float32(high)), image)

    def visible(index: int) -> np.ndarray:
        hidden = np.zeros((h, w), bool)
        for later in objects[index + 1:]:
            hidden |= later[1]
        return objects[index][1] & ~hidden

    def fits(mask: np.ndarray) -> bool:
        """Whether ``mask`` hides at most _MAX_OCCLUDED of what is visible of every earlier object."""
        for index in range(len(objects)):
            seen = visible(index)
            if (seen & mask).sum() > _MAX_OCCLUDED * max(seen.sum(), 1):
                return False
        return True

    if kind in ("crowd", "crowd_only"):
        category_id, name, texture = EMBEDDED_DET_CATEGORIES[int(rng.integers(len(EMBEDDED_DET_CATEGORIES)))]
        cx, cy = _place(rng, h, w, 40)
        crowd = np.zeros((h, w), bool)
        for _ in range(int(rng.integers(5, 9))):
            size = rng.uniform(9, 14)
            member = _polygon_mask(_shape_polygon(name, rng, cx + rng.uniform(-18, 18), cy + rng.uniform(-18, 18),
                                                  size), h, w)
            paint(member, texture)
            crowd |= member
        objects.append([category_id, crowd, None, 1])

    count = {"empty": 0, "crowd_only": 0}.get(kind, int(rng.integers(1, 5)))
    for _ in range(count):
        category_id, name, texture = EMBEDDED_DET_CATEGORIES[int(rng.integers(len(EMBEDDED_DET_CATEGORIES)))]
        for _attempt in range(10):
            size = rng.uniform(22, 56)
            polygon = _shape_polygon(name, rng, *_place(rng, h, w, size), size)
            mask = _polygon_mask(polygon, h, w)
            if mask.sum() >= 40 and fits(mask):
                paint(mask, texture)
                objects.append([category_id, mask, polygon, 0])
                break

    annotations, occluded = [], 0
    for index, (category_id, mask, polygon, iscrowd) in enumerate(objects):
        seen = visible(index)
        if iscrowd:
            annotations.append(_annotation(seen, category_id, _compressed_rle(seen), 1))
        elif (seen == mask).all():
            annotations.append(_annotation(mask, category_id, [polygon], 0))
        else:
            segmentation = _uncompressed_rle(seen) if occluded % 2 else _compressed_rle(seen)
            annotations.append(_annotation(seen, category_id, segmentation, 0))
            occluded += 1

    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    theta = rng.uniform(0, 2 * math.pi)
    ramp = (xx * math.cos(theta) + yy * math.sin(theta)) / max(h, w)
    image = image * (1 + rng.uniform(-0.2, 0.2) * ramp)
    image = image + rng.standard_normal((h, w), dtype=np.float32) * rng.uniform(2, 6)     # grain
    grey = image.clip(0, 255).astype(np.uint8)
    rgb = Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2))
    return rgb.filter(ImageFilter.BoxBlur(rng.uniform(0.2, 0.5))), annotations
