"""Semantic-segmentation evaluation as mmsegmentation 0.11 does it: sliding-window inference and mIoU.

Inference (mmseg ``EncoderDecoder.slide_inference`` / ``inference`` / ``aug_test``), per image:

    windows  crop x crop, stride apart; per axis ``max(H - crop + stride - 1, 0) // stride + 1`` of them,
             the last one pushed back inside the image (``y1 = max(min(y1 + crop, H) - crop, 0)``)
    logits   sum of the windows' logits / number of windows covering each pixel
    view     logits resized (bilinear, align_corners=False) to the ORIGINAL image size, softmax,
             flipped back when the view was flipped
    label    argmax of the mean of the views' softmaxes (one view: argmax of its logits, the same thing)

One difference, documented: a window smaller than the crop (an image smaller than the crop) is padded
right / bottom with 0 (the mean colour once normalised, as the training pad) to the crop and its logits
cropped back. The original decodes it unpadded, which crashes BEiT's fixed relative-position grid.

mIoU (mmseg ``intersect_and_union`` / ``eval_metrics`` / ``CustomDataset.evaluate``), summed over the set:

    keep     pixels whose label != ignore_index (the prediction is masked by the label only)
    areas    per class c: intersect = #(pred == label == c), pred = #(pred == c), label = #(label == c),
             union = pred + label - intersect
    IoU_c    intersect / union        (NaN where union = 0)      mIoU = mean of the non-NaN IoU_c
    Acc_c    intersect / label        (NaN where label = 0)      mAcc = mean of the non-NaN Acc_c
    aAcc     sum intersect / sum label

So a class predicted somewhere but absent from every label counts in mIoU as 0. Values are percent,
not rounded (mmseg rounds to two decimals).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from mcbeit.engine.distributed import all_reduce_sum
from mcbeit.engine.precision import autocast_context
from mcbeit.errors import ConfigError, InputError

__all__ = ["IoUAccumulator", "colourise", "evaluate_segmentation", "palette", "predict", "save_visualisation",
           "slide_logits", "slide_windows"]

Encode = Callable[[Tensor], Tensor]  # (B,3,h,w) normalised images -> (B,C,h,w) logits

#: mmseg's Normalize for ADE20K (RGB order): what the test transform used, to show the image again
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


# ---------------------------------------------------------------------- mIoU
class IoUAccumulator:
    """Per-class pixel areas (intersect, union, pred, label) summed over images, as mmseg counts them.

    Integer counts on ``device`` (exact however many pixels); :meth:`all_reduce` sums them over the
    process group, :meth:`compute` turns them into mIoU / mAcc / aAcc.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, device: torch.device | str | None = None):
        if int(num_classes) < 1:
            raise ConfigError(f"num_classes must be at least 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.areas = torch.zeros(4, self.num_classes, dtype=torch.int64, device=device)  # (4,C)

    @property
    def area_intersect(self) -> Tensor:
        return self.areas[0]

    @property
    def area_union(self) -> Tensor:
        return self.areas[1]

    @property
    def area_pred(self) -> Tensor:
        return self.areas[2]

    @property
    def area_label(self) -> Tensor:
        return self.areas[3]

    def update(self, pred: Tensor, label: Tensor) -> None:
        """Add one prediction / label pair: (H,W) or (B,H,W) integer maps of the same shape."""
        if pred.shape != label.shape:
            raise InputError(f"prediction {tuple(pred.shape)} and label {tuple(label.shape)} differ in shape; "
                             "resize the prediction to the label's (original) size first")
        if pred.is_floating_point() or label.is_floating_point():
            raise InputError("predictions and labels must be integer class maps (argmax the logits first)")
        device = self.areas.device
        label = label.to(device).long().flatten()
        pred = pred.to(device).long().flatten()
        valid = label != self.ignore_index
        pred, label = pred[valid], label[valid]  # (N,), N = labelled pixels
        self._check_range(pred, "prediction")
        self._check_range(label, "label")
        c = self.num_classes
        area_intersect = torch.bincount(label[pred == label], minlength=c)
        area_pred = torch.bincount(pred, minlength=c)
        area_label = torch.bincount(label, minlength=c)
        area_union = area_pred + area_label - area_intersect
        self.areas += torch.stack([area_intersect, area_union, area_pred, area_label])

    def _check_range(self, values: Tensor, what: str) -> None:
        if values.numel() == 0:
            return
        low, high = (int(v) for v in torch.aminmax(values))
        if low < 0 or high >= self.num_classes:
            raise InputError(f"{what} values must be class ids in [0, {self.num_classes - 1}] or "
                             f"{self.ignore_index} (ignored), found {low if low < 0 else high}; check num_classes "
                             "and reduce_zero_label for this dataset")

    def all_reduce(self) -> None:
        """Sum the areas over the process group (nothing without one)."""
        self.areas = all_reduce_sum(self.areas)

    def compute(self, class_names: Sequence[str] | None = None) -> dict:
        """``mIoU``, ``mAcc``, ``aAcc`` (percent) and per-class ``IoU`` / ``Acc`` lists (percent, NaN where undefined)."""
        if class_names is not None and len(class_names) != self.num_classes:
            raise ConfigError(f"{len(class_names)} class names for {self.num_classes} classes")
        intersect, union, _, label = self.areas.double().cpu()
        if label.sum() == 0:
            raise InputError(f"no labelled pixel was evaluated (every label is {self.ignore_index} or the set is "
                             "empty); check the annotations and reduce_zero_label")
        iou = intersect / union  # (C,) 0/0 = NaN where union = 0
        acc = intersect / label  # (C,) NaN where the class has no labelled pixel
        out = {"mIoU": 100.0 * float(iou.nanmean()), "mAcc": 100.0 * float(acc.nanmean()),
               "aAcc": 100.0 * float(intersect.sum() / label.sum()),
               "IoU": (100.0 * iou).tolist(), "Acc": (100.0 * acc).tolist()}
        if class_names is not None:
            out["classes"] = list(class_names)
        return out


# ---------------------------------------------------------------------- inference
def _pair(v: int | Sequence[int], name: str) -> tuple[int, int]:
    h, w = (v, v) if isinstance(v, int) else tuple(v)
    if int(h) < 1 or int(w) < 1:
        raise ConfigError(f"{name} must be positive, got {v}")
    return int(h), int(w)


def slide_windows(size: int, crop: int, stride: int) -> list[tuple[int, int]]:
    """(start, end) of mmseg's windows along one axis of length ``size``; the last is pushed back inside."""
    grids = max(size - crop + stride - 1, 0) // stride + 1
    out = []
    for i in range(grids):
        end = min(i * stride + crop, size)
        out.append((max(end - crop, 0), end))
    return out


def _encode_checked(encode: Encode, x: Tensor, num_classes: int) -> Tensor:
    logits = encode(x)
    want = (x.shape[0], num_classes, *x.shape[2:])
    if tuple(logits.shape) != want:
        raise InputError(f"the model's encode returned logits {tuple(logits.shape)} for an input {tuple(x.shape)}, "
                         f"expected {want}: it must return num_classes logits at the input's size")
    return logits.float()


def slide_logits(encode: Encode, image: Tensor, num_classes: int, crop: int | Sequence[int] = (512, 512),
                 stride: int | Sequence[int] = (341, 341), window_batch: int = 4) -> Tensor:
    """Sliding-window logits (B,C,H,W) of a normalised image (B,3,H,W), as mmseg's ``slide_inference``.

    ``encode`` maps crop-sized images to logits at their size. Windows are decoded ``window_batch``
    at a time (the original: one at a time; eval-mode BN makes them independent). A window smaller
    than the crop is padded with 0 to the crop and its logits cropped back (see the module docstring).
    """
    (ch, cw), (sh, sw) = _pair(crop, "crop"), _pair(stride, "stride")
    if sh > ch or sw > cw:
        raise ConfigError(f"stride {(sh, sw)} larger than the crop {(ch, cw)} leaves pixels no window covers")
    if image.dim() != 4:
        raise InputError(f"slide_logits wants a (B,3,H,W) image, got {tuple(image.shape)}")
    b, _, h, w = image.shape
    windows = [(y, x) for y in slide_windows(h, ch, sh) for x in slide_windows(w, cw, sw)]
    logits = image.new_zeros((b, num_classes, h, w), dtype=torch.float32)  # (B,C,H,W) sum over windows
    count = image.new_zeros((1, 1, h, w), dtype=torch.float32)  # windows covering each pixel
    for start in range(0, len(windows), max(1, int(window_batch))):
        chunk = windows[start:start + max(1, int(window_batch))]
        tiles = [F.pad(image[:, :, y1:y2, x1:x2], (0, cw - (x2 - x1), 0, ch - (y2 - y1)))  # (B,3,ch,cw)
                 for (y1, y2), (x1, x2) in chunk]
        out = _encode_checked(encode, torch.cat(tiles), num_classes)  # (n*B,C,ch,cw)
        for k, ((y1, y2), (x1, x2)) in enumerate(chunk):
            logits[:, :, y1:y2, x1:x2] += out[k * b:(k + 1) * b, :, :y2 - y1, :x2 - x1]
            count[:, :, y1:y2, x1:x2] += 1
    return logits / count


def predict(encode: Encode, views: Sequence[tuple[Tensor, bool]], out_size: tuple[int, int], num_classes: int,
            mode: str = "slide", crop: int | Sequence[int] = (512, 512), stride: int | Sequence[int] = (341, 341),
            window_batch: int = 4) -> Tensor:
    """Class map (H,W) at ``out_size`` = (H, W) of one image seen through ``views``.

    ``views``: ``(image (3,h,w) normalised, flipped horizontally)`` pairs, e.g. the scales and flips
    of multi-scale testing. Several views: argmax of the mean of their softmaxes, each at ``out_size``
    and flipped back (mmseg ``aug_test``); one view: argmax of its logits.
    """
    if mode not in ("slide", "whole"):
        raise ConfigError(f"inference mode must be 'slide' or 'whole', got {mode!r}")
    if not views:
        raise InputError("predict needs at least one view of the image")
    total = None  # (1,C,H,W) sum of the views' scores
    for image, flipped in views:
        x = image[None] if image.dim() == 3 else image  # (1,3,h,w)
        if mode == "slide":
            logits = slide_logits(encode, x, num_classes, crop, stride, window_batch)
        else:
            logits = _encode_checked(encode, x, num_classes)
        logits = F.interpolate(logits, size=tuple(out_size), mode="bilinear", align_corners=False)  # (1,C,H,W)
        score = logits if len(views) == 1 else logits.softmax(dim=1)
        if flipped:
            score = score.flip(dims=(3,))
        total = score if total is None else total + score  # the mean's 1/n does not move the argmax
    return total[0].argmax(dim=0)  # (H,W)


# ---------------------------------------------------------------------- the loop
def _items(batch) -> list[tuple]:
    """(views, label, index, n_skipped) per image of a loader batch: lists collated field by field
    (``seg_collate``: ``([views], [label], [index], [n_skipped])``), or one uncollated item."""
    if len(batch) != 4:
        raise InputError(f"an evaluation batch must be (views, label, index, n_skipped), got {len(batch)} fields")
    views, label = batch[0], batch[1]
    if isinstance(label, Tensor) and label.dim() == 2:  # one item, not collated
        return [tuple(batch)]
    return list(zip(views, label, batch[2], batch[3], strict=True))


@contextlib.contextmanager
def _eval_mode(encode: Encode):
    """The module ``encode`` is (or is a method of) in eval mode for the block, its mode restored after."""
    module = encode if isinstance(encode, nn.Module) else getattr(encode, "__self__", None)
    if not isinstance(module, nn.Module):
        yield
        return
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def _shown_image(view: tuple[Tensor, bool], size: tuple[int, int], mean: Sequence[float],
                 std: Sequence[float]) -> np.ndarray:
    """The view's image back in uint8 RGB (H,W,3) at the label's size."""
    image, flipped = view
    image = image.float()
    if flipped:
        image = image.flip(dims=(2,))
    image = image * image.new_tensor(std)[:, None, None] + image.new_tensor(mean)[:, None, None]  # (3,h,w) 0..255
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]  # (3,H,W)
    return image.clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


