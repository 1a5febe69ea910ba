"""The pre-training data pipeline per worker: decode + two-view transform + mask, on real JPEG files.

The benchmark writes its own JPEGs (photo-like content: smooth colour fields, shapes, texture and
noise, quality 90) at a chosen size, then times, in one process (one loader worker's work), the
product's dataset item (:class:`mcbeit.data.datasets.ImageDataset` with
:class:`mcbeit.data.transforms.TwoViewTransform`) and the reference pipeline
(:class:`mcbeit.bench.reference.ReferenceTwoViews`) on the same files, alternating file by file.
Both run with one intra-op thread, as in a data-loader worker (PyTorch sets that in each one):
with more, their small torch ops wait on each other's threads when the machine is busy.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from mcbeit.bench.reference import ReferenceTwoViews
from mcbeit.data.datasets import build_pretraining_dataset
from mcbeit.data.masking import build_mask_generator
from mcbeit.data.transforms import TwoViewTransform
from mcbeit.tokenizers.base import Normalize

INCEPTION = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def write_jpegs(folder: Path, count: int, size: tuple[int, int], seed: int = 0) -> Path:
    """``count`` photo-like JPEGs of ``size`` (width, height) in ``folder/class_0``."""
    out = folder / "class_0"
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    width, height = size
    for i in range(count):
        path = out / f"{i:05d}.jpg"
        if path.exists():
            continue
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        base = rng.uniform(0, 255, 3)
        tilt = rng.uniform(-0.3, 0.3, (2, 3))
        field = base + xx[..., None] * tilt[0] + yy[..., None] * tilt[1]
        field += 30 * np.sin(xx[..., None] / rng.uniform(5, 40) + rng.uniform(0, 6, 3))   # texture
        image = Image.fromarray(np.clip(field, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
            r = rng.uniform(0.05, 0.3) * min(width, height)
            draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=tuple(int(v) for v in rng.uniform(0, 255, 3)))
        image = image.filter(ImageFilter.GaussianBlur(1.0))
        noisy = np.asarray(image, dtype=np.int16) + rng.normal(0, 6, (height, width, 3)).astype(np.int16)
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(path, quality=90)
    return folder


def run_data(folder: Path, count: int = 64, size: tuple[int, int] = (500, 375), input_size: int = 224,
             repeats: int = 2) -> dict:
    """Milliseconds per image (median over files) and images/s per worker, ours and the reference."""
    write_jpegs(folder, count, size)
    window = input_size // 16
    masks = build_mask_generator("block", window, round(0.383 * window * window), 0.75, min(16, window * window // 4), None)
    mean, std = INCEPTION
    transform = TwoViewTransform(input_size, input_size // 2, "bicubic", "lanczos", mean, std,
                                 Normalize(mean, std), masks)
    dataset = build_pretraining_dataset(str(folder), "image_folder", transform, seed=0)
    reference = ReferenceTwoViews(input_size, input_size // 2, masks, mean=mean, std=std,
                                  second_mean=mean, second_std=std)
    ours, theirs = [], []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a data-loader worker
    try:
        for epoch in range(repeats + 1):
            for index in range(len(dataset)):
                t0 = time.perf_counter()
                dataset[(index, epoch)]
                t1 = time.perf_counter()
                reference(str(dataset.path(index)), dataset.rng(index, epoch))
                t2 = time.perf_counter()
                if epoch:  # the first pass warms the page cache and the allocators
                    ours.append(t1 - t0)
                    theirs.append(t2 - t1)
    finally:
        torch.set_num_threads(threads)
    ours_s, ref_s = statistics.median(ours), statistics.median(theirs)
    return {"config": f"data {size[0]}x{size[1]} jpeg -> {input_size}+{input_size // 2}",
            "image_size": list(size), "images": count,
            "ours": {"ms_per_image": 1e3 * ours_s, "images_per_s": 1 / ours_s},
            "reference": {"ms_per_image": 1e3 * ref_s, "images_per_s": 1 / ref_s},
            "speedup": ref_s / ours_s}
