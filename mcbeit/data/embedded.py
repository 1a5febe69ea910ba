"""The embedded default dataset: generated images, so every command runs with no download.

Ten classes of drawn objects (discs, rings, squares, triangles, stripes, checkers, stars,
crosses, blobs, grids) with random colours, sizes, positions and rotations, shaded, with drop
shadows, on textured noisy gradient backgrounds, slightly blurred and saved as JPEG. Each class
is visually distinct (a classifier can learn them) and the images are locally smooth (a masked
patch is predictable from its context), which is what a pre-training smoke run needs.

The tree is an ImageFolder: ``<root>/train/<class>/*.jpg`` and ``<root>/val/<class>/*.jpg``.
It is generated once, deterministically, into a temporary folder beside the root and renamed
into place, so concurrent processes (DDP ranks, data-loader workers) never see half a dataset.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

__all__ = ["embedded_dataset_root", "generate_embedded_dataset", "EMBEDDED_CLASSES"]

logger = logging.getLogger(__name__)

VERSION = "embedded-v1"
EMBEDDED_CLASSES = (
    "disc", "ring", "square", "triangle", "stripes",
    "checkers", "star", "cross", "blobs", "grid",
)  # fmt: skip
SPLITS = {"train": 100, "val": 20}  # images per class
MARKER = "COMPLETE.json"
_SEED = 20220722
_JPEG_QUALITY = 90


def default_cache_dir() -> Path:
    """``$MCBEIT_CACHE`` if set, else ``~/.cache/mcbeit``."""
    env = os.environ.get("MCBEIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mcbeit"


def _expected_marker() -> dict:
    return {"version": VERSION, "classes": list(EMBEDDED_CLASSES), "images_per_class": SPLITS}


def _is_complete(root: Path) -> bool:
    """The marker matches and every split/class folder holds the expected number of files."""
    try:
        marker = json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return False
    if marker != _expected_marker():
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
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root = cache / VERSION
    if _is_complete(root):
        return root
    cache.mkdir(parents=True, exist_ok=True)
    with _generation_lock(cache):  # lets concurrent ranks wait instead of all generating
        if not _is_complete(root):
            _generate_atomically(cache, root)
    if not _is_complete(root):
        raise RuntimeError(f"embedded dataset at {root} is incomplete after generation")
    return root


@contextlib.contextmanager
def _generation_lock(cache: Path):
    """An advisory lock where the platform has one; correctness never depends on it (the tree
    appears by an atomic rename), it only saves duplicate work."""
    if fcntl is None:
        yield
        return
    try:
        handle = open(cache / f".{VERSION}.lock", "a")
    except OSError:
        yield
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:  # e.g. a file system without locks
            pass
        yield  # closing the file releases the lock


def _generate_atomically(cache: Path, root: Path) -> None:
    tmp = cache / f".{VERSION}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    start = time.perf_counter()
    logger.info("generating the embedded dataset into %s (once)", root)
    try:
        generate_embedded_dataset(tmp)
        if root.exists() and not _is_complete(root):
            # A stale or damaged tree (not ours: ours only ever appear complete): move it aside.
            stale = cache / f".{VERSION}.stale-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(root, stale)
                shutil.rmtree(stale, ignore_errors=True)
            except OSError:
                pass  # someone else moved it first
        try:
            os.rename(tmp, root)
        except OSError:
            if not _is_complete(root):  # lost a race to a process whose tree is complete?
                raise
            logger.info("another process generated %s first; using theirs", root)
        else:
            logger.info("embedded dataset ready in %.1f s: %s", time.perf_counter() - start, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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


def _random_colour(rng: np.random.Generator, avoid: np.ndarray | None = None) -> np.ndarray:
    """An RGB colour in [0, 255], a clear distance from ``avoid`` when 8 tries find one."""
    for _ in range(8):
        colour = rng.uniform(0, 255, 3)
        if avoid is None or np.abs(colour - avoid).sum() > 180:
            break
    return colour.astype(np.float32)


def _background(rng: np.random.Generator, h: int, w: int, yy, xx) -> np.ndarray:
    """Gradient between two colours + low-frequency colour blotches, float (3,h,w)."""
    c0, c1 = rng.uniform(20, 235, (2, 3, 1, 1)).astype(np.float32)
    theta = rng.uniform(0, 2 * math.pi)
    g = (xx * math.cos(theta) + yy * math.sin(theta)) / max(h, w) + 0.5  # ~[0,1]
    bg = c0 + (c1 - c0) * np.clip(g, 0, 1)[None]
    cells = int(rng.integers(3, 8))
    blotch = rng.normal(0, 20, (cells, cells, 3)).clip(-127, 127) + 128
    blotch = Image.fromarray(blotch.astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    bg += np.asarray(blotch, dtype=np.float32).transpose(2, 0, 1) - 128.0
    return bg


def _rotated(yy, xx, cy, cx, angle):
    """Coordinates (u, v) of every pixel in a frame centred on (cy, cx), rotated by angle."""
    c, s = math.cos(angle), math.sin(angle)
    dx, dy = xx - cx, yy - cy
    return dx * c + dy * s, -dx * s + dy * c


def _polygon_mask(h: int, w: int, polygons: list[list[tuple[float, float]]], holes=()) -> Image.Image:
    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    for points in polygons:
        draw.polygon(points, fill=255)
    for points in holes:
        draw.polygon(points, fill=0)
    return mask


def _star_points(cx, cy, radii, angles) -> list[tuple[float, float]]:
    return [(cx + r * math.cos(a), cy + r * math.sin(a)) for r, a in zip(radii, angles, strict=True)]


def _regular(cx, cy, r, n, angle, aspect=1.0) -> list[tuple[float, float]]:
    """A regular n-gon (an ellipse for large n) of radius r, stretched by aspect, rotated."""
    t = np.arange(n) * 2 * math.pi / n
    x, y = r * aspect * np.cos(t), r * np.sin(t)
    c, s = math.cos(angle), math.sin(angle)
    return list(zip(cx + x * c - y * s, cy + x * s + y * c, strict=True))


def _object(class_id: int, rng: np.random.Generator, h: int, w: int, yy, xx, bg_mean):
    """(alpha (h,w) in [0,1], colour (3,h,w)) for one object of the class."""
    size = min(h, w)
    r = rng.uniform(0.2, 0.36) * size
    margin = 0.6 * r
    cx, cy = rng.uniform(margin, w - margin), rng.uniform(margin, h - margin)
    angle = rng.uniform(0, 2 * math.pi)
    colour = _random_colour(rng, bg_mean)
    name = EMBEDDED_CLASSES[class_id]
    mask, pattern = _shape(name, rng, h, w, yy, xx, cx, cy, r, angle)

    alpha = np.asarray(mask.filter(ImageFilter.BoxBlur(0.7)), dtype=np.float32) / 255.0
    # Shading: a linear ramp across the object (a sphere-like highlight for discs).
    u, v = _rotated(yy, xx, cy, cx, rng.uniform(0, 2 * math.pi))
    if name == "disc":
        shade = 1.25 - 0.5 * np.sqrt((u + 0.35 * r) ** 2 + (v + 0.35 * r) ** 2) / (1.6 * r)
    else:
        shade = 1.0 + 0.25 * np.clip(u / r, -1.5, 1.5)
    if pattern is not None:
        colour2 = _random_colour(rng, colour)
        rgb = np.where(pattern[None], colour[:, None, None], colour2[:, None, None])
    else:
        rgb = colour[:, None, None]
    return alpha, rgb * shade[None]


def _shape(name: str, rng: np.random.Generator, h: int, w: int, yy, xx, cx: float, cy: float, r: float,
           angle: float) -> tuple[Image.Image, np.ndarray | None]:
    """(mask, pattern) of one object of class ``name`` centred at (cx, cy) with radius ``r``: the
    mask an "L" image, the pattern None or a boolean map choosing between two colours inside it."""
    if name == "disc":
        return _polygon_mask(h, w, [_regular(cx, cy, r, 64, angle, rng.uniform(0.8, 1.0))]), None
    if name == "ring":
        inner = r * rng.uniform(0.45, 0.7)
        return _polygon_mask(h, w, [_regular(cx, cy, r, 64, 0)], [_regular(cx, cy, inner, 64, 0)]), None
    if name == "square":
        return _polygon_mask(h, w, [_regular(cx, cy, r, 4, angle)]), None
    if name == "triangle":
        return _polygon_mask(h, w, [_regular(cx, cy, r * 1.1, 3, angle)]), None
    if name == "star":
        n = 5
        angles = angle + np.arange(2 * n) * math.pi / n
        radii = np.where(np.arange(2 * n) % 2 == 0, r * 1.1, r * rng.uniform(0.38, 0.5))
        return _polygon_mask(h, w, [_star_points(cx, cy, radii, angles)]), None
    if name == "cross":
        a = r * rng.uniform(0.28, 0.4)  # half arm width
        pts = [(a, r), (a, a), (r, a), (r, -a), (a, -a), (a, -r),
               (-a, -r), (-a, -a), (-r, -a), (-r, a), (-a, a), (-a, r)]  # fmt: skip
        c, s = math.cos(angle), math.sin(angle)
        return _polygon_mask(h, w, [[(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]]), None
    if name == "blobs":
        return _polygon_mask(h, w, [_blob(rng, cx, cy, r) for _ in range(int(rng.integers(2, 5)))]), None
    # patterned squares: stripes, checkers, grid
    mask = _polygon_mask(h, w, [_regular(cx, cy, r * 1.15, 4, angle)])
    u, v = _rotated(yy, xx, cy, cx, angle + math.pi / 4)
    period = rng.uniform(9, 18)
    if name == "stripes":
        return mask, np.sin(2 * math.pi * u / period) > 0
    if name == "checkers":
        return mask, (np.floor(u / period) + np.floor(v / period)) % 2 == 0
    fu, fv = (u / period) % 1.0, (v / period) % 1.0  # grid: thin lines, background visible between them
    lines = (fu < 0.22) | (fv < 0.22)
    return Image.fromarray((np.asarray(mask) * lines).astype(np.uint8)), None


def _blob(rng: np.random.Generator, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """The outline of one wobbly disc near (cx, cy) (of the "blobs" class)."""
    br = r * rng.uniform(0.3, 0.5)
    bx = cx + rng.uniform(-0.6, 0.6) * r
    by = cy + rng.uniform(-0.6, 0.6) * r
    t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
    rad = br * (1 + sum(rng.uniform(0, 0.25) * np.sin(k * t + rng.uniform(0, 6.3))
                        for k in (2, 3, 4)))  # fmt: skip
    return list(zip(bx + rad * np.cos(t), by + rad * np.sin(t), strict=True))


def render_image(class_id: int, rng: np.random.Generator) -> Image.Image:
    """One RGB image of the class, ~192 px a side, drawn from ``rng``."""
    h, w = (int(v) for v in rng.integers(21, 28, 2) * 8)  # 168..216
    yy = np.arange(h, dtype=np.float32)[:, None]  # (h,1), broadcast against xx (1,w)
    xx = np.arange(w, dtype=np.float32)[None, :]
    image = _background(rng, h, w, yy, xx)  # (3,h,w) float32: channels first, fast numpy
    for _ in range(1 if rng.random() < 0.7 else 2):
        bg_mean = image[:, ::8, ::8].mean(axis=(1, 2))
        alpha, rgb = _object(class_id, rng, h, w, yy, xx, bg_mean)
        shadow = np.roll(alpha, (int(rng.integers(2, 6)), int(rng.integers(2, 6))), axis=(0, 1))
        image *= 1.0 - 0.35 * shadow[None]
        image += (rgb - image) * alpha[None]
    image += rng.standard_normal((1, h, w), dtype=np.float32) * rng.uniform(3, 9)  # grain
    out = Image.fromarray(image.clip(0, 255).astype(np.uint8).transpose(1, 2, 0).copy())
    return out.filter(ImageFilter.BoxBlur(rng.uniform(0.3, 0.8)))  # slight lens blur
