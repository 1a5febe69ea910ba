"""Mask R-CNN on BEiT for COCO detection and instance segmentation, as mc-BEiT's (MIMDet's) benchmarking recipe.

The original (``detection/models/benchmarking.py`` with ``configs/benchmarking/
benchmarking_mask_rcnn_base_FPN_25ep_LSJ_mc-beit.py`` on detectron2)::

    image (B,3,1024,1024), ImageNet mean/std -> patch embedding + absolute position (learnable, zero at the start,
        no CLS token) -> 12 BEiT blocks: 16x16-token windows in blocks 0,1, 3,4, 6,7, 9,10, global in 2, 5, 8, 11
    outputs of blocks 2, 5, 8, 11 (B,768,64,64) -> ms_adaptor: ConvT-GroupNorm(32)-GELU-ConvT (stride 4), ConvT (8),
        identity (16), max-pool (32) -> FPN (256 channels, SyncBN, p6 by stride-2 subsampling of p5)
    -> RPN (2 convs; anchors 32..512 one size per level x ratios 0.5, 1, 2; top 2000/1000 per level before NMS 0.7,
       1000 after; 256 anchors per image, half positive)
    -> RoI heads (512 RoIs per image, a quarter positive; ROIAlignV2 7x7 / 14x14; box head 4 convs + 1 fc 1024,
       mask head 4 convs + deconv, head norm NaiveSyncBatchNorm(stats_mode='N'); box weights (10, 10, 5, 5);
       score threshold 0.05, 100 detections)

Here, on torchvision's ``MaskRCNN`` (:class:`BeitMaskRCNN`, built by :func:`build_detector`):

* ``detector.backbone`` (:class:`DetectionBackbone`, ``out_channels`` 256) holds ``body`` (:class:`WindowedBeit`:
  timm's ``Beit``, the class of every other task, with ``blocks.{i}``, ``patch_embed``, ``pos_embed`` and the
  relative tables; no CLS token, final norm or head), ``ms_adaptor`` (the original's name and layers) and ``fpn``
  (``torchvision.ops.FeaturePyramidNetwork`` with ``LastLevelMaxPool``: detectron2's FPN, same layers and
  initialisation). Levels are named ``'0'..'3'`` (p2..p5, strides 4..32) and ``'pool'`` (p6). ``pyramid='vitdet'``
  replaces ms_adaptor + FPN with ViTDet's :class:`SimpleFeaturePyramid` on the last block's output (and LayerNorm
  in the heads, as ViTDet's config).
* The backbone (windows, relative and absolute position, ``ms_adaptor``, the ViTDet pyramid) is :mod:`mcbeit.models.det_backbone`.
* Heads: torchvision's ``RPNHead(conv_depth=2)``, ``FastRCNNConvFCHead((256,7,7), [256]*4, [1024])``,
  ``FastRCNNPredictor``, ``MaskRCNNHeads(256, [256]*4)`` + ``MaskRCNNPredictor``, initialised as detectron2 (fc
  layers Xavier-like ``kaiming_uniform(a=1)``, class scores normal(0.01), box deltas normal(0.001), mask logits
  normal(0.001)). Anchors are detectron2's (:class:`UnroundedAnchorGenerator`: torchvision rounds the cell
  anchors to whole pixels). Under autocast the anchors, the RPN's deltas, the box scores / deltas and the mask
  logits are float32 (the ``Float32*`` subclasses of the heads), so boxes are decoded in float32 as detectron2
  does (torchvision would decode in half precision: 1 px steps at 1024 in float16, 4 px in bfloat16).
* Losses, detectron2's (:class:`DetectronRPN`, :class:`DetectronRoIHeads`): box regression L1
  (``smooth_l1_beta=0``; torchvision's smooth L1 with beta 1/9), the RPN's two losses summed over the sampled
  anchors and divided by 256 x images, mask targets cut from the instance bitmasks by aligned RoIAlign and
  binarised at 0.5 (detectron2's ``BitMasks.crop_and_resize``; torchvision keeps soft unaligned crops). The loss
  names are torchvision's: ``loss_objectness``, ``loss_rpn_box_reg``, ``loss_classifier``, ``loss_box_reg``,
  ``loss_mask``.
* RoIAlign: detectron2's ROIAlignV2 is ``aligned=True`` (pixel centres at +0.5, so box coordinates are shifted by
  half a feature pixel) with adaptive sampling (``sampling_ratio=0``); torchvision's ``MultiScaleRoIAlign`` always
  calls ``roi_align(..., aligned=False)``. :class:`AlignedMultiScaleRoIAlign` subclasses it and replaces its
  forward: torchvision's ``LevelMapper`` (FPN eq. 1, canonical 224 px at level 4) assigns each box a level, then
  ``torchvision.ops.roi_align(..., aligned=True)`` pools it; the scales come from the known strides.
* Inputs: a list of (3,S,S) float images in 0-1 (S = ``img_size``), already resized / cropped / padded by the data
  pipeline; :class:`FixedSizeTransform` only normalises (ImageNet mean / std: the original's 123.675... / 58.395...
  divided by 255) and batches. Outputs are in the input's pixels: ``boxes`` (K,4) xyxy, ``labels`` (K,),
  ``scores`` (K,), ``masks`` (K,1,S,S) probabilities pasted by torchvision (``detector.transform.paste_masks =
  False``: the raw (K,1,28,28) probabilities, for pasting at the original image's size as detectron2's
  ``lsj_postprocess`` does).

What differs from the original, and why:

* Head norm: ``NaiveSyncBatchNorm(stats_mode='N')`` becomes ``nn.BatchNorm2d``, or ``nn.SyncBatchNorm`` with
  ``sync_bn=True`` (FPN and heads). torch's SyncBatchNorm now takes empty inputs (detectron2's reason for its own)
  and pools the statistics of all processes weighted by their element counts, as ``stats_mode='N'``; it keeps an
  unbiased running variance (NaiveSyncBatchNorm a biased one). Without ``sync_bn`` each process normalises over
  its own RoIs (512 per image for the box head, the positives for the mask head).
* The box / mask predictors have a background output that is never used (torchvision's layout: 81 scores, 81 x 4
  deltas, 81 masks for 80 classes; detectron2 81 / 80 x 4 / 80).
* The RPN drops proposals narrower than 1e-3 px (torchvision; detectron2 only empty ones); the level mapper adds
  1e-6 to log2(size / 224) where detectron2 adds 1e-8 inside the log.
* Masks are pasted by torchvision's ``paste_masks_in_image`` (bilinear on the 1-pixel padded mask) where detectron2
  samples the mask on the image grid; the original trains its masks from COCO polygons rasterised in each box,
  ours from bitmasks (detectron2's ``mask_format='bitmask'`` path).
* The ViT starts from timm's initialisation (the original's truncates its normal at one standard deviation); this
  only matters without pre-trained weights. The ms_adaptor is initialised as the original (LeCun normal).
* A per-block detector (``shared_rel_pos_bias=False``) from a checkpoint with only a shared table: the original
  fails (KeyError); here the shared table is copied into every block first, as BEiT fine-tuning does, and said so.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNN, MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.poolers import LevelMapper

from mcbeit.errors import ConfigError, InputError
from mcbeit.models.beit_weights import ConversionReport, convert_state_dict
from mcbeit.models.checkpoint import (StateDictMismatchError, compare_state_dict, extract_state_dict,
                                      holds_whole_model, read_checkpoint, resolve_source)
from mcbeit.models.det_backbone import (LEVELS, STRIDES, DetectionBackbone, RelativePositionBias,
                                        SimpleFeaturePyramid, WindowedBeit, default_global_blocks)
from mcbeit.models.segmentation import backbone_size

__all__ = ['RelativePositionBias', 'WindowedBeit', 'SimpleFeaturePyramid', 'DetectionBackbone',
           'UnroundedAnchorGenerator', 'Float32RPNHead', 'Float32BoxPredictor', 'Float32MaskPredictor',
           'AlignedMultiScaleRoIAlign', 'DetectronRPN', 'DetectronRoIHeads',
           'FixedSizeTransform', 'BeitMaskRCNN', 'build_detector', 'default_global_blocks', 'load_backbone_weights',
           'IMAGENET_MEAN', 'IMAGENET_STD']

#: the original's pixel mean / std (123.675, 116.28, 103.53) / (58.395, 57.12, 57.375), in 0-1 units
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_CPU = torch.device('cpu')


# ---------------------------------------------------------------------- detection parts
class UnroundedAnchorGenerator(AnchorGenerator):
    """detectron2's ``DefaultAnchorGenerator(offset=0.0)``: torchvision's anchors without rounding the cell anchors
    to whole pixels (a 32-px anchor of ratio 0.5 is 45.25 x 22.63, not 46 x 22). Ratio = height / width. Anchors
    are float32 under autocast too (torchvision takes the feature maps' dtype: half precision is 1 px at 1024)."""

    def forward(self, image_list, feature_maps: List[Tensor]) -> List[Tensor]:
        # only the maps' sizes, dtype and device are read: float32 views of a scalar, no copies
        shapes = [torch.zeros((), dtype=torch.float32, device=f.device).expand(f.shape) for f in feature_maps]
        return super().forward(image_list, shapes)

    def generate_anchors(self, scales, aspect_ratios, dtype: torch.dtype = torch.float32,
                         device: torch.device = _CPU) -> Tensor:
        scales = torch.as_tensor(scales, dtype=dtype, device=device)
        ratios = torch.as_tensor(aspect_ratios, dtype=dtype, device=device)
        hs = (torch.sqrt(ratios)[:, None] * scales[None, :]).reshape(-1)  # (A,)
        ws = (scales[None, :] / torch.sqrt(ratios)[:, None]).reshape(-1)  # (A,)
        return torch.stack([-ws, -hs, ws, hs], dim=1) / 2  # (A,4) centred at 0


class Float32RPNHead(RPNHead):
    """torchvision's ``RPNHead`` whose outputs are float32 under autocast: the proposals are decoded from them, and
    detectron2 decodes in float32 (``Box2BoxTransform.apply_deltas``: ``deltas.float()``); torchvision would decode
    in the deltas' half precision."""

    def forward(self, x: List[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        logits, deltas = super().forward(x)
        return [t.float() for t in logits], [t.float() for t in deltas]


class Float32BoxPredictor(FastRCNNPredictor):
    """torchvision's ``FastRCNNPredictor`` with float32 scores and deltas (boxes decoded in float32, as detectron2)."""

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        scores, deltas = super().forward(x)
        return scores.float(), deltas.float()


class Float32MaskPredictor(MaskRCNNPredictor):
    """torchvision's ``MaskRCNNPredictor`` with float32 mask logits (probabilities pasted in float32)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x).float()


class AlignedMultiScaleRoIAlign(MultiScaleRoIAlign):
    """detectron2's ``ROIPooler(pooler_type='ROIAlignV2', sampling_ratio=0)`` on torchvision's pieces: each box goes
    to a level by torchvision's ``LevelMapper`` (FPN eq. 1), then ``torchvision.ops.roi_align(..., aligned=True)``
    pools it (torchvision's forward hard-codes ``aligned=False``). ``strides`` are the levels' (4, 8, 16, 32)."""

    def __init__(self, featmap_names: Sequence[str], output_size: int, strides: Sequence[int] = STRIDES,
                 sampling_ratio: int = 0, *, canonical_scale: int = 224, canonical_level: int = 4):
        super().__init__(list(featmap_names), output_size, sampling_ratio, canonical_scale=canonical_scale,
                         canonical_level=canonical_level)
        levels = [int(round(math.log2(s))) for s in strides]
        if len(levels) != len(self.featmap_names) or levels != list(range(levels[0], levels[0] + len(levels))):
            raise ConfigError(f'strides {tuple(strides)}: give one power-of-two stride per level, doubling')
        self.scales = [1.0 / s for s in strides]
        self.map_levels = LevelMapper(levels[0], levels[-1], canonical_scale=canonical_scale,
                                      canonical_level=canonical_level)

    def forward(self, x: Dict[str, Tensor], boxes: List[Tensor], image_shapes: List[Tuple[int, int]]) -> Tensor:
        """x: levels by name; boxes: per image (Ni,4) xyxy in input pixels -> (sum Ni, C, out, out)."""
        features = [x[name] for name in self.featmap_names]
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)])  # (R,5)
        levels = self.map_levels(boxes)  # (R,) 0..L-1
        out = features[0].new_zeros((rois.shape[0], features[0].shape[1]) + self.output_size)
        for level, (feature, scale) in enumerate(zip(features, self.scales, strict=True)):
            idx = torch.where(levels == level)[0]
            pooled = roi_align(feature, rois[idx], self.output_size, spatial_scale=scale,
                               sampling_ratio=self.sampling_ratio, aligned=True)
            out[idx] = pooled.to(out.dtype)  # roi_align runs in float32 under autocast
        return out

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(featmap_names={self.featmap_names}, output_size={self.output_size}, '
                f'sampling_ratio={self.sampling_ratio}, aligned=True)')


class DetectronRPN(RegionProposalNetwork):
    """torchvision's RPN with detectron2's losses: objectness BCE summed over the sampled anchors and box regression
    L1 (``smooth_l1_beta=0``) summed over the positive ones, both divided by ``batch_size_per_image`` x images
    (torchvision: BCE mean, smooth L1 with beta 1/9 over the number sampled)."""

    def compute_loss(self, objectness: Tensor, pred_bbox_deltas: Tensor, labels: List[Tensor],
                     regression_targets: List[Tensor]) -> Tuple[Tensor, Tensor]:
        sampled_pos, sampled_neg = self.fg_bg_sampler(labels)
        pos = torch.where(torch.cat(sampled_pos, dim=0))[0]
        sampled = torch.cat([pos, torch.where(torch.cat(sampled_neg, dim=0))[0]])
        normalizer = self.fg_bg_sampler.batch_size_per_image * len(labels)
        labels_all, targets = torch.cat(labels, dim=0), torch.cat(regression_targets, dim=0)
        objectness_loss = F.binary_cross_entropy_with_logits(
            objectness.flatten()[sampled], labels_all[sampled], reduction='sum') / normalizer
        box_loss = F.l1_loss(pred_bbox_deltas[pos], targets[pos], reduction='sum') / normalizer
        return objectness_loss, box_loss


def _mask_targets(gt_masks: Tensor, boxes: Tensor, matched_idxs: Tensor, size: int) -> Tensor:
    """detectron2's ``BitMasks.crop_and_resize``: each matched instance mask (N,S,S) cut to its box by aligned
    RoIAlign, binarised at 0.5 -> (R, size, size) float."""
    if boxes.shape[0] == 0:
        return boxes.new_zeros((0, size, size))
    boxes = boxes.float()
    rois = torch.cat([matched_idxs[:, None].to(boxes), boxes], dim=1)  # (R,5)
    crops = roi_align(gt_masks[:, None].float(), rois, (size, size), spatial_scale=1.0, sampling_ratio=0,
                      aligned=True)[:, 0]  # (R,size,size)
    return (crops >= 0.5).float()


class DetectronRoIHeads(RoIHeads):
    """torchvision's RoI heads (box + mask) with detectron2's training losses: classification cross-entropy (as
    torchvision), class-specific box regression L1 summed over the positives / all sampled RoIs, mask BCE against
    binarised aligned crops of the bitmasks (:func:`_mask_targets`). Inference is torchvision's."""

    def forward(self, features: Dict[str, Tensor], proposals: List[Tensor], image_shapes: List[Tuple[int, int]],
                targets: Optional[List[Dict[str, Tensor]]] = None):
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        if targets is None:
            raise InputError('training the detector needs targets (boxes, labels, masks per image)')
        for t in targets:
            if not t['boxes'].is_floating_point() or t['labels'].dtype != torch.int64:
                raise InputError(f'targets: boxes must be float and labels int64, got {t["boxes"].dtype} and '
                                 f'{t["labels"].dtype}')
        proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))  # (R,1024)
        class_logits, box_regression = self.box_predictor(box_features)  # (R,K+1), (R,(K+1)*4)
        labels_all, box_targets = torch.cat(labels, dim=0), torch.cat(regression_targets, dim=0)
        loss_classifier = F.cross_entropy(class_logits, labels_all)
        pos = torch.where(labels_all > 0)[0]
        deltas = box_regression.reshape(labels_all.shape[0], -1, 4)[pos, labels_all[pos]]  # (P,4)
        loss_box_reg = F.l1_loss(deltas, box_targets[pos], reduction='sum') / max(labels_all.numel(), 1)

        # masks: the positive RoIs of each image
        keep = [torch.where(lab > 0)[0] for lab in labels]
        mask_boxes = [p[k] for p, k in zip(proposals, keep, strict=True)]
        mask_matched = [m[k] for m, k in zip(matched_idxs, keep, strict=True)]
        mask_logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, mask_boxes, image_shapes)))
        mask_labels = torch.cat([t['labels'][m] for t, m in zip(targets, mask_matched, strict=True)])  # (P,)
        if mask_labels.numel() == 0:
            loss_mask = mask_logits.sum() * 0
        else:
            size = mask_logits.shape[-1]
            mask_targets = torch.cat([_mask_targets(t['masks'], b, m, size)
                                      for t, b, m in zip(targets, mask_boxes, mask_matched, strict=True)])  # (P,M,M)
            picked = mask_logits[torch.arange(mask_labels.shape[0], device=mask_labels.device), mask_labels]
            loss_mask = F.binary_cross_entropy_with_logits(picked, mask_targets.to(picked.dtype))
        return [], {'loss_classifier': loss_classifier, 'loss_box_reg': loss_box_reg, 'loss_mask': loss_mask}


