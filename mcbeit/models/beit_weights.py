"""BEiT-family weights: the one conversion from a checkpoint to a BEiT model, and every route that calls it.

Files it reads: released BEiT / mc-BEiT / BEiT v2 pre-training and fine-tuned checkpoints
(``{'model' | 'module': state_dict, 'args': argparse.Namespace, ...}``), mmpretrain's BEiT / BEiT v2
files (``{'meta': ..., 'state_dict': {backbone.*, neck.*, head.*, ...}}``), this package's pre-training
and fine-tuning checkpoints, DeepSpeed model states (a checkpoint folder or its
``mp_rank_00_model_states.pt``), flat timm state dicts and ``.safetensors`` files; always read
safely (:mod:`mcbeit.models.checkpoint`).

:func:`convert_state_dict` is the conversion, the ``if args.finetune:`` block of the original
``run_class_finetuning.py``, for any timm ``Beit`` (this package's pre-training model included):

1. the state dict under the first ``model_key`` present (mmpretrain's ``state_dict`` when none is),
   restricted to ``model_prefix``; mmpretrain's names (``backbone.layers.N.ln1``, ``neck.patch_aggregation``,
   ``head.cls_head``, ``head.fc``, ...) mapped to the original's (:mod:`mcbeit.models.key_maps`), its
   ``target_generator.*`` (the tokenizer) and ``data_preprocessor.*`` dropped and listed;
2. what the model has no place for is dropped: a head of another class count, pre-training heads
   (``mask_token``, ``lm_head``, BEiT v2's ``cls_pt_layers``, ConMIM's ``projectors``) and the
   ``relative_position_index`` buffers; with mean pooling the pre-training ``norm`` (``fc_norm``
   starts fresh, as the original);
3. a shared relative position table is copied into every block when the model has one per block;
4. relative position tables and an absolute position embedding of another grid are resized exactly
   as the original (:mod:`mcbeit.models.position_resize`: geometric grid, bicubic spline per head);
5. everything left must fit. Unlike the original (``strict=False`` and a print), the only model keys
   allowed to keep their initialisation are the head, ``fc_norm`` and position parameters the
   checkpoint has none of (``pos_embed``; relative tables when it has no table at all, i.e. no
   bias); anything else raises ``StateDictMismatchError`` naming keys and shapes.

A model built on ``Beit`` for another task declares what it adds and what it lacks (the segmentation
backbone, :mod:`mcbeit.models.segmentation`, does): ``new_modules`` (key prefixes of modules no BEiT
checkpoint has, e.g. ``('fpn1.', 'fpn2.')``: reported as fresh) and ``checkpoint_keys_without_place``
(key prefix -> why a checkpoint's keys under it are dropped, e.g. ``{'norm.': 'no final norm'}``: step 2,
each key listed with that reason). A model whose position parameters are not timm's (the detection
backbone, :mod:`mcbeit.models.det_backbone`: tables per attention window, no CLS rows) converts them itself
in ``adapt_checkpoint(sd, report)``, called after step 2 on the flat state dict (it pops the checkpoint's
tables, puts its own, records what it did in ``report``). Models without these attributes convert as before.

Routes (one file into one architecture gives equal tensors through each):

* :func:`load_pretrained` ``(model, file)``: Python, for any BEiT model, timm's own names included;
* :func:`load_for_finetuning`: ``--finetune`` (the same, worded for the flag);
* ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...))`` for this
  package's registered names (``beit_*_patch16_224_8k_vocab``, ``beit_{tiny,small}_patch16_224``):
  their builder :func:`build_beit` builds the model, then calls :func:`load_pretrained`. Weights timm
  reads itself (``pretrained_cfg_overlay=dict(state_dict=...)``, a ``local-dir:`` folder) go through
  :func:`checkpoint_filter_fn`, their ``pretrained_filter_fn``;
* :func:`mcbeit.models.export.load_for_export` (a model built from the weights' architecture).

timm's own names (``beit_base_patch16_224``, ``beit_large_patch16_224``, ``beitv2_*``) are timm's
registrations and keep timm's loader: ``timm.create_model('beit_base_patch16_224', pretrained=True,
pretrained_cfg_overlay=dict(file=...))`` reads the file with timm's ``load_state_dict`` (``model_ema``
/ ``state_dict_ema`` first when the file has one, then ``state_dict``, then ``model``) and converts it
with ``timm.models.beit.checkpoint_filter_fn``: the index buffers dropped, relative tables resized by
``resize_rel_pos_bias_table`` (linear by default, not the original's spline), ``pos_embed`` and the
patch embedding resampled; a shared table is NOT copied into the blocks and pre-training keys are
NOT dropped, so a pre-training file fails timm's strict load. The original's conversion for those
names is ``load_pretrained(timm.create_model('beit_base_patch16_224', num_classes=...), file)``.
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models import build_model_with_cfg, resolve_pretrained_cfg

from mcbeit.models.checkpoint import (LoadReport, StateDictMismatchError, compare_state_dict,
                                      filter_pretraining_state_dict, read_checkpoint, resolve_source,
                                      select_state_dict)
from mcbeit.models.position_resize import interpolate_pos_embed, interpolate_rel_pos_table

__all__ = ['ConversionReport', 'convert_state_dict', 'adapt_state_dict', 'load_pretrained', 'load_for_finetuning',
           'checkpoint_filter_fn', 'build_beit']

_logger = logging.getLogger(__name__)

SHARED_TABLE = 'rel_pos_bias.relative_position_bias_table'
#: keys of pre-training heads (masked image modelling, BEiT v2 patch aggregation, ConMIM projector)
PRETRAINING_ONLY = ('mask_token', 'lm_head.', 'cls_pt_layers.', 'projectors.')
_NO_DOWNLOAD = ('mcbeit never downloads weights: name a file, timm.create_model(name, pretrained=True, '
                'pretrained_cfg_overlay=dict(file=PATH)), or create the model with pretrained=False and '
                'load it with mcbeit.models.load_pretrained(model, PATH)')


@dataclass
class ConversionReport:
    """What :func:`convert_state_dict` did, by parameter name."""
    source: str  # the file read
    model_key: Optional[str] = None  # the model_key entry used; None: the file is the state dict
    renamed: Dict[str, str] = field(default_factory=dict)  # mmpretrain key -> the original's name (key_maps)
    dropped: Dict[str, str] = field(default_factory=dict)  # checkpoint key -> why it was not loaded
    interpolated: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=list)  # key, from, to
    expanded_shared_rel_pos_bias: bool = False  # the shared table was copied into every block
    fresh: List[str] = field(default_factory=list)  # model keys the checkpoint lacks, kept at their init
    loaded: int = 0  # tensors taken from the checkpoint

    def summary(self, verb: str = 'fine-tuning from') -> str:
        key = f' (state dict under {self.model_key!r})' if self.model_key else ''
        lines = [f'{verb} {self.source}{key}: loaded {self.loaded} tensors']
        if self.renamed:
            some = ', '.join(f'{k} -> {v}' for k, v in list(self.renamed.items())[:3])
            lines.append(f"  mmpretrain names mapped to the original's: {len(self.renamed)} keys ({some}, ...)")
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
    """Every key named: one by one when few, else by module, its keys by name when they are few
    (``mask_token, lm_head.weight, lm_head.bias, projectors.* (16 keys)``, in first-seen order)."""
    if len(keys) <= limit:
        return ', '.join(keys)
    groups: Dict[str, List[str]] = {}
    for k in keys:
        groups.setdefault(k.split('.')[0], []).append(k)

    def group(head: str, g: List[str]) -> str:
        if len(g) <= 3:
            return ', '.join(g)
        patterns = {re.sub(r'\.\d+(?=\.|$)', '.*', k) for k in g}  # one key per block: say which key
        return f'{patterns.pop()} ({len(g)} keys)' if len(patterns) == 1 else f'{head}.* ({len(g)} keys)'

    return ', '.join(group(head, g) for head, g in groups.items())


# ---------------------------------------------------------------------- the conversion
def _drop_what_has_no_place(sd: Dict[str, torch.Tensor], model: nn.Module, own: Mapping[str, torch.Tensor],
                            report: ConversionReport) -> None:
    """Step 2 of the module doc, in place on ``sd``."""
    def drop(key: str, why: str) -> None:
        sd.pop(key)
        report.dropped[key] = why

    for prefix, why in getattr(model, 'checkpoint_keys_without_place', {}).items():
        for k in [k for k in sd if k.startswith(prefix) and k not in own]:
            drop(k, why)
    for k in ('head.weight', 'head.bias'):
        if k in sd and (k not in own or sd[k].shape != own[k].shape):
            drop(k, f'head {tuple(sd[k].shape)} vs model {tuple(own[k].shape) if k in own else "none"}: starts fresh')
    for k in [k for k in sd if k.startswith(PRETRAINING_ONLY) and k not in own]:
        drop(k, 'pre-training only (masked image modeling)')
    kept = filter_pretraining_state_dict(sd, model)
    for k in [k for k in sd if k not in kept]:
        drop(k, 'buffer the model computes itself')
    fc_norm = getattr(model, 'fc_norm', None)
    if fc_norm is not None and not isinstance(fc_norm, nn.Identity) and not any(k.startswith('fc_norm.') for k in sd):
        for k in [k for k in sd if k.startswith('norm.')]:
            drop(k, 'mean pooling: fc_norm starts fresh instead of the final norm (as the original)')


def _resize_positions(sd: Dict[str, torch.Tensor], model: nn.Module, own: Mapping[str, torch.Tensor],
                      report: ConversionReport) -> None:
    """Step 4 of the module doc, in place on ``sd``."""
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


def adapt_state_dict(sd: Mapping[str, torch.Tensor], model: nn.Module,
                     report: ConversionReport) -> Dict[str, torch.Tensor]:
    """Steps 2-4 of the module doc on a copy of the flat state dict ``sd``; records what it did in ``report``."""
    own = model.state_dict()
    sd = dict(sd)
    _drop_what_has_no_place(sd, model, own, report)
    adapt = getattr(model, 'adapt_checkpoint', None)
    if adapt is not None:  # the model's own conversion of its position parameters (module doc)
        adapt(sd, report)
    per_block = 'blocks.0.attn.relative_position_bias_table' in own
    if per_block and SHARED_TABLE in sd and SHARED_TABLE not in own:
        shared = sd.pop(SHARED_TABLE)  # (num_pos, heads)
        for i in range(len(model.blocks)):
            sd[f'blocks.{i}.attn.relative_position_bias_table'] = shared.clone()
        report.expanded_shared_rel_pos_bias = True
    _resize_positions(sd, model, own, report)
    return sd


def _expected_fresh(key: str, sd: Mapping[str, torch.Tensor], model: Optional[nn.Module] = None) -> bool:
    """Model keys that may start from their initialisation when the checkpoint lacks them (the model's
    own ``new_modules`` included)."""
    if key.startswith(('head.', 'fc_norm.')) or key == 'pos_embed':
        return True
    if key.startswith(tuple(getattr(model, 'new_modules', ()))):
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


def convert_state_dict(checkpoint: Mapping, model: nn.Module, *, model_key: str = 'model|module',
                       model_prefix: str = '', source: str = '',
                       what: str = 'checkpoint') -> Tuple[Dict[str, torch.Tensor], ConversionReport]:
    """THE conversion of a BEiT-family checkpoint (a whole checkpoint dict or a state dict) for ``model``.

    Returns ``(state_dict, report)``: ``state_dict`` holds every key of ``model.state_dict()`` (the
    keys in ``report.fresh`` hold the model's own tensors), so ``model.load_state_dict(state_dict)``
    loads it strictly; ``report`` says what was dropped, expanded, interpolated and kept fresh.
    Raises ``StateDictMismatchError`` (message prefixed ``what``) when anything else does not fit;
    ``CheckpointError`` when no state dict is found. The model is not touched.
    """
    renamed: Dict[str, str] = {}
    sd, used, outside = select_state_dict(checkpoint, model_key, model_prefix, renamed)
    report = ConversionReport(source=source, model_key=used, dropped=dict(outside), renamed=renamed)
    sd = adapt_state_dict(sd, model, report)
    mismatch = compare_state_dict(model, sd)
    report.fresh = [k for k in mismatch.missing if _expected_fresh(k, sd, model)]
    fatal_missing = [k for k in mismatch.missing if k not in report.fresh]
    if fatal_missing or mismatch.unexpected or mismatch.mismatched:
        mismatch.missing = fatal_missing
        raise StateDictMismatchError(f'{what}: ' + _mismatch_message(mismatch, fatal_missing), mismatch)
    report.loaded = len(sd)
    own = model.state_dict()
    return {**sd, **{k: own[k] for k in report.fresh}}, report


# ---------------------------------------------------------------------- the routes
def _load_file(model: nn.Module, source: str | os.PathLike, model_key: str, model_prefix: str,
               what: str) -> ConversionReport:
    path = resolve_source(source, what)
    sd, report = convert_state_dict(read_checkpoint(path), model, model_key=model_key, model_prefix=model_prefix,
                                    source=path, what=f'{what} {os.fspath(source)}')
    model.load_state_dict(sd)
    return report


def load_pretrained(model: nn.Module, source: str | os.PathLike, *, model_key: str = 'model|module',
                    model_prefix: str = '') -> ConversionReport:
    """Load the BEiT-family checkpoint ``source`` (a file, a DeepSpeed folder, an https URL already in the
    hub cache) into ``model`` (any timm ``Beit``) through :func:`convert_state_dict`.

    The Python route, and what this package's registered names call for
    ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...))``. For timm's
    own names (``beit_base_patch16_224``, ...) it is the route that converts as the original::

        model = timm.create_model('beit_base_patch16_224', num_classes=100, img_size=384)
        mcbeit.models.load_pretrained(model, 'beit_base_patch16_224_pt22k.pth')

    Returns the :class:`ConversionReport` (also logged). Raises ``CheckpointNotFoundError``,
    ``UnsafeCheckpointError`` (a pickle that needs more than tensors and ``argparse.Namespace``),
    ``CheckpointError`` (unreadable) and ``StateDictMismatchError``; the model is left unchanged then.
    """
    report = _load_file(model, source, model_key, model_prefix, 'checkpoint')
    _logger.info('%s', report.summary('weights from'))
    return report


def load_for_finetuning(spec: str, model: nn.Module, model_key: str = 'model|module',
                        model_prefix: str = '') -> ConversionReport:
    """``--finetune spec``: :func:`load_pretrained` with the flag named in messages and the log."""
    report = _load_file(model, spec, model_key, model_prefix, '--finetune')
    _logger.info('%s', report.summary('fine-tuning from'))
    return report


def checkpoint_filter_fn(state_dict: Mapping, model: nn.Module) -> Dict[str, torch.Tensor]:
    """timm ``pretrained_filter_fn`` of this package's names: weights timm read itself (a state dict given in
    the pretrained cfg, a ``local-dir:`` folder), converted by :func:`convert_state_dict`."""
    sd, report = convert_state_dict(state_dict, model, source='the pretrained cfg', what='pretrained weights')
    _logger.info('%s', report.summary('weights from'))
    return sd


def _weights_file(variant: str, kwargs: Mapping[str, Any]) -> Optional[str]:
    """The file (or DeepSpeed folder) the resolved pretrained cfg names; None when timm reads the weights
    itself (a state dict, a ``local-dir:`` folder, the hub). ValueError when it names no weights at all."""
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get('pretrained_cfg'),
                                 pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay'))
    if cfg.source in ('local-dir', 'hf-hub') or cfg.state_dict:
        return None
    if cfg.file:
        return os.fspath(cfg.file)
    if cfg.url or cfg.hf_hub_id:
        return None
    raise ValueError(_NO_DOWNLOAD)


def build_beit(model_cls: Callable[..., nn.Module], variant: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """timm's ``build_model_with_cfg`` for this package's registered names, loading weights through this module.

    ``pretrained=True`` with a file in the pretrained cfg (``pretrained_cfg_overlay=dict(file=...)``):
    the model is built, then :func:`load_pretrained` reads and converts the file, so the result is
    that of ``--finetune`` (timm's own reader, its head policy and its filter are not involved). Other
    sources are read by timm and converted by :func:`checkpoint_filter_fn`; timm then also drops the
    head when ``num_classes`` differs from the cfg's (pass ``num_classes`` in the overlay, as the
    export's ``config.json`` does). ``pretrained=True`` with no weights named raises ValueError.
    """
    file = _weights_file(variant, kwargs) if pretrained else None
    if file is None:
        return build_model_with_cfg(model_cls, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)
    features_only = kwargs.pop('features_only', False)
    model = build_model_with_cfg(model_cls, variant, False, **kwargs)
    load_pretrained(model, file)
    if not features_only:
        return model
    # timm wraps a features_only model after loading its weights: give it the loaded ones as a state dict
    overlay = dict(kwargs.pop('pretrained_cfg_overlay', None) or {}, state_dict=model.state_dict())
    wrapped = build_model_with_cfg(model_cls, variant, True, features_only=True, pretrained_cfg_overlay=overlay,
                                   **kwargs)
    wrapped.pretrained_cfg.pop('state_dict', None)
    return wrapped
