"""``inference_model``: images -> one dict per image, for every model kind ``get_model`` builds.

=================  ==================================================================================================
kind               each image's dict
=================  ==================================================================================================
classifier         ``pred_scores`` (C,) float32 softmax, ``pred_label`` int, ``pred_score`` float, ``pred_class``
                   str (the checkpoint's class names; ``str(label)`` when it has none)
segmentation       ``pred_sem_seg`` (H,W) int64 class map at the image's size, ``classes`` (names, may be empty)
detection          ``boxes`` (K,4) float32 xyxy in the image's pixels, ``labels`` (K,) int64 (the category ids of
                   the training annotations), ``scores`` (K,), ``masks`` (K,H,W) bool, ``classes`` (K names)
pre-training       ``mask`` (h,w) bool (the method's masking, drawn from ``seed``); BEiT / mc-BEiT / BEiT v2:
                   ``pred_tokens`` (h,w) int64, the visual token the model predicts at every patch from the masked
                   input; with a ``tokenizer``: ``target_tokens`` (h,w), ``token_accuracy`` over the masked patches
                   and, when the tokenizer has a decoder (DALL-E with ``decoder.pkl``, VQGAN, this package's
                   ``mcbeit-tokenizer``), ``reconstruction`` (H,W,3) uint8 decoded from the predicted tokens at the
                   masked patches and the tokenizer's elsewhere. ConMIM (no token head): ``nearest_patch`` (h,w)
                   int64, for each patch of the masked view the patch of the unmasked view its projection is most
                   similar to (its pretext task: itself), and ``patch_accuracy`` over the masked patches
=================  ==================================================================================================

Images: a path, a PIL image, an (H,W,3) / (H,W) array (uint8, or float in 0-1), or a list of them; a list gives
a list of dicts, one image a dict. They go through the model's own evaluation pipeline (the one its command
evaluates with: resize and centre crop; mmseg's keep-ratio resize and sliding window; detectron2's resize and
pad), in batches of ``batch_size``, on the model's device.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image
from torch import nn

from mcbeit.errors import InputError

__all__ = ["inference_model", "load_image"]

ImageLike = Any  # str | os.PathLike | PIL.Image.Image | np.ndarray


def load_image(image: ImageLike) -> Image.Image:
    """An RGB PIL image from a path, a PIL image or an array ((H,W,3) or (H,W); uint8, or float in 0-1)."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        array = image
        if array.ndim == 3 and array.shape[2] == 4:
            array = array[..., :3]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] != 3):
            raise InputError(f"an image array must be (H,W,3) or (H,W), got {array.shape}")
        if array.dtype != np.uint8:
            if not np.issubdtype(array.dtype, np.floating):
                raise InputError(f"an image array must be uint8 or float in 0-1, got {array.dtype}")
            array = (np.clip(array, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
        return Image.fromarray(np.ascontiguousarray(array)).convert("RGB")
    if isinstance(image, (str, os.PathLike)):
        from mcbeit.data.images import load_rgb_image

        path = os.fspath(image)
        if not os.path.isfile(path):
            raise InputError(f"image {path} does not exist")
        try:
            return load_rgb_image(path)
        except Exception as exc:  # noqa: BLE001 - PIL's and OSError's many kinds: one message
            raise InputError(f"cannot read the image {path} ({type(exc).__name__}: {exc}): pass a JPEG / PNG / ... "
                             "file, a PIL image or an (H,W,3) array") from None
    raise InputError(f"an image is a path, a PIL image or a numpy array, got {type(image).__name__}")


def _as_model(model: Any, device: Optional[str | torch.device]) -> nn.Module:
    from mcbeit.api.models import get_model

    if isinstance(model, nn.Module):
        if not hasattr(model, "mcbeit"):
            raise InputError("inference_model: pass a model mcbeit.get_model returned, a model name or a checkpoint")
        return model.to(device).eval() if device is not None else model.eval()
    return get_model(model, device=device)


def inference_model(model: Any, images: ImageLike | Sequence[ImageLike], *, device: Optional[str | torch.device] = None,
                    batch_size: int = 8, tokenizer: Any = None, seed: int = 0,
                    score_threshold: Optional[float] = None) -> dict | list[dict]:
    """Predictions of ``model`` (a model of :func:`mcbeit.get_model`, or what it takes: a name or a checkpoint) for
    ``images`` (module doc). ``tokenizer`` (pre-training models): a tokenizer, its weights' path, or None for the
    one the checkpoint was trained with when its file is still there. ``seed``: the pre-training mask's draw.
    ``score_threshold`` (detection): keep detections scoring at least this (default: the model's, 0.05)."""
    model = _as_model(model, device)
    single = not isinstance(images, (list, tuple))
    items = [images] if single else list(images)
    if not items:
        return []
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}")
    kind = model.mcbeit.kind  # images are read batch by batch: a long list is never all in memory
    with torch.inference_mode():
        if kind == "classifier":
            results = _classify(model, items, batch_size)
        elif kind == "segmentation":
            results = [_segment(model, load_image(item)) for item in items]
        elif kind == "detection":
            results = _detect(model, items, batch_size, score_threshold)
        else:
            results = _pretraining(model, items, batch_size, tokenizer, seed)
    return results[0] if single else results


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


# ---------------------------------------------------------------------- classifiers
def _classify(model: nn.Module, images: list, batch_size: int) -> list[dict]:
    from mcbeit.api.models import data_config
    from mcbeit.data.classification_transforms import build_classification_transform

    cfg = data_config(model)
    transform = build_classification_transform(False, int(cfg["input_size"][-1]), mean=cfg["mean"], std=cfg["std"],
                                               crop_pct=cfg.get("crop_pct")).transform
    size = int(cfg["input_size"][-1])

    def prepared(item) -> torch.Tensor:
        image = load_image(item)
        if size <= 32 and image.size != (size, size):  # the evaluation transform does not resize at CIFAR sizes
            image = image.resize((size, size), Image.Resampling.BICUBIC)
        return transform(image)  # (3,S,S)

    device, classes, out = _device_of(model), model.mcbeit.classes, []
    for part in _batches(len(images), batch_size):
        x = torch.stack([prepared(item) for item in images[part]]).to(device)  # (B,3,S,S)
        scores = model(x).float().softmax(dim=-1).cpu().numpy()  # (B,C)
        for row in scores:
            label = int(row.argmax())
            out.append({"pred_scores": row, "pred_label": label, "pred_score": float(row[label]),
                        "pred_class": classes[label] if label < len(classes) else str(label)})
    return out


# ---------------------------------------------------------------------- dense models
def _segment(model: nn.Module, image: Image.Image) -> dict:
    from mcbeit.evaluation.segmentation import predict

    s = model.mcbeit.settings
    pixels = np.asarray(image)  # (H,W,3) uint8
    views, _ = s["transform"](pixels, np.zeros(pixels.shape[:2], dtype=np.uint8))  # the test pipeline's views
    device = _device_of(model)
    num_classes = model.decode_head.conv_seg.out_channels
    label = predict(model.encode_decode, [(v.to(device), flipped) for v, flipped in views], pixels.shape[:2],
                    num_classes, mode=s["test_mode"], crop=s["crop_size"], stride=s["stride"])  # (H,W)
    return {"pred_sem_seg": label.cpu().numpy().astype(np.int64), "classes": list(model.mcbeit.classes)}


def _detect(model: nn.Module, images: list, batch_size: int,
            score_threshold: Optional[float]) -> list[dict]:
    from mcbeit.data.det_transforms import ResizePadTestTransform
    from mcbeit.evaluation.detection import box_level_masks, in_original_pixels

    transform = ResizePadTestTransform(int(model.mcbeit.settings["image_size"]))
    ids = model.mcbeit.settings.get("category_ids") or []
    names = model.mcbeit.classes
    threshold = 0.0 if score_threshold is None else float(score_threshold)  # the model keeps >= 0.05 itself
    device, out = _device_of(model), []
    with box_level_masks(model):  # pasted at the original size, as the COCO evaluation does
        for part in _batches(len(images), batch_size):
            pil = [load_image(item) for item in images[part]]
            inputs = [transform(image) for image in pil]  # (image (3,S,S), target with 'scale')
            outputs = model([x.to(device) for x, _ in inputs])
            for image, (_, target), det in zip(pil, inputs, outputs, strict=True):
                keep = det["scores"] >= threshold
                det = {**{k: v[keep] for k, v in det.items()}, "mask_kind": "roi"}
                found = in_original_pixels(det, {**target, "orig_size": image.size[::-1]})
                labels = found["labels"].cpu().numpy().astype(np.int64)
                out.append({"boxes": found["boxes"].cpu().numpy(), "scores": found["scores"].cpu().numpy(),
                            "labels": np.array([ids[i - 1] if 0 < i <= len(ids) else i for i in labels], np.int64),
                            "masks": found["masks"],
                            "classes": [names[i - 1] if 0 < i <= len(names) else str(i) for i in labels]})
    return out


# ---------------------------------------------------------------------- pre-training models
def _tokenizer_of(model: nn.Module, tokenizer: Any) -> Optional[nn.Module]:
    """The tokenizer to compare with: the one given (a module or its weights' path), else the checkpoint's own
    when its file is still there; None without one."""
    s = model.mcbeit.settings
    spec = s["tokenizer"]
    if isinstance(tokenizer, nn.Module):
        tok = tokenizer
    else:
        path = tokenizer if tokenizer is not None else (spec.get("tokenizer_weight")
                                                         or spec.get("discrete_vae_weight_path"))
        if path is None or (tokenizer is None and not os.path.exists(os.fspath(path))):
            return None
        if not os.path.exists(os.fspath(path)):
            raise InputError(f"tokenizer {path} does not exist")
        from mcbeit.tokenizers import build_tokenizer
        from mcbeit.tokenizers.vqkd import build_vqkd_tokenizer

        size = int(s["second_input_size"])
        if model.mcbeit.method == "beitv2" or spec.get("discrete_vae_type") == "vqkd":
            tok = build_vqkd_tokenizer(os.fspath(path), size, model=spec.get("tokenizer_model"),
                                       codebook_size=spec.get("codebook_size") or 8192,
                                       codebook_dim=spec.get("codebook_dim") or 32)
        else:
            tok = build_tokenizer(spec.get("discrete_vae_type") or "vqgan", os.fspath(path), size)
    vocab = model.lm_head.out_features
    if int(tok.vocab_size) != vocab:
        raise InputError(f"the tokenizer has {tok.vocab_size} tokens, the model predicts {vocab}: pass the tokenizer "
                         "it was pre-trained with")
    return tok.to(_device_of(model)).eval()


def _pretraining(model: nn.Module, images: list, batch_size: int, tokenizer: Any, seed: int) -> list[dict]:
    from mcbeit.api.models import data_config
    from mcbeit.data.masking import build_mask_generator
    from mcbeit.data.transforms import TwoViewTransform
    from mcbeit.tasks.pretrain import mask_cell

    s, cfg = model.mcbeit.settings, data_config(model)
    conmim = model.mcbeit.method == "conmim"
    tok = None if conmim else _tokenizer_of(model, tokenizer)
    grid = tuple(model.patch_embed.grid_size)
    try:
        masks = build_mask_generator(s["mask_type"], grid, s["num_mask_patches"], s["mask_ratio"],
                                     s["min_mask_patches_per_block"], s["max_mask_patches_per_block"],
                                     exact=s["exact_masks"], cell=mask_cell(model.patch_embed.patch_size[0]))
    except ValueError as exc:
        raise InputError(f"the model's masking does not fit its {grid[0]}x{grid[1]} patch grid: {exc}") from None
    second = int(s["second_input_size"]) if tok is not None else int(cfg["input_size"][-1])
    # the training pipeline without its randomness: the central square, no flip, both views from it
    views = TwoViewTransform(int(cfg["input_size"][-1]), second, "bicubic", s["second_interpolation"], cfg["mean"],
                             cfg["std"], tok.input_transform if tok is not None else None, masks, scale=(1.0, 1.0),
                             ratio=(1.0, 1.0), flip_prob=0.0)
    rng = np.random.default_rng(seed)
    device, out = _device_of(model), []
    for part in _batches(len(images), batch_size):
        a, b, m = zip(*(views(load_image(item), rng) for item in images[part]), strict=True)
        x, mask = torch.stack(a).to(device), torch.stack(m).to(device)  # (B,3,H,W), (B,N)
        if conmim:
            out += _conmim(model, x, mask, grid)
            continue
        tokens = model.extract_feat(x, mask)
        tokens = tokens[1] if isinstance(tokens, tuple) else tokens  # BEiT v2: (early, last)
        pred = model.lm_head(tokens[:, model.num_prefix_tokens:]).argmax(-1)  # (B,N)
        target = recon = None
        if tok is not None:
            target = tok(torch.stack(b).to(device)).argmax(1).flatten(1)  # (B,h*w)
            if tok.has_decoder:
                mixed = torch.where(mask, pred, target).reshape(-1, *grid)  # predicted where masked
                recon = (tok.decode(mixed).clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        for i in range(x.shape[0]):
            item = {"mask": mask[i].reshape(grid).cpu().numpy(), "pred_tokens": pred[i].reshape(grid).cpu().numpy()}
            if target is not None:
                hit = (pred[i] == target[i])[mask[i]]
                item.update(target_tokens=target[i].reshape(grid).cpu().numpy(),
                            token_accuracy=float(hit.float().mean()) if hit.numel() else float("nan"))
            if recon is not None:
                item["reconstruction"] = recon[i]
            out.append(item)
    return out


def _conmim(model: nn.Module, x: torch.Tensor, mask: torch.Tensor, grid: tuple[int, int]) -> list[dict]:
    """ConMIM's pretext at inference: masked view's projections against the unmasked view's, per image."""
    import torch.nn.functional as F

    _, q = model(x, mask)  # (B,N,P) the masked view
    _, k = model(x, None)  # (B,N,P) the whole view (the teacher's role)
    sim = F.normalize(q.float(), dim=-1) @ F.normalize(k.float(), dim=-1).transpose(1, 2)  # (B,N,N)
    nearest = sim.argmax(-1)  # (B,N)
    own = torch.arange(nearest.shape[1], device=nearest.device)
    out = []
    for i in range(x.shape[0]):
        hit = (nearest[i] == own)[mask[i]]
        out.append({"mask": mask[i].reshape(grid).cpu().numpy(), "nearest_patch": nearest[i].reshape(grid).cpu().numpy(),
                    "patch_accuracy": float(hit.float().mean()) if hit.numel() else float("nan")})
    return out
