"""UperNet on BEiT for semantic segmentation (ADE20K), as unilm's / mc-BEiT's mmseg 0.11 code builds it.

    image (B,3,H,W) -> BEiT blocks -> outputs of blocks [3,5,7,11] (after the block, no final norm, CLS dropped)
        -> neck fpn1..fpn4 (strides 4, 8, 16, 32) -> UPerHead -> logits (B,C,H/4,W/4)
                                                  -> FCNHead on the stride-16 level (training only, loss x0.4)

* :class:`BeitSegmentationBackbone` is timm's ``Beit`` (the class every other task of this package uses)
  with no final norm, no head and a relative position table per block at the crop's grid; its neck
  ``fpn1`` (deconv 2x2 s2, BN, GELU, deconv 2x2 s2), ``fpn2`` (deconv), ``fpn3`` (identity), ``fpn4``
  (max-pool) has the original's parameter names, so the ``backbone.*`` keys of a released ADE20K file
  are this module's keys.
* :class:`UPerHead`, :class:`FCNHead` and :class:`ConvModule` (conv without bias, BN, ReLU) have mmseg's
  child names (``psp_modules.{i}.1.conv``, ``bottleneck.bn``, ``lateral_convs``, ``fpn_convs``,
  ``fpn_bottleneck``, ``conv_seg``, ``convs.0``) and mmcv's initialisation (kaiming normal fan-out for the
  convs, BN 1/0, ``conv_seg`` normal(0, 0.01)).
* :class:`UperNetSegmentor` holds ``backbone``, ``decode_head`` and ``auxiliary_head``: the names of mmseg's
  ``EncoderDecoder``, so ``segmentor.state_dict()`` is a released file's ``state_dict`` less its
  ``relative_position_index`` buffers.

The BN of every head and of ``fpn1`` is ``nn.BatchNorm2d`` or, with ``sync_bn=True``, ``nn.SyncBatchNorm``
(the original always uses SyncBN over its 16 images; it hard-codes it in ``fpn1``). Plain BN in training
needs more than one value per channel: the PPM's 1x1 pooling branch sees one per image, so a per-process
batch of 1 needs ``sync_bn=True`` under several processes.

Initialisation: ``init="timm"`` keeps timm's (Linear trunc-normal 0.02, then ``fix_init_weight`` divides
each block's ``attn.proj`` / ``mlp.fc2`` by sqrt(2 (i+1))). ``init="original"``: the original's
``EncoderDecoder`` calls the backbone's ``init_weights`` after construction, which re-draws every Linear
and LayerNorm and so undoes that rescale; a randomly initialised backbone of the original has none.
Weights: :func:`load_backbone_weights` (pre-training, fine-tuning, timm and released BEiT-family files
through :func:`mcbeit.models.beit_weights.convert_state_dict`) and :func:`load_segmentation_checkpoint`
(released unilm ADE20K files and segmentor state dicts).
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Dict, List, Optional, Sequence, Tuple, Type

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.beit import Beit
from torch import Tensor, nn

from mcbeit.errors import ConfigError, InputError
from mcbeit.models.beit_weights import ConversionReport, convert_state_dict
from mcbeit.models.checkpoint import (LoadReport, StateDictMismatchError, compare_state_dict, extract_state_dict,
                                      holds_whole_model, read_checkpoint, resolve_source)
from mcbeit.models.position_resize import interpolate_rel_pos_table

try:  # timm >= 1.0.2x exports its use_reentrant=False wrapper
    from timm.models import checkpoint as _checkpoint
except ImportError:  # pragma: no cover - older timm
    import torch.utils.checkpoint

    def _checkpoint(function, *args, **kwargs):
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, **kwargs)

__all__ = ['BeitSegmentationBackbone', 'ConvModule', 'PPM', 'UPerHead', 'FCNHead', 'UperNetSegmentor',
           'build_segmentor', 'backbone_size', 'default_out_indices', 'load_backbone_weights',
           'load_segmentation_checkpoint']


#: embed dim, depth, heads of each BEiT size
BEIT_SIZES: Dict[str, Tuple[int, int, int]] = {
    'tiny': (192, 12, 3), 'small': (384, 12, 6), 'base': (768, 12, 12), 'large': (1024, 24, 16)}
_NAME = re.compile(r'^(?:beit|beitv2|conmim)_(tiny|small|base|large)_patch(\d+)_\d+')


def _resize(x: Tensor, size: Sequence[int]) -> Tensor:
    """mmseg's ``resize`` as every head uses it: bilinear, ``align_corners=False``."""
    return F.interpolate(x, size=tuple(size), mode='bilinear', align_corners=False)