class FixedSizeTransform(GeneralizedRCNNTransform):
    """torchvision's transform without its resizing: checks the images are (3,S,S), normalises them (ImageNet
    mean / std in 0-1 units) and batches them; outputs stay in the input's pixels. ``paste_masks=False`` leaves
    the masks as the mask head's (K,1,28,28) probabilities instead of pasting them into (K,1,S,S)."""

    def __init__(self, img_size: int):
        super().__init__(min_size=img_size, max_size=img_size, image_mean=list(IMAGENET_MEAN),
                         image_std=list(IMAGENET_STD), size_divisible=1)
        self.img_size = int(img_size)
        self.paste_masks = True

    def forward(self, images, targets=None):
        for i, img in enumerate(images):
            if img.dim() != 3 or tuple(img.shape) != (3, self.img_size, self.img_size):
                raise InputError(f'image {i} is {tuple(img.shape)}: the detector takes (3, {self.img_size}, '
                                 f'{self.img_size}) float images in 0-1, resized and padded by the data pipeline')
        return super().forward(images, targets)

    def resize(self, image: Tensor, target: Optional[Dict[str, Tensor]] = None):
        return image, target  # the data pipeline resized, cropped and padded already

    def postprocess(self, result, image_shapes, original_image_sizes):
        if self.training or self.paste_masks:
            return super().postprocess(result, image_shapes, original_image_sizes)  # boxes unchanged (same sizes)
        return result

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(size={self.img_size}, mean={self.image_mean}, std={self.image_std}, '
                f'no resizing, paste_masks={self.paste_masks})')