@torch.inference_mode()
def evaluate_segmentation(model_encode: Encode, loader: Iterable, num_classes: int, device: torch.device,
                          amp_dtype: torch.dtype | None = None, sharded: bool = False,
                          crop: int | Sequence[int] = (512, 512), stride: int | Sequence[int] = (341, 341),
                          mode: str = "slide", class_names: Sequence[str] | None = None, visualise: int = 0,
                          ignore_index: int = 255, mean: Sequence[float] = IMAGENET_MEAN,
                          std: Sequence[float] = IMAGENET_STD, window_batch: int = 4) -> dict:
    """mIoU / mAcc / aAcc (percent) of ``model_encode`` over every image of ``loader``.

    ``loader`` yields ``(views, label, index, n_skipped)`` per image (batch size 1, collated as
    lists); ``model_encode`` maps normalised (B,3,h,w) images to (B,C,h,w) logits (its module is put
    in eval mode for the loop). ``sharded``: the loader holds this rank's shard (``ShardSampler``),
    the areas are summed over ranks, so each image counts once; otherwise each rank measures its
    whole loader. ``amp_dtype`` autocasts the model only; scores are float32.

    Returns :meth:`IoUAccumulator.compute`'s dict plus ``images``, ``skipped_images`` and
    ``visualisation``: on rank 0, the first ``visualise`` images of its shard as
    ``(image uint8 (H,W,3), label (H,W), prediction (H,W))`` numpy triples (for :func:`save_visualisation`).
    """
    def encode(x: Tensor) -> Tensor:
        with autocast_context(device, amp_dtype):
            return model_encode(x)

    accumulator = IoUAccumulator(num_classes, ignore_index, device)
    counts = torch.zeros(2, dtype=torch.int64)  # images, skipped unreadable files
    triples = []
    keep = int(visualise) if _is_main() else 0
    with _eval_mode(model_encode):
        for batch in loader:
            for views, label, _index, n_skipped in _items(batch):
                views = [(image.to(device, non_blocking=True), bool(flipped)) for image, flipped in views]
                label = label.to(device, non_blocking=True)  # (H,W) original size
                pred = predict(encode, views, tuple(label.shape[-2:]), num_classes, mode, crop, stride,
                               window_batch)  # (H,W)
                accumulator.update(pred, label)
                counts += torch.tensor([1, int(n_skipped)])
                if len(triples) < keep:
                    triples.append((_shown_image(views[0], tuple(label.shape[-2:]), mean, std),
                                    label.cpu().numpy(), pred.cpu().numpy()))
    if sharded:
        accumulator.all_reduce()
        counts = all_reduce_sum(counts)
    images, skipped = counts.tolist()
    if images == 0:
        raise InputError("the segmentation evaluation set is empty")
    return {**accumulator.compute(class_names), "images": images, "skipped_images": skipped,
            "visualisation": triples}


