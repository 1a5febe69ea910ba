"""The two views of one random crop that BEiT-style pre-training needs.

View A feeds the ViT, view B the tokenizer; both are resized from the *same* box of the
(possibly flipped) image, each straight from the decoded image (never resized twice), and only
the small outputs are flipped. Bilinear and bicubic views are resized by torch's antialiased
uint8 kernel (PIL's filters, within 2 levels, several times faster); lanczos, hamming, box and
nearest by PIL's ``resize``. Given an :class:`~mcbeit.data.images.OpenedImage` (what
:class:`~mcbeit.data.datasets.ImageDataset` passes), a transform decodes the file itself, a JPEG
at 1/2, 1/4 or 1/8 scale when the box is that much larger than every view.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD

from mcbeit.data.classification_transforms import SeededTransform, build_classification_transform
from mcbeit.data.images import OpenedImage

__all__ = ["TwoViewTransform", "OneViewTransform", "SeededTransform", "build_classification_transform", "parse_interpolation", "sample_crop_box", "sample_flipped_box",
           "INTERPOLATIONS"]

INTERPOLATIONS: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "hamming": Image.Resampling.HAMMING,
    "box": Image.Resampling.BOX,
}
# timm's 'random' interpolation: a fresh choice per image between these two.
_RANDOM_CHOICES = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)
# The filters torch resizes (its antialiased kernels are PIL's filters); PIL keeps the others.
_TORCH_MODES = {Image.Resampling.BILINEAR: "bilinear", Image.Resampling.BICUBIC: "bicubic"}

Interpolation = Image.Resampling | str  # a PIL filter, or the string "random"


def normalisation(imagenet_default_mean_and_std: bool) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of the ViT's input: ImageNet's with ``--imagenet_default_mean_and_std``, else the
    originals' default (0.5, 0.5, 0.5) / (0.5, 0.5, 0.5)."""
    if imagenet_default_mean_and_std:
        return IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    return IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD


def parse_interpolation(name: str | Image.Resampling) -> Interpolation:
    """A PIL resampling filter for a command-line name, or ``"random"`` (bilinear/bicubic)."""
    if isinstance(name, Image.Resampling):
        return name
    key = str(name).strip().lower()
    if key == "random":
        return "random"
    if key in INTERPOLATIONS:
        return INTERPOLATIONS[key]
    raise ValueError(
        f"unknown interpolation {name!r}: choose one of {', '.join([*INTERPOLATIONS, 'random'])}"
    )


def _interpolation_name(interpolation: Interpolation) -> str:
    return interpolation if isinstance(interpolation, str) else interpolation.name.lower()


def _size(size: int | Sequence[int]) -> tuple[int, int]:
    """(height, width) from an int or a pair."""
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    height, width = (int(v) for v in size)
    return height, width


def sample_crop_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box as ``(top, left, h, w)``, drawn from ``rng``.

    Ten tries of an area fraction uniform in ``scale`` and a log-uniform aspect in ``ratio``;
    if none fits, the largest centred box whose aspect is clamped into ``ratio``.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def sample_flipped_box(image_size: tuple[int, int], rng: np.random.Generator, flip_prob: float,
                       scale: tuple[float, float], ratio: tuple[float, float]) -> tuple[tuple[int, int, int, int], bool]:
    """Horizontal flip, then a random-resized-crop box: ((left, top, right, bottom), flip).

    The box is drawn as if on the flipped image and mirrored onto the original, so callers crop
    the original and flip only the (small) resized output; symmetric filters make this exact.
    """
    width, height = image_size
    flip = rng.random() < flip_prob
    top, left, h, w = sample_crop_box(width, height, rng, scale, ratio)
    if flip:
        left = width - left - w
    return (left, top, left + w, top + h), flip