class BeitMaskRCNN(MaskRCNN):
    """torchvision ``MaskRCNN`` with the BEiT backbone and the recipe's parts (build it with
    :func:`build_detector`). Train: ``model(images, targets)`` -> torchvision's 5 losses; eval: ``model(images)``
    -> per image ``{'boxes', 'labels', 'scores', 'masks'}`` in the input's pixels. The ViT is
    ``model.backbone.body`` (``blocks.{i}.*``)."""

    def __init__(self, backbone: DetectionBackbone, rpn: DetectronRPN, roi_heads: DetectronRoIHeads,
                 transform: FixedSizeTransform):
        # MaskRCNN.__init__ only builds torchvision's RPN / RoI heads / transform from keyword arguments:
        # these parts are ours, so the common constructor takes them as they are
        GeneralizedRCNN.__init__(self, backbone, rpn, roi_heads, transform)
        self.img_size = transform.img_size

    def get_num_layers(self) -> int:
        return self.backbone.body.get_num_layers()

    def extract_feat(self, images: Tensor | Sequence[Tensor]) -> Dict[str, Tensor]:
        """(B,3,S,S) images in 0-1 (or a list of (3,S,S)) -> the pyramid the heads read (detectron2's
        ``backbone(images)``): OrderedDict '0'..'3' (p2..p5: (B,C,S/4,S/4) .. (B,C,S/32,S/32)) and 'pool' (p6,
        (B,C,S/64,S/64)); normalised here as in ``forward``."""
        batch, _ = self.transform(list(images))
        return self.backbone(batch.tensors)


