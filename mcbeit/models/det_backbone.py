"""The detector's backbone, as mc-BEiT's (MIMDet's) ``BenchmarkingViTDet``: a windowed BEiT ViT and its pyramid.

    image (B,3,S,S) -> :class:`WindowedBeit` (timm's ``Beit``, the class of every other task; no CLS token, final
        norm or head) -> outputs of blocks 2, 5, 8, 11 (B,D,S/16,S/16)
    -> :class:`DetectionBackbone`: ``ms_adaptor`` (ConvT-GroupNorm(32)-GELU-ConvT: stride 4; ConvT: 8; identity:
       16; max-pool: 32) + ``fpn`` (torchvision's ``FeaturePyramidNetwork`` with ``LastLevelMaxPool``: detectron2's
       FPN) -> OrderedDict '0'..'3' (p2..p5, strides 4..32) and 'pool' (p6, stride 64) of (B,C,.,.)
       or, ``pyramid='vitdet'``, ViTDet's :class:`SimpleFeaturePyramid` on the last block's output.

* Windows: blocks outside ``global_blocks`` attend within ``window_size`` x ``window_size`` tokens; the token grid
  (img_size / 16) must be a multiple of the window (the original's ``rearrange`` fails otherwise; it does not pad).
  timm's blocks run on (B * windows, w*w, D), so drop path drops a window's tokens, as the original.
* Relative position bias, as the original (no CLS rows in these tables): ``shared_rel_pos_bias=True`` (the
  pre-training checkpoint's shared table): one ``windowed_rel_pos_bias`` ((2w-1)^2, heads) and one
  ``global_rel_pos_bias`` ((2G-1)^2, heads), each bicubic-resized (``F.interpolate``, the original's
  ``resize_pos_embed``) from the checkpoint's table less its 3 CLS rows; ``shared_rel_pos_bias=False`` (the ``_ft_``
  config, fine-tuned checkpoints): ``rel_pos_bias.{i}`` per block, window- or grid-sized, resampled from the block's
  table by the original's geometric bicubic spline (:func:`mcbeit.models.position_resize.interpolate_rel_pos_table`).
  Tables start at zero when the checkpoint has none. The bias is gathered by broadcasting relative offsets (the
  original keeps a (G^2, G^2) index buffer: 128 MiB at 1024 px).
* Absolute position: ``pos_embed`` (1, G^2, D), zero at the start, learnable. The original loads the checkpoint's
  embedding and then zeroes it (``zero_pos_embed=True``): a checkpoint's ``pos_embed`` is dropped and listed.

The heads, losses and loaders around it are in :mod:`mcbeit.models.detection`.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d, lecun_normal_
from timm.models.beit import Beit
from torch import Tensor, nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from mcbeit.errors import ConfigError, InputError
from mcbeit.models.beit_weights import SHARED_TABLE, ConversionReport
from mcbeit.models.position_resize import interpolate_pos_embed, interpolate_rel_pos_table

try:  # timm >= 1.0.2x exports its use_reentrant=False wrapper
    from timm.models import checkpoint as _checkpoint
except ImportError:  # pragma: no cover - older timm
    import torch.utils.checkpoint

    def _checkpoint(function, *args, **kwargs):
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, **kwargs)

__all__ = ['RelativePositionBias', 'WindowedBeit', 'SimpleFeaturePyramid', 'DetectionBackbone',
           'default_global_blocks', 'LEVELS', 'STRIDES']

#: pyramid level names: p2..p5 for the RoI heads, then p6 ('pool', torchvision's LastLevelMaxPool) for the RPN
LEVELS = ('0', '1', '2', '3')
STRIDES = (4, 8, 16, 32)


def default_global_blocks(depth: int) -> List[int]:
    """The last block of each quarter: [2, 5, 8, 11] for 12 blocks, [5, 11, 17, 23] for 24."""
    if depth < 4:
        raise ConfigError(f'a detection backbone needs at least 4 blocks (one per pyramid level), got depth={depth}')
    return [(k + 1) * depth // 4 - 1 for k in range(4)]


# ---------------------------------------------------------------------- the ViT
class RelativePositionBias(nn.Module):
    """Relative position bias for attention among ``size`` x ``size`` tokens, without CLS rows (the original's
    detection ``RelativePositionBias``): ``relative_position_bias_table`` ((2 size-1)^2, heads), zero at the start.
    ``forward()`` -> (heads, size^2, size^2): entry (p, q) is the table's row (dy + size-1)(2 size-1) + dx + size-1
    for the offset (dy, dx) = position p - position q (row-major token order), the original's index."""

    def __init__(self, size: int, num_heads: int):
        super().__init__()
        self.size = int(size)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * self.size - 1) ** 2, num_heads))
        pos = torch.arange(self.size)
        self.register_buffer('offsets', pos[:, None] - pos[None, :] + self.size - 1, persistent=False)  # (s,s)

    def forward(self) -> Tensor:
        s, heads = self.size, self.relative_position_bias_table.shape[1]
        table = self.relative_position_bias_table.t().reshape(heads, 2 * s - 1, 2 * s - 1)  # (h,dy,dx)
        dy = self.offsets[:, None, :, None]  # (s,1,s,1): y of p, y of q
        dx = self.offsets[None, :, None, :]  # (1,s,1,s): x of p, x of q
        return table[:, dy, dx].reshape(heads, s * s, s * s)  # (h, s*s, s*s)

    def extra_repr(self) -> str:
        return f'size={self.size}, heads={self.relative_position_bias_table.shape[1]}'


