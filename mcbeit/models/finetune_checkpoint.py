"""Loading a pre-trained checkpoint into timm's ``Beit`` for fine-tuning (the original's ``--finetune``).

Reproduces the ``if args.finetune:`` block of the original ``run_class_finetuning.py``:

1. source: a file, a DeepSpeed folder (``latest`` -> tag folder -> ``mp_rank_00_model_states.pt``)
   or an ``https://`` URL (taken from the hub cache ``torch.hub.get_dir()/checkpoints`` when there);
   always read safely (``load_checkpoint_file``; ``.safetensors`` with safetensors);
2. the state dict under the first ``--model_key`` present, restricted to ``--model_prefix``;
3. a head of another class count, ``lm_head``/``mask_token`` and ``relative_position_index`` buffers
   are dropped; with mean pooling the pre-training ``norm`` is dropped and ``fc_norm`` starts fresh;
4. a shared relative position table is copied into every block when the model has one per block;
5. relative position tables of another window are interpolated exactly as the original (a
   geometric-progression source grid, a bicubic spline per head, the 3 extra rows re-appended);
   the original's ``interp2d(x, y, z, kind='cubic')(dx, dy)`` (removed in SciPy 1.14) is
   ``RectBivariateSpline(x, y, z.T, kx=3, ky=3, s=0)(dx, dy).T``;
6. an absolute position embedding of another grid is resized with bicubic ``F.interpolate``.

Unlike the original (which loads with ``strict=False`` and prints), everything left must fit:
the only keys allowed to start from the model's own initialisation are the head, ``fc_norm``, and
position parameters the checkpoint has none of (``pos_embed``; relative tables when the checkpoint
has no table at all, which start at zero, i.e. no bias). Anything else raises
``StateDictMismatchError`` naming keys and shapes.
"""
from __future__ import annotations

import logging
import os
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.interpolate import RectBivariateSpline

from mcbeit.models.checkpoint import (CheckpointError, CheckpointNotFoundError, LoadReport, StateDictMismatchError,
                                      compare_state_dict, extract_state_dict, filter_pretraining_state_dict,
                                      load_checkpoint_file)

__all__ = ['FinetuneReport', 'load_for_finetuning', 'resolve_source', 'read_checkpoint', 'select_state_dict',
           'adapt_state_dict', 'relative_position_coords', 'interpolate_rel_pos_table', 'interpolate_pos_embed']

_logger = logging.getLogger(__name__)

DEEPSPEED_FILE = 'mp_rank_00_model_states.pt'
SHARED_TABLE = 'rel_pos_bias.relative_position_bias_table'


@dataclass
class FinetuneReport:
    """What ``load_for_finetuning`` did, by parameter name."""
    source: str  # the file read
    model_key: Optional[str] = None  # the --model_key entry used; None: the file is the state dict
    dropped: Dict[str, str] = field(default_factory=dict)  # checkpoint key -> why it was not loaded
    interpolated: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=list)  # key, from, to
    expanded_shared_rel_pos_bias: bool = False  # the shared table was copied into every block
    fresh: List[str] = field(default_factory=list)  # model keys the checkpoint lacks, kept at their init
    loaded: int = 0  # tensors loaded

    def summary(self) -> str:
        key = f' (state dict under {self.model_key!r})' if self.model_key else ''
        lines = [f'fine-tuning from {self.source}{key}: loaded {self.loaded} tensors']
        if self.expanded_shared_rel_pos_bias:
            lines.append('  shared relative position bias copied into every block')
        by_shapes: Dict[Tuple, List[str]] = {}
        for k, src, dst in self.interpolated:
            by_shapes.setdefault((tuple(src), tuple(dst)), []).append(k)
        for (src, dst), keys in by_shapes.items():
            lines.append(f'  interpolated {src} -> {dst}: {_names(keys)}')
        by_reason: Dict[str, List[str]] = {}
        for k, why in self.dropped.items():
            by_reason.setdefault(why, []).append(k)
        for why, keys in by_reason.items():
            lines.append(f'  dropped ({why}): {_names(keys)}')
        if self.fresh:
            lines.append(f'  starting from initialisation: {", ".join(self.fresh)}')
        return '\n'.join(lines)


def _names(keys: List[str], limit: int = 6) -> str:
    more = f' and {len(keys) - limit} more' if len(keys) > limit else ''
    return ', '.join(keys[:limit]) + more