def _init_heads_like_detectron2(box_head: nn.Module, box_predictor: FastRCNNPredictor,
                                mask_predictor: MaskRCNNPredictor) -> None:
    """detectron2's initialisation where torchvision's differs: the box head's fc layers ``c2_xavier_fill``
    (kaiming uniform, a=1), class scores normal(0.01), box deltas normal(0.001), the mask deconv ``c2_msra_fill``
    and mask logits normal(0.001), every bias 0 (the convs already are detectron2's: kaiming normal fan-out)."""
    for m in box_head.modules():
        if isinstance(m, nn.Linear):
            nn.init.kaiming_uniform_(m.weight, a=1)
            nn.init.zeros_(m.bias)
    nn.init.normal_(box_predictor.cls_score.weight, std=0.01)
    nn.init.normal_(box_predictor.bbox_pred.weight, std=0.001)
    nn.init.kaiming_normal_(mask_predictor.conv5_mask.weight, mode='fan_out', nonlinearity='relu')
    nn.init.normal_(mask_predictor.mask_fcn_logits.weight, std=0.001)
    for bias in (box_predictor.cls_score.bias, box_predictor.bbox_pred.bias, mask_predictor.conv5_mask.bias,
                 mask_predictor.mask_fcn_logits.bias):
        nn.init.zeros_(bias)


