"""Reading model checkpoints safely and loading them with a report by name.

Released BEiT / mc-BEiT checkpoints are ``torch.save`` pickles of a dict such as
``{'model': state_dict, 'args': argparse.Namespace, 'epoch': ..., 'optimizer': ...}``. They are read
with ``torch.load(weights_only=True)`` and ``argparse.Namespace`` as the only extra allowed class:
a file that needs any other Python object is refused (never unpickled in full), so a hostile file
cannot run code.

Also here, for every family: where a checkpoint comes from (:func:`resolve_source`: a file, a DeepSpeed
folder or an ``https://`` URL already in the hub cache), :func:`read_checkpoint` (``.safetensors`` too)
and :func:`select_state_dict` (the original's ``--model_key`` / ``--model_prefix``; mmpretrain's
``{'meta', 'state_dict'}`` files too, their names mapped by :mod:`mcbeit.models.key_maps`). What a BEiT model
does with the weights is :mod:`mcbeit.models.beit_weights`.
"""
from __future__ import annotations

import argparse
import logging
import os
import pickle
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from mcbeit.errors import InputError

__all__ = [
    'CheckpointError', 'CheckpointNotFoundError', 'UnsafeCheckpointError', 'StateDictMismatchError',
    'LoadReport', 'load_checkpoint_file', 'extract_state_dict', 'filter_pretraining_state_dict',
    'load_into', 'compare_state_dict', 'resolve_source', 'read_checkpoint', 'select_state_dict', 'hub_cache_path',
]

_logger = logging.getLogger(__name__)

#: classes a checkpoint may hold beside tensors and plain containers
SAFE_GLOBALS = [argparse.Namespace]
#: prefixes wrappers add to parameter names: DistributedDataParallel / DeepSpeed, torch.compile
_WRAPPER_PREFIXES = ('module.', '_orig_mod.')
#: the model-states file of a DeepSpeed checkpoint folder
DEEPSPEED_FILE = 'mp_rank_00_model_states.pt'


class CheckpointError(InputError, RuntimeError):
    """A checkpoint could not be read or does not fit the model (wrong input: the command line exits 1)."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint path does not exist or is not a file."""


class UnsafeCheckpointError(CheckpointError):
    """The file needs Python objects outside the allow-list; it was not unpickled."""


class StateDictMismatchError(CheckpointError):
    """Keys or shapes of a state dict do not match the model (see ``report``)."""

    def __init__(self, message: str, report: 'LoadReport'):
        super().__init__(message)
        self.report = report


@dataclass
class LoadReport:
    """What did not match when loading a state dict into a model."""
    missing: List[str] = field(default_factory=list)  # in the model, not in the state dict
    unexpected: List[str] = field(default_factory=list)  # in the state dict, not in the model
    mismatched: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=list)  # key, ckpt, model

    def __bool__(self) -> bool:  # True when something did not match
        return bool(self.missing or self.unexpected or self.mismatched)

    def describe(self) -> str:
        lines = []
        for k in self.missing:
            lines.append(f'  missing (in the model, not in the checkpoint): {k}')
        for k in self.unexpected:
            lines.append(f'  unexpected (in the checkpoint, not in the model): {k}')
        for k, ck, md in self.mismatched:
            lines.append(f'  shape mismatch: {k}: checkpoint {tuple(ck)} vs model {tuple(md)}')
        return '\n'.join(lines)


