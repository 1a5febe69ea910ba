"""Resizing position parameters to another patch grid exactly as the original BEiT fine-tuning does.

* Relative position tables (``(2H-1)(2W-1) + 3`` rows, one column per head): the source offsets are
  spread on a geometric progression (near offsets keep their spacing, far ones stretch), each head
  is resampled with a bicubic interpolating spline, and the 3 cls rows are re-appended as they are.
  The original's ``scipy.interpolate.interp2d(x, y, z, kind='cubic')(dx, dy)`` (removed in SciPy
  1.14) is reproduced bit for bit by ``RectBivariateSpline(x, y, z.T, kx=3, ky=3, s=0)(dx, dy).T``.
  timm's ``resize_rel_pos_bias_table`` (used by timm's own BEiT filter) interpolates linearly by
  default, which differs by up to 3.9 on a random table.
* Absolute position embeddings: bicubic ``F.interpolate`` of the patch tokens, the CLS row kept.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from mcbeit.models.checkpoint import CheckpointError

__all__ = ['relative_position_coords', 'interpolate_rel_pos_table', 'interpolate_pos_embed']


def relative_position_coords(src_size: int, dst_size: int) -> Tuple[np.ndarray, np.ndarray]:
    """Source and target coordinates (along one axis) of a relative table of side src -> dst.

    The source offsets are spread on a geometric progression 1, 1+q, 1+q+q^2, ... whose last term
    is dst_size // 2 (q found by bisection in (1.01, 1.5)), so near offsets keep their spacing
    and far ones stretch; the targets are the integers -dst//2 .. dst//2. Exactly the original.
    """
    def geometric_progression(a: float, r: float, n: int) -> float:
        return a * (1.0 - r ** n) / (1.0 - r)

    left, right = 1.01, 1.5
    while right - left > 1e-6:
        q = (left + right) / 2.0
        if geometric_progression(1, q, src_size // 2) > dst_size // 2:
            right = q
        else:
            left = q
    dis, cur = [], 1.0
    for i in range(src_size // 2):
        dis.append(cur)
        cur += q ** (i + 1)
    x = np.array([-d for d in reversed(dis)] + [0.0] + dis)  # (src_size,)
    t = dst_size // 2.0
    dx = np.arange(-t, t + 0.1, 1.0)  # (dst_size,)
    return x, dx


def _side(num: int, what: str) -> int:
    side = int(round(num ** 0.5))
    if side * side != num:
        raise CheckpointError(f'{what}: {num} positions do not form a square grid')
    return side


def interpolate_rel_pos_table(table: torch.Tensor, dst_num_pos: int, grid: Sequence[int]) -> torch.Tensor:
    """Relative position table (src_num_pos, heads) -> (dst_num_pos, heads) for a patch ``grid`` (H, W).

    The last rows (3: cls-to-token, token-to-cls, cls-to-cls) are kept as they are; the
    ((2H-1)^2) offsets are resampled per head with a bicubic interpolating spline.
    """
    H, W = grid
    if H != W:
        raise NotImplementedError(
            f'relative position tables can only be interpolated to a square patch grid (as the original); '
            f'the model has {H}x{W} patches: use a square --input_size')
    num_extra = dst_num_pos - (2 * H - 1) * (2 * W - 1)  # 3
    src_num_pos, heads = table.shape
    src_size = _side(src_num_pos - num_extra, 'checkpoint relative position table')
    dst_size = _side(dst_num_pos - num_extra, 'model relative position table')
    from scipy.interpolate import RectBivariateSpline  # here: importing scipy.interpolate takes 0.3 s

    x, dx = relative_position_coords(src_size, dst_size)
    offsets = table[:-num_extra].float().numpy()  # (src*src, heads)
    columns = []
    for h in range(heads):
        z = offsets[:, h].reshape(src_size, src_size)  # (src, src)
        spline = RectBivariateSpline(x, x, z.T, kx=3, ky=3, s=0)  # == interp2d(x, x, z, kind='cubic')
        columns.append(torch.from_numpy(spline(dx, dx).T.astype(np.float32)).reshape(-1))  # (dst*dst,)
    resampled = torch.stack(columns, dim=1).to(table.dtype)  # (dst*dst, heads)
    return torch.cat([resampled, table[-num_extra:]], dim=0)  # (dst_num_pos, heads)


def interpolate_pos_embed(pos_embed: torch.Tensor, grid: Sequence[int], num_extra: int = 1) -> torch.Tensor:
    """Absolute position embedding (1, extra+S*S, D) -> (1, extra+H*W, D): bicubic on the patch tokens."""
    extra, tokens = pos_embed[:, :num_extra], pos_embed[:, num_extra:]  # (1,extra,D), (1,S*S,D)
    S, D = _side(tokens.shape[1], 'checkpoint pos_embed'), tokens.shape[-1]
    tokens = tokens.reshape(-1, S, S, D).permute(0, 3, 1, 2)  # (1,D,S,S)
    tokens = F.interpolate(tokens.float(), size=tuple(grid), mode='bicubic', align_corners=False)  # (1,D,H,W)
    tokens = tokens.permute(0, 2, 3, 1).flatten(1, 2).to(pos_embed.dtype)  # (1,H*W,D)
    return torch.cat([extra, tokens], dim=1)