def build_detector(model: str = 'beit_base_patch16_224', num_classes: int = 80, img_size: int = 1024,
                   window_size: int = 16, global_blocks: Optional[Sequence[int]] = None,
                   out_indices: Optional[Sequence[int]] = None, drop_path: float = 0.1,
                   layer_scale_init_value: float = 0.1, rel_pos_bias: bool = True, shared_rel_pos_bias: bool = True,
                   abs_pos_emb: bool = True, pyramid: str = 'benchmarking', sync_bn: bool = False,
                   grad_checkpointing: bool = False, *, depth: Optional[int] = None, head_norm: Optional[str] = None,
                   fpn_channels: int = 256, box_fc_dim: int = 1024,
                   anchor_sizes: Sequence[int] = (32, 64, 128, 256, 512),
                   rpn_batch_size_per_image: int = 256, box_batch_size_per_image: int = 512) -> BeitMaskRCNN:
    """Mask R-CNN on a BEiT of ``model``'s size, as the mc-BEiT benchmarking config (module doc).

    ``num_classes``: object classes without the background (labels 1..num_classes). ``img_size``: the side of every
    input (a multiple of 32). ``global_blocks``: default the last block of each quarter; ``out_indices``: default
    the global blocks (``pyramid='vitdet'``: the last block). ``layer_scale_init_value`` 0 disables layer scale
    (0.1 for base, 1e-5 for large in the original). ``shared_rel_pos_bias``: True for pre-training checkpoints
    (a shared table), False for fine-tuned ones (the ``_ft_`` config). ``sync_bn``: ``nn.SyncBatchNorm`` in the
    FPN and the heads. ``head_norm``: ``'bn'`` (the recipe) or ``'ln'`` (ViTDet); default by ``pyramid``.
    ``depth``, ``fpn_channels`` (also the head convs' width), ``box_fc_dim``, ``anchor_sizes`` and the sampling
    sizes are the recipe's by default; change them for tiny test models only.
    """
    embed_dim, model_depth, heads = backbone_size(model)
    depth = model_depth if depth is None else int(depth)
    if int(num_classes) < 1:
        raise ConfigError(f'num_classes={num_classes}: give the number of object classes (80 for COCO)')
    if int(img_size) % 32 or int(img_size) < 64:
        raise ConfigError(f'img_size={img_size}: the input side must be a multiple of 32 pixels (strides 4..64), '
                          f'at least 64')
    if pyramid not in ('benchmarking', 'vitdet'):
        raise ConfigError(f'pyramid={pyramid!r}: use "benchmarking" (mc-BEiT / MIMDet) or "vitdet"')
    head_norm = ('ln' if pyramid == 'vitdet' else 'bn') if head_norm is None else str(head_norm).lower()
    if head_norm not in ('bn', 'ln'):
        raise ConfigError(f'head_norm={head_norm!r}: use "bn" (BatchNorm; SyncBatchNorm with sync_bn) or "ln"')
    if len(tuple(anchor_sizes)) != 5:
        raise ConfigError(f'anchor_sizes {tuple(anchor_sizes)}: give one size per level p2..p6 (5)')
    if out_indices is None and pyramid == 'vitdet':
        out_indices = [depth - 1]
    bn = nn.SyncBatchNorm if sync_bn else nn.BatchNorm2d
    init_values = float(layer_scale_init_value)
    body = WindowedBeit(
        img_size=int(img_size), patch_size=16, embed_dim=embed_dim, depth=depth, num_heads=heads, mlp_ratio=4.0,
        qkv_bias=True, drop_path_rate=float(drop_path), init_values=init_values if init_values > 0 else None,
        window_size=window_size, global_blocks=global_blocks, out_indices=out_indices, rel_pos_bias=rel_pos_bias,
        shared_rel_pos_bias=shared_rel_pos_bias, abs_pos_emb=abs_pos_emb)
    body.set_grad_checkpointing(bool(grad_checkpointing))
    channels = int(fpn_channels)
    backbone = DetectionBackbone(body, pyramid=pyramid, out_channels=channels, norm_layer=bn)

    anchors = UnroundedAnchorGenerator(tuple((int(s),) for s in anchor_sizes), ((0.5, 1.0, 2.0),) * 5)
    rpn = DetectronRPN(
        anchors, Float32RPNHead(channels, anchors.num_anchors_per_location()[0], conv_depth=2),
        fg_iou_thresh=0.7, bg_iou_thresh=0.3, batch_size_per_image=int(rpn_batch_size_per_image),
        positive_fraction=0.5, pre_nms_top_n=dict(training=2000, testing=1000),
        post_nms_top_n=dict(training=1000, testing=1000), nms_thresh=0.7)

    head_norm_layer = bn if head_norm == 'bn' else LayerNorm2d
    box_head = FastRCNNConvFCHead((channels, 7, 7), [channels] * 4, [int(box_fc_dim)], norm_layer=head_norm_layer)
    box_predictor = Float32BoxPredictor(int(box_fc_dim), int(num_classes) + 1)
    mask_head = MaskRCNNHeads(channels, [channels] * 4, 1, norm_layer=head_norm_layer)
    mask_predictor = Float32MaskPredictor(channels, channels, int(num_classes) + 1)
    _init_heads_like_detectron2(box_head, box_predictor, mask_predictor)
    roi_heads = DetectronRoIHeads(
        AlignedMultiScaleRoIAlign(LEVELS, 7), box_head, box_predictor,
        fg_iou_thresh=0.5, bg_iou_thresh=0.5, batch_size_per_image=int(box_batch_size_per_image),
        positive_fraction=0.25, bbox_reg_weights=(10.0, 10.0, 5.0, 5.0), score_thresh=0.05, nms_thresh=0.5,
        detections_per_img=100, mask_roi_pool=AlignedMultiScaleRoIAlign(LEVELS, 14), mask_head=mask_head,
        mask_predictor=mask_predictor)
    return BeitMaskRCNN(backbone, rpn, roi_heads, FixedSizeTransform(int(img_size)))