# ---------------------------------------------------------------------- reading files
def load_checkpoint_file(path: str | os.PathLike) -> dict:
    """Read a checkpoint with ``torch.load(map_location='cpu', weights_only=True)``.

    Only tensors, plain containers/scalars and ``argparse.Namespace`` are accepted.
    Raises ``CheckpointNotFoundError`` (a FileNotFoundError) for a missing path,
    ``UnsafeCheckpointError`` when the file needs other Python objects, and ``CheckpointError``
    for a file that is not a PyTorch checkpoint or does not hold a dict.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        what = 'is a directory' if os.path.isdir(path) else 'does not exist'
        raise CheckpointNotFoundError(
            f'checkpoint {path!r} {what}: pass the path of a .pth/.pt file saved with torch.save')
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if 'Weights only load failed' not in msg:
            raise CheckpointError(f'{path!r} is not a readable PyTorch checkpoint ({msg})') from None
        names = sorted(set(re.findall(r'GLOBAL ([\w.]+)', msg)))
        needs = ', '.join(names) if names else 'Python objects other than tensors and argparse.Namespace'
        raise UnsafeCheckpointError(
            f'refusing to unpickle {path!r}: it needs {needs}, which is not on the allow-list '
            f'(tensors, plain containers, argparse.Namespace), and unpickling it could run code. '
            f'If you trust the file, convert it once in a separate session: load it there with '
            f'torch.load(..., weights_only=False), keep only its tensors, e.g. '
            f"torch.save({{'model': ckpt['model']}}, 'clean.pth'), and pass the new file."
        ) from None
    except Exception as e:  # not a torch file: zip errors, invalid load keys, EOF, ...
        raise CheckpointError(
            f'{path!r} is not a PyTorch checkpoint ({type(e).__name__}: {e}); expected a file written '
            f'by torch.save, e.g. a released BEiT/mc-BEiT .pth') from None
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(
            f'{path!r} holds a {type(ckpt).__name__}, not a dict: expected a state dict or '
            f"a checkpoint such as {{'model': state_dict, ...}}")
    return ckpt


def hub_cache_path(url: str) -> str:
    """Where torch hub keeps ``url``'s file: ``torch.hub.get_dir()/checkpoints/<basename>``."""
    return os.path.join(torch.hub.get_dir(), 'checkpoints', os.path.basename(urllib.parse.urlparse(url).path))


def _cached_download(url: str, what: str) -> str:
    """The hub-cache copy of ``url`` (:func:`hub_cache_path`), downloaded if absent."""
    name = os.path.basename(urllib.parse.urlparse(url).path)
    if not name:
        raise CheckpointError(f'{what} {url!r}: the URL does not end with a file name')
    dst = hub_cache_path(url)
    if os.path.isfile(dst):
        return dst
    match = torch.hub.HASH_REGEX.search(name)  # as check_hash=True: 'name-<sha256 prefix>.pth'
    try:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        _logger.info('downloading %s to %s', url, dst)
        torch.hub.download_url_to_file(url, dst, match.group(1) if match else None, progress=False)
    except Exception as e:
        where = f'to {what}' if what.startswith('-') else 'instead'
        raise CheckpointError(
            f'could not download {url} ({type(e).__name__}: {e}). Without network access, fetch the file '
            f'elsewhere and put it at {dst} (it is used from there), or pass its local path {where}'
        ) from None
    return dst


def _deepspeed_file(folder: str, what: str) -> str:
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
        f'{what} {folder!r} is a folder but not a DeepSpeed checkpoint: none of {candidates} exists, and it holds no '
        f'checkpoint-<epoch>.pth of a run; pass a checkpoint file, a run\'s output folder or a DeepSpeed folder '
        f'(with a latest file naming the tag folder)')


def _newest_in_run_folder(folder: str) -> Optional[str]:
    """A training run's output folder: its newest ``checkpoint_copy-<E>.pth`` (ConMIM's EMA teacher, the network
    its fine-tuning takes), else its newest whole ``checkpoint-<E>.pth``; None when it has neither."""
    from mcbeit.engine.checkpoint import latest_good_checkpoint  # (the engine imports this module)

    copies = [(int(m.group(1)), p) for p in Path(folder).glob('checkpoint_copy-*.pth')
              if (m := re.fullmatch(r'checkpoint_copy-(\d+)\.pth', p.name))]
    if copies:
        newest = str(max(copies)[1])
        _logger.info('%s: its newest EMA teacher, %s', folder, os.path.basename(newest))
        return newest
    found = latest_good_checkpoint(folder)
    if found is not None:
        _logger.info('%s: its newest checkpoint, %s', folder, found.name)
    return None if found is None else str(found)