def default_out_indices(depth: int) -> List[int]:
    """Blocks whose outputs feed the neck: ``(k+1) depth/12 - 1`` for k = 3, 5, 7, 11 (the original's
    [3, 5, 7, 11] for 12 blocks, [7, 11, 15, 23] for 24)."""
    if depth < 4:
        raise ConfigError(f'a segmentation backbone needs at least 4 blocks (one per neck level), got depth={depth}')
    return [(k + 1) * depth // 12 - 1 for k in (3, 5, 7, 11)]


def backbone_size(model: str) -> Tuple[int, int, int]:
    """(embed dim, depth, heads) of a BEiT model name: classification names (``beit_base_patch16_224``,
    ``beitv2_large_patch16_224``, a timm tag allowed) and pre-training names (``beit_base_patch16_224_8k_vocab``,
    its ``_cls_pt``, ``conmim_base_patch16_224``) mean their size."""
    match = _NAME.match(str(model))
    if match is None:
        raise ConfigError(f'--model {model}: not a BEiT model name; use beit_{{tiny,small,base,large}}_patch16_224 '
                          f'(or a pre-training name of that size, e.g. beit_base_patch16_224_8k_vocab)')
    if match.group(2) != '16':
        raise ConfigError(f'--model {model}: the segmentation neck is built for 16-pixel patches (as the '
                          f'original\'s 512 and 640 configs); use a _patch16_ model')
    return BEIT_SIZES[match.group(1)]


# ---------------------------------------------------------------------- backbone
class BeitSegmentationBackbone(Beit):
    """timm ``Beit`` that returns four feature maps (B,D,H/4), (B,D,H/8), (B,D,H/16), (B,D,H/32).

    No final norm, no head, no ``fc_norm``; ``out_indices`` blocks (default :func:`default_out_indices`; blocks
    after the last index are not run, so their parameters get no gradient: DDP then needs ``find_unused_parameters``);
    any further keyword goes to timm's ``Beit`` (``img_size`` is the training crop: the relative position
    tables are built for its grid, so every input must be ``img_size`` x ``img_size``).
    """

    #: checkpoint keys for which this model has no place, dropped and listed by the BEiT-family conversion
    _WITHOUT_PLACE = {
        'norm.': 'the segmentation backbone has no final norm, as the original',
        'fc_norm.': 'classification pooling norm: the segmentation backbone has none',
        'head.': 'classification head: the segmentation backbone has none',
    }

    def __init__(self, *, out_indices: Optional[Sequence[int]] = None,
                 norm_layer_2d: Type[nn.Module] = nn.BatchNorm2d, **kwargs):
        super().__init__(num_classes=0, global_pool='', use_fc_norm=False, **kwargs)
        self.norm = nn.Identity()  # the original has no final norm at all
        depth, dim = len(self.blocks), self.embed_dim
        self.out_indices = list(default_out_indices(depth) if out_indices is None else out_indices)
        if (len(self.out_indices) != 4 or sorted(set(self.out_indices)) != self.out_indices
                or not 0 <= self.out_indices[0] <= self.out_indices[-1] < depth):
            raise ConfigError(f'out_indices {self.out_indices}: give 4 increasing block indices in [0, {depth})')
        if tuple(self.patch_embed.patch_size) != (16, 16):
            raise ConfigError(f'patch size {self.patch_embed.patch_size}: the neck is built for 16-pixel patches')
        self.fpn1 = nn.Sequential(  # stride 16 -> 4
            nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2), norm_layer_2d(dim), nn.GELU(),
            nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2))
        self.fpn2 = nn.Sequential(nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2))  # 16 -> 8
        self.fpn3 = nn.Identity()  # 16
        self.fpn4 = nn.MaxPool2d(kernel_size=2, stride=2)  # 16 -> 32

    @property
    def new_modules(self) -> Tuple[str, ...]:
        """Key prefixes of the neck: no BEiT checkpoint has them (kept at their initialisation)."""
        return 'fpn1.', 'fpn2.'

    @property
    def checkpoint_keys_without_place(self) -> Dict[str, str]:
        """Checkpoint key prefix -> why it is dropped (read by :mod:`mcbeit.models.beit_weights`)."""
        out = dict(self._WITHOUT_PLACE)
        if self.pos_embed is None:  # the original raises AttributeError here (fact sheet 2.5)
            out['pos_embed'] = ('absolute position embedding: the model has none (build it with abs_pos_emb=True '
                                'to use it)')
        return out

    def get_num_layers(self) -> int:
        return len(self.blocks)

    def reinit_as_original(self) -> None:
        """The original's ``init_weights(pretrained=None)``: every Linear re-drawn (trunc-normal 0.02, bias 0)
        and LayerNorm reset to 1/0, which undoes ``fix_init_weight``. The neck keeps PyTorch's init."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _check_size(self, x: Tensor) -> None:
        expected = tuple(self.patch_embed.img_size)
        if tuple(x.shape[-2:]) != expected:
            raise InputError(
                f'the segmentation backbone takes {expected[0]}x{expected[1]} inputs (its relative position '
                f'tables are for that grid, as the original), got {tuple(x.shape[-2:])}: crop or pad the image '
                f'(sliding-window inference does), or build the model with img_size= the input size')

    def forward_levels(self, x: Tensor) -> List[Tensor]:
        """Outputs of the ``out_indices`` blocks as maps: 4 x (B,D,H/16,W/16)."""
        self._check_size(x)
        B = x.shape[0]
        Hp, Wp = self.patch_embed.grid_size
        x = self.patch_embed(x)  # (B,N,D)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)  # (B,1+N,D)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        x = self.pos_drop(x)
        rel_pos_bias = self.rel_pos_bias() if self.rel_pos_bias is not None else None
        levels = []
        for i, blk in enumerate(self.blocks[:self.out_indices[-1] + 1]):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = _checkpoint(blk, x, shared_rel_pos_bias=rel_pos_bias)
            else:
                x = blk(x, shared_rel_pos_bias=rel_pos_bias)  # (B,1+N,D)
            if i in self.out_indices:
                levels.append(x[:, 1:].transpose(1, 2).reshape(B, -1, Hp, Wp))  # (B,D,Hp,Wp), CLS dropped
        return levels

    def forward(self, x: Tensor) -> List[Tensor]:
        """(B,3,H,W) -> [(B,D,H/4,W/4), (B,D,H/8,W/8), (B,D,H/16,W/16), (B,D,H/32,W/32)]."""
        levels = self.forward_levels(x)
        return [op(level) for op, level in zip((self.fpn1, self.fpn2, self.fpn3, self.fpn4), levels, strict=True)]


# ---------------------------------------------------------------------- heads
class ConvModule(nn.Module):
    """mmcv's ConvModule with a norm: conv (no bias) -> ``bn`` -> ReLU, kaiming-normal (fan-out) conv, BN 1/0."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding: int = 0,
                 norm_layer: Type[nn.Module] = nn.BatchNorm2d, inplace: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=False)
        self.bn = norm_layer(out_channels)
        self.activate = nn.ReLU(inplace=inplace)
        nn.init.kaiming_normal_(self.conv.weight, mode='fan_out', nonlinearity='relu')
        nn.init.ones_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.activate(self.bn(self.conv(x)))


