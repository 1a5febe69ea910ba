"""The original fine-tuning transforms (timm's ``create_transform`` and torchvision's), run as
``transform(pil_image, rng)`` so that an augmentation is a function of (seed, epoch, index) as in
pre-training."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image

__all__ = ["SeededTransform", "build_classification_transform"]


class SeededTransform:
    """Run a torchvision/timm transform (which draws from ``random``, numpy's and torch's global
    generators: RandAugment picks its ops with ``np.random``) as a ``transform(pil_image, rng)``:
    all three are seeded from ``rng`` for the call and restored after it, so an augmentation is a
    function of (seed, epoch, index) as in pre-training."""

    def __init__(self, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.transform = transform

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        import random

        seed = int(rng.integers(2**32))
        states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        try:
            return self.transform(image)
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.random.set_rng_state(states[2])

    def __repr__(self) -> str:
        return f"SeededTransform({self.transform!r})"


def _posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """PIL's posterize, with 0 bits meaning what it meant in the Pillow of the originals: all bits cleared."""
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size, 0)
    return ImageOps.posterize(img, bits_to_keep)


def _allow_zero_bit_posterize(transform) -> None:
    """timm's RandAugment 'PosterizeIncreasing' asks for 0 bits at magnitude 10 (reached with
    ``mstd``), which Pillow >= 10 refuses with a ValueError that kills the data-loader worker; give
    those ops the old behaviour (a black image) instead."""
    for step in getattr(transform, "transforms", []):
        for op in getattr(step, "ops", []):
            if getattr(op, "name", "").startswith("Posterize"):
                op.aug_fn = _posterize


def build_classification_transform(is_train: bool, input_size: int, *, mean: Sequence[float], std: Sequence[float],
                                   color_jitter: float = 0.4, aa: str | None = "rand-m9-mstd0.5-inc1",
                                   train_interpolation: str = "bicubic", reprob: float = 0.25,
                                   remode: str = "pixel", recount: int = 1, crop_pct: float | None = None,
                                   crop_min_scale: float = 0.08) -> SeededTransform:
    """The original fine-tuning transforms, through timm and torchvision.

    Training: timm's ``create_transform`` (random-resized crop of scale (``crop_min_scale``, 1), flip, colour jitter or RandAugment
    ``--aa``, random erasing ``--reprob/--remode/--recount``); inputs of 32 px or less use a padded
    random crop instead of the resized crop (CIFAR). Evaluation: resize the short side to
    ``input_size / crop_pct`` (bicubic; crop_pct 224/256 below 384 px, 1.0 from 384) and centre crop;
    at 32 px or less no resize.
    """
    from timm.data import create_transform
    from torchvision import transforms as T

    if is_train:
        aa = None if aa in (None, "", "none", "None") else aa
        transform = create_transform(input_size=input_size, is_training=True, color_jitter=color_jitter,
                                     auto_augment=aa, interpolation=train_interpolation, re_prob=reprob,
                                     re_mode=remode, re_count=recount, mean=tuple(mean), std=tuple(std),
                                     scale=(crop_min_scale, 1.0))
        if input_size <= 32:
            transform.transforms[0] = T.RandomCrop(input_size, padding=4)
        _allow_zero_bit_posterize(transform)
        return SeededTransform(transform)
    steps = []
    if input_size > 32:
        pct = crop_pct if crop_pct is not None else (224 / 256 if input_size < 384 else 1.0)
        steps += [T.Resize(int(input_size / pct), interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(input_size)]
    steps += [T.ToTensor(), T.Normalize(tuple(mean), tuple(std))]
    return SeededTransform(T.Compose(steps))