def resolve_source(spec: str | os.PathLike, what: str = '--finetune') -> str:
    """The local file behind ``spec``: a file path, a DeepSpeed folder, a training run's output folder (its newest
    checkpoint; ConMIM's: its newest teacher, ``checkpoint_copy-<E>.pth``) or an http(s) URL (hub cache).

    ``what`` names ``spec`` in error messages: the flag that gave it, or e.g. ``'checkpoint'``.
    """
    spec = os.fspath(spec)
    if spec.startswith(('https://', 'http://')):
        return _cached_download(spec, what)
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        deepspeed = os.path.isfile(os.path.join(path, 'latest')) or os.path.isfile(os.path.join(path, DEEPSPEED_FILE))
        newest = None if deepspeed else _newest_in_run_folder(path)
        return newest if newest is not None else _deepspeed_file(path, what)
    if not os.path.isfile(path):
        raise CheckpointNotFoundError(
            f'{what} {spec!r} does not exist: pass a checkpoint file (.pth/.pt/.bin/.safetensors), '
            f'a DeepSpeed checkpoint folder or an https:// URL')
    return path


def read_checkpoint(path: str | os.PathLike) -> Mapping:
    """A ``.safetensors`` file with safetensors, anything else with the safe ``load_checkpoint_file``."""
    path = os.fspath(path)
    if not path.endswith('.safetensors'):
        return load_checkpoint_file(path)
    from safetensors.torch import load_file
    try:
        return load_file(path, device='cpu')
    except Exception as e:
        raise CheckpointError(f'{path!r} is not a readable safetensors file ({type(e).__name__}: {e})') from None


# ---------------------------------------------------------------------- state dicts
def _is_state_dict(d: Mapping) -> bool:
    return len(d) > 0 and all(isinstance(v, torch.Tensor) for v in d.values())


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _WRAPPER_PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def extract_state_dict(ckpt: Mapping, keys: Sequence[str] = ('model', 'module', 'state_dict'),
                       map_names: bool = True) -> Dict[str, torch.Tensor]:
    """Unwrap a checkpoint to its state dict and strip wrapper prefixes from the names.

    The first of ``keys`` present (holding a dict) is taken, as the original's ``--model_key``
    does, repeatedly while the result is not yet a flat name -> tensor dict. A leading
    ``module.`` (DDP / DeepSpeed) or ``_orig_mod.`` (torch.compile) is removed from every key.
    With ``map_names`` an mmpretrain state dict (``{'meta', 'state_dict'}`` files: ``backbone.*``,
    ``neck.*``, ``head.*``) comes back in the original's names (:func:`mcbeit.models.key_maps.from_mmpretrain`;
    its ``target_generator.*`` and ``data_preprocessor.*`` are dropped and logged).
    """
    sd = ckpt
    for _ in range(4):  # nested wrappers, e.g. {'model': {'module': ...}}
        if _is_state_dict(sd):
            break
        inner = next((sd[k] for k in keys if isinstance(sd.get(k), Mapping)), None)
        if inner is None:
            break
        sd = inner
    if not _is_state_dict(sd):
        top = sorted(map(str, ckpt.keys()))[:20]
        raise CheckpointError(
            f'no state dict found: looked under {list(keys)}; the checkpoint has keys {top}')
    out: Dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        out[_strip_prefixes(k)] = v
    if map_names:
        out, _ = _map_mmpretrain(out)
    return out


