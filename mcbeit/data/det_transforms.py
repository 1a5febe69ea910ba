"""Detection transforms: detectron2's large-scale jitter (LSJ) of the mc-BEiT / MIMDet benchmarking recipe,
written with torchvision.transforms.v2 so that the image, its boxes and its instance masks move together.

The original (``benchmarking_mask_rcnn_base_FPN_100ep_LSJ_mae.py``, detectron2 0.6) trains with

1. ``ResizeScale(0.1, 2.0, S, S)``: r = min(S / h, S / w) x U(0.1, 2.0), the image resized by r (PIL bilinear
   on uint8, which is antialiased when shrinking; bit masks PIL nearest);
2. ``FixedSizeCrop(S)``: a random S x S crop when a side is larger, its offset ``round(max(0, side - S) x u)``
   with *one* u ~ U(0, 1) for both axes; then padding right and bottom to S x S with 128 (masks 0);
3. ``RandomFlip(horizontal)`` with probability 0.5;
4. ``recompute_boxes=True``: each box becomes the extent of its cropped mask, and instances left with an
   empty mask or box are dropped (``filter_empty_instances``).

Here: :class:`ResizeScale` is ``v2.ScaleJitter`` (the same draw; masks resized with nearest-exact, which is
PIL's nearest, instead of torchvision's legacy nearest that shifts them by half a pixel), then
``v2.ToImage``, :class:`FixedSizeCrop` (torchvision has none: the crop, clip and pad of detectron2's as a
``v2.Transform``), ``v2.RandomHorizontalFlip``, :func:`masks_to_boxes` and ``v2.SanitizeBoundingBoxes``.
The image is a PIL image until the resize, so it is resized by PIL's own bilinear filter as in detectron2.

Testing (:class:`ResizePadTestTransform`): ``ResizeShortestEdge(S, max_size=S)`` (the short side to S unless the
long side would pass S: factor min(S / h, S / w), each side rounded half up), then the same pad to S x S,
top-left (detectron2's ``FixedSizeCrop`` at test time never crops).

Randomness: every draw comes from the sample's own ``numpy`` generator (``sample_rng(seed, epoch, index)``
of :mod:`mcbeit.data.datasets`): it seeds torch's global generator inside ``torch.random.fork_rng``, so the
v2 transforms draw from it and the caller's torch state is left as it was. A sample is a function of
(seed, epoch, index), whichever loader worker makes it and however often the run is resumed.

Deviations from detectron2, all under a pixel: ``ScaleJitter`` truncates the resized size (detectron2
rounds); masks are bit masks resized with nearest (detectron2 keeps COCO polygons as polygons and
rasterises them at the final size), so a box taken from a mask is the mask's pixel extent (``x2 = last
column + 1``) rather than the clipped polygon's real-valued extent.

Inputs: a PIL RGB image and a target dict of ``boxes`` (N,4) xyxy float in the image's pixels, ``labels``
(N,) int64, ``iscrowd`` (N,) uint8 and optionally ``masks`` (N,H,W) uint8. Outputs: the image (3,S,S) float32
in 0..1 and the target with the same keys in the network input's pixels plus ``scale`` (the resize factor).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

__all__ = [
    "PAD_VALUE",
    "FixedSizeCrop",
    "LSJTrainTransform",
    "ResizePadTestTransform",
    "ResizeScale",
    "ResizeShortestEdge",
    "masks_to_boxes",
    "resize_shortest_edge_size",
]

PAD_VALUE = 128  # detectron2 0.6 FixedSizeCrop's pad_value (uint8 images); masks are padded with 0
_MASK_INTERPOLATION = v2.InterpolationMode.NEAREST_EXACT  # == PIL's NEAREST (detectron2's for bit masks)


def _resize(transform: v2.Transform, inpt: Any, size: Sequence[int], interpolation) -> Any:
    """One input of a sample resized to ``size`` (h, w): masks by nearest-exact, the rest by ``interpolation``."""
    if isinstance(inpt, tv_tensors.Mask):
        interpolation = _MASK_INTERPOLATION
    return transform._call_kernel(F.resize, inpt, size=list(size), interpolation=interpolation, antialias=True)


class ResizeScale(v2.ScaleJitter):
    """``v2.ScaleJitter`` (r = min(S / h, S / w) x U(scale_range), size truncated), with masks resized by
    nearest-exact (PIL's nearest) rather than torchvision's legacy nearest."""

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return _resize(self, inpt, params["size"], self.interpolation)


def resize_shortest_edge_size(height: int, width: int, short: int, max_size: int) -> tuple[int, int]:
    """(h, w) of detectron2's ``ResizeShortestEdge``: the short side to ``short``, scaled down further if the
    long side would pass ``max_size``; each side rounded half up."""
    scale = short / min(height, width)
    new_h, new_w = (short, scale * width) if height < width else (scale * height, short)
    if max(new_h, new_w) > max_size:
        shrink = max_size / max(new_h, new_w)
        new_h, new_w = new_h * shrink, new_w * shrink
    return int(new_h + 0.5), int(new_w + 0.5)


class ResizeShortestEdge(v2.Transform):
    """detectron2's deterministic ``ResizeShortestEdge(short, max_size)`` (images bilinear, masks nearest-exact)."""

    def __init__(self, short: int, max_size: int, interpolation=v2.InterpolationMode.BILINEAR) -> None:
        super().__init__()
        self.short, self.max_size, self.interpolation = int(short), int(max_size), interpolation

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        return {"size": resize_shortest_edge_size(height, width, self.short, self.max_size)}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return _resize(self, inpt, params["size"], self.interpolation)


class FixedSizeCrop(v2.Transform):
    """detectron2's ``FixedSizeCrop(crop_size, pad=True, pad_value=128)`` as a v2 transform.

    A side longer than the crop is cropped at offset ``round(max(0, side - crop) * u)``, one u ~ U(0, 1) drawn
    for both sides (torch's generator; drawn only when something is cropped); boxes are shifted and clipped
    to the crop. Then the right and bottom are padded to the crop size: images with ``pad_value`` (0..255; a
    float image gets ``pad_value / 255``), masks with ``mask_pad_value``.
    """

    def __init__(self, size: int | Sequence[int], pad: bool = True, pad_value: float = PAD_VALUE,
                 mask_pad_value: int = 0) -> None:
        super().__init__()
        self.size = (int(size), int(size)) if isinstance(size, (int, np.integer)) else tuple(int(s) for s in size)
        if len(self.size) != 2 or min(self.size) <= 0:
            raise ValueError(f"size must be a positive int or (h, w), got {size!r}")
        self.pad, self.pad_value, self.mask_pad_value = bool(pad), float(pad_value), int(mask_pad_value)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        crop_h, crop_w = self.size
        max_top, max_left = max(height - crop_h, 0), max(width - crop_w, 0)
        u = float(torch.rand(())) if max_top or max_left else 0.0
        out_h, out_w = min(height, crop_h), min(width, crop_w)
        padding = [0, 0, crop_w - out_w, crop_h - out_h] if self.pad else [0, 0, 0, 0]  # left, top, right, bottom
        return {"top": round(max_top * u), "left": round(max_left * u), "height": out_h, "width": out_w,
                "cropped": (out_h, out_w) != (height, width), "padding": padding}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if params["cropped"]:
            inpt = self._call_kernel(F.crop, inpt, top=params["top"], left=params["left"],
                                     height=params["height"], width=params["width"])
        if any(params["padding"]):
            if isinstance(inpt, tv_tensors.Mask):
                fill = self.mask_pad_value
            elif isinstance(inpt, torch.Tensor) and inpt.is_floating_point():
                fill = self.pad_value / 255.0
            else:
                fill = self.pad_value
            inpt = self._call_kernel(F.pad, inpt, padding=params["padding"], fill=fill)
        return inpt


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """(N,4) float32 xyxy pixel extents of (N,H,W) masks, ``x2``/``y2`` one past the last pixel (detectron2's
    ``BitMasks.get_bounding_boxes``); an empty mask gives (0, 0, 0, 0)."""
    if masks.shape[0] == 0:
        return torch.zeros((0, 4), dtype=torch.float32)
    height, width = masks.shape[-2:]
    cols = masks.any(dim=1)                                                               # (N,W)
    rows = masks.any(dim=2)                                                               # (N,H)
    x1 = cols.int().argmax(dim=1)
    x2 = width - cols.flip(1).int().argmax(dim=1)
    y1 = rows.int().argmax(dim=1)
    y2 = height - rows.flip(1).int().argmax(dim=1)
    boxes = torch.stack([x1, y1, x2, y2], dim=1).float()                                 # (N,4)
    return boxes * cols.any(dim=1, keepdim=True)                                          # empty -> zeros


def _labels_and_crowd(inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """SanitizeBoundingBoxes' ``labels_getter``: the per-instance tensors to filter with the boxes (picklable)."""
    target = inputs[1]
    return target["labels"], target["iscrowd"]


def _to_sample(image: Image.Image, target: dict) -> dict:
    """The v2 sample of a target: boxes as BoundingBoxes on the image's canvas, masks as a Mask."""
    width, height = image.size
    boxes = torch.as_tensor(np.asarray(target["boxes"], np.float32).reshape(-1, 4))
    sample = {
        "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
        "labels": torch.as_tensor(np.asarray(target["labels"]), dtype=torch.int64).reshape(-1),
        "iscrowd": torch.as_tensor(np.asarray(target.get("iscrowd", np.zeros(len(boxes)))),
                                   dtype=torch.uint8).reshape(-1),
    }
    if target.get("masks") is not None:
        masks = torch.as_tensor(np.asarray(target["masks"]), dtype=torch.uint8)
        if masks.shape != (len(boxes), height, width):
            raise ValueError(f"masks must be (N, H, W) = ({len(boxes)}, {height}, {width}), got {tuple(masks.shape)}")
        sample["masks"] = tv_tensors.Mask(masks)
    return sample


def _finish(image: torch.Tensor, sample: dict, scale: float) -> tuple[torch.Tensor, dict]:
    """Plain tensors out: the image (3,S,S) float32 in 0..1, boxes float32, masks uint8, and ``scale``."""
    target = {
        "boxes": sample["boxes"].as_subclass(torch.Tensor).float(),
        "labels": sample["labels"].as_subclass(torch.Tensor),
        "iscrowd": sample["iscrowd"].as_subclass(torch.Tensor),
        "scale": float(scale),
    }
    if "masks" in sample:
        target["masks"] = sample["masks"].as_subclass(torch.Tensor)
    return image.as_subclass(torch.Tensor).float().div_(255.0), target


def _check_image(image: Image.Image) -> None:
    if not isinstance(image, Image.Image) or image.mode != "RGB":
        raise TypeError(f"expected a PIL RGB image, got {type(image).__name__} {getattr(image, 'mode', '')}")


class LSJTrainTransform:
    """The LSJ training pipeline (module docstring): ``(image, target, rng)`` -> ``(image (3,S,S), target)``.

    ``recompute_boxes`` (the recipe's): boxes are taken from the transformed masks (needs ``masks``); without
    masks, the transformed boxes are clipped. Either way boxes under 1 pixel wide or high go, with their
    label, crowd flag and mask. ``scale`` in the output is the resize factor (resized width / width).
    """

    def __init__(self, size: int = 1024, scale_range: Sequence[float] = (0.1, 2.0), flip_prob: float = 0.5,
                 pad_value: float = PAD_VALUE, recompute_boxes: bool = True) -> None:
        if int(size) <= 0:
            raise ValueError(f"size must be positive, got {size}")
        low, high = (float(s) for s in scale_range)
        if not 0 < low <= high:
            raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got {scale_range!r}")
        self.size, self.scale_range, self.flip_prob = int(size), (low, high), float(flip_prob)
        self.recompute_boxes = bool(recompute_boxes)
        self.resize = ResizeScale((self.size, self.size), self.scale_range, interpolation="bilinear")
        self.to_image = v2.ToImage()
        self.crop = FixedSizeCrop(self.size, pad=True, pad_value=pad_value)
        self.flip = v2.RandomHorizontalFlip(self.flip_prob)
        self.sanitize = v2.SanitizeBoundingBoxes(min_size=1.0, min_area=1.0, labels_getter=_labels_and_crowd)

    def __call__(self, image: Image.Image, target: dict, rng: np.random.Generator) -> tuple[torch.Tensor, dict]:
        _check_image(image)
        sample = _to_sample(image, target)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(rng.integers(2**63)))
            resized, sample = self.resize(image, sample)                                  # PIL (r h, r w)
            scale = resized.size[0] / image.size[0]
            pixels, sample = self.crop(*self.to_image(resized, sample))                   # (3,S,S) uint8
            pixels, sample = self.flip(pixels, sample)
        if self.recompute_boxes and "masks" in sample:
            sample["boxes"] = tv_tensors.wrap(masks_to_boxes(sample["masks"]), like=sample["boxes"])
        pixels, sample = self.sanitize(pixels, sample)
        return _finish(pixels, sample, scale)

    def __repr__(self) -> str:
        return (f"LSJTrainTransform(size={self.size}, scale_range={self.scale_range}, flip_prob={self.flip_prob}, "
                f"pad_value={self.crop.pad_value:g}, recompute_boxes={self.recompute_boxes})")


class ResizePadTestTransform:
    """The test pipeline: ``ResizeShortestEdge(S, max_size=S)``, then pad right and bottom to S x S with the
    same grey. ``(image, target, rng=None)`` -> ``(image (3,S,S), target)``; every annotation is kept (crowd
    ones too), boxes scaled with the image, not clipped nor filtered. ``scale`` is min(S / h, S / w): a box in
    the input's pixels divided by it is in the original image's pixels."""

    def __init__(self, size: int = 1024, pad_value: float = PAD_VALUE) -> None:
        if int(size) <= 0:
            raise ValueError(f"size must be positive, got {size}")
        self.size = int(size)
        self.resize = ResizeShortestEdge(self.size, self.size)
        self.to_image = v2.ToImage()
        self.pad = FixedSizeCrop(self.size, pad=True, pad_value=pad_value)  # never crops after the resize

    def __call__(self, image: Image.Image, target: dict | None = None,
                 rng: np.random.Generator | None = None) -> tuple[torch.Tensor, dict]:
        _check_image(image)
        width, height = image.size
        sample = _to_sample(image, target if target is not None else {"boxes": [], "labels": []})
        resized, sample = self.resize(image, sample)
        pixels, sample = self.pad(*self.to_image(resized, sample))
        return _finish(pixels, sample, min(self.size / height, self.size / width))

    def __repr__(self) -> str:
        return f"ResizePadTestTransform(size={self.size}, pad_value={self.pad.pad_value:g})"