# ---------------------------------------------------------------------- finding and reading the file
def _cached_download(url: str) -> str:
    """The hub-cache copy of ``url`` (``torch.hub.get_dir()/checkpoints/<basename>``), downloaded if absent."""
    name = os.path.basename(urllib.parse.urlparse(url).path)
    if not name:
        raise CheckpointError(f'--finetune {url!r}: the URL does not end with a file name')
    dst = os.path.join(torch.hub.get_dir(), 'checkpoints', name)
    if os.path.isfile(dst):
        return dst
    match = torch.hub.HASH_REGEX.search(name)  # as check_hash=True: 'name-<sha256 prefix>.pth'
    try:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        _logger.info('downloading %s to %s', url, dst)
        torch.hub.download_url_to_file(url, dst, match.group(1) if match else None, progress=False)
    except Exception as e:
        raise CheckpointError(
            f'could not download {url} ({type(e).__name__}: {e}). Without network access, fetch the file '
            f'elsewhere and put it at {dst} (it is used from there), or pass its local path to --finetune'
        ) from None
    return dst


def _deepspeed_file(folder: str) -> str:
    """The model-states file of a DeepSpeed checkpoint folder (tag read from its ``latest`` file)."""
    candidates = []
    latest = os.path.join(folder, 'latest')
    if os.path.isfile(latest):
        with open(latest) as f:
            candidates.append(os.path.join(folder, f.read().strip(), DEEPSPEED_FILE))
    candidates.append(os.path.join(folder, DEEPSPEED_FILE))
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise CheckpointNotFoundError(
        f'--finetune {folder!r} is a folder but not a DeepSpeed checkpoint: none of {candidates} exists; '
        f'pass a checkpoint file or a DeepSpeed folder (with a latest file naming the tag folder)')


def resolve_source(spec: str) -> str:
    """The local file behind ``spec``: a file path, a DeepSpeed folder or an http(s) URL."""
    if spec.startswith(('https://', 'http://')):
        return _cached_download(spec)
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        return _deepspeed_file(path)
    if not os.path.isfile(path):
        raise CheckpointNotFoundError(
            f'--finetune {spec!r} does not exist: pass a checkpoint file (.pth/.pt/.bin/.safetensors), '
            f'a DeepSpeed checkpoint folder or an https:// URL')
    return path


def read_checkpoint(path: str) -> Mapping:
    """A ``.safetensors`` file with safetensors, anything else with the safe ``load_checkpoint_file``."""
    if not path.endswith('.safetensors'):
        return load_checkpoint_file(path)
    from safetensors.torch import load_file
    try:
        return load_file(path, device='cpu')
    except Exception as e:
        raise CheckpointError(f'{path!r} is not a readable safetensors file ({type(e).__name__}: {e})') from None


def select_state_dict(ckpt: Mapping, model_key: str = 'model|module',
                      model_prefix: str = '') -> Tuple[Dict[str, torch.Tensor], Optional[str], Dict[str, str]]:
    """(state dict, key used or None, keys outside ``model_prefix`` -> reason).

    Takes the first of ``model_key.split('|')`` present (the whole dict when none is), strips
    ``module.``/``_orig_mod.``, keeps only keys starting with ``model_prefix`` and strips it.
    """
    keys = [k for k in model_key.split('|') if k]
    flat = len(ckpt) > 0 and all(isinstance(v, torch.Tensor) for v in ckpt.values())
    used = None if flat else next((k for k in keys if isinstance(ckpt.get(k), Mapping)), None)
    sd = extract_state_dict(ckpt, keys)
    outside: Dict[str, str] = {}
    if model_prefix:
        kept = {k[len(model_prefix):]: v for k, v in sd.items() if k.startswith(model_prefix)}
        if not kept:
            raise CheckpointError(f'--model_prefix {model_prefix!r}: no checkpoint key starts with it '
                                  f'(keys look like {sorted(sd)[:5]})')
        outside = {k: f'outside --model_prefix {model_prefix!r}' for k in sd if not k.startswith(model_prefix)}
        sd = kept
    return sd, used, outside


# ---------------------------------------------------------------------- position interpolation
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