def _map_mmpretrain(sd: Dict[str, torch.Tensor], model_prefix: str = ''
                    ) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """``sd`` in the original's names when it is an mmpretrain state dict (else unchanged) and the notes of
    :func:`~mcbeit.models.key_maps.from_mmpretrain` (old key -> 'renamed to ...' or why it was dropped).

    With ``model_prefix`` (mmpretrain's own ``prefix='backbone.'``) the keys under it are taken as one ViT's
    (:func:`~mcbeit.models.key_maps.mmpretrain_vit_key`) and the rest are noted as outside the prefix."""
    from mcbeit.models import key_maps

    if not key_maps.is_mmpretrain(sd):
        return sd, {}
    if model_prefix:
        outside = {k: f'outside --model_prefix {model_prefix!r}' for k in sd if not k.startswith(model_prefix)}
        inside = [k for k in sd if k.startswith(model_prefix)]
        if not inside:
            raise CheckpointError(f'--model_prefix {model_prefix!r}: no checkpoint key starts with it '
                                  f'(keys look like {sorted(sd)[:5]})')
        unknown, out, notes = [], {}, dict(outside)
        for k in inside:
            try:
                new = key_maps.mmpretrain_vit_key(k[len(model_prefix):])
            except key_maps.UnmappedKeysError:
                unknown.append(k)
                continue
            out[new], notes[k] = sd[k], key_maps.RENAMED + new
        if unknown:
            raise key_maps.UnmappedKeysError(unknown)
    else:
        out, notes = key_maps.from_mmpretrain(sd)
    renamed, dropped = key_maps.split_notes(notes)
    _logger.info('mmpretrain checkpoint: %d keys renamed to the original BEiT names%s', len(renamed),
                 ''.join(f'; dropped {k} ({why})' for k, why in dropped.items()))
    return out, notes


def select_state_dict(ckpt: Mapping, model_key: str = 'model|module', model_prefix: str = '',
                      renamed: Optional[Dict[str, str]] = None
                      ) -> Tuple[Dict[str, torch.Tensor], Optional[str], Dict[str, str]]:
    """(state dict, key used or None, dropped keys -> reason).

    Takes the first of ``model_key.split('|')`` present (the whole dict when none is; mmpretrain's
    ``state_dict`` when none of them is there), strips ``module.``/``_orig_mod.``, keeps only keys
    starting with ``model_prefix`` and strips it. An mmpretrain state dict comes back in the original's
    names (:mod:`mcbeit.models.key_maps`; with ``--model_prefix backbone.`` as mmpretrain's own
    fine-tuning config loads it); the keys it drops (``target_generator.*``, ``data_preprocessor.*``) are
    among the dropped keys, and ``renamed`` (when given) receives old -> new name for the others.
    """
    keys = [k for k in model_key.split('|') if k]
    flat = _is_state_dict(ckpt)
    used = None if flat else next((k for k in keys if isinstance(ckpt.get(k), Mapping)), None)
    if not flat and used is None and isinstance(ckpt.get('state_dict'), Mapping):
        used = 'state_dict'  # mmengine / mmpretrain checkpoints: {'meta': ..., 'state_dict': ...}
        keys = keys + ['state_dict']
    sd = extract_state_dict(ckpt, keys, map_names=False)
    sd, notes = _map_mmpretrain(sd, model_prefix)
    if notes:
        from mcbeit.models.key_maps import split_notes

        new_names, dropped = split_notes(notes)
        if renamed is not None:
            renamed.update(new_names)
        return sd, used, dropped
    outside: Dict[str, str] = {}
    if model_prefix:
        kept = {k[len(model_prefix):]: v for k, v in sd.items() if k.startswith(model_prefix)}
        if not kept:
            raise CheckpointError(f'--model_prefix {model_prefix!r}: no checkpoint key starts with it '
                                  f'(keys look like {sorted(sd)[:5]})')
        outside = {k: f'outside --model_prefix {model_prefix!r}' for k in sd if not k.startswith(model_prefix)}
        sd = kept
    return sd, used, outside


