"""Semantic-segmentation transforms: mmseg 0.11's ADE20K pipeline, step for step, with every random
draw taken from the sample's own generator.

Training (``SegTrainTransform``), in mmseg's order:

1. keep-ratio rescale to ``img_scale`` x ratio, ratio ~ U[0.5, 2.0): mmcv's ``rescale_size`` rule
   ``f = min(long_max / long_side, short_max / short_side)``, new size ``int(side * f + 0.5)``
   (so the short side becomes ~512 r unless the image is more than 4:1; torchvision's
   ``ScaleJitter`` uses ``min(th / h, tw / w)`` and disagrees on portrait images); cv2 bilinear
   for the image, nearest for the label, both on uint8;
2. random crop to ``crop_size`` (smaller if the image is): a crop is redrawn while its largest
   class covers ``cat_max_ratio`` or more of its valid pixels, or it holds a single class; ten
   crops are checked, an eleventh is taken unchecked;
3. horizontal flip with probability 0.5;
4. mmseg's ``PhotoMetricDistortion`` on uint8 (not torchvision's ColorJitter): brightness shift,
   contrast as a *gain*, OpenCV-HSV saturation scale and integer hue shift in [-18, 17] on the
   0..179 scale, each with probability 0.5, each truncating to uint8; contrast runs first or last
   (``mode``). mmseg runs it on BGR with ``BGR2HSV``; on RGB with ``RGB2HSV`` every value is the
   same;
5. normalise with ImageNet's mean and std (0..255 scale);
6. pad right and bottom to ``crop_size``: the image with 0 *after* normalising (the mean colour),
   the label with 255 (ignored).

Evaluation (``SegTestTransform``): mmseg's ``MultiScaleFlipAug``: one or more keep-ratio rescales,
each optionally with its mirror image, normalised, not padded; the label stays at the original size.

Images are RGB uint8 ``(H, W, 3)`` numpy arrays, labels ``(H, W)`` uint8 class indices (255 = ignore).
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch

__all__ = [
    "IMAGENET_MEAN_255",
    "IMAGENET_STD_255",
    "SegTestTransform",
    "SegTrainTransform",
    "normalise",
    "photometric_distortion",
    "random_crop_box",
    "rescale_size",
    "seg_collate",
    "setr_rescale_size",
]

IMAGENET_MEAN_255 = (123.675, 116.28, 103.53)
IMAGENET_STD_255 = (58.395, 57.12, 57.375)
IGNORE_INDEX = 255


# ----------------------------------------------------------------------------- geometry


def rescale_size(width: int, height: int, scale: Sequence[float]) -> tuple[int, int]:
    """The (width, height) of a keep-ratio rescale "as large as possible within ``scale``" (mmcv's rule).

    The longer image side may grow to ``max(scale)`` and the shorter to ``min(scale)``, whichever
    binds first; each side is rounded half up. Never below 1 pixel (mmcv would crash there).
    """
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return max(1, int(width * float(factor) + 0.5)), max(1, int(height * float(factor) + 0.5))


def setr_rescale_size(width: int, height: int, scale: Sequence[float], crop_size: Sequence[int]) -> tuple[int, int]:
    """The (width, height) of SETR_Resize, the multi-scale test resize of BEiT's configs.

    The short side becomes ``min(scale)``, or ``crop_size[0]`` if that is larger (a view smaller
    than the crop would not fit BEiT's fixed position grid), with no cap on the long side: the
    target is stated as (long, short) keeping the aspect ratio and passed through mmcv's rule.
    """
    short = crop_size[0] if min(scale) < crop_size[0] else min(scale)
    if height > width:
        target = (short * height / width, short)
    else:
        target = (short, short * width / height)
    return rescale_size(width, height, target)


def _resize(image: np.ndarray, label: np.ndarray | None, size: tuple[int, int]):
    """cv2 bilinear for the image, nearest for the label (uint8 both); ``size`` is (width, height)."""
    image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
    if label is not None:
        label = cv2.resize(label, size, interpolation=cv2.INTER_NEAREST)
    return image, label


def _draw_box(height: int, width: int, crop: tuple[int, int], rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(y1, y2, x1, x2) of a uniformly placed crop; a side smaller than the crop is kept whole."""
    y = int(rng.integers(0, max(height - crop[0], 0) + 1))
    x = int(rng.integers(0, max(width - crop[1], 0) + 1))
    return y, y + crop[0], x, x + crop[1]


def _crop_is_balanced(label_crop: np.ndarray, cat_max_ratio: float, ignore_index: int) -> bool:
    """At least two valid classes, and none covering ``cat_max_ratio`` or more of the valid pixels."""
    values, counts = np.unique(label_crop, return_counts=True)
    counts = counts[values != ignore_index]
    return len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio


def random_crop_box(
    label: np.ndarray,
    crop: tuple[int, int],
    rng: np.random.Generator,
    cat_max_ratio: float = 0.75,
    ignore_index: int = IGNORE_INDEX,
    checked_tries: int = 10,
) -> tuple[int, int, int, int]:
    """(y1, y2, x1, x2) of mmseg's RandomCrop: up to ``checked_tries`` crops are checked for balance
    (:func:`_crop_is_balanced`), and if none passes one more is drawn and used unchecked.
    ``cat_max_ratio`` >= 1 turns the check off (one draw)."""
    height, width = label.shape
    box = _draw_box(height, width, crop, rng)
    if cat_max_ratio < 1.0:
        for _ in range(checked_tries):
            y1, y2, x1, x2 = box
            if _crop_is_balanced(label[y1:y2, x1:x2], cat_max_ratio, ignore_index):
                break
            box = _draw_box(height, width, crop, rng)
    return box


# ----------------------------------------------------------------------------- photometric


def _affine_uint8(image: np.ndarray, gain: float = 1.0, shift: float = 0.0) -> np.ndarray:
    """``image * gain + shift`` in float32, clipped to [0, 255] and truncated to uint8 (mmseg's rounding)."""
    return np.clip(image.astype(np.float32) * gain + shift, 0, 255).astype(np.uint8)


def _scale_saturation(image: np.ndarray, gain: float) -> np.ndarray:
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)  # uint8: H in 0..179, S and V in 0..255
    hsv[:, :, 1] = _affine_uint8(hsv[:, :, 1], gain=gain)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def _shift_hue(image: np.ndarray, delta: int) -> np.ndarray:
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    hsv[:, :, 0] = (hsv[:, :, 0].astype(np.int64) + delta) % 180
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def photometric_distortion(
    image: np.ndarray,
    rng: np.random.Generator,
    brightness_delta: int = 32,
    contrast_range: tuple[float, float] = (0.5, 1.5),
    saturation_range: tuple[float, float] = (0.5, 1.5),
    hue_delta: int = 18,
) -> np.ndarray:
    """mmseg's PhotoMetricDistortion of an RGB uint8 image, drawing from ``rng`` in mmseg's order:
    brightness? (+U(-32, 32)), mode, [contrast? (x U(0.5, 1.5)) if mode 1], saturation?, hue?
    (+integer in [-hue_delta, hue_delta)), [contrast? if mode 0]. Each "?" is a fair coin."""

    def contrast(img: np.ndarray) -> np.ndarray:
        if rng.integers(2):
            return _affine_uint8(img, gain=rng.uniform(*contrast_range))
        return img

    if rng.integers(2):
        image = _affine_uint8(image, shift=rng.uniform(-brightness_delta, brightness_delta))
    contrast_first = rng.integers(2) == 1
    if contrast_first:
        image = contrast(image)
    if rng.integers(2):
        image = _scale_saturation(image, rng.uniform(*saturation_range))
    if rng.integers(2):
        image = _shift_hue(image, int(rng.integers(-hue_delta, hue_delta)))
    if not contrast_first:
        image = contrast(image)
    return image


# ----------------------------------------------------------------------------- tensors


def normalise(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (3, H, W) float32 ``(x - mean) / std``."""
    array = image.astype(np.float32)
    array = (array - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)          # (H, W, 3)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))             # (3, H, W)


def _pad_to(image: torch.Tensor, label: torch.Tensor, size: tuple[int, int], ignore_index: int):
    """Pad right and bottom to ``size`` (h, w): the image with 0, the label with ``ignore_index``."""
    _, h, w = image.shape
    if (h, w) == tuple(size):
        return image, label
    padded_image = image.new_zeros((3, size[0], size[1]))                                 # (3, cropH, cropW)
    padded_image[:, :h, :w] = image
    padded_label = label.new_full((size[0], size[1]), ignore_index)                       # (cropH, cropW)
    padded_label[:h, :w] = label
    return padded_image, padded_label


def _check_inputs(image: np.ndarray, label: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {image.dtype} {image.shape}")
    if label.shape != image.shape[:2] or label.dtype != np.uint8:
        raise ValueError(f"expected an (H, W) uint8 label of the image's size {image.shape[:2]}, "
                         f"got {label.dtype} {label.shape}")


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (int(value), int(value)) if isinstance(value, (int, np.integer)) else tuple(int(v) for v in value)
    if len(pair) != 2 or min(pair) <= 0:
        raise ValueError(f"{name} must be a positive int or (h, w) pair, got {value!r}")
    return pair


# ----------------------------------------------------------------------------- transforms


class SegTrainTransform:
    """mmseg's ADE20K training pipeline (module docstring): ``(image, label, rng)`` ->
    ``(image (3, cropH, cropW) float32, label (cropH, cropW) int64)``."""

    def __init__(
        self,
        crop_size: int | Sequence[int] = (512, 512),
        img_scale: Sequence[int] = (2048, 512),
        ratio_range: Sequence[float] | None = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        flip_prob: float = 0.5,
        photometric: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN_255,
        std: Sequence[float] = IMAGENET_STD_255,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        self.crop_size = _pair(crop_size, "crop_size")
        self.img_scale = tuple(int(v) for v in img_scale)
        self.ratio_range = None if ratio_range is None else tuple(float(r) for r in ratio_range)
        if self.ratio_range is not None and not 0 < self.ratio_range[0] <= self.ratio_range[1]:
            raise ValueError(f"ratio_range must be (low, high) with 0 < low <= high, got {ratio_range!r}")
        self.cat_max_ratio = float(cat_max_ratio)
        self.flip_prob = float(flip_prob)
        self.photometric = bool(photometric)
        self.mean, self.std = tuple(mean), tuple(std)
        self.ignore_index = int(ignore_index)

    def draw_scale(self, rng: np.random.Generator) -> tuple[int, int]:
        """``img_scale`` times a ratio drawn uniformly from ``ratio_range``, each side truncated."""
        if self.ratio_range is None:
            return self.img_scale
        low, high = self.ratio_range
        ratio = rng.random() * (high - low) + low
        return int(self.img_scale[0] * ratio), int(self.img_scale[1] * ratio)

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator):
        _check_inputs(image, label)
        height, width = label.shape
        image, label = _resize(image, label, rescale_size(width, height, self.draw_scale(rng)))
        y1, y2, x1, x2 = random_crop_box(label, self.crop_size, rng, self.cat_max_ratio, self.ignore_index)
        image, label = image[y1:y2, x1:x2], label[y1:y2, x1:x2]                           # (h<=cropH, w<=cropW)
        if rng.random() < self.flip_prob:
            image, label = image[:, ::-1], label[:, ::-1]
        image = np.ascontiguousarray(image)
        if self.photometric:
            image = photometric_distortion(image, rng)
        image_t = normalise(image, self.mean, self.std)                                   # (3, h, w)
        label_t = torch.from_numpy(label.astype(np.int64))                                # (h, w)
        return _pad_to(image_t, label_t, self.crop_size, self.ignore_index)

    def __repr__(self) -> str:
        return (f"SegTrainTransform(crop_size={self.crop_size}, img_scale={self.img_scale}, "
                f"ratio_range={self.ratio_range}, cat_max_ratio={self.cat_max_ratio}, flip_prob={self.flip_prob}, "
                f"photometric={self.photometric})")


class SegTestTransform:
    """mmseg's MultiScaleFlipAug: ``(image, label, rng)`` -> ``(views, label (H, W) int64)``, where
    ``views`` is a list of ``(image (3, h, w) float32, flipped)``, per scale its plain then (with
    ``flip``) its mirrored view, none padded.

    Scales are ``(int(img_scale[0] r), int(img_scale[1] r))`` per ratio. With the single ratio 1.0
    (the single-scale configs) the resize is mmcv's keep-ratio rule; with other ratios and
    ``setr_resize`` it is SETR_Resize (:func:`setr_rescale_size`: short side at least the crop, no
    long-side cap), as BEiT's multi-scale configs, so that ratios 0.5 and 0.75 become 1.0.
    ``rng`` is unused (the views are deterministic); it keeps the transforms interchangeable.
    """

    def __init__(
        self,
        img_scale: Sequence[int] = (2048, 512),
        ratios: Sequence[float] = (1.0,),
        flip: bool = False,
        crop_size: int | Sequence[int] = (512, 512),
        setr_resize: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN_255,
        std: Sequence[float] = IMAGENET_STD_255,
    ) -> None:
        if not ratios or min(ratios) <= 0:
            raise ValueError(f"ratios must be positive numbers, got {ratios!r}")
        self.img_scale = tuple(int(v) for v in img_scale)
        self.ratios = tuple(float(r) for r in ratios)
        self.flip = bool(flip)
        self.crop_size = _pair(crop_size, "crop_size")
        self.setr_resize = bool(setr_resize)
        self.mean, self.std = tuple(mean), tuple(std)

    @property
    def scales(self) -> list[tuple[int, int]]:
        return [(int(self.img_scale[0] * r), int(self.img_scale[1] * r)) for r in self.ratios]

    @property
    def uses_setr_resize(self) -> bool:
        return self.setr_resize and self.ratios != (1.0,)

    def view_size(self, width: int, height: int, scale: tuple[int, int]) -> tuple[int, int]:
        """(width, height) of the view of a ``width`` x ``height`` image at ``scale``."""
        if self.uses_setr_resize:
            return setr_rescale_size(width, height, scale, self.crop_size)
        return rescale_size(width, height, scale)

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator | None = None):
        _check_inputs(image, label)
        height, width = label.shape
        views = []
        for scale in self.scales:
            resized, _ = _resize(image, None, self.view_size(width, height, scale))
            plain = normalise(resized, self.mean, self.std)                               # (3, h, w)
            views.append((plain, False))
            if self.flip:
                views.append((plain.flip(-1), True))
        return views, torch.from_numpy(label.astype(np.int64))                            # label (H, W)

    def __repr__(self) -> str:
        return (f"SegTestTransform(img_scale={self.img_scale}, ratios={self.ratios}, flip={self.flip}, "
                f"crop_size={self.crop_size}, setr_resize={self.uses_setr_resize})")


def seg_collate(batch: Sequence[tuple]) -> tuple:
    """Evaluation batches of images of different sizes: transposes the items, so that each field
    becomes a list over the batch; integer fields (index, n_skipped) become int64 tensors.

    An eval item ``(views, label, index, n_skipped)`` gives ``(list[views], list[label (H, W)],
    index (B,), n_skipped (B,))``; with batch size 1, ``views[0]`` and ``label[0]`` are the image's.
    """
    fields = list(zip(*batch, strict=True))
    return tuple(torch.as_tensor(f, dtype=torch.int64) if all(isinstance(v, (int, np.integer)) for v in f)
                 else list(f) for f in fields)