class PPM(nn.ModuleList):
    """Pooling pyramid: per scale s, adaptive average pool to s x s, a 1x1 ConvModule, bilinear back to x's size."""

    def __init__(self, pool_scales: Sequence[int], in_channels: int, channels: int,
                 norm_layer: Type[nn.Module] = nn.BatchNorm2d):
        super().__init__(nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvModule(in_channels, channels, 1,
                                                                           norm_layer=norm_layer))
                         for s in pool_scales)

    def forward(self, x: Tensor) -> List[Tensor]:  # x: (B,Cin,h,w)
        return [_resize(branch(x), x.shape[2:]) for branch in self]  # len(scales) x (B,ch,h,w)


class _SegHead(nn.Module):
    """mmseg's ``BaseDecodeHead`` part every head shares: ``Dropout2d`` then ``conv_seg`` (1x1 with bias)."""

    def __init__(self, channels: int, num_classes: int, dropout: float):
        super().__init__()
        self.num_classes = int(num_classes)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else None
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        nn.init.normal_(self.conv_seg.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def cls_seg(self, feat: Tensor) -> Tensor:  # (B,ch,h,w) -> (B,C,h,w)
        if self.dropout is not None:
            feat = self.dropout(feat)
        return self.conv_seg(feat)


class UPerHead(_SegHead):
    """UperNet decoder: PPM on the coarsest level, a top-down FPN over all four, their fusion at stride 4."""

    def __init__(self, in_channels: Sequence[int] = (768,) * 4, channels: int = 768,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), num_classes: int = 150, dropout: float = 0.1,
                 norm_layer: Type[nn.Module] = nn.BatchNorm2d):
        super().__init__(channels, num_classes, dropout)
        in_channels = list(in_channels)
        self.psp_modules = PPM(pool_scales, in_channels[-1], channels, norm_layer)
        self.bottleneck = ConvModule(in_channels[-1] + len(pool_scales) * channels, channels, 3, padding=1,
                                     norm_layer=norm_layer)
        self.lateral_convs = nn.ModuleList(ConvModule(c, channels, 1, norm_layer=norm_layer, inplace=False)
                                           for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvModule(channels, channels, 3, padding=1, norm_layer=norm_layer,
                                                  inplace=False) for _ in in_channels[:-1])
        self.fpn_bottleneck = ConvModule(len(in_channels) * channels, channels, 3, padding=1, norm_layer=norm_layer)

    def psp_forward(self, x: Tensor) -> Tensor:  # (B,Cin,h,w) -> (B,ch,h,w)
        return self.bottleneck(torch.cat([x, *self.psp_modules(x)], dim=1))  # cat: (B,Cin+S*ch,h,w)

    def forward(self, levels: Sequence[Tensor]) -> Tensor:
        """4 maps, fine to coarse -> logits (B,C,h0,w0) at the finest level's size."""
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, levels[:-1], strict=True)]  # (B,ch,h_i,w_i)
        laterals.append(self.psp_forward(levels[-1]))
        for i in range(len(laterals) - 1, 0, -1):  # top-down
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:-1], strict=True)] + [laterals[-1]]  # the PPM level: no fpn conv
        size = outs[0].shape[2:]
        outs = [outs[0]] + [_resize(x, size) for x in outs[1:]]  # all (B,ch,h0,w0)
        return self.cls_seg(self.fpn_bottleneck(torch.cat(outs, dim=1)))  # (B,4ch,h0,w0) -> (B,C,h0,w0)


