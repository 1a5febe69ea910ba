"""Exporting BEiT weights: timm safetensors + ``config.json``, and Hugging Face ``transformers`` BEiT.

A checkpoint (``mcbeit-finetune``, ``mcbeit-pretrain`` or a released BEiT ``.pth``) becomes a plain
timm ``Beit`` classifier with its weights (:func:`load_for_export`). A pre-trained checkpoint
becomes its backbone: ``lm_head``, ``mask_token`` (and BEiT v2's ``cls_pt_layers``) are dropped and
the model is the classifier of the same size with ``num_classes=0, global_pool='token'`` (the final ``norm`` kept, the CLS token as
the pooled feature), with the shared relative position table when pre-training had one.

The architecture is read from the weights (head size, ``fc_norm`` = mean pooling, shared or per-block
relative tables, absolute position embedding, layer scale, grid size); the checkpoint's ``args`` or the
caller only name the model size and the preprocessing. Flags that disagree with the weights are
logged and the weights win: the export is what the file holds.

:func:`save_timm` writes the folder that ``timm.create_model('local-dir:DIR', pretrained=True)``
reads (``model.safetensors`` + ``config.json`` in the Hugging Face hub layout of timm).
:func:`save_hf` writes ``transformers.BeitModel`` / ``BeitForImageClassification`` files, in the
parameter layout ``save_pretrained`` uses on disk, after checking that HF's BEiT can express the model.

The class names ``mcbeit-finetune`` keeps in its checkpoints (``classes``, index = label) travel
along: ``label_names`` in timm's ``config.json`` (``model.pretrained_cfg['label_names']`` once
loaded) and ``id2label`` / ``label2id`` in the transformers config.
"""
from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import timm
import torch
import torch.nn as nn
from safetensors.torch import save_file
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from timm.layers import Mlp
from timm.models.beit import Beit

from mcbeit.errors import InputError
from mcbeit.files import apply_umask
from mcbeit.models.beit_weights import PRETRAINING_ONLY, convert_state_dict
from mcbeit.models.checkpoint import LoadReport, StateDictMismatchError, extract_state_dict, load_checkpoint_file
from mcbeit.models.classifier import classifier_counterpart, classifier_names

__all__ = ['ExportError', 'Exportable', 'load_for_export', 'architecture_from_weights', 'grid_side',
           'eval_data_config', 'timm_config', 'save_timm', 'timm_create_calls', 'verify_export', 'hf_config_kwargs',
           'timm_to_hf_state_dict', 'save_hf']

_logger = logging.getLogger(__name__)

PRETRAIN_FORMAT = 'mcbeit-pretrain-v1'
_MIM_KEYS = PRETRAINING_ONLY  # mask_token, lm_head, BEiT v2's cls_pt_layers, ConMIM's projectors
_VOCAB_SUFFIX = '_8k_vocab'


class ExportError(InputError, RuntimeError):
    """The checkpoint cannot be exported as asked (the message says why and what to do)."""


@dataclass
class Exportable:
    """A timm ``Beit`` with its weights (eval mode) and what rebuilds it."""
    model: Beit
    name: str  # timm architecture, e.g. 'beit_base_patch16_224'
    model_args: Dict[str, Any]  # create_model kwargs that rebuild it (config.json 'model_args')
    data_config: Dict[str, Any]  # input_size, interpolation, crop_pct, crop_mode, mean, std
    source: str  # what was read, for the log: 'fine-tuned', 'fine-tuned (EMA)', 'pre-trained'
    label_names: List[str] = field(default_factory=list)  # class names, index = label; [] when the checkpoint has none


# ---------------------------------------------------------------------- reading a checkpoint
def grid_side(sd: Mapping[str, torch.Tensor]) -> Optional[int]:
    """Patches per side fixed by the weights (relative table or position embedding), or None."""
    table = sd.get('rel_pos_bias.relative_position_bias_table', sd.get('blocks.0.attn.relative_position_bias_table'))
    if table is not None:  # (2h-1)(2w-1)+3 rows, square grids only
        return (math.isqrt(table.shape[0] - 3) + 1) // 2
    if 'pos_embed' in sd:  # (1, 1+N, D)
        return math.isqrt(sd['pos_embed'].shape[1] - 1)
    return None