# ---------------------------------------------------------------------- adapting and loading
def adapt_state_dict(sd: Mapping[str, torch.Tensor], model: nn.Module,
                     report: FinetuneReport) -> Dict[str, torch.Tensor]:
    """Steps 3-6 of the module doc on a copy of ``sd``; records what it did in ``report``."""
    own = model.state_dict()
    sd = dict(sd)

    def drop(key: str, why: str) -> None:
        sd.pop(key)
        report.dropped[key] = why

    for k in ('head.weight', 'head.bias'):
        if k in sd and (k not in own or sd[k].shape != own[k].shape):
            drop(k, f'head {tuple(sd[k].shape)} vs model {tuple(own[k].shape) if k in own else "none"}: starts fresh')
    for k in [k for k in sd if k == 'mask_token' or k.startswith('lm_head.')]:
        drop(k, 'pre-training only (masked image modeling)')
    kept = filter_pretraining_state_dict(sd, model)
    for k in [k for k in sd if k not in kept]:
        drop(k, 'buffer the model computes itself')
    fc_norm = getattr(model, 'fc_norm', None)
    if fc_norm is not None and not isinstance(fc_norm, nn.Identity) and not any(k.startswith('fc_norm.') for k in sd):
        for k in [k for k in sd if k.startswith('norm.')]:
            drop(k, 'mean pooling: fc_norm starts fresh instead of the final norm (as the original)')

    per_block = 'blocks.0.attn.relative_position_bias_table' in own
    if per_block and SHARED_TABLE in sd and SHARED_TABLE not in own:
        shared = sd.pop(SHARED_TABLE)  # (num_pos, heads)
        for i in range(len(model.blocks)):
            sd[f'blocks.{i}.attn.relative_position_bias_table'] = shared.clone()
        report.expanded_shared_rel_pos_bias = True

    grid = tuple(model.patch_embed.grid_size)  # (H, W) patches
    for k in [k for k in sd if k.endswith('relative_position_bias_table')]:
        if k in own and sd[k].shape[0] != own[k].shape[0]:
            src = tuple(sd[k].shape)
            sd[k] = interpolate_rel_pos_table(sd[k], own[k].shape[0], grid)
            report.interpolated.append((k, src, tuple(sd[k].shape)))
    if 'pos_embed' in sd and 'pos_embed' in own and sd['pos_embed'].shape[1] != own['pos_embed'].shape[1]:
        src = tuple(sd['pos_embed'].shape)
        num_extra = own['pos_embed'].shape[1] - grid[0] * grid[1]  # 1: the CLS token
        sd['pos_embed'] = interpolate_pos_embed(sd['pos_embed'], grid, num_extra)
        report.interpolated.append(('pos_embed', src, tuple(sd['pos_embed'].shape)))
    return sd


def _expected_fresh(key: str, sd: Mapping[str, torch.Tensor]) -> bool:
    """Model keys that may start from their initialisation when the checkpoint lacks them."""
    if key.startswith(('head.', 'fc_norm.')) or key == 'pos_embed':
        return True
    return key.endswith('relative_position_bias_table') and not any(
        k.endswith('relative_position_bias_table') for k in sd)


def _mismatch_message(report: LoadReport, fatal_missing: List[str]) -> str:
    hints = []
    if report.mismatched:
        hints.append('shapes differ: the checkpoint is probably of another model size; pick the --model it '
                     'was trained as (e.g. a small checkpoint needs beit_small_patch16_224)')
    if any('relative_position' in k for k in report.unexpected):
        hints.append('the checkpoint has relative position tables: fine-tune with --rel_pos_bias')
    if 'pos_embed' in report.unexpected:
        hints.append('the checkpoint has an absolute position embedding: fine-tune with --abs_pos_emb')
    if any(k.startswith('fc_norm.') for k in report.unexpected):
        hints.append('the checkpoint was trained with mean pooling: fine-tune with --use_mean_pooling')
    hints.append('check --model, --model_key and --model_prefix')
    lines = [f'  missing (in the model, not in the checkpoint): {k}' for k in fatal_missing]
    lines += [f'  unexpected (in the checkpoint, not in the model): {k}' for k in report.unexpected]
    lines += [f'  shape mismatch: {k}: checkpoint {ck} vs model {md}' for k, ck, md in report.mismatched]
    return (f'the checkpoint does not fit the model: {len(fatal_missing)} missing, {len(report.unexpected)} '
            f'unexpected, {len(report.mismatched)} shape mismatches\n' + '\n'.join(lines) + '\n'
            + '\n'.join(f'hint: {h}' for h in hints))


def load_for_finetuning(spec: str, model: nn.Module, model_key: str = 'model|module',
                        model_prefix: str = '') -> FinetuneReport:
    """Load the checkpoint ``spec`` (file, DeepSpeed folder or https URL) into a timm ``Beit``.

    Returns a ``FinetuneReport`` (also logged). Raises ``CheckpointNotFoundError``,
    ``UnsafeCheckpointError`` (refused pickles), ``CheckpointError`` (unreadable), and
    ``StateDictMismatchError`` when something other than the expected fresh keys is missing, a key
    is unexpected or a shape differs; the model is left unchanged when anything is raised.
    """
    path = resolve_source(spec)
    sd, used, outside = select_state_dict(read_checkpoint(path), model_key, model_prefix)
    report = FinetuneReport(source=path, model_key=used, dropped=dict(outside))
    sd = adapt_state_dict(sd, model, report)

    mismatch = compare_state_dict(model, sd)
    report.fresh = [k for k in mismatch.missing if _expected_fresh(k, sd)]
    fatal_missing = [k for k in mismatch.missing if k not in report.fresh]
    if fatal_missing or mismatch.unexpected or mismatch.mismatched:
        mismatch.missing = fatal_missing
        raise StateDictMismatchError(f'--finetune {spec}: ' + _mismatch_message(mismatch, fatal_missing), mismatch)
    model.load_state_dict(sd, strict=False)
    report.loaded = len(sd)
    _logger.info('%s', report.summary())
    return report