class FCNHead(_SegHead):
    """Auxiliary head: ``num_convs`` 3x3 ConvModules on level ``in_index``, then ``conv_seg``."""

    def __init__(self, in_index: int = 2, in_channels: int = 768, channels: int = 256, num_convs: int = 1,
                 num_classes: int = 150, dropout: float = 0.1, norm_layer: Type[nn.Module] = nn.BatchNorm2d):
        super().__init__(channels, num_classes, dropout)
        self.in_index = int(in_index)
        widths = [in_channels] + [channels] * num_convs
        self.convs = nn.Sequential(*(ConvModule(a, b, 3, padding=1, norm_layer=norm_layer)
                                     for a, b in zip(widths[:-1], widths[1:], strict=True)))

    def forward(self, levels: Sequence[Tensor]) -> Tensor:  # -> (B,C,h,w) at level in_index's size
        return self.cls_seg(self.convs(levels[self.in_index]))


# ---------------------------------------------------------------------- segmentor
class UperNetSegmentor(nn.Module):
    """mmseg's ``EncoderDecoder``: ``backbone`` -> ``decode_head`` (+ ``auxiliary_head`` in training)."""

    def __init__(self, backbone: BeitSegmentationBackbone, decode_head: UPerHead,
                 auxiliary_head: Optional[FCNHead] = None):
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head
        self.auxiliary_head = auxiliary_head
        self.num_classes = decode_head.num_classes
        self.crop_size: Tuple[int, int] = tuple(backbone.patch_embed.img_size)

    def get_num_layers(self) -> int:
        return self.backbone.get_num_layers()

    def no_weight_decay(self) -> set:
        """Nothing beyond 1-D parameters and biases: the original's layer-decay constructor compares names
        carrying ``backbone.`` against ``('pos_embed', 'cls_token')``, so ``cls_token`` and the relative
        tables do get weight decay."""
        return set()

    def _bn_synchronised(self) -> bool:
        return (isinstance(self.decode_head.bottleneck.bn, nn.SyncBatchNorm) and torch.distributed.is_available()
                and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1)

    def forward(self, img: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """(B,3,H,W) -> (logits (B,C,H/4,W/4), auxiliary logits (B,C,H/16,W/16) in training mode, else None)."""
        if self.training and img.shape[0] == 1 and not self._bn_synchronised():
            raise InputError('training on one image per step: BatchNorm needs more than one value per channel and '
                             "the PPM's 1x1 pooling branch has one per image; use a per-process batch of at least 2, "
                             'or sync_bn=True across several processes (the original: SyncBN over 8 GPUs x 2)')
        levels = self.backbone(img)
        logits = self.decode_head(levels)
        aux = self.auxiliary_head(levels) if self.training and self.auxiliary_head is not None else None
        return logits, aux

    def extract_feat(self, img: Tensor) -> List[Tensor]:
        """(B,3,H,W), H = W = the crop -> the neck's 4 maps the heads read: [(B,D,H/4,W/4), (B,D,H/8,W/8),
        (B,D,H/16,W/16), (B,D,H/32,W/32)] (mmseg's ``extract_feat``)."""
        return self.backbone(img)

    def encode_decode(self, img: Tensor) -> Tensor:
        """(B,3,H,W) -> decode-head logits resized (bilinear, align_corners=False) to (B,C,H,W)."""
        return _resize(self.decode_head(self.backbone(img)), img.shape[2:])


def build_segmentor(model: str = 'beit_base_patch16_224', num_classes: int = 150, img_size: int = 512,
                    drop_path: float = 0.1, layer_scale_init_value: float = 0.1,
                    out_indices: Optional[Sequence[int]] = None, channels: int = 768, aux_channels: int = 256,
                    aux: bool = True, sync_bn: bool = False, rel_pos_bias: bool = True, abs_pos_emb: bool = False,
                    init: str = 'timm') -> UperNetSegmentor:
    """UperNet on a BEiT of ``model``'s size, as the original's ``upernet_beit`` configs (see the module doc).

    ``img_size``: the training crop (512, or 640 for the 640 configs); ``layer_scale_init_value`` 0 disables
    layer scale; ``aux=False`` leaves out the auxiliary FCN head; ``sync_bn`` uses ``nn.SyncBatchNorm`` for
    every BN (``fpn1``'s included); ``init`` ``"timm"`` or ``"original"`` (module doc).
    """
    embed_dim, depth, heads = backbone_size(model)
    if not 1 <= int(num_classes) <= 255:
        raise ConfigError(f'num_classes={num_classes}: give 1..255 classes (label 255 is the ignore index)')
    if int(img_size) % 16 or int(img_size) < 32:
        raise ConfigError(f'img_size={img_size}: the crop must be a multiple of 16 pixels, at least 32')
    if init not in ('timm', 'original'):
        raise ConfigError(f'init={init!r}: use "timm" (timm\'s, with fix_init_weight) or "original"')
    norm = nn.SyncBatchNorm if sync_bn else nn.BatchNorm2d
    init_values = float(layer_scale_init_value)
    backbone = BeitSegmentationBackbone(
        img_size=int(img_size), patch_size=16, embed_dim=embed_dim, depth=depth, num_heads=heads, mlp_ratio=4.0,
        qkv_bias=True, drop_path_rate=float(drop_path), init_values=init_values if init_values > 0 else None,
        use_abs_pos_emb=bool(abs_pos_emb), use_rel_pos_bias=bool(rel_pos_bias), use_shared_rel_pos_bias=False,
        out_indices=out_indices, norm_layer_2d=norm)
    if init == 'original':
        backbone.reinit_as_original()
    decode_head = UPerHead(in_channels=(embed_dim,) * 4, channels=int(channels), num_classes=int(num_classes),
                           norm_layer=norm)
    auxiliary_head = FCNHead(in_index=2, in_channels=embed_dim, channels=int(aux_channels),
                             num_classes=int(num_classes), norm_layer=norm) if aux else None
    return UperNetSegmentor(backbone, decode_head, auxiliary_head)


# ---------------------------------------------------------------------- weights


def load_backbone_weights(segmentor: UperNetSegmentor, source: str | os.PathLike, model_key: str = 'model|module',
                          model_prefix: str = '') -> ConversionReport:
    """A BEiT-family file (this package's pre-training or fine-tuning checkpoint, a released BEiT / mc-BEiT /
    BEiT v2 / ConMIM file, timm weights) into ``segmentor.backbone``, through the one BEiT conversion
    (:func:`mcbeit.models.beit_weights.convert_state_dict`): a shared relative table copied into every block,
    tables resampled to the crop's grid as the original, pre-training heads and the final norm dropped and
    listed, the neck reported as fresh. A whole segmentor's file (``backbone.*`` + ``decode_head.*``) gives its
    backbone (``model_prefix='backbone.'``, the heads listed as outside it). Returns the report."""
    path = resolve_source(source, 'backbone weights')
    ckpt = read_checkpoint(path)
    if not model_prefix and holds_whole_model(ckpt, model_key, 'backbone.', 'decode_head.'):
        model_prefix = 'backbone.'
    sd, report = convert_state_dict(ckpt, segmentor.backbone, model_key=model_key, model_prefix=model_prefix,
                                    source=path, what=f'backbone weights {os.fspath(source)}')
    segmentor.backbone.load_state_dict(sd)
    return report  # the caller logs report.summary(): once


def _mismatch_hints(report: LoadReport) -> List[str]:
    hints = []
    for k, ck, md in report.mismatched:
        if k.endswith('conv_seg.weight'):
            hints.append(f'the file has {ck[0]} classes, the model {md[0]}: build it with num_classes={ck[0]}')
            break
    if any('blocks.' in k or k.startswith('backbone.fpn') for k, _, _ in report.mismatched):
        hints.append('backbone shapes differ: the file is probably of another model size (--model)')
    if any(k.startswith('auxiliary_head.') for k in report.missing):
        hints.append('the file has no auxiliary head: build the segmentor with aux=False')
    if any(k.startswith('backbone.blocks.') and k.endswith('relative_position_bias_table') for k in report.unexpected):
        hints.append('the file has relative position tables: build the segmentor with rel_pos_bias=True')
    return hints


def load_segmentation_checkpoint(segmentor: UperNetSegmentor, source: str | os.PathLike) -> ConversionReport:
    """A whole segmentor's weights: unilm's released ADE20K files (``{'meta', 'state_dict': {backbone.*,
    decode_head.*, auxiliary_head.*}, ...}``, a ``module.`` prefix allowed), this package's checkpoints
    (``model``) and plain segmentor state dicts.

    Dropped and listed: the ``relative_position_index`` buffers (the model computes them), the file's
    auxiliary head when the segmentor has none (it is used in training only). Relative tables of another
    crop's grid are resampled as the original's loader does. Anything else must fit exactly: otherwise
    ``StateDictMismatchError`` names every key and shape and the model is left unchanged.
    """
    path = resolve_source(source, 'segmentation checkpoint')
    ckpt = read_checkpoint(path)
    used = next((k for k in ('state_dict', 'model', 'module') if isinstance(ckpt.get(k), Mapping)), None)
    sd = extract_state_dict(ckpt, ('state_dict', 'model', 'module'), map_names=False)
    report = ConversionReport(source=path, model_key=used)
    for k in [k for k in sd if k.endswith('relative_position_index')]:
        del sd[k]
        report.dropped[k] = 'buffer the model computes itself'
    if segmentor.auxiliary_head is None:
        for k in [k for k in sd if k.startswith('auxiliary_head.')]:
            del sd[k]
            report.dropped[k] = 'auxiliary head (training only): the segmentor has none'
    own = segmentor.state_dict()
    grid = tuple(segmentor.backbone.patch_embed.grid_size)
    for k in [k for k in sd if k.endswith('relative_position_bias_table')]:
        if k in own and sd[k].ndim == 2 and sd[k].shape[1] == own[k].shape[1] and sd[k].shape[0] != own[k].shape[0]:
            src = tuple(sd[k].shape)
            sd[k] = interpolate_rel_pos_table(sd[k], own[k].shape[0], grid)
            report.interpolated.append((k, src, tuple(sd[k].shape)))
    mismatch = compare_state_dict(segmentor, sd)
    if mismatch:
        lines = [f'  missing (in the model, not in the file): {k}' for k in mismatch.missing]
        lines += [f'  unexpected (in the file, not in the model): {k}' for k in mismatch.unexpected]
        lines += [f'  shape mismatch: {k}: file {ck} vs model {md}' for k, ck, md in mismatch.mismatched]
        hints = _mismatch_hints(mismatch) + ['check --model, num_classes and the crop size the file was trained at']
        raise StateDictMismatchError(
            f'segmentation checkpoint {os.fspath(source)} does not fit the segmentor: {len(mismatch.missing)} '
            f'missing, {len(mismatch.unexpected)} unexpected, {len(mismatch.mismatched)} shape mismatches\n'
            + '\n'.join(lines) + '\n' + '\n'.join(f'hint: {h}' for h in hints), mismatch)
    segmentor.load_state_dict(sd)
    report.loaded = len(sd)
    return report  # the caller logs report.summary(): once
