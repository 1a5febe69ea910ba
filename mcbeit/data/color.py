"""Colour jitter of the whole image before the views are cut: unilm's BEiT pre-training augmentation.

unilm's `beit/datasets.py` (``DataAugmentationForBEiT``) applies
``ColorJitter(0.4, 0.4, 0.4)`` to the whole image, then the flip, then the random-resized crop of
both views. :class:`JitterThenViews` does the same in front of any view transform: brightness,
contrast and saturation factors uniform in [1 - s, 1 + s], applied in a random order with
torchvision's functional ops on the fully decoded image (contrast blends with the whole image's
mean grey, so the crop cannot come first). The draws come from the sample's ``rng`` (first, before
the view transform's), so a resumed run draws the same.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
from PIL import Image
from torchvision.transforms import functional as TF

from mcbeit.data.images import OpenedImage

_OPS = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


def jitter_colour(image: Image.Image, strength: float, rng: np.random.Generator, *,
                  saturation: float | None = None, hue: float = 0.0) -> Image.Image:
    """torchvision's ``ColorJitter(strength, strength, saturation, hue)`` with draws from ``rng``:
    brightness, contrast and saturation each scaled by a factor uniform in [max(0, 1 - s), 1 + s]
    (``saturation`` defaults to ``strength``), the hue shifted by a value uniform in [-hue, hue]
    (only when ``hue`` > 0), in a random order."""
    sat = strength if saturation is None else saturation
    ranges = [(max(0.0, 1.0 - s), 1.0 + s) for s in (strength, strength, sat)]
    if hue > 0:
        ranges.append((-hue, hue))
    order = rng.permutation(len(ranges))
    low, high = np.array(ranges).T
    factors = rng.uniform(low, high)
    for i in order:
        image = _OPS[i](image, float(factors[i]))
    return image


class JitterThenViews:
    """``views(jitter_colour(image), rng)``: colour jitter of the whole image, then ``views``."""

    accepts_opened_image = True

    def __init__(self, views: Callable[[Image.Image, np.random.Generator], Any], strength: float):
        self.views, self.strength = views, float(strength)

    def __repr__(self) -> str:
        return f"ColorJitter({self.strength}, {self.strength}, {self.strength}) of the whole image, then {self.views!r}"

    def __call__(self, image: Image.Image | OpenedImage, rng: np.random.Generator) -> Any:
        if isinstance(image, OpenedImage):
            image = image.decode()  # every pixel: the contrast's mean is the whole image's
        return self.views(jitter_colour(image, self.strength, rng), rng)
