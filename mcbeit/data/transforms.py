"""The two views of one random crop that BEiT-style pre-training needs.

View A feeds the ViT, view B the tokenizer; both are resized from the *same* box of the
(possibly flipped) image, each in one PIL ``resize(..., box=...)`` call, so the image is decoded
once and never resized twice.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image

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

Interpolation = Image.Resampling | str  # a PIL filter, or the string "random"


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


def _to_tensor(image: Image.Image, scale: np.ndarray, offset: np.ndarray) -> torch.Tensor:
    """(3,H,W) float32 ``pixel * scale - offset`` per channel from an RGB PIL image.

    Done in numpy, channels first: torch's element-wise ops on small tensors are slower and
    depend on the intra-op thread count of the process (main process vs loader workers).
    """
    array = np.asarray(image).transpose(2, 0, 1).astype(np.float32)  # (3,H,W), a fresh copy
    array *= scale
    array -= offset
    return torch.from_numpy(array)


def sample_flipped_box(image_size: tuple[int, int], rng: np.random.Generator, flip_prob: float,
                       scale: tuple[float, float], ratio: tuple[float, float]) -> tuple[tuple[int, int, int, int], bool]:
    """Horizontal flip, then a random-resized-crop box: ((left, top, right, bottom), flip).

    The box is drawn as if on the flipped image and mirrored onto the original, so callers crop
    the original and flip only the (small) resized output; PIL's filters make this exact.
    """
    width, height = image_size
    flip = rng.random() < flip_prob
    top, left, h, w = sample_crop_box(width, height, rng, scale, ratio)
    if flip:
        left = width - left - w
    return (left, top, left + w, top + h), flip


class TwoViewTransform:
    """Flip, one random-resized-crop box, two resized views and a patch mask.

    ``__call__(pil_image, rng)`` returns ``(view_a, view_b, mask)``:
    view_a (3, H, W) normalised with ``mean``/``std``; view_b (3, h2, w2) passed through
    ``tokenizer_transform`` (a callable on a [0, 1] float tensor; identity when None);
    mask (N,) torch.bool from ``mask_generator(rng)``, flattened row-major.
    Every random choice comes from ``rng`` in a fixed order: flip, box, interpolations, mask.
    """

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
        # ToTensor + Normalize folded into one affine map per channel: x/255/std - mean/std.
        std_ = np.asarray(self.std, dtype=np.float64).reshape(3, 1, 1)
        self._scale_a = (1.0 / (255.0 * std_)).astype(np.float32)
        self._offset_a = (np.asarray(self.mean).reshape(3, 1, 1) / std_).astype(np.float32)
        self._scale_b = np.full((3, 1, 1), 1.0 / 255.0, dtype=np.float32)
        self._offset_b = np.zeros((3, 1, 1), dtype=np.float32)
        self.tokenizer_transform = tokenizer_transform
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

    @staticmethod
    def _filter(interpolation: Interpolation, rng: np.random.Generator) -> Image.Resampling:
        if interpolation == "random":
            return _RANDOM_CHOICES[int(rng.integers(0, len(_RANDOM_CHOICES)))]
        return interpolation

    def __call__(
        self, image: Image.Image, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if image.mode != "RGB":
            image = image.convert("RGB")
        box, flip = sample_flipped_box(image.size, rng, self.flip_prob, self.scale, self.ratio)
        filter_a = self._filter(self.interpolation, rng)
        filter_b = self._filter(self.second_interpolation, rng)
        (ha, wa), (hb, wb) = self.input_size, self.second_input_size
        crop_a = image.resize((wa, ha), filter_a, box=box)
        crop_b = image.resize((wb, hb), filter_b, box=box)
        if flip:
            crop_a = crop_a.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            crop_b = crop_b.transpose(Image.Transpose.FLIP_LEFT_RIGHT)

        view_a = _to_tensor(crop_a, self._scale_a, self._offset_a)  # (3,H,W) normalised
        view_b = _to_tensor(crop_b, self._scale_b, self._offset_b)  # (3,h2,w2) in [0,1]
        if self.tokenizer_transform is not None:
            view_b = self.tokenizer_transform(view_b)
        mask = np.ascontiguousarray(self.mask_generator(rng), dtype=np.bool_)  # (h,w)
        return view_a, view_b, torch.from_numpy(mask.reshape(-1))  # mask (N,)


class OneViewTransform:
    """Flip and one random-resized crop at ``size``: the tokenizer's training (and inspection) view.

    ``__call__(pil_image, rng) -> (3, H, W)`` float tensor in [0, 1], passed through
    ``output_transform`` (e.g. a tokenizer's ``input_transform``) when given. Random choices come
    from ``rng`` in the order of :class:`TwoViewTransform` (flip, box, interpolation).
    ``scale=(1, 1), ratio=(1, 1), flip_prob=0`` is a deterministic centre crop (the largest square).
    """

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
        self._scale = np.full((3, 1, 1), 1.0 / 255.0, dtype=np.float32)
        self._offset = np.zeros((3, 1, 1), dtype=np.float32)

    def __repr__(self) -> str:
        return (f"OneViewTransform(flip p={self.flip_prob}, random_resized_crop scale={self.scale} "
                f"ratio=({self.ratio[0]:.4g}, {self.ratio[1]:.4g}), {self.size} "
                f"{_interpolation_name(self.interpolation)}, {self.output_transform!r})")

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        if image.mode != "RGB":
            image = image.convert("RGB")
        box, flip = sample_flipped_box(image.size, rng, self.flip_prob, self.scale, self.ratio)
        resample = TwoViewTransform._filter(self.interpolation, rng)
        crop = image.resize((self.size[1], self.size[0]), resample, box=box)
        if flip:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        view = _to_tensor(crop, self._scale, self._offset)  # (3,H,W) in [0,1]
        return self.output_transform(view) if self.output_transform is not None else view


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
