"""mmpretrain's BEiT / BEiT v2 parameter names -> the original's (unilm's, timm's, this package's).

mmpretrain builds BEiT from its own modules (``mmpretrain/models/backbones/beit.py``: ``BEiTViT``,
``BEiTTransformerEncoderLayer`` on mmcv's ``FFN`` and ``PatchEmbed``; ``selfsup/beit.py``:
``BEiTPretrainViT``, ``VQKD``; ``necks/beitv2_neck.py``; ``heads/beitv2_head.py``,
``heads/linear_head.py``), so its files hold the same tensors under other names. mmpretrain ships no
converter; this map was read from those module definitions:

====================================================  ================================================
mmpretrain                                             original
====================================================  ================================================
``backbone.cls_token`` / ``mask_token`` / ``pos_embed``  ``cls_token`` / ``mask_token`` / ``pos_embed``
``backbone.patch_embed.projection.*`` (mmcv)           ``patch_embed.proj.*``
``backbone.rel_pos_bias.*`` (shared table, index)      ``rel_pos_bias.*``
``backbone.layers.N.ln1`` / ``ln2``                    ``blocks.N.norm1`` / ``norm2``
``backbone.layers.N.ffn.layers.0.0`` / ``layers.1``    ``blocks.N.mlp.fc1`` / ``mlp.fc2``
``backbone.layers.N.attn.*``, ``gamma_1``, ``gamma_2``  the same under ``blocks.N``
``backbone.ln1`` (``final_norm=True``)                 ``norm`` (the final norm of every token)
``backbone.ln2`` (``out_type='avg_featmap'``)          ``fc_norm`` (after mean pooling)
``neck.patch_aggregation.N.*`` (BEiT v2)               ``cls_pt_layers.N.*`` (same renames as a layer)
``neck.norm`` (BEiT v2's shared norm)                  ``norm``
``head.cls_head`` (BEiT v1/v2 MIM head)                ``lm_head``
``head.fc`` (``LinearClsHead``)                        ``head``
``target_generator.*`` (the VQ-KD tokenizer)           dropped from a model: load it with --tokenizer_weight
``data_preprocessor.*`` (normalisation constants)      dropped: mcbeit normalises in its data pipeline
====================================================  ================================================

mmpretrain's encoder-only VQ-KD file (``vqkd_encoder.pth``: ``encoder.*``, ``quantize.*``,
``encode_task_layer.*``) and the ``target_generator.*`` part of a pre-training file map to unilm's
VQ-KD names (``from_mmpretrain(sd, tokenizer=True)``): the encoder as above except that its final
``ln1`` is unilm's ``encoder.fc_norm`` (the encoder is ``BEiTViT(final_norm=True, out_type='featmap')``:
a LayerNorm of every token, of which the patch tokens are used; unilm's encoder is a mean-pooling ViT
whose ``fc_norm`` normalises each patch token, the same computation); ``quantize.*`` and
``encode_task_layer.*`` keep their names (the quantiser's ``embedding.weight``, ``embedding.initted``,
``cluster_size`` are unilm's names).

The tensors need no change: the relative position tables use the same index layout (the 3 extra
rows for CLS last), ``qkv`` holds q, k, v in that order with ``q_bias``/``v_bias`` apart, layer
scales are ``gamma_1``/``gamma_2``. mmpretrain keeps ``relative_position_index`` buffers in its
files (persistent there); they map like any key and :func:`~mcbeit.models.checkpoint.filter_pretraining_state_dict`
drops them later, as it drops unilm's. A key the map does not know raises :class:`UnmappedKeysError`
naming every such key: nothing is dropped silently.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Dict, List, Tuple

import torch

from mcbeit.models.checkpoint import CheckpointError, extract_state_dict

__all__ = ['UnmappedKeysError', 'is_mmpretrain', 'mmpretrain_vit_key', 'from_mmpretrain', 'split_notes',
           'RENAMED', 'TOKENIZER_DROPPED', 'PREPROCESSOR_DROPPED']

#: a note of :func:`from_mmpretrain` that starts with this is a rename (the new name follows)
RENAMED = 'renamed to '
TOKENIZER_DROPPED = "the tokenizer (mmpretrain's target_generator): load it with --tokenizer_weight"
PREPROCESSOR_DROPPED = "mmpretrain's data pre-processor constants: mcbeit normalises in its data pipeline"
MODEL_DROPPED = 'the pre-training model, not the tokenizer'

# keys that only mmpretrain's modules write (never unilm's, timm's or this package's)
_MMPRETRAIN_KEY = re.compile(
    r'^(?:(?:backbone|encoder|decoder|target_generator\.encoder)\.(?:layers\.\d+\.|patch_embed\.projection\.)'
    r'|target_generator\.|neck\.patch_aggregation\.|head\.cls_head\.|data_preprocessor\.)')
_LAYER = re.compile(r'^layers\.(\d+)\.(.+)$')
_ATTN = ('q_bias', 'v_bias', 'qkv.weight', 'qkv.bias', 'proj.weight', 'proj.bias', 'relative_position_bias_table',
         'relative_position_index')
_AFFINE = ('weight', 'bias')


class UnmappedKeysError(CheckpointError):
    """Keys of an mmpretrain file the map does not know (``keys``): nothing was loaded."""

    def __init__(self, keys: List[str]):
        self.keys = list(keys)
        shown = '\n'.join(f'  {k}' for k in self.keys[:40])
        more = f'\n  ... and {len(self.keys) - 40} more' if len(self.keys) > 40 else ''
        super().__init__(
            f'{len(self.keys)} key(s) of this mmpretrain checkpoint have no counterpart in the original BEiT '
            f'names (mcbeit.models.key_maps knows backbone.*, neck.patch_aggregation.*, neck.norm, head.cls_head, '
            f'head.fc, target_generator.*, data_preprocessor.*):\n{shown}{more}\n'
            f'is it a BEiT / BEiT v2 file of mmpretrain? Another architecture needs its own conversion')


def _flat(sd: Mapping) -> Dict[str, torch.Tensor]:
    """A state dict, or the one inside a whole checkpoint (``{'meta', 'state_dict'}``, ``{'model': ...}``)."""
    if len(sd) > 0 and all(isinstance(v, torch.Tensor) for v in sd.values()):
        return dict(sd)
    return extract_state_dict(sd, ('state_dict', 'model', 'module'), map_names=False)


def is_mmpretrain(sd: Mapping) -> bool:
    """True when ``sd`` (a state dict or a whole checkpoint) has keys only mmpretrain's modules write:
    ``backbone.layers.N.*``, ``encoder.layers.N.*``, ``*.patch_embed.projection.*``, ``target_generator.*``,
    ``neck.patch_aggregation.*``, ``head.cls_head.*``, ``data_preprocessor.*``."""
    keys = sd.keys()
    if not (len(sd) > 0 and all(isinstance(v, torch.Tensor) for v in sd.values())):
        inner = next((sd[k] for k in ('state_dict', 'model', 'module') if isinstance(sd.get(k), Mapping)), None)
        if inner is None:
            return False
        keys = inner.keys()
    return any(_MMPRETRAIN_KEY.match(str(k)) for k in keys)


def _layer_key(rest: str) -> str:
    """One key inside an mmpretrain ``BEiTTransformerEncoderLayer`` -> inside a timm/unilm ``Block``."""
    name, _, leaf = rest.rpartition('.')
    if rest in ('gamma_1', 'gamma_2'):
        return rest
    if rest.startswith('attn.') and rest[len('attn.'):] in _ATTN:
        return rest
    renames = {'ln1': 'norm1', 'ln2': 'norm2', 'ffn.layers.0.0': 'mlp.fc1', 'ffn.layers.1': 'mlp.fc2'}
    if name in renames and leaf in _AFFINE:
        return f'{renames[name]}.{leaf}'
    raise KeyError(rest)


def mmpretrain_vit_key(key: str, final_norm: str = 'norm') -> str:
    """One key of an mmpretrain ``BEiTViT`` / ``BEiTPretrainViT`` (without ``backbone.``) -> the original's.

    ``layers.N.ln1`` -> ``blocks.N.norm1``, ``layers.N.ln2`` -> ``blocks.N.norm2``, ``layers.N.ffn.layers.0.0``
    -> ``blocks.N.mlp.fc1``, ``layers.N.ffn.layers.1`` -> ``blocks.N.mlp.fc2``, ``layers.N.attn.*`` and
    ``layers.N.gamma_{1,2}`` keep their names under ``blocks.N``; ``patch_embed.projection`` ->
    ``patch_embed.proj``; ``cls_token``, ``mask_token``, ``pos_embed``, ``rel_pos_bias.*`` keep theirs; the
    final ``ln1`` -> ``final_norm`` (``'norm'``; pass ``'fc_norm'`` for a VQ-KD encoder, see the module doc);
    ``ln2`` (after mean pooling) -> ``fc_norm``. Raises :class:`UnmappedKeysError` for any other key.
    """
    m = _LAYER.match(key)
    try:
        if m:
            return f'blocks.{m.group(1)}.{_layer_key(m.group(2))}'
        if key in ('cls_token', 'mask_token', 'pos_embed'):
            return key
        name, _, leaf = key.rpartition('.')
        if name == 'rel_pos_bias' and leaf in ('relative_position_bias_table', 'relative_position_index'):
            return key
        if name == 'patch_embed.projection' and leaf in _AFFINE:
            return f'patch_embed.proj.{leaf}'
        if name in ('ln1', 'ln2') and leaf in _AFFINE:
            return f'{final_norm if name == "ln1" else "fc_norm"}.{leaf}'
    except KeyError:
        pass
    raise UnmappedKeysError([key])


def _tokenizer_key(key: str) -> str:
    """A key of mmpretrain's ``VQKD`` (encoder-only file, or ``target_generator.*`` without the prefix)."""
    part, _, rest = key.partition('.')
    if part in ('encoder', 'decoder'):
        return f'{part}.{mmpretrain_vit_key(rest, final_norm="fc_norm")}'
    if part in ('quantize', 'encode_task_layer', 'decode_task_layer'):
        return key
    raise UnmappedKeysError([key])