# ---------------------------------------------------------------------- weights
BODY = 'backbone.body.'


def load_backbone_weights(detector: BeitMaskRCNN, source: str | os.PathLike, model_key: str = 'model|module',
                          model_prefix: str = '') -> ConversionReport:
    """A BEiT-family file (this package's pre-training or fine-tuning checkpoint, a released BEiT / mc-BEiT /
    BEiT v2 / ConMIM file, timm weights) into ``detector.backbone.body`` through the one BEiT conversion
    (:func:`mcbeit.models.beit_weights.convert_state_dict`; the relative tables and ``pos_embed`` by
    :meth:`WindowedBeit.adapt_checkpoint`). Dropped keys are listed with their reason in ``report.dropped``
    (checkpoint names); ``report.fresh`` lists every detector key left at its initialisation (full names: the
    pyramid, RPN and RoI heads, ``backbone.body.pos_embed``, ...). A whole detector's file (``backbone.body.*`` +
    ``roi_heads.*``) gives its ViT (``model_prefix='backbone.body.'``, the rest listed as outside it).
    Raises ``StateDictMismatchError`` (keys and shapes named; the detector unchanged) when the file does not fit."""
    path = resolve_source(source, 'backbone weights')
    ckpt = read_checkpoint(path)
    if not model_prefix and holds_whole_model(ckpt, model_key, BODY, 'roi_heads.'):
        model_prefix = BODY
    body = detector.backbone.body
    sd, report = convert_state_dict(ckpt, body, model_key=model_key, model_prefix=model_prefix, source=path,
                                    what=f'backbone weights {os.fspath(source)}')
    body.load_state_dict(sd)
    report.fresh = [BODY + k for k in report.fresh] + [k for k in detector.state_dict() if not k.startswith(BODY)]
    return report  # the caller logs report.summary(): once


