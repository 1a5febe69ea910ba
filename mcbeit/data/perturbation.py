"""ConMIM's two views of one crop (TencentARC/ConMIM ``datasets.py``, ``DataAugmentationForConMIM``).

One flip and one random-resized crop (area 0.08-1, bicubic by default) give a uint8 image; from it:

- the student's view: ToTensor + Normalize only (it is masked later, in the model);
- the teacher's view, the "image perturbation": ``ColorJitter(0.4, 0.4, 0.2, 0.1)`` with p 0.8,
  grayscale with p 0.2, Gaussian blur (PIL, radius uniform in [0.1, 2]) with p 0.1, solarize (PIL,
  threshold 128) with p 0.2, in that order, then ToTensor + Normalize.

The geometry is shared, so patch i of one view is patch i of the other. The original also resizes a
second 112 px view for a tokenizer and throws it away: not done here. Every draw comes from the
sample's ``rng``, in a fixed order: flip, box, filter, jitter (apply, order, factors), grayscale,
blur (apply, radius), solarize, mask; so a resumed run draws the same.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

from mcbeit.data.color import jitter_colour
from mcbeit.data.images import OpenedImage
from mcbeit.data.transforms import _affine, _interpolation_name, _resized_views, _size, parse_interpolation

#: the original's perturbation: (jitter p, brightness/contrast, saturation, hue), grayscale p, blur p, solarize p
JITTER_P, JITTER, JITTER_SATURATION, JITTER_HUE = 0.8, 0.4, 0.2, 0.1
GRAYSCALE_P, BLUR_P, BLUR_RADIUS, SOLARIZE_P = 0.2, 0.1, (0.1, 2.0), 0.2


def perturb(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The teacher's photometric perturbation of one RGB image (see the module docstring)."""
    if rng.random() < JITTER_P:
        image = jitter_colour(image, JITTER, rng, saturation=JITTER_SATURATION, hue=JITTER_HUE)
    if rng.random() < GRAYSCALE_P:
        image = image.convert("L").convert("RGB")  # torchvision's RandomGrayscale(3 channels): PIL's L, repeated
    if rng.random() <= BLUR_P:  # the original's "<=" (DINO's GaussianBlur)
        image = image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(*BLUR_RADIUS))))
    if rng.random() < SOLARIZE_P:
        image = ImageOps.solarize(image)  # threshold 128
    return image


class DenoisingViews:
    """``__call__(image, rng) -> (student_view, teacher_view, mask)``: (3,H,W) float32 each, normalised
    with ``mean``/``std``, and the mask (N,) bool from ``mask_generator(rng)``."""

    accepts_opened_image = True

    def __init__(self, input_size: int | Sequence[int], interpolation: str = "bicubic",
                 mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5),
                 mask_generator: Callable[[np.random.Generator], np.ndarray] | None = None,
                 scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 flip_prob: float = 0.5) -> None:
        if mask_generator is None:
            raise ValueError("DenoisingViews needs a mask_generator (see build_mask_generator)")
        self.input_size = _size(input_size)
        self.interpolation = parse_interpolation(interpolation)
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        self._scale, self._offset = _affine(self.mean, self.std)
        self._pixels = (torch.ones(3, 1, 1), torch.zeros(3, 1, 1))  # keep 0..255
        self.mask_generator = mask_generator
        self.scale, self.ratio, self.flip_prob = tuple(scale), tuple(ratio), float(flip_prob)

    def __repr__(self) -> str:
        return (f"DenoisingViews(flip p={self.flip_prob}, random_resized_crop scale={self.scale} "
                f"{self.input_size} {_interpolation_name(self.interpolation)}; student: normalise mean={self.mean} "
                f"std={self.std}; teacher: ColorJitter({JITTER}, {JITTER}, {JITTER_SATURATION}, {JITTER_HUE}) "
                f"p={JITTER_P}, grayscale p={GRAYSCALE_P}, blur p={BLUR_P}, solarize p={SOLARIZE_P}, normalise; "
                f"mask: {self.mask_generator!r})")

    def _normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.to(torch.float32).mul_(self._scale).sub_(self._offset)

    def __call__(self, image: Image.Image | OpenedImage, rng: np.random.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        [crop] = _resized_views(image, rng, self.flip_prob, self.scale, self.ratio,
                                ((self.input_size, self.interpolation, *self._pixels),))  # (3,H,W) 0..255
        crop = crop.round_().clamp_(0, 255).to(torch.uint8)                                # the PIL crop's pixels
        perturbed = perturb(Image.fromarray(crop.permute(1, 2, 0).numpy()), rng)
        teacher = torch.from_numpy(np.array(perturbed)).permute(2, 0, 1)                  # (3,H,W) uint8
        mask = np.ascontiguousarray(self.mask_generator(rng), dtype=np.bool_)             # (h,w)
        return self._normalise(crop), self._normalise(teacher), torch.from_numpy(mask.reshape(-1))