def _model_key(key: str) -> str:
    """A key of mmpretrain's ``BEiT`` self-supervisor or ``ImageClassifier`` (not the tokenizer)."""
    if key.startswith('backbone.'):
        return mmpretrain_vit_key(key[len('backbone.'):])
    m = re.match(r'^neck\.patch_aggregation\.(\d+)\.(.+)$', key)
    if m:
        try:
            return f'cls_pt_layers.{m.group(1)}.{_layer_key(m.group(2))}'
        except KeyError:
            raise UnmappedKeysError([key]) from None
    for old, new in (('neck.norm.', 'norm.'), ('head.cls_head.', 'lm_head.'), ('head.fc.', 'head.')):
        if key.startswith(old) and key[len(old):] in _AFFINE:
            return new + key[len(old):]
    if key.split('.', 1)[0] in ('encoder', 'decoder', 'quantize', 'encode_task_layer', 'decode_task_layer'):
        return _tokenizer_key(key)  # mmpretrain's encoder-only VQ-KD file
    raise UnmappedKeysError([key])


def from_mmpretrain(sd: Mapping, *, tokenizer: bool = False) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """An mmpretrain BEiT / BEiT v2 state dict (or whole ``{'meta', 'state_dict'}`` checkpoint) in the original names.

    Returns ``(state_dict, notes)``: ``notes`` maps every key of the input to what happened to it,
    ``'renamed to <name>'`` (:data:`RENAMED` + the new name) or why it was dropped (``target_generator.*``
    from a model, :data:`TOKENIZER_DROPPED`; ``data_preprocessor.*``, :data:`PREPROCESSOR_DROPPED`).
    ``tokenizer=True`` takes the VQ-KD tokenizer instead: ``target_generator.*`` (or the keys of the
    encoder-only ``vqkd_encoder.pth``) in unilm's VQ-KD names, everything else dropped and noted.
    Raises :class:`UnmappedKeysError` listing every key the map does not know, and ``CheckpointError``
    when two keys would land on one name.
    """
    sd = _flat(sd)
    out: Dict[str, torch.Tensor] = {}
    notes: Dict[str, str] = {}
    unknown: List[str] = []
    source_of: Dict[str, str] = {}
    for key, value in sd.items():
        if key.startswith('data_preprocessor.'):
            notes[key] = PREPROCESSOR_DROPPED
            continue
        try:
            if tokenizer:
                if key.startswith('target_generator.'):
                    new = _tokenizer_key(key[len('target_generator.'):])
                elif key.split('.', 1)[0] in ('encoder', 'decoder', 'quantize', 'encode_task_layer',
                                               'decode_task_layer'):
                    new = _tokenizer_key(key)
                else:
                    _model_key(key)  # still a known name, or an error
                    notes[key] = MODEL_DROPPED
                    continue
            elif key.startswith('target_generator.'):  # VQ-KD (v2) or DALL-E (v1): listed, never loaded here
                notes[key] = TOKENIZER_DROPPED
                continue
            else:
                new = _model_key(key)
        except UnmappedKeysError:
            unknown.append(key)
            continue
        if new in out:
            raise CheckpointError(f'mmpretrain keys {source_of[new]!r} and {key!r} both map to {new!r}: '
                                  f'the file mixes two models; pass one model per file')
        out[new], source_of[new], notes[key] = value, key, RENAMED + new
    if unknown:
        raise UnmappedKeysError(unknown)
    return out, notes


def split_notes(notes: Mapping[str, str]) -> Tuple[Dict[str, str], Dict[str, str]]:
    """``notes`` of :func:`from_mmpretrain` -> ({old: new name}, {dropped key: why})."""
    renamed = {k: v[len(RENAMED):] for k, v in notes.items() if v.startswith(RENAMED)}
    return renamed, {k: v for k, v in notes.items() if not v.startswith(RENAMED)}