def vit_of(detector: nn.Module) -> Tuple[str, WindowedBeit]:
    """(parameter-name prefix, module) of the detector's ViT, for layer-wise lr decay: ``('backbone.body.', ...)``."""
    from mcbeit.engine.optim import unwrap_model

    detector = unwrap_model(detector)
    return BODY, detector.get_submodule(BODY.rstrip('.'))


def load_detection_checkpoint(detector: BeitMaskRCNN, source: str | os.PathLike) -> ConversionReport:
    """A whole detector's weights (detectron2's ``train.init_checkpoint``): a checkpoint of mcbeit-det (``model``)
    or a plain state dict of :class:`BeitMaskRCNN`, a ``module.`` prefix allowed. Everything must fit exactly:
    otherwise ``StateDictMismatchError`` names every key and shape and the detector is left unchanged. (Backbone
    weights alone go through :func:`load_backbone_weights`.)"""
    path = resolve_source(source, 'detection checkpoint')
    ckpt = read_checkpoint(path)
    used = next((k for k in ('model', 'state_dict', 'module') if isinstance(ckpt.get(k), Mapping)), None)
    sd = extract_state_dict(ckpt, ('model', 'state_dict', 'module'), map_names=False)
    report = ConversionReport(source=path, model_key=used)
    mismatch = compare_state_dict(detector, sd)
    if mismatch:
        lines = [f'  missing (in the model, not in the file): {k}' for k in mismatch.missing[:40]]
        lines += [f'  unexpected (in the file, not in the model): {k}' for k in mismatch.unexpected[:40]]
        lines += [f'  shape mismatch: {k}: file {ck} vs model {md}' for k, ck, md in mismatch.mismatched]
        hints = []
        if any(k.startswith('roi_heads.box_predictor.') for k, _, _ in mismatch.mismatched):
            hints.append('the classifiers differ in their number of classes: --num_classes / the annotations')
        if not any(k.startswith('roi_heads.') for k in sd):
            hints.append('the file holds no detector heads: to start from backbone weights use --pretrained')
        hints.append('check --model, --pyramid, --shared_rel_pos_bias and --window_size / --image_size against '
                     'the run that wrote the file')
        raise StateDictMismatchError(
            f'detection checkpoint {os.fspath(source)} does not fit the detector: {len(mismatch.missing)} missing, '
            f'{len(mismatch.unexpected)} unexpected, {len(mismatch.mismatched)} shape mismatches\n'
            + '\n'.join(lines) + '\n' + '\n'.join(f'hint: {h}' for h in hints), mismatch)
    detector.load_state_dict(sd)
    report.loaded = len(sd)
    return report  # the caller logs report.summary(): once
