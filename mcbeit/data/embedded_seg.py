"""The embedded segmentation data: generated scenes with per-pixel labels, so ``mcbeit-seg`` trains and
evaluates with no download.

Each scene (96-160 px a side, any aspect in that range) is a background of irregular blobs with two
to four shapes (ellipses, rotated rectangles, triangles) laid over it, later ones occluding earlier
ones. Every region is filled with its class's texture in two grey levels of its own, under one
brightness ramp, grain and a slight blur for the whole image. The textures are those of the
embedded pre-training data (:mod:`mcbeit.data.embedded`: same periods, phases, small rotations),
so a class is told apart by local structure only (no colour, brightness or place belongs to a
class) and pre-training on the embedded images can plausibly help.

Classes (label values): 0 background (blobs), 1 stripes (any of four orientations), 2 checkers,
3 dots, 4 grid. No label is 255 (ignore).

The tree is the generic folder layout of :mod:`mcbeit.data.segmentation`: ``images/{train,val}/*.jpg``,
``annotations/{train,val}/*.png`` and ``classes.txt``. It is generated once, deterministically, into a
temporary folder beside the root and renamed into place (under an advisory lock), with a
``COMPLETE.json`` marker, so concurrent processes never see half of it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .embedded import _pattern as texture_pattern  # the pre-training data's textures, on purpose the same
from .generated import generated_root, marker_matches

__all__ = ["EMBEDDED_SEG_CLASSES", "embedded_segmentation_root", "generate_embedded_segmentation", "render_scene"]

VERSION = "embedded-seg-v1"
EMBEDDED_SEG_CLASSES = ("background", "stripes", "checkers", "dots", "grid")
SPLITS = {"train": 96, "val": 24}  # scenes per split
MARKER = "COMPLETE.json"
_SEED = 20240518
_JPEG_QUALITY = 90
_STRIPES = ("stripes_h", "stripes_v", "stripes_diag", "stripes_anti")


def _expected_marker() -> dict:
    return {"version": VERSION, "classes": list(EMBEDDED_SEG_CLASSES), "scenes": SPLITS}


def _is_complete(root: Path) -> bool:
    """The marker matches and every split holds the expected number of images and labels."""
    if not marker_matches(root / MARKER, _expected_marker()):
        return False
    for split, count in SPLITS.items():
        for folder, suffix in (("images", ".jpg"), ("annotations", ".png")):
            try:
                found = sum(1 for e in os.scandir(root / folder / split) if e.name.endswith(suffix))
            except OSError:
                return False
            if found != count:
                return False
    return True


def embedded_segmentation_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Root of the embedded segmentation data (``$MCBEIT_CACHE`` or ``~/.cache/mcbeit`` by default),
    generating it if needed."""
    return generated_root(cache_dir, VERSION, _is_complete,
                          lambda dest: generate_embedded_segmentation(dest),  # looked up at call time: tests replace it
                          "embedded segmentation data")


def generate_embedded_segmentation(dest: str | os.PathLike) -> Path:
    """Write the whole tree (both splits, ``classes.txt``, the marker) into ``dest``; deterministic."""
    dest = Path(dest)
    for split_id, (split, count) in enumerate(SPLITS.items()):
        (dest / "images" / split).mkdir(parents=True, exist_ok=True)
        (dest / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image, label = render_scene(np.random.default_rng([_SEED, split_id, i]))
            image.save(dest / "images" / split / f"scene_{i:04d}.jpg", quality=_JPEG_QUALITY)
            Image.fromarray(label).save(dest / "annotations" / split / f"scene_{i:04d}.png")
    (dest / "classes.txt").write_text("\n".join(EMBEDDED_SEG_CLASSES) + "\n")
    (dest / MARKER).write_text(json.dumps(_expected_marker()))
    return dest


# ----------------------------------------------------------------------------- drawing


def _texture(class_id: int, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Boolean (h, w) texture of a class: which of its two grey levels each pixel takes."""
    name = ("spots", rng.choice(_STRIPES), "checkers", "dots", "grid")[class_id]
    return texture_pattern(str(name), rng, h, w)


def _shape_mask(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Boolean (h, w) mask of one shape, 30-65% of the image's sides, anywhere (partly outside allowed)."""
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    sh, sw = rng.uniform(0.3, 0.65) * h, rng.uniform(0.3, 0.65) * w
    cy, cx = rng.uniform(0.15, 0.85) * h, rng.uniform(0.15, 0.85) * w
    kind = int(rng.integers(3))
    if kind == 0:
        draw.ellipse((cx - sw / 2, cy - sh / 2, cx + sw / 2, cy + sh / 2), fill=1)
    else:
        angle = rng.uniform(0, math.pi)
        corners = ((-0.5, -0.5), (0.5, -0.5), (0.5, 0.5), (-0.5, 0.5)) if kind == 1 else \
            ((0.0, -0.6), (0.55, 0.45), (-0.55, 0.45))  # rotated rectangle or triangle
        c, s = math.cos(angle), math.sin(angle)
        draw.polygon([(cx + u * sw * c - v * sh * s, cy + u * sw * s + v * sh * c) for u, v in corners], fill=1)
    return np.asarray(canvas, dtype=bool)


def _two_greys(rng: np.random.Generator) -> tuple[float, float]:
    dark = rng.uniform(0, 255)
    return dark, (dark + rng.uniform(80, 175)) % 255


def render_scene(rng: np.random.Generator) -> tuple[Image.Image, np.ndarray]:
    """One scene drawn from ``rng``: the RGB image (greys) and its (H, W) uint8 label map."""
    h, w = (int(v) for v in rng.integers(12, 21, 2) * 8)  # 96..160
    label = np.zeros((h, w), np.uint8)
    dark, light = _two_greys(rng)
    image = np.where(_texture(0, rng, h, w), np.float32(dark), np.float32(light))    # (h, w)
    for _ in range(int(rng.integers(2, 5))):
        class_id = int(rng.integers(1, len(EMBEDDED_SEG_CLASSES)))
        mask = _shape_mask(rng, h, w)
        dark, light = _two_greys(rng)
        fill = np.where(_texture(class_id, rng, h, w), np.float32(dark), np.float32(light))
        image = np.where(mask, fill, image)
        label[mask] = class_id
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    theta = rng.uniform(0, 2 * math.pi)
    ramp = (xx * math.cos(theta) + yy * math.sin(theta)) / max(h, w)
    image = image * (1 + rng.uniform(-0.3, 0.3) * ramp)
    image = image + rng.standard_normal((h, w), dtype=np.float32) * rng.uniform(3, 9)  # grain
    grey = image.clip(0, 255).astype(np.uint8)
    rgb = Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2))
    return rgb.filter(ImageFilter.BoxBlur(rng.uniform(0.3, 0.8))), label
