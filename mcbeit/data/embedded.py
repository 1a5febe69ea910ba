"""The embedded default dataset: generated images, so every command runs with no download.

Ten classes of grey textures (stripes in four orientations, checkers, dots, grids, rings, zigzags,
spots), each image with its own two grey levels, period, phase, small rotation, brightness ramp,
grain and blur, saved as JPEG. A class is told apart by local structure only: no colour, place or
mean brightness belongs to a class. That is what masked image modelling learns from, and what lets
``mcbeit-demo`` show in minutes on a CPU that pre-training improves the features. (embedded-v1
drew shapes of random colour: there, colour was each image's largest difference, and both a
random and a briefly pre-trained ViT's features sorted images by colour, at chance for the class.)

The tree is an ImageFolder: ``<root>/train/<class>/*.jpg`` and ``<root>/val/<class>/*.jpg``.
It is generated once, deterministically, into a temporary folder beside the root and renamed
into place, so concurrent processes (DDP ranks, data-loader workers) never see half a dataset.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from .generated import default_cache_dir, generated_root, marker_matches  # noqa: F401 (default_cache_dir: its old home)

__all__ = ["embedded_dataset_root", "generate_embedded_dataset", "EMBEDDED_CLASSES"]

VERSION = "embedded-v2"
EMBEDDED_CLASSES = (
    "stripes_h", "stripes_v", "stripes_diag", "stripes_anti", "checkers",
    "dots", "grid", "rings", "zigzag", "spots",
)  # fmt: skip
SPLITS = {"train": 100, "val": 20}  # images per class
MARKER = "COMPLETE.json"
_SEED = 20221204
_JPEG_QUALITY = 90



def _expected_marker() -> dict:
    return {"version": VERSION, "classes": list(EMBEDDED_CLASSES), "images_per_class": SPLITS}


def _is_complete(root: Path) -> bool:
    """The marker matches and every split/class folder holds the expected number of files."""
    if not marker_matches(root / MARKER, _expected_marker()):
        return False
    for split, per_class in SPLITS.items():
        for name in EMBEDDED_CLASSES:
            folder = root / split / name
            try:
                count = sum(1 for e in os.scandir(folder) if e.name.endswith(".jpg"))
            except OSError:
                return False
            if count != per_class:
                return False
    return True


def embedded_dataset_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Root of the embedded dataset (``train/`` and ``val/`` inside), generating it if needed."""
    return generated_root(cache_dir, VERSION, _is_complete,
                          lambda dest: generate_embedded_dataset(dest),  # looked up at call time: tests replace it
                          "embedded dataset")


def generate_embedded_dataset(dest: str | os.PathLike) -> Path:
    """Write the whole tree (all splits and the marker) into ``dest``; deterministic."""
    dest = Path(dest)
    for split_id, (split, per_class) in enumerate(SPLITS.items()):
        for class_id, name in enumerate(EMBEDDED_CLASSES):
            folder = dest / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                rng = np.random.default_rng([_SEED, split_id, class_id, i])
                image = render_image(class_id, rng)
                image.save(folder / f"{name}_{i:04d}.jpg", quality=_JPEG_QUALITY)
    (dest / MARKER).write_text(json.dumps(_expected_marker()))
    return dest


# ----------------------------------------------------------------------------- drawing


def _pattern(name: str, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """The boolean (h, w) map of one image of class ``name``: which of the two grey levels each pixel
    takes. Period (12-22 px), phase and a small rotation (+-12 degrees) are drawn per image, so a
    class is a kind of local structure, never a place, a phase or an exact scale."""
    yy = np.arange(h, dtype=np.float32)[:, None]  # (h,1), broadcast against xx (1,w)
    xx = np.arange(w, dtype=np.float32)[None, :]
    period = rng.uniform(12, 22)
    jitter = math.radians(rng.uniform(-12, 12))
    phase_u, phase_v = rng.uniform(0, period, 2)

    def frame(theta: float):
        """Coordinates along and across direction ``theta``, shifted by the image's phase."""
        c, s = math.cos(theta), math.sin(theta)
        return xx * c + yy * s + phase_u, -xx * s + yy * c + phase_v

    if name.startswith("stripes"):
        theta = {"stripes_h": 90, "stripes_v": 0, "stripes_diag": 45, "stripes_anti": 135}[name]
        u, _ = frame(math.radians(theta) + jitter)
        return np.sin(2 * math.pi * u / period) > 0
    if name == "checkers":
        u, v = frame(jitter)
        return (np.floor(u / period) + np.floor(v / period)) % 2 == 0
    if name == "dots":  # a square or diamond lattice of discs
        u, v = frame(jitter + math.pi / 4 * int(rng.integers(0, 2)))
        fu, fv = (u / period) % 1 - 0.5, (v / period) % 1 - 0.5
        return fu ** 2 + fv ** 2 < (0.28 * rng.uniform(0.8, 1.2)) ** 2
    if name == "grid":  # thin lines both ways
        u, v = frame(jitter)
        return ((u / period) % 1 < 0.25) | ((v / period) % 1 < 0.25)
    if name == "rings":  # concentric circles around a centre anywhere in the image
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        r = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
        return np.sin(2 * math.pi * r / period + phase_u) > 0
    if name == "zigzag":  # chevron stripes, horizontal or vertical
        u, v = frame(jitter + math.pi / 2 * int(rng.integers(0, 2)))
        tooth = np.abs((u / (1.5 * period)) % 1 - 0.5) * period
        return np.sin(2 * math.pi * (v + 1.2 * tooth) / period) > 0
    if name == "spots":  # thresholded smooth noise: irregular blobs
        noise = rng.normal(size=(max(2, h // 8), max(2, w // 8))).astype(np.float32)
        grey = ((noise - noise.min()) / (np.ptp(noise) + 1e-6) * 255).astype(np.uint8)
        field = np.asarray(Image.fromarray(grey).resize((w, h), Image.Resampling.BICUBIC), np.float32)
        return field > np.median(field)
    raise KeyError(name)


def render_image(class_id: int, rng: np.random.Generator) -> Image.Image:
    """One RGB image of the class, ~192 px a side, drawn from ``rng``: the class's pattern in two grey
    levels (at least 80 apart), under a brightness ramp, with sensor grain, slightly blurred."""
    h, w = (int(v) for v in rng.integers(21, 28, 2) * 8)  # 168..216
    pattern = _pattern(EMBEDDED_CLASSES[class_id], rng, h, w)
    dark = rng.uniform(0, 255)
    light = (dark + rng.uniform(80, 175)) % 255
    image = np.where(pattern, np.float32(dark), np.float32(light))                    # (h, w)
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    theta = rng.uniform(0, 2 * math.pi)
    ramp = (xx * math.cos(theta) + yy * math.sin(theta)) / max(h, w)
    image = image * (1 + rng.uniform(-0.3, 0.3) * ramp)
    image = image + rng.standard_normal((h, w), dtype=np.float32) * rng.uniform(3, 9)  # grain
    grey = image.clip(0, 255).astype(np.uint8)
    out = Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2))
    return out.filter(ImageFilter.BoxBlur(rng.uniform(0.3, 0.8)))  # slight lens blur