def architecture_from_weights(sd: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    """timm ``Beit`` kwargs fixed by a classifier/backbone state dict (MIM keys already dropped).

    ``init_values`` only decides whether ``gamma_1/2`` exist (their values are loaded): 0.1 when
    they do, 0.0 when not (0.0 rather than None: ``create_model`` drops None kwargs, so the
    registry's default would come back).
    """
    head = sd.get('head.weight')
    return dict(
        num_classes=int(head.shape[0]) if head is not None else 0,
        global_pool='avg' if 'fc_norm.weight' in sd else 'token',
        use_abs_pos_emb='pos_embed' in sd,
        use_rel_pos_bias='blocks.0.attn.relative_position_bias_table' in sd,
        use_shared_rel_pos_bias='rel_pos_bias.relative_position_bias_table' in sd,
        init_values=0.1 if 'blocks.0.gamma_1' in sd else 0.0,
    )


def _warn_on_flag_conflicts(arch: Mapping[str, Any], args: Mapping[str, Any], pretrained: bool) -> None:
    """Log every flag of ``args`` that disagrees with the weights (the weights are exported)."""
    held = dict(arch, init_values=arch['init_values'] > 0)  # layer scale: only its presence is in the flags
    checks = [('abs_pos_emb', 'use_abs_pos_emb', bool),
              ('rel_pos_bias', 'use_shared_rel_pos_bias' if pretrained else 'use_rel_pos_bias', bool),
              ('layer_scale_init_value', 'init_values', lambda v: float(v) > 0)]
    if not pretrained:
        checks += [('nb_classes', 'num_classes', int), ('use_mean_pooling', 'global_pool', lambda v: 'avg' if v else 'token')]
    for flag, key, implied in checks:
        if args.get(flag) is not None and implied(args[flag]) != held[key]:
            _logger.warning('--%s %s disagrees with the weights (%s=%s): exporting what the weights hold',
                            flag, args[flag], key, arch[key])


def _model_name(args: Mapping[str, Any]) -> str:
    name = args.get('model')
    if not name:
        raise ExportError('the checkpoint has no args naming its model: pass --model, e.g. beit_base_patch16_224 '
                          '(or beit_base_patch16_224_8k_vocab for a pre-training checkpoint)')
    name = classifier_counterpart(name)
    if name not in classifier_names():
        raise ExportError(f'--model {args["model"]}: not a BEiT model timm knows; choose one of {classifier_names()} '
                          f'(or their pre-training names: ending in {_VOCAB_SUFFIX}, or conmim_*)')
    return name


def eval_data_config(args: Mapping[str, Any], size: int) -> Dict[str, Any]:
    """The original evaluation transform: resize to size/crop_pct, center crop, bicubic, normalise."""
    imagenet = bool(args.get('imagenet_default_mean_and_std'))
    crop_pct = args.get('crop_pct') or (224 / 256 if size < 384 else 1.0)
    return dict(input_size=(3, size, size), interpolation='bicubic', crop_pct=float(crop_pct), crop_mode='center',
                mean=IMAGENET_DEFAULT_MEAN if imagenet else IMAGENET_INCEPTION_MEAN,
                std=IMAGENET_DEFAULT_STD if imagenet else IMAGENET_INCEPTION_STD)


def load_for_export(path: str | os.PathLike, *, use_ema: bool = False,
                    overrides: Optional[Mapping[str, Any]] = None) -> Exportable:
    """Read a checkpoint and return its weights in a timm ``Beit`` (eval mode).

    ``overrides`` (e.g. the command line) replace the checkpoint's ``args``: ``model``,
    ``input_size``, ``imagenet_default_mean_and_std``, ``crop_pct``; None values are ignored.
    ``use_ema`` exports ``model_ema`` instead of ``model``.
    """
    ckpt = load_checkpoint_file(path)
    args = ckpt.get('args') or {}
    args = dict(vars(args) if not isinstance(args, Mapping) else args)
    args.update({k: v for k, v in (overrides or {}).items() if v is not None})
    if use_ema:
        if not isinstance(ckpt.get('model_ema'), Mapping):
            raise ExportError(f'--use_ema: {os.fspath(path)!r} holds no model_ema (fine-tune with --model_ema to keep one)')
        sd = extract_state_dict(ckpt['model_ema'])
    else:
        sd = extract_state_dict(ckpt)
    pretrained = ckpt.get('format') == PRETRAIN_FORMAT or any(k.startswith(_MIM_KEYS) for k in sd)
    sd = {k: v for k, v in sd.items() if not k.startswith(_MIM_KEYS)}
    name = _model_name(args)
    arch = architecture_from_weights(sd)
    _warn_on_flag_conflicts(arch, args, pretrained)
    side = grid_side(sd)
    patch = sd['patch_embed.proj.weight'].shape[-1] if 'patch_embed.proj.weight' in sd else 16
    size = side * patch if side else int(args.get('input_size') or 224)
    if args.get('input_size') and int(args['input_size']) != size:
        raise ExportError(f'--input_size {args["input_size"]}: the weights hold a {side}x{side} grid of {patch}-pixel '
                          f'patches ({size} px); export at {size} (fine-tune at another size to get such a model)')
    model_args = dict(arch, img_size=size)
    model = timm.create_model(name, pretrained=False, **model_args)
    try:  # the BEiT family's one conversion; the architecture fits the weights, so nothing may stay fresh
        converted, report = convert_state_dict(sd, model, source=os.fspath(path), what=os.fspath(path))
        if report.fresh:
            raise StateDictMismatchError(f'{os.fspath(path)}: no weights for {report.fresh}',
                                         LoadReport(missing=report.fresh))
    except StateDictMismatchError as e:
        raise ExportError(f'the weights do not fit {name}: shape mismatches mean another size (pass the --model '
                          f'the checkpoint was trained as); other keys, an architecture this export does not know.'
                          f'\n{e}') from None
    model.load_state_dict(converted)
    source = ('pre-trained' if pretrained else 'fine-tuned') + (' (EMA)' if use_ema else '')
    return Exportable(model.eval(), name, model_args, eval_data_config(args, size), source,
                      _label_names(ckpt.get('classes'), model.num_classes, path))


def _label_names(classes: Any, num_classes: int, path: str | os.PathLike) -> List[str]:
    """The checkpoint's ``classes`` when they name each of the head's outputs; else [] (with a warning when
    some were there but do not fit)."""
    if not classes or not num_classes:
        return []
    if not isinstance(classes, (list, tuple)) or not all(isinstance(c, str) for c in classes):
        _logger.warning('%s: its classes entry is not a list of names (%s); exported without class names',
                        os.fspath(path), type(classes).__name__)
        return []
    if len(classes) != num_classes:
        _logger.warning('%s names %d classes for a head of %d outputs (fine-tuned with a larger --nb_classes than the '
                        'data has?); exported without class names', os.fspath(path), len(classes), num_classes)
        return []
    return list(classes)


# ---------------------------------------------------------------------- timm
def timm_config(exp: Exportable) -> Dict[str, Any]:
    """``config.json`` as timm's ``local-dir:`` / ``hf-hub:`` loader reads it (architecture, model_args, pretrained_cfg)."""
    m = exp.model
    pretrained_cfg = dict(exp.data_config, num_classes=m.num_classes, fixed_input_size=True, pool_size=None,
                          first_conv='patch_embed.proj', classifier='head', tag='mcbeit', custom_load=False,
                          notes=(f'exported by mcbeit-export from a {exp.source} checkpoint',))
    labels = dict(label_names=list(exp.label_names)) if exp.label_names else {}
    return dict(architecture=exp.name, num_classes=m.num_classes, num_features=m.num_features,
                global_pool=m.global_pool, model_args=exp.model_args, **labels, pretrained_cfg=pretrained_cfg)


def save_timm(exp: Exportable, out_dir: str | os.PathLike) -> Path:
    """Write ``model.safetensors`` (contiguous tensors, metadata format=pt) and ``config.json``; return the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in exp.model.state_dict().items()}
    save_file(tensors, str(out / 'model.safetensors'), metadata={'format': 'pt'})
    apply_umask(out / 'model.safetensors')  # save_file leaves 0600
    (out / 'config.json').write_text(json.dumps(timm_config(exp), indent=2) + '\n')
    return out


def _file_overlay(exp: Exportable, out: Path) -> Dict[str, Any]:
    """``pretrained_cfg_overlay`` for loading ``model.safetensors`` by file: its num_classes keeps the load strict
    (timm drops the head when the registry cfg's class count differs) and its preprocessing replaces the registry's."""
    cfg = timm_config(exp)['pretrained_cfg']
    return dict(file=str(out / 'model.safetensors'),
                **{k: cfg[k] for k in ('num_classes', 'input_size', 'mean', 'std', 'crop_pct', 'interpolation')})


def timm_create_calls(exp: Exportable, out_dir: str | os.PathLike) -> List[str]:
    """The two ``timm.create_model`` calls that load the exported folder, as Python source."""
    out = Path(out_dir).resolve()
    kwargs = ''.join(f', {k}={v!r}' for k, v in exp.model_args.items())
    return [f"timm.create_model({'local-dir:' + str(out)!r}, pretrained=True)",
            f'timm.create_model({exp.name!r}, pretrained=True, pretrained_cfg_overlay={_file_overlay(exp, out)!r}{kwargs})']


def verify_export(exp: Exportable, out_dir: str | os.PathLike, hf_dir: str | os.PathLike | None = None,
                  atol: float = 1e-4) -> Dict[str, float]:
    """Load the written files back and compare with ``exp.model`` on two random images (eval mode).

    Routes: timm ``local-dir:``, timm by file (the calls of :func:`timm_create_calls`) and, with
    ``hf_dir``, transformers (final tokens and logits / pooled feature). Returns the largest absolute
    difference per route; raises ``ExportError`` when one exceeds ``atol``, or when the class names do not
    come back (timm's ``pretrained_cfg['label_names']``, transformers' ``id2label``).
    """
    out = Path(out_dir).resolve()
    x = torch.randn((2, *exp.data_config['input_size']), generator=torch.Generator().manual_seed(0))  # (2,3,H,W)
    model = exp.model.eval()
    with torch.inference_mode():
        tokens, result = model.forward_features(x), model(x)  # (2,1+N,D), logits (2,C) or CLS feature (2,D)
        routes = {'timm local-dir': timm.create_model(f'local-dir:{out}', pretrained=True),
                  'timm file': timm.create_model(exp.name, pretrained=True,
                                                 pretrained_cfg_overlay=_file_overlay(exp, out), **exp.model_args)}
        diffs = {k: (m.eval()(x) - result).abs().max().item() for k, m in routes.items()}
        names = {'timm local-dir': list(routes['timm local-dir'].pretrained_cfg.get('label_names') or [])}
        if hf_dir is not None:
            import transformers
            cls = transformers.BeitForImageClassification if model.num_classes else transformers.BeitModel
            hf = cls.from_pretrained(hf_dir).eval()
            base = hf.beit if model.num_classes else hf
            hf_tokens = base(x).last_hidden_state  # (2,1+N,D)
            hf_result = hf(x).logits if model.num_classes else base(x).pooler_output
            diffs['transformers'] = max((hf_tokens - tokens).abs().max().item(), (hf_result - result).abs().max().item())
            if exp.label_names:
                names['transformers'] = [hf.config.id2label[i] for i in range(len(hf.config.id2label))]
    lost = {k: v for k, v in names.items() if exp.label_names and v != list(exp.label_names)}
    if lost:
        raise ExportError(f'the exported files do not carry the class names back: {sorted(lost)}')
    bad = {k: v for k, v in diffs.items() if not v <= atol}
    if bad:
        raise ExportError(f'the exported files do not reproduce the model: max |difference| {bad} > {atol}')
    return diffs


# ---------------------------------------------------------------------- Hugging Face transformers
def _hf_blockers(model: Beit) -> List[str]:
    """Why HF's BEiT cannot express ``model`` (empty when it can)."""
    why = []
    pool, fc_norm, norm = model.global_pool, model.fc_norm, model.norm
    if not ((pool == 'avg' and isinstance(fc_norm, nn.LayerNorm) and isinstance(norm, nn.Identity))
            or (pool == 'token' and isinstance(norm, nn.LayerNorm) and isinstance(fc_norm, nn.Identity))):
        why.append(f'pooling {pool!r} with norm={type(norm).__name__}, fc_norm={type(fc_norm).__name__}: HF has only '
                   'mean pooling + LayerNorm (use_mean_pooling) or the CLS token after the final LayerNorm')
    img, patch = model.patch_embed.img_size, model.patch_embed.patch_size
    if img[0] != img[1] or patch[0] != patch[1]:
        why.append(f'image {img} / patch {patch} not square: HF BEiT builds its position tables for square grids')
    for i, blk in enumerate(model.blocks):
        mlp = blk.mlp
        if not (type(mlp) is Mlp and isinstance(mlp.norm, nn.Identity) and isinstance(mlp.act, nn.GELU)
                and mlp.act.approximate == 'none'):
            why.append(f'blocks.{i}.mlp is {type(mlp).__name__} (swiglu_mlp / scale_mlp / another activation): '
                       'HF BEiT has a plain fc1-GELU-fc2 MLP')
            break
        norms = [blk.norm1, blk.norm2] + [n for n in (norm, fc_norm) if not isinstance(n, nn.Identity)]
        if not all(type(n) in (nn.LayerNorm, timm.layers.LayerNorm) and n.eps == blk.norm1.eps for n in norms):
            why.append('norm layers other than LayerNorm with one eps: HF BEiT has a single layer_norm_eps')
            break
    return why


def hf_config_kwargs(model: Beit, label_names: Optional[List[str]] = None) -> Dict[str, Any]:
    """``transformers.BeitConfig`` arguments describing ``model`` (with ``label_names``, one per output, its
    ``id2label`` / ``label2id``); ``ExportError`` when HF cannot express it."""
    why = _hf_blockers(model)
    if why:
        raise ExportError('this model does not convert to transformers BEiT:\n  ' + '\n  '.join(why))
    if label_names and len(label_names) != model.num_classes:
        raise ExportError(f'{len(label_names)} class names for a model of {model.num_classes} outputs')
    labels = (dict(id2label=dict(enumerate(label_names)), label2id={n: i for i, n in enumerate(label_names)})
              if label_names else {'num_labels': model.num_classes} if model.num_classes else {})
    blk = model.blocks[0]
    return dict(
        hidden_size=model.embed_dim, num_hidden_layers=len(model.blocks), num_attention_heads=blk.attn.num_heads,
        intermediate_size=blk.mlp.fc1.out_features, hidden_act='gelu', layer_norm_eps=blk.norm1.eps,
        image_size=model.patch_embed.img_size[0], patch_size=model.patch_embed.patch_size[0],
        num_channels=model.patch_embed.proj.in_channels, use_mask_token=False,
        use_absolute_position_embeddings=model.pos_embed is not None,
        use_relative_position_bias=blk.attn.relative_position_bias_table is not None,
        use_shared_relative_position_bias=model.rel_pos_bias is not None,
        layer_scale_init_value=float(blk.init_values) if blk.gamma_1 is not None else 0.0,
        use_mean_pooling=model.global_pool == 'avg', hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        **labels,
    )


def timm_to_hf_state_dict(model: Beit) -> Dict[str, torch.Tensor]:
    """timm names -> the names HF BEiT files use on disk (``save_pretrained``'s layout, read by transformers 4 and 5).

    The fused ``qkv`` weight is split into query/key/value; q_bias/v_bias become the query/value
    biases (HF's key has none, timm's is a zero buffer); ``gamma_1/2`` -> ``lambda_1/2``. With a
    head, the backbone is prefixed ``beit.`` and ``head`` becomes ``classifier``.
    """
    sd = dict(model.state_dict())
    out: Dict[str, torch.Tensor] = {}
    pre = 'beit.' if model.num_classes else ''

    def move(src: str, dst: str) -> None:
        if src in sd:
            out[dst] = sd.pop(src)

    move('cls_token', pre + 'embeddings.cls_token')
    move('pos_embed', pre + 'embeddings.position_embeddings')
    for p in ('weight', 'bias'):
        move(f'patch_embed.proj.{p}', f'{pre}embeddings.patch_embeddings.projection.{p}')
    move('rel_pos_bias.relative_position_bias_table', pre + 'encoder.relative_position_bias.relative_position_bias_table')
    for i in range(len(model.blocks)):
        src, dst = f'blocks.{i}.', f'{pre}encoder.layer.{i}.'
        att = dst + 'attention.attention.'
        q, k, v = sd.pop(src + 'attn.qkv.weight').chunk(3)  # (3D, D) -> 3 x (D, D)
        out.update({att + 'query.weight': q, att + 'key.weight': k, att + 'value.weight': v})
        zeros = torch.zeros(q.shape[0], dtype=q.dtype)
        out[att + 'query.bias'] = sd.pop(src + 'attn.q_bias', zeros)
        out[att + 'value.bias'] = sd.pop(src + 'attn.v_bias', zeros)
        move(src + 'attn.relative_position_bias_table', att + 'relative_position_bias.relative_position_bias_table')
        move(src + 'gamma_1', dst + 'lambda_1')
        move(src + 'gamma_2', dst + 'lambda_2')
        for a, b in (('norm1', 'layernorm_before'), ('norm2', 'layernorm_after'), ('attn.proj', 'attention.output.dense'),
                     ('mlp.fc1', 'intermediate.dense'), ('mlp.fc2', 'output.dense')):
            for p in ('weight', 'bias'):
                move(f'{src}{a}.{p}', f'{dst}{b}.{p}')
    for p in ('weight', 'bias'):
        move(f'norm.{p}', f'{pre}layernorm.{p}')
        move(f'fc_norm.{p}', f'{pre}pooler.layernorm.{p}')
        move(f'head.{p}', f'classifier.{p}')
    if sd:
        raise ExportError(f'no place in HF BEiT for {sorted(sd)}: this model does not convert to transformers')
    return {k: v.detach().contiguous() for k, v in out.items()}


def save_hf(model: Beit, out_dir: str | os.PathLike, label_names: Optional[List[str]] = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` for ``BeitForImageClassification`` (with a head) or ``BeitModel``;
    ``label_names`` (one per output) become the config's ``id2label`` / ``label2id``.

    The converted weights are loaded back with ``from_pretrained`` (every parameter must be found,
    none left over) and written again with ``save_pretrained``, so the files are transformers' own.
    """
    try:
        import transformers
    except ImportError:
        raise ExportError('--hf needs transformers: pip install "mcbeit[hf]"') from None
    config = transformers.BeitConfig(**hf_config_kwargs(model, label_names))
    cls = transformers.BeitForImageClassification if model.num_classes else transformers.BeitModel
    config.architectures = [cls.__name__]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    save_file(timm_to_hf_state_dict(model), str(out / 'model.safetensors'), metadata={'format': 'pt'})
    hf_model, info = cls.from_pretrained(out, output_loading_info=True)
    problems = {k: sorted(info.get(k) or []) for k in ('missing_keys', 'unexpected_keys', 'mismatched_keys')}
    if any(problems.values()) or info.get('error_msgs'):
        raise ExportError(f'transformers {transformers.__version__} did not take every converted weight: '
                          f'{problems} {info.get("error_msgs") or ""}')
    hf_model.save_pretrained(out)
    apply_umask(*out.glob('model*.safetensors'))  # transformers writes them through safetensors' save_file (0600)
    return out