def _regenerated_buffers(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Non-persistent buffers: the model computes them, a checkpoint's copy is not loaded."""
    persistent = set(model.state_dict().keys())
    return {n: b for n, b in model.named_buffers() if n not in persistent}


def filter_pretraining_state_dict(sd: Mapping, model: nn.Module) -> Dict[str, torch.Tensor]:
    """Make a released (or our own) checkpoint's state dict loadable into ``model``.

    Accepts a whole checkpoint (unwrapped with ``extract_state_dict``: ``model``, ``module`` or mmpretrain's
    ``state_dict``, whose names are mapped to the original's) or a state dict. Drops
    the entries the model regenerates: every ``relative_position_index`` (timm keeps them
    non-persistent) and any other key naming one of the model's non-persistent buffers (e.g. a
    zero ``k_bias``). A dropped index that differs from the model's own is logged as a warning.
    Nothing else is changed: keys the model lacks stay, so ``load_into`` reports them.
    """
    sd = extract_state_dict(sd)
    regenerated = _regenerated_buffers(model)
    out: Dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k.endswith('relative_position_index') or k in regenerated:
            own = regenerated.get(k)
            if own is not None and own.shape == v.shape and not torch.equal(own.to(v.device, v.dtype), v):
                _logger.warning('checkpoint %s differs from the index the model computes; using the '
                                "model's", k)
            continue
        if k.endswith('.k_bias') and not torch.count_nonzero(v):
            continue  # original BEiT has no key bias; a zero one is what timm uses anyway
        out[k] = v
    return out


def compare_state_dict(model: nn.Module, sd: Mapping[str, torch.Tensor]) -> LoadReport:
    """Missing / unexpected keys and shape mismatches of ``sd`` against ``model.state_dict()``."""
    own = model.state_dict()
    report = LoadReport()
    report.missing = [k for k in own if k not in sd]
    report.unexpected = [k for k in sd if k not in own]
    report.mismatched = [
        (k, tuple(v.shape), tuple(own[k].shape)) for k, v in sd.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)]
    return report


def load_into(model: nn.Module, sd: Mapping[str, torch.Tensor], strict: bool = True) -> LoadReport:
    """Load ``sd`` into ``model`` and report what did not match, by name.

    strict=True: any missing key, unexpected key or shape mismatch raises
    ``StateDictMismatchError`` naming each one (key, checkpoint shape, model shape), and the model
    is left unchanged. strict=False: the matching entries are loaded, the rest are logged
    (warning) and returned in the ``LoadReport``.
    """
    report = compare_state_dict(model, sd)
    if strict and report:
        raise StateDictMismatchError(
            f'checkpoint does not match {type(model).__name__}: {len(report.missing)} missing, '
            f'{len(report.unexpected)} unexpected, {len(report.mismatched)} shape mismatches\n'
            + report.describe(), report)
    if report:
        _logger.warning('loading a partial state dict into %s:\n%s', type(model).__name__, report.describe())
    bad = {k for k, _, _ in report.mismatched}
    model.load_state_dict({k: v for k, v in sd.items() if k not in bad}, strict=strict)
    return report


def holds_whole_model(ckpt: Mapping, model_key: str, backbone_prefix: str, head_prefix: str) -> bool:
    """True when the file's state dict (under ``model_key``'s keys or ``state_dict``) is a whole dense model's:
    keys under ``backbone_prefix`` beside keys under ``head_prefix`` (a segmentor's ``backbone.`` + ``decode_head.``,
    a detector's ``backbone.body.`` + ``roi_heads.``), so its backbone is read with that prefix stripped."""
    keys = [k for k in model_key.split('|') if k] + ['state_dict']
    try:
        sd = extract_state_dict(ckpt, keys, map_names=False)
    except CheckpointError:  # no state dict: the conversion says so
        return False
    return any(k.startswith(backbone_prefix) for k in sd) and any(k.startswith(head_prefix) for k in sd)