# ---------------------------------------------------------------------- pictures
#: mmseg 0.11 ``ADE20KDataset.PALETTE`` (RGB), transcribed as hex, 12 classes a line
_ADE20K_PALETTE = " ".join([
    "787878 b47878 06e6e6 503232 04c803 787850 8c8c8c cc05ff e6e6e6 04fa07 e005ff ebff07",
    "96053d 787846 08ff33 ff0652 8fff8c ccff04 ff3307 cc4603 0066c8 3de6fa ff0633 0b66ff",
    "ff0747 ff09e0 0907e6 dcdcdc ff095c 7009ff 08ffd6 07ffe0 ffb806 0aff47 ff290a 07ffff",
    "e0ff08 6608ff ff3d06 ffc207 ff7a08 00ff14 ff0829 ff0599 0633ff eb0cff a09614 00a3ff",
    "8c8c8c fa0a0f 14ff00 1fff00 ff1f00 ffe000 99ff00 0000ff ff4700 00ebff 00adff 1f00ff",
    "0bc8c8 ff5200 00fff5 003dff 00ff70 00ff85 ff0000 ffa300 ff6600 c2ff00 008fff 33ff00",
    "0052ff 00ff29 00ffad 0a00ff adff00 00ff99 ff5c00 ff00ff ff00f5 ff0066 ffad00 ff0014",
    "ffb8b8 001fff 00ff3d 0047ff ff00cc 00ffc2 00ff52 000aff 0070ff 3300ff 00c2ff 007aff",
    "00ffa3 ff9900 00ff0a ff7000 8fff00 5200ff a3ff00 ffeb00 08b8aa 8500ff 00ff5c b800ff",
    "ff001f 00b8ff 00d6ff ff0070 5cff00 00e0ff 70e0ff 46b8a0 a300ff 9900ff 47ff00 ff00a3",
    "ffcc00 ff008f 00ffeb 85ff00 ff00eb f500ff ff007a fff500 0abed4 d6ff00 00ccff 1400ff",
    "ffff00 0099ff 0029ff 00ffcc 2900ff 29ff00 ad00ff 00f5ff 4700ff 7a00ff 00ffb8 005cff",
    "b8ff00 0085ff ffd600 19c2c2 66ff00 5c00ff",
]).split()