def _to_windows(x: Tensor, batch: int, grid: int, window: int) -> Tensor:
    """(B, G*G, D) raster tokens -> (B * (G/w)^2, w*w, D), the original's ``b (h h1) (w w1) c -> (b h w) (h1 w1) c``."""
    n, d = grid // window, x.shape[-1]
    x = x.reshape(batch, n, window, n, window, d).permute(0, 1, 3, 2, 4, 5)  # (B,n,n,w,w,D)
    return x.reshape(batch * n * n, window * window, d)


def _from_windows(x: Tensor, batch: int, grid: int, window: int) -> Tensor:
    """Inverse of :func:`_to_windows`: (B * (G/w)^2, w*w, D) -> (B, G*G, D)."""
    n, d = grid // window, x.shape[-1]
    x = x.reshape(batch, n, n, window, window, d).permute(0, 1, 3, 2, 4, 5)  # (B,n,w,n,w,D)
    return x.reshape(batch, grid * grid, d)


def _bicubic_table(table: Tensor, size: int) -> Tensor:
    """The original's shared-table resize, ``resize_pos_embed(table[None, :-3], new[None], 0)``: the offsets (CLS
    rows dropped) as a square image per head, bicubic (``align_corners=False``) to (2 size-1)^2 rows."""
    side = 2 * size - 1
    return interpolate_pos_embed(table[None, :-3], (side, side), num_extra=0)[0]  # (side*side, heads)


def _spline_table(table: Tensor, size: int) -> Tensor:
    """The original's per-block resize, ``sophisticated_rel_pos_bias_interp(table[:-3], new)``: geometric offsets,
    a bicubic spline per head (scipy's interp2d, reproduced by position_resize), CLS rows dropped."""
    side = 2 * size - 1
    return interpolate_rel_pos_table(table, side * side + 3, (size, size))[:-3]  # (side*side, heads)