def _affine(mean: Sequence[float], std: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """ToTensor + Normalize folded into one map per channel: (3,1,1) ``scale`` and ``offset``
    with ``pixel * scale - offset == (pixel / 255 - mean) / std``."""
    std_ = np.asarray(std, dtype=np.float64).reshape(3, 1, 1)
    scale = (1.0 / (255.0 * std_)).astype(np.float32)
    offset = (np.asarray(mean, dtype=np.float64).reshape(3, 1, 1) / std_).astype(np.float32)
    return torch.from_numpy(scale), torch.from_numpy(offset)


def _draw_filter(interpolation: Interpolation, rng: np.random.Generator) -> Image.Resampling:
    if interpolation == "random":
        return _RANDOM_CHOICES[int(rng.integers(0, len(_RANDOM_CHOICES)))]
    return interpolation


def _decoded(image: Image.Image | OpenedImage, box: tuple[int, int, int, int],
             sizes: Sequence[tuple[int, int]]) -> tuple[Image.Image, tuple[float, ...]]:
    """The RGB image to resize from, and ``box`` in its pixels.

    An opened file is decoded here, reduced as far as the box stays at least as large as every
    view (``sizes``, (height, width)) in both sides: a reduced JPEG decode then never upsamples
    where the full one would not. The box is divided by the factor the decoder used (exactly:
    PIL resizes from fractional boxes).
    """
    if isinstance(image, Image.Image):
        return (image if image.mode == "RGB" else image.convert("RGB")), box
    left, top, right, bottom = box
    limit = min(min((right - left) // w, (bottom - top) // h) for h, w in sizes)
    decoded = image.decode(max_reduction=limit)
    if image.reduction > 1:
        return decoded, tuple(c / image.reduction for c in box)
    return decoded, box


def _box_pixels(image: Image.Image, box: tuple[int, int, int, int]) -> torch.Tensor:
    """The box's pixels as a (1, 3, h, w) uint8 tensor in channels-last memory format.

    Channels last is PIL's own layout (no transposing copy), and torch's antialiased uint8
    resize is about twice as fast on it as on NCHW; uint8 because that kernel works in fixed
    point, as PIL does. Only the box is copied.
    """
    return torch.from_numpy(np.array(image.crop(box))).permute(2, 0, 1).unsqueeze(0)  # writable copy


_UNIT = ((0.0,) * 3, (1.0,) * 3)  # (mean, std) giving [0, 1]


def _folded_affine(transform: Callable[[torch.Tensor], torch.Tensor] | None) -> tuple[tuple, tuple] | None:
    """(mean, std) of a transform of [0, 1] views that is a per-channel affine map, to fold into the
    uint8 -> float conversion instead of a pass of its own; None for anything else (applied after it).

    The transform (a tokenizer's ``input_transform``) is not imported here but recognised by what it
    says of itself, checked on a probe view: ``mean`` and ``std`` of 3 values each for
    ``(x - mean) / std`` (the tokenizers' and torchvision's ``Normalize``), or ``eps`` for DALL-E's
    pixel map ``x * (1 - 2 eps) + eps`` (the tokenizers' ``MapPixels``).
    """
    if transform is None:
        return _UNIT
    stated = _stated_affine(transform)
    if stated is None or not _maps_as(transform, *stated):
        return None
    return stated


def _stated_affine(transform: object) -> tuple[tuple, tuple] | None:
    mean, std, eps = (getattr(transform, name, None) for name in ("mean", "std", "eps"))
    if mean is not None or std is not None:
        if mean is None or std is None or len(mean) != 3 or len(std) != 3:
            return None
        return tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if isinstance(eps, (int, float)) and float(eps) != 0.5:
        eps = float(eps)
        gain = 1.0 - 2.0 * eps  # x * gain + eps == (x - mean) / std
        return (-eps / gain,) * 3, (1.0 / gain,) * 3
    return None


_PROBE = torch.linspace(0.0, 1.0, 12).reshape(3, 2, 2)  # a (3, 2, 2) view in [0, 1]


def _maps_as(transform: Callable[[torch.Tensor], torch.Tensor], mean: tuple, std: tuple) -> bool:
    """Whether ``transform`` maps the probe view as ``(x - mean) / std`` does (to float32 rounding)."""
    expected = (_PROBE - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    try:
        out = transform(_PROBE.clone())
    except Exception:  # noqa: BLE001 - not a map of (3, H, W) float views: applied after the conversion
        return False
    return (isinstance(out, torch.Tensor) and out.shape == expected.shape
            and torch.allclose(out.float(), expected, rtol=1e-5, atol=1e-6))


def _normalised(pixels: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """(3,H,W) contiguous float32 ``pixel * scale - offset`` from (3,H,W) uint8 of any strides
    (PIL's outputs are channels last: the converting copy also transposes them)."""
    return torch.empty(pixels.shape, dtype=torch.float32).copy_(pixels).mul_(scale).sub_(offset)


View = tuple[tuple[int, int], Interpolation, torch.Tensor, torch.Tensor]  # size, filter, scale, offset


def _resized_views(image: Image.Image | OpenedImage, rng: np.random.Generator, flip_prob: float,
                   scale: tuple[float, float], ratio: tuple[float, float],
                   views: Sequence[View]) -> list[torch.Tensor]:
    """Flip, one random-resized-crop box, and each view resized from it, (3, h, w) float32.

    Random draws, in this order: flip, box, each view's interpolation. The box is turned into
    a uint8 tensor once, and only if a view is resized by torch. torch resizes whole-pixel boxes
    only: a box made fractional by a reduced decode goes to PIL, which resizes from it exactly
    (rounding it instead would shift the view by up to half an output pixel).
    """
    box, flip = sample_flipped_box(image.size, rng, flip_prob, scale, ratio)
    filters = [_draw_filter(interpolation, rng) for _, interpolation, _, _ in views]
    decoded, box = _decoded(image, box, [size for size, *_ in views])
    whole_pixels = all(float(c).is_integer() for c in box)
    pixels = None
    outputs = []
    for ((height, width), _, scale_, offset), resample in zip(views, filters, strict=True):
        if resample in _TORCH_MODES and whole_pixels:
            if pixels is None:
                pixels = _box_pixels(decoded, tuple(int(c) for c in box))
            resized = F.interpolate(pixels, size=(height, width), mode=_TORCH_MODES[resample],
                                    align_corners=False, antialias=True)[0]
        else:
            resized = torch.from_numpy(np.array(decoded.resize((width, height), resample, box=box)))
            resized = resized.permute(2, 0, 1)
        if flip:
            resized = resized.flip(-1)
        outputs.append(_normalised(resized, scale_, offset))
    return outputs


class TwoViewTransform:
    """Flip, one random-resized-crop box, two resized views and a patch mask.

    ``__call__(pil_image, rng)`` returns ``(view_a, view_b, mask)``:
    view_a (3, H, W) normalised with ``mean``/``std``; view_b (3, h2, w2) passed through
    ``tokenizer_transform`` (a callable on a [0, 1] float tensor; identity when None);
    mask (N,) torch.bool from ``mask_generator(rng)``, flattened row-major.
    Every random choice comes from ``rng`` in a fixed order: flip, box, interpolations, mask.
    ``pil_image`` may also be an :class:`~mcbeit.data.images.OpenedImage`, decoded here.
    """

    accepts_opened_image = True  # ImageDataset passes files undecoded (see OpenedImage)

    def __init__(
        self,
        input_size: int | Sequence[int],
        second_input_size: int | Sequence[int],
        train_interpolation: str | Image.Resampling = "bicubic",
        second_interpolation: str | Image.Resampling = "lanczos",
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        tokenizer_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        mask_generator: Callable[[np.random.Generator], np.ndarray] | None = None,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_prob: float = 0.5,
    ) -> None:
        if mask_generator is None:
            raise ValueError("TwoViewTransform needs a mask_generator (see build_mask_generator)")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std need 3 values each, std > 0; got {mean}, {std}")
        self.input_size = _size(input_size)
        self.second_input_size = _size(second_input_size)
        self.interpolation = parse_interpolation(train_interpolation)
        self.second_interpolation = parse_interpolation(second_interpolation)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self._affine_a = _affine(self.mean, self.std)
        self.tokenizer_transform = tokenizer_transform
        folded = _folded_affine(tokenizer_transform)
        self._tokenizer_after = tokenizer_transform if folded is None else None
        self._affine_b = _affine(*(folded or _UNIT))
        self.mask_generator = mask_generator
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)
        self.flip_prob = float(flip_prob)

    def __repr__(self) -> str:
        return (
            f"TwoViewTransform(\n"
            f"  flip p={self.flip_prob}, random_resized_crop scale={self.scale} "
            f"ratio=({self.ratio[0]:.4g}, {self.ratio[1]:.4g}),\n"
            f"  view A: {self.input_size} {_interpolation_name(self.interpolation)}, "
            f"normalise mean={self.mean} std={self.std},\n"
            f"  view B: {self.second_input_size} "
            f"{_interpolation_name(self.second_interpolation)}, {self.tokenizer_transform!r},\n"
            f"  mask: {self.mask_generator!r})"
        )

    def __call__(
        self, image: Image.Image | OpenedImage, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        view_a, view_b = _resized_views(image, rng, self.flip_prob, self.scale, self.ratio, (
            (self.input_size, self.interpolation, *self._affine_a),  # (3,H,W) normalised
            (self.second_input_size, self.second_interpolation, *self._affine_b),  # (3,h2,w2)
        ))
        if self._tokenizer_after is not None:
            view_b = self._tokenizer_after(view_b)
        mask = np.ascontiguousarray(self.mask_generator(rng), dtype=np.bool_)  # (h,w)
        return view_a, view_b, torch.from_numpy(mask.reshape(-1))  # mask (N,)


class OneViewTransform:
    """Flip and one random-resized crop at ``size``: the tokenizer's training (and inspection) view.

    ``__call__(pil_image, rng) -> (3, H, W)`` float tensor in [0, 1], passed through
    ``output_transform`` (e.g. a tokenizer's ``input_transform``) when given. Random choices come
    from ``rng`` in the order of :class:`TwoViewTransform` (flip, box, interpolation).
    ``scale=(1, 1), ratio=(1, 1), flip_prob=0`` is a deterministic centre crop (the largest square).
    ``pil_image`` may also be an :class:`~mcbeit.data.images.OpenedImage`, decoded here.
    """

    accepts_opened_image = True

    def __init__(
        self,
        size: int | Sequence[int],
        scale: tuple[float, float] = (0.35, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        interpolation: str | Image.Resampling = "lanczos",
        flip_prob: float = 0.5,
        output_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.size = _size(size)
        self.scale = tuple(float(v) for v in scale)
        self.ratio = tuple(float(v) for v in ratio)
        self.interpolation = parse_interpolation(interpolation)
        self.flip_prob = float(flip_prob)
        self.output_transform = output_transform
        folded = _folded_affine(output_transform)
        self._output_after = output_transform if folded is None else None
        self._affine = _affine(*(folded or _UNIT))

    def __repr__(self) -> str:
        return (f"OneViewTransform(flip p={self.flip_prob}, random_resized_crop scale={self.scale} "
                f"ratio=({self.ratio[0]:.4g}, {self.ratio[1]:.4g}), {self.size} "
                f"{_interpolation_name(self.interpolation)}, {self.output_transform!r})")

    def __call__(self, image: Image.Image | OpenedImage, rng: np.random.Generator) -> torch.Tensor:
        [view] = _resized_views(image, rng, self.flip_prob, self.scale, self.ratio,
                                ((self.size, self.interpolation, *self._affine),))  # (3,H,W)
        return self._output_after(view) if self._output_after is not None else view