def _bit_palette_colour(i: int) -> tuple[int, int, int]:
    """PASCAL VOC's colour map: the bits of ``i`` spread over R, G, B from the high bit down (distinct, never
    black for i > 0)."""
    r = g = b = 0
    for shift in range(7, -1, -1):
        r |= (i & 1) << shift
        g |= ((i >> 1) & 1) << shift
        b |= ((i >> 2) & 1) << shift
        i >>= 3
    return r, g, b


def palette(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 RGB colours: ADE20K's for 150 classes, else PASCAL VOC's colour map from
    its second colour on (class 0 is not black: black is the ignored label)."""
    if num_classes == len(_ADE20K_PALETTE):
        return np.array([[int(h[k:k + 2], 16) for k in (0, 2, 4)] for h in _ADE20K_PALETTE], dtype=np.uint8)
    return np.array([_bit_palette_colour(i + 1) for i in range(num_classes)], dtype=np.uint8)


def _numpy(a) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, Tensor) else np.asarray(a)


def colourise(label_map, num_classes: int) -> np.ndarray:
    """uint8 (H,W,3) picture of a class map (H,W): the palette's colour per class, black for any other
    value (255 = ignored)."""
    m = _numpy(label_map).astype(np.int64)
    if m.ndim != 2:
        raise InputError(f"colourise wants a (H,W) class map, got shape {m.shape}")
    out = np.zeros((*m.shape, 3), dtype=np.uint8)
    known = (m >= 0) & (m < num_classes)
    out[known] = palette(num_classes)[m[known]]
    return out


def _fit(picture: np.ndarray, size: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    if picture.shape[1::-1] == size:
        return picture
    return np.asarray(Image.fromarray(picture).resize(size, resample))


def save_visualisation(path: str | Path | None, triples: Sequence[tuple], num_classes: int,
                       max_side: int = 320, gap: int = 4) -> np.ndarray:
    """A uint8 (H,W,3) grid, one row per ``(image, label, prediction)`` triple: image | ground truth |
    prediction, each shrunk so its longer side is at most ``max_side``; written as a PNG to ``path``
    (unless None) and returned (for TensorBoard)."""
    if not triples:
        raise InputError("no (image, label, prediction) triple to draw: evaluate with visualise > 0")
    rows = []
    for image, label, pred in triples:
        image = _numpy(image).astype(np.uint8)
        h, w = image.shape[:2]
        f = min(1.0, max_side / max(h, w))
        size = (max(1, round(w * f)), max(1, round(h * f)))  # PIL's (width, height)
        parts = [_fit(image, size, Image.Resampling.BILINEAR),
                 _fit(colourise(label, num_classes), size, Image.Resampling.NEAREST),
                 _fit(colourise(pred, num_classes), size, Image.Resampling.NEAREST)]
        row = np.full((size[1], 3 * size[0] + 2 * gap, 3), 255, dtype=np.uint8)
        for k, part in enumerate(parts):
            row[:, k * (size[0] + gap):k * (size[0] + gap) + size[0]] = part
        rows.append(row)
    width = max(r.shape[1] for r in rows)
    height = sum(r.shape[0] for r in rows) + gap * (len(rows) - 1)
    grid = np.full((height, width, 3), 255, dtype=np.uint8)
    top = 0
    for row in rows:
        grid[top:top + row.shape[0], :row.shape[1]] = row
        top += row.shape[0] + gap
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid).save(path)
    return grid