class WindowedBeit(Beit):
    """timm ``Beit`` run as the original's ``BenchmarkingViTDet``: (B,3,S,S) -> the outputs of the ``out_indices``
    blocks as maps (B,D,S/16,S/16) (after the block; no final norm).

    Blocks outside ``global_blocks`` attend within ``window_size`` x ``window_size`` token windows. Relative
    position: ``rel_pos_bias=False`` none; ``shared_rel_pos_bias=True``: ``windowed_rel_pos_bias`` and
    ``global_rel_pos_bias`` (one table each, shared by the blocks of that kind); else ``rel_pos_bias.{i}`` per block.
    ``abs_pos_emb``: ``pos_embed`` (1, G^2, D), zero at the start. No CLS token, final norm or head. Blocks after
    the last of ``out_indices`` are not run. Any further keyword goes to timm's ``Beit`` (``img_size`` fixes the
    grid: every input must be ``img_size`` x ``img_size``).
    """

    #: checkpoint keys for which this model has no place, dropped and listed by the BEiT-family conversion
    _WITHOUT_PLACE = {
        'cls_token': 'class token: the detection backbone has none, as the original',
        'norm.': 'final norm: the detection backbone has none, as the original',
        'fc_norm.': 'classification pooling norm: the detection backbone has none',
        'head.': 'classification head: the detection backbone has none',
    }

    def __init__(self, *, window_size: int = 16, global_blocks: Optional[Sequence[int]] = None,
                 out_indices: Optional[Sequence[int]] = None, rel_pos_bias: bool = True,
                 shared_rel_pos_bias: bool = True, abs_pos_emb: bool = True, **kwargs):
        super().__init__(num_classes=0, global_pool='', use_fc_norm=False, use_abs_pos_emb=False,
                         use_rel_pos_bias=False, use_shared_rel_pos_bias=False, **kwargs)
        self.norm = nn.Identity()  # the original removes norm, head and cls_token
        self.cls_token = None
        self.num_prefix_tokens = 0
        depth, heads = len(self.blocks), self.blocks[0].attn.num_heads
        if tuple(self.patch_embed.patch_size) != (16, 16):
            raise ConfigError(f'patch size {self.patch_embed.patch_size}: the pyramid is built for 16-pixel patches')
        grid_h, grid_w = self.patch_embed.grid_size
        if grid_h != grid_w:
            raise ConfigError(f'image size {self.patch_embed.img_size}: the detector takes square inputs')
        self.grid = int(grid_h)
        self.window_size = int(window_size)
        if self.window_size < 1 or self.grid % self.window_size:
            raise ConfigError(f'window_size={window_size}: the {self.grid}x{self.grid} token grid (img_size / 16) must '
                              f'be a multiple of the window (the original does not pad); e.g. 16 at img_size 1024')
        self.global_blocks = sorted(set(default_global_blocks(depth) if global_blocks is None else global_blocks))
        if not all(0 <= i < depth for i in self.global_blocks):
            raise ConfigError(f'global_blocks {self.global_blocks}: give block indices in [0, {depth})')
        self.out_indices = list(self.global_blocks if out_indices is None else out_indices)
        if (not self.out_indices or sorted(set(self.out_indices)) != self.out_indices
                or not 0 <= self.out_indices[0] <= self.out_indices[-1] < depth):
            raise ConfigError(f'out_indices {self.out_indices}: give increasing block indices in [0, {depth})')
        run = range(self.out_indices[-1] + 1)
        windowed = [i for i in run if i not in self.global_blocks]
        has_global = any(i in self.global_blocks for i in run)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid * self.grid, self.embed_dim)) if abs_pos_emb else None
        self.shared_rel_pos_bias = bool(rel_pos_bias and shared_rel_pos_bias)
        self.windowed_rel_pos_bias = self.global_rel_pos_bias = None
        self.rel_pos_bias = None
        if rel_pos_bias and shared_rel_pos_bias:  # tables only for block kinds that run (DDP: no unused parameter)
            if windowed:
                self.windowed_rel_pos_bias = RelativePositionBias(self.window_size, heads)
            if has_global:
                self.global_rel_pos_bias = RelativePositionBias(self.grid, heads)
        elif rel_pos_bias:
            self.rel_pos_bias = nn.ModuleList(
                RelativePositionBias(self.grid if i in self.global_blocks else self.window_size, heads)
                for i in range(depth))

    # -- what the BEiT-family conversion (mcbeit.models.beit_weights) reads
    @property
    def checkpoint_keys_without_place(self) -> Dict[str, str]:
        """Checkpoint key prefix -> why it is dropped."""
        return dict(self._WITHOUT_PLACE)

    def adapt_checkpoint(self, sd: Dict[str, Tensor], report: ConversionReport) -> None:
        """Convert a BEiT checkpoint's position parameters to this model's, in place on the flat ``sd`` (module doc):
        the shared table (``rel_pos_bias.relative_position_bias_table``) or the blocks' tables
        (``blocks.{i}.attn.relative_position_bias_table``) resized to windows and grid; ``pos_embed`` of another
        shape dropped (zero at the start, as the original). Keys already in this model's layout (a detector's
        own backbone) are left as they are."""
        depth = len(self.blocks)
        shared = sd.pop(SHARED_TABLE, None)
        blocks = {i: sd.pop(f'blocks.{i}.attn.relative_position_bias_table')
                  for i in range(depth) if f'blocks.{i}.attn.relative_position_bias_table' in sd}
        own = self.state_dict()
        if 'pos_embed' in sd and ('pos_embed' not in own or sd['pos_embed'].shape != own['pos_embed'].shape):
            sd.pop('pos_embed')
            report.dropped['pos_embed'] = (
                'absolute position embedding: the detector starts it at zero (the original\'s zero_pos_embed=True)'
                if self.pos_embed is not None else
                'absolute position embedding: the detector was built with abs_pos_emb=False')
        used = set()
        if self.shared_rel_pos_bias and shared is not None:
            for name in ('windowed_rel_pos_bias', 'global_rel_pos_bias'):
                module = getattr(self, name)
                key = f'{name}.relative_position_bias_table'
                if module is not None and key not in sd:
                    sd[key] = _bicubic_table(shared, module.size)
                    report.interpolated.append((f'{SHARED_TABLE} -> {key}', tuple(shared.shape), tuple(sd[key].shape)))
                    used.add(SHARED_TABLE)
        elif self.rel_pos_bias is not None:
            for i, module in enumerate(self.rel_pos_bias):
                key = f'rel_pos_bias.{i}.relative_position_bias_table'
                source, table = f'blocks.{i}.attn.relative_position_bias_table', blocks.get(i)
                if table is None and shared is not None and not blocks:
                    source, table = SHARED_TABLE, shared
                    report.expanded_shared_rel_pos_bias = True
                if table is not None and key not in sd:
                    sd[key] = _spline_table(table, module.size)
                    report.interpolated.append((f'{source} -> {key}', tuple(table.shape), tuple(sd[key].shape)))
                    used.add(source)
        leftovers = ({SHARED_TABLE: shared} if shared is not None else {}) | {
            f'blocks.{i}.attn.relative_position_bias_table': t for i, t in blocks.items()}
        no_tables = all(m is None for m in (self.windowed_rel_pos_bias, self.global_rel_pos_bias, self.rel_pos_bias))
        for key in [k for k in leftovers if k not in used]:
            if no_tables:
                why = 'relative position table: the detector was built with rel_pos_bias=False'
            elif key != SHARED_TABLE and self.shared_rel_pos_bias:
                why = ('per-block relative position table: a shared-bias detector loads only a shared table (as the '
                       'original, its tables start at zero); build it with shared_rel_pos_bias=False to use these')
            elif key == SHARED_TABLE and blocks:
                why = 'shared relative position table: the per-block tables of the checkpoint are used'
            else:
                why = "relative position table: the file's tables in the detector's own layout are used"
            report.dropped[key] = why

    def get_num_layers(self) -> int:
        return len(self.blocks)

    # -- forward
    def _check_size(self, x: Tensor) -> None:
        expected = tuple(self.patch_embed.img_size)
        if tuple(x.shape[-2:]) != expected:
            raise InputError(f'the detector takes {expected[0]}x{expected[1]} images (its windows, relative tables and '
                             f'position embedding are for that grid, as the original), got {tuple(x.shape[-2:])}: '
                             f'resize and pad in the data pipeline, or build it with img_size= the input size')

    def _biases(self, dtype: Optional[torch.dtype]) -> List[Optional[Tensor]]:
        """The bias each block adds to its attention logits, (heads, n, n) or None; the shared ones computed once."""
        depth = self.out_indices[-1] + 1
        if self.rel_pos_bias is not None:
            biases = [self.rel_pos_bias[i]() for i in range(depth)]
        else:
            windowed = self.windowed_rel_pos_bias() if self.windowed_rel_pos_bias is not None else None
            global_ = self.global_rel_pos_bias() if self.global_rel_pos_bias is not None else None
            biases = [global_ if i in self.global_blocks else windowed for i in range(depth)]
        # under autocast the attention runs in half precision: a bias of that dtype keeps SDPA's fused kernels
        return [b.to(dtype) if b is not None and dtype is not None else b for b in biases]

    def forward(self, x: Tensor) -> List[Tensor]:
        """(B,3,S,S) -> [(B,D,S/16,S/16)] * len(out_indices)."""
        self._check_size(x)
        B, G, w = x.shape[0], self.grid, self.window_size
        x = self.patch_embed(x)  # (B,G*G,D)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        x = self.pos_drop(x)
        device = x.device.type
        biases = self._biases(torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None)
        windowed, outs = False, []
        for i, blk in enumerate(self.blocks[:self.out_indices[-1] + 1]):
            want = i not in self.global_blocks
            if want != windowed:  # (B,G*G,D) <-> (B*nW,w*w,D)
                x = _to_windows(x, B, G, w) if want else _from_windows(x, B, G, w)
                windowed = want
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = _checkpoint(blk, x, shared_rel_pos_bias=biases[i])
            else:
                x = blk(x, shared_rel_pos_bias=biases[i])
            if i in self.out_indices:
                tokens = _from_windows(x, B, G, w) if windowed else x  # (B,G*G,D)
                outs.append(tokens.transpose(1, 2).reshape(B, -1, G, G))  # (B,D,G,G)
        return outs


