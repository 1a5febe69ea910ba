"""Pictures of :func:`mcbeit.inference_model`'s results (``mcbeit-predict --out``), drawn with the pieces the
evaluations already use: the segmentation palette, the detection drawing, the tokenizer's token colours.

* classifier: the image over a band listing the top-5 classes and scores;
* segmentation: the image | its colourised class map;
* detection: the image with its boxes, labels and translucent masks (scores >= 0.3 unless told otherwise);
* pre-training: the model's view | the mask (masked patches greyed) | predicted tokens in false colour | the
  tokenizer's tokens | its reconstruction (the last two when a tokenizer was given); ConMIM: the view | the mask
  | each patch coloured by whether it found itself (green) or another patch (red).
"""
from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

__all__ = ["render", "save_png"]

_GAP = 4


def _row(pictures: list[np.ndarray], height: int) -> np.ndarray:
    """Pictures side by side, each resized to ``height`` rows (nearest for label-like pictures is the caller's)."""
    resized = []
    for p in pictures:
        h, w = p.shape[:2]
        width = max(1, round(w * height / h))
        resized.append(np.asarray(Image.fromarray(p).resize((width, height), Image.Resampling.NEAREST
                                                            if h < height else Image.Resampling.BILINEAR)))
    total = sum(p.shape[1] for p in resized) + _GAP * (len(resized) - 1)
    out = np.full((height, total, 3), 255, dtype=np.uint8)
    left = 0
    for p in resized:
        out[:, left:left + p.shape[1]] = p
        left += p.shape[1] + _GAP
    return out


def _classification(image: np.ndarray, result: Mapping, classes: list) -> np.ndarray:
    scores = np.asarray(result["pred_scores"])
    top = np.argsort(-scores)[:5]
    lines = [f"{classes[i] if i < len(classes) else i}: {scores[i]:.3f}" for i in top]
    band = Image.new("RGB", (max(image.shape[1], 240), 14 * len(lines) + 8), "white")
    draw = ImageDraw.Draw(band)
    for k, line in enumerate(lines):
        draw.text((4, 4 + 14 * k), line, fill=(0, 0, 0))
    picture = np.full((image.shape[0] + band.height, band.width, 3), 255, dtype=np.uint8)
    picture[:image.shape[0], :image.shape[1]] = image
    picture[image.shape[0]:] = np.asarray(band)
    return picture


def _pretraining(model: nn.Module, image: np.ndarray, result: Mapping) -> np.ndarray:
    from mcbeit.tokenizers.visualize import token_palette

    size = int(model.pretrained_cfg["input_size"][-1])
    side = min(image.shape[:2])
    top, left = (image.shape[0] - side) // 2, (image.shape[1] - side) // 2
    view = np.asarray(Image.fromarray(image[top:top + side, left:left + side]).resize((size, size),
                                                                                     Image.Resampling.BICUBIC))
    mask = np.asarray(result["mask"], dtype=bool)
    cells = np.kron(mask, np.ones((size // mask.shape[0], size // mask.shape[1]), dtype=bool))[..., None]
    masked = np.where(cells, (view * 0.25 + 96).astype(np.uint8), view)
    pictures = [view, masked]
    if "pred_tokens" in result:
        vocab = int(model.lm_head.out_features)
        colours = token_palette(vocab)
        pictures.append(colours[np.asarray(result["pred_tokens"])])
        if "target_tokens" in result:
            pictures.append(colours[np.asarray(result["target_tokens"])])
        if "reconstruction" in result:
            pictures.append(np.asarray(result["reconstruction"]))
    else:  # ConMIM: green = the patch found itself, red = another patch
        own = np.arange(mask.size).reshape(mask.shape)
        hit = np.asarray(result["nearest_patch"]) == own
        pictures.append(np.where(hit[..., None], np.array([60, 180, 75], np.uint8), np.array([220, 50, 50], np.uint8)))
    return _row(pictures, size)


def render(model: nn.Module, image, result: Mapping, score_threshold: float = 0.3) -> np.ndarray:
    """uint8 (H,W,3) picture of one image's ``result`` (module doc); detections drawn from ``score_threshold``."""
    from mcbeit.api.inference import load_image

    pixels = np.asarray(load_image(image))  # (H,W,3)
    kind, classes = model.mcbeit.kind, list(model.mcbeit.classes)
    if kind == "classifier":
        return _classification(pixels, result, classes)
    if kind == "segmentation":
        from mcbeit.evaluation.segmentation import colourise

        num_classes = int(model.decode_head.conv_seg.out_channels)
        return _row([pixels, colourise(result["pred_sem_seg"], num_classes)], pixels.shape[0])
    if kind == "detection":
        from mcbeit.evaluation.detection import save_detection_visualisation

        ids = list(model.mcbeit.settings.get("category_ids") or [])
        index = [ids.index(int(c)) + 1 if int(c) in ids else int(c) for c in result["labels"]]  # model labels
        out = {"boxes": torch.as_tensor(result["boxes"]), "scores": torch.as_tensor(result["scores"]),
               "labels": torch.as_tensor(index, dtype=torch.int64), "masks": torch.as_tensor(result["masks"])}
        return save_detection_visualisation(None, [torch.from_numpy(pixels.copy()).permute(2, 0, 1)], [out], classes,
                                            score_threshold=score_threshold, max_side=max(pixels.shape[:2]))
    return _pretraining(model, pixels, result)


def save_png(path: str | os.PathLike, picture: np.ndarray) -> None:
    """Write ``picture`` as a PNG atomically (a crash leaves the old file or the new one)."""
    from mcbeit.engine.checkpoint import write_atomic

    write_atomic(path, lambda f: Image.fromarray(picture).save(f, format="PNG"))