# ---------------------------------------------------------------------- pyramids
class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid (detectron2 ``SimpleFeaturePyramid``, scale factors 4, 2, 1, 0.5, norm "LN",
    ``LastLevelMaxPool``) on one (B,D,G,G) map -> levels '0'..'3' (strides 4..32) and 'pool' (64), ``out_channels``
    each. Stage k: [x4: ConvT(D,D/2) LN GELU ConvT(D/2,D/4); x2: ConvT(D,D/2); x1: none; x0.5: max-pool] ->
    Conv1x1(->C, no bias) LN -> Conv3x3(C, no bias) LN; LN over channels (eps 1e-6); PyTorch's initialisation."""

    def __init__(self, dim: int, out_channels: int = 256):
        super().__init__()
        stages = []
        for scale in (4.0, 2.0, 1.0, 0.5):
            if scale == 4.0:
                layers, out_dim = [nn.ConvTranspose2d(dim, dim // 2, 2, 2), LayerNorm2d(dim // 2), nn.GELU(),
                                   nn.ConvTranspose2d(dim // 2, dim // 4, 2, 2)], dim // 4
            elif scale == 2.0:
                layers, out_dim = [nn.ConvTranspose2d(dim, dim // 2, 2, 2)], dim // 2
            elif scale == 1.0:
                layers, out_dim = [], dim
            else:
                layers, out_dim = [nn.MaxPool2d(kernel_size=2, stride=2)], dim
            layers += [nn.Conv2d(out_dim, out_channels, 1, bias=False), LayerNorm2d(out_channels),
                       nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), LayerNorm2d(out_channels)]
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        levels = [stage(x) for stage in self.stages]  # (B,C,4G,4G) .. (B,C,G/2,G/2)
        out = OrderedDict(zip(LEVELS, levels, strict=True))
        out['pool'] = F.max_pool2d(levels[-1], kernel_size=1, stride=2, padding=0)  # p6
        return out


class DetectionBackbone(nn.Module):
    """``body`` (:class:`WindowedBeit`) + pyramid: (B,3,S,S) -> OrderedDict '0'..'3', 'pool' of (B,C,S/4..S/64).

    ``pyramid='benchmarking'``: ``ms_adaptor`` (the original's, on the outputs of the 4 ``out_indices`` blocks)
    then ``fpn`` (``torchvision.ops.FeaturePyramidNetwork``, ``norm_layer`` after its convs, p6 by
    ``LastLevelMaxPool``). ``pyramid='vitdet'``: ``simple_fpn`` (:class:`SimpleFeaturePyramid`) on the body's
    one output (its last block).
    """

    def __init__(self, body: WindowedBeit, pyramid: str = 'benchmarking', out_channels: int = 256,
                 norm_layer: type = nn.BatchNorm2d):
        super().__init__()
        self.body = body
        self.pyramid = pyramid
        self.out_channels = int(out_channels)
        dim = body.embed_dim
        if pyramid == 'benchmarking':
            if len(body.out_indices) != 4:
                raise ConfigError(f'out_indices {body.out_indices}: the benchmarking pyramid takes 4 blocks\' outputs')
            self.ms_adaptor = nn.ModuleList([
                nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, 2), nn.GroupNorm(32, dim), nn.GELU(),
                              nn.ConvTranspose2d(dim, dim, 2, 2)),  # stride 16 -> 4
                nn.ConvTranspose2d(dim, dim, 2, 2),  # 16 -> 8
                nn.Identity(),  # 16
                nn.MaxPool2d(2),  # 16 -> 32
            ])
            for m in self.ms_adaptor.modules():  # the original's init_adaptor
                if isinstance(m, nn.ConvTranspose2d):
                    lecun_normal_(m.weight)
                    nn.init.zeros_(m.bias)
                elif isinstance(m, nn.GroupNorm):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)
            self.fpn = FeaturePyramidNetwork([dim] * 4, self.out_channels, extra_blocks=LastLevelMaxPool(),
                                             norm_layer=norm_layer)
        elif pyramid == 'vitdet':
            if len(body.out_indices) != 1:
                raise ConfigError(f'out_indices {body.out_indices}: the vitdet pyramid takes one block\'s output')
            self.simple_fpn = SimpleFeaturePyramid(dim, self.out_channels)
        else:
            raise ConfigError(f'pyramid={pyramid!r}: use "benchmarking" (mc-BEiT / MIMDet) or "vitdet"')

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        features = self.body(x)  # [(B,D,G,G)]
        if self.pyramid == 'vitdet':
            return self.simple_fpn(features[-1])
        maps = OrderedDict((name, op(f)) for name, op, f in zip(LEVELS, self.ms_adaptor, features, strict=True))
        return self.fpn(maps)  # '0'..'3' (B,C,S/4..S/32), 'pool' (B,C,S/64)
