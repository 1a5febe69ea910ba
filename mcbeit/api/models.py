"""``list_models`` / ``get_model``: a name or a file -> the model in eval mode, with its preprocessing attached.

What ``get_model`` accepts (:func:`get_model`):

* a checkpoint of any command here, or a run's output folder (its newest checkpoint; ConMIM's: its newest EMA
  teacher), the kind read from the file's ``format``:

  ========================  ==================  =================================================================
  written by                kind                model (``extract_feat(x)`` returns)
  ========================  ==================  =================================================================
  mcbeit-pretrain(-beit)    ``'pretrain'``      the MIM ViT with its token head; (B,1+N,D) tokens after the norm
  mcbeit-pretrain-beitv2    ``'pretrain'``      + patch aggregation; ``(early, last)``: (B,1+N,D) each (below)
  mcbeit-pretrain-conmim    ``'pretrain'``      the EMA teacher (what fine-tuning takes); (B,1+N,D) after the norm
  mcbeit-finetune           ``'classifier'``    timm ``Beit``; the pooled feature (B,D) the head reads
  mcbeit-linprobe           ``'classifier'``    :class:`~mcbeit.models.linear_probe.LinearProbe`; its feature (B,D)
  mcbeit-seg                ``'segmentation'``  UperNet; the neck's 4 maps (B,D,H/4..H/32,.) (H: the crop)
  mcbeit-det                ``'detection'``     Mask R-CNN; the FPN's levels '0'..'3', 'pool' (B,C,S/4..S/64,.)
  mcbeit-export             ``'classifier'``    the exported folder (``config.json`` + ``model.safetensors``)
  ========================  ==================  =================================================================

  BEiT v2's ``extract_feat`` returns what its patch aggregation reads: the tokens after block ``early_layers``
  (before any norm) and after the last block and the final norm. mmpretrain's BEiT v2 backbone returns the outputs
  of the same two blocks (its ``out_indices=[-4, -1]`` at 12 blocks), both without the final norm (its norm sits in
  the neck); the first is the same tensor, the last differs by that norm.
* released files: unilm's / mc-BEiT's / BEiT v2's / ConMIM's pre-training ``.pth`` (and mmpretrain's names of
  them), fine-tuned classifiers (unilm, mmpretrain, timm safetensors). A released segmentor or detector needs its
  config: ``get_model(PRESET, pretrained=FILE)``.
* a name: :func:`list_models` lists them: timm's BEiT family and this package's pre-training models
  (``beit_base_patch16_224_8k_vocab``, ``..._cls_pt``, ``conmim_base_patch16_224``), the seed's mmpretrain names
  (``beitv2_beit-base-p16_8xb256-amp-coslr-300e_in1k``, ...), and the segmentation and detection presets (the
  seeds' config names). ``pretrained=FILE`` loads weights into it; ``pretrained=True`` reads the released file
  from a local cache (torch hub's for URLs, Hugging Face's for timm's) and otherwise says which file to pass:
  nothing is downloaded.

The model comes back in eval mode on ``device`` (CUDA when there is one), with ``model.pretrained_cfg`` (timm's
preprocessing keys: ``input_size``, ``mean``, ``std``, ``crop_pct``, ``interpolation``), ``model.mcbeit``
(:class:`ModelInfo`) and ``model.extract_feat``.
"""
from __future__ import annotations

import fnmatch
import logging
import os
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

from mcbeit.errors import InputError
from mcbeit.models.checkpoint import hub_cache_path

__all__ = ["ModelInfo", "list_models", "get_model", "data_config", "hub_cache_path", "KINDS", "SEED_MODELS"]

log = logging.getLogger(__name__)

KINDS = ("pretrain", "classifier", "segmentation", "detection")
_MMPRETRAIN = "https://download.openmmlab.com/mmselfsup/1.x/beitv2/beitv2_vit-base-p16_8xb256-amp-coslr-300e_in1k/"


@dataclass(frozen=True)
class SeedModel:
    """A name of seed 003 (mmpretrain's BEiT v2 configs) as this package builds it, and its released file."""
    kind: str
    arch: str  # timm name
    kwargs: Mapping[str, Any]
    url: str
    imagenet_norm: bool = True
    method: Optional[str] = None


#: seed 003's mmpretrain names -> this package's model of the same architecture (mmpretrain's files load into it)
SEED_MODELS: dict[str, SeedModel] = {
    "beitv2_beit-base-p16_8xb256-amp-coslr-300e_in1k": SeedModel(
        "pretrain", "beit_base_patch16_224_8k_vocab_cls_pt",
        dict(vocab_size=8192, early_layers=9, head_layers=2, shared_lm_head=True),
        _MMPRETRAIN + "beitv2_vit-base-p16_8xb256-amp-coslr-300e_in1k_20221212-a157be30.pth", method="beitv2"),
    "beit-base-p16_beitv2-pre_8xb128-coslr-100e_in1k": SeedModel(
        "classifier", "beit_base_patch16_224", dict(num_classes=1000, global_pool="avg"),
        _MMPRETRAIN + "vit-base-p16_ft-8xb128-coslr-100e_in1k/vit-base-p16_ft-8xb128-coslr-100e_in1k_20221212-d1c0789e.pth"),
    "beit-base-p16_beitv2-in21k-pre_3rdparty_in1k": SeedModel(
        "classifier", "beit_base_patch16_224", dict(num_classes=1000, global_pool="avg"),
        "https://download.openmmlab.com/mmclassification/v0/beit/beitv2-base_3rdparty_in1k_20221114-73e11905.pth"),
}


@dataclass
class ModelInfo:
    """What ``get_model`` knows about a model beyond its weights (``model.mcbeit``).

    ``kind``: one of :data:`KINDS`; ``name``: its architecture or preset; ``source``: the file its weights came from
    (None: random); ``classes``: class names by label (classifier: index = label; segmentation: index = value of the
    label map; detection: label i+1 = ``classes[i]``), empty when unknown; ``method``: for a pre-training model,
    ``'mcbeit'``, ``'beit'``, ``'beitv2'`` or ``'conmim'``; ``settings``: what inference needs (the checkpoint's
    flags: a segmentor's test pipeline, a detector's input size, a pre-training model's masks and tokenizer)."""
    kind: str
    name: str
    source: Optional[str] = None
    classes: list = field(default_factory=list)
    method: Optional[str] = None
    settings: dict = field(default_factory=dict)


# ---------------------------------------------------------------------- names
def _timm_names() -> list[str]:
    import timm

    import mcbeit.models  # noqa: F401  (registers this package's names)

    return sorted(n for n in timm.list_models(["beit_*", "beitv2_*", "conmim_*"]) if not n.startswith("beit3"))


def _preset_names() -> dict[str, str]:
    from mcbeit.config.detection import PRESETS as DET
    from mcbeit.config.segmentation import PRESETS as SEG

    return {**{n: "segmentation" for n in SEG}, **{n: "detection" for n in DET}}


def list_models(pattern: str = "*", kind: Optional[str] = None) -> list[str]:
    """Model names ``get_model`` builds, matching ``pattern`` (fnmatch, case-insensitive), optionally of one ``kind``
    (``'pretrain'``, ``'classifier'``, ``'segmentation'``, ``'detection'``)."""
    if kind is not None and kind not in KINDS:
        raise InputError(f"kind={kind!r}: choose one of {KINDS}")
    names = {n: _name_kind(n) for n in _timm_names()}
    names.update({n: m.kind for n, m in SEED_MODELS.items()})
    names.update(_preset_names())
    pattern = pattern.lower()
    return sorted(n for n, k in names.items() if fnmatch.fnmatch(n.lower(), pattern) and kind in (None, k))


def _name_kind(name: str) -> str:
    return "pretrain" if "_8k_vocab" in name or name.startswith("conmim_") else "classifier"


# ---------------------------------------------------------------------- get_model
def _device(device: Optional[str | torch.device]) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _is_file_spec(spec: str) -> bool:
    return (os.path.exists(os.path.expanduser(spec)) or os.sep in spec or spec.startswith(("http://", "https://"))
            or spec.endswith((".pth", ".pt", ".bin", ".safetensors", ".ckpt")))


def get_model(model: str | os.PathLike | nn.Module, pretrained: bool | str | os.PathLike = False,
              device: Optional[str | torch.device] = None, **kwargs: Any) -> nn.Module:
    """The model ``model`` names or holds (module doc), in eval mode on ``device``, with ``pretrained_cfg``,
    ``mcbeit`` (:class:`ModelInfo`) and ``extract_feat``.

    ``pretrained``: for a name, False (random weights), a file (a checkpoint of ours or a released one: loaded and
    every key accounted for), or True (the released file from a local cache, else an error naming the file to
    pass). A file given as ``model`` has its weights already; ``pretrained`` must then be left out. ``kwargs`` go
    to the builder of a timm name (``num_classes``, ``img_size``, ``drop_path_rate``, ...) and, for a preset, set
    ``num_classes``.
    """
    target = _device(device)
    if isinstance(model, nn.Module):
        if not hasattr(model, "mcbeit"):
            raise InputError("get_model(module): pass a model get_model returned, or a name or a checkpoint file")
        return model.to(target).eval()
    spec = os.fspath(model)
    if spec in SEED_MODELS or spec in _preset_names() or spec in _timm_names():
        built = _from_name(spec, pretrained, kwargs)
    elif _is_file_spec(spec):
        if pretrained not in (False, None):
            raise InputError(f"get_model({spec!r}, pretrained={pretrained!r}): {spec} is a file with its weights "
                             "already; pretrained= goes with a model name (mcbeit.list_models())")
        if kwargs:
            raise InputError(f"get_model({spec!r}): {sorted(kwargs)} apply to model names only; a checkpoint is "
                             "rebuilt as it was trained")
        from mcbeit.api.checkpoints import model_from_file

        built = model_from_file(spec)
    else:
        close = list_models(f"*{spec.split('_')[0]}*")[:8] if spec else []
        raise InputError(f"get_model({spec!r}): neither a file nor a model name; names: mcbeit.list_models() "
                         f"{'(e.g. ' + ', '.join(close) + ')' if close else ''}")
    return built.to(target).eval()


def _from_name(name: str, pretrained: bool | str | os.PathLike, kwargs: dict) -> nn.Module:
    from mcbeit.api import checkpoints as files

    file = _pretrained_file(name, pretrained) if pretrained not in (False, None) else None
    presets = _preset_names()
    if name in presets:
        return files.preset_model(name, presets[name], file, kwargs)
    seed = SEED_MODELS.get(name)
    arch, kind = (seed.arch, seed.kind) if seed else (name, _name_kind(name))
    build_kwargs = {**(seed.kwargs if seed else {}), **kwargs}
    if kind == "pretrain":
        method = seed.method if seed else files.method_of_name(arch)
        return files.named_pretraining_model(name, arch, method, build_kwargs, file,
                                             imagenet_norm=seed.imagenet_norm if seed else None)
    return files.named_classifier(name, arch, build_kwargs, file,
                                  imagenet_norm=seed.imagenet_norm if seed else None)


def _release_of(name: str) -> tuple[Optional[str], Optional[str]]:
    """(URL, Hugging Face hub id) of a name's released weights, where one is known."""
    if name in SEED_MODELS:
        return SEED_MODELS[name].url, None
    try:
        import timm

        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # noqa: BLE001 - a name timm has no configuration for
        cfg = None
    if cfg is None:
        return None, None
    return (cfg.url or None), (cfg.hf_hub_id or None)


def _pretrained_file(name: str, pretrained: bool | str | os.PathLike) -> str:
    if pretrained is not True:
        return os.fspath(pretrained)
    url, hub_id = _release_of(name)
    if url:
        cached = hub_cache_path(url)
        if os.path.isfile(cached):
            return cached
    if hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache

            for filename in ("model.safetensors", "pytorch_model.bin"):
                found = try_to_load_from_cache(hub_id.split("@")[0], filename)
                if isinstance(found, str) and os.path.isfile(found):
                    return found
        except ImportError:  # pragma: no cover - timm depends on huggingface_hub
            pass
    where = []
    if url:
        where.append(f"{url} (put it at {hub_cache_path(url)} and pretrained=True finds it)")
    if hub_id:
        where.append(f"the Hugging Face hub's {hub_id} (model.safetensors; once in the local hub cache, "
                     "pretrained=True finds it)")
    if not where:
        where.append("a checkpoint of this package (e.g. mcbeit-pretrain's output folder) or a released file of "
                     "this architecture")
    raise InputError(f"get_model({name!r}, pretrained=True): nothing is downloaded here and no local copy was "
                     f"found; pass pretrained='<file>': {'; or '.join(where)}")


# ---------------------------------------------------------------------- preprocessing and features
def data_config(model: nn.Module) -> dict[str, Any]:
    """The preprocessing of ``model`` (timm's data-config keys): ``input_size`` (3,H,W), ``interpolation``,
    ``crop_pct``, ``crop_mode``, ``mean``, ``std``; dense models add their test pipeline's keys (segmentation:
    ``img_scale``, ``test_mode``, ``stride``; detection: ``image_size``, images in 0-1, normalised inside)."""
    cfg = getattr(model, "pretrained_cfg", None)
    if not isinstance(cfg, Mapping):
        raise InputError("data_config(model): the model has no pretrained_cfg; build it with mcbeit.get_model")
    keys = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std", "img_scale", "test_mode",
            "stride", "image_size", "aug_test", "eval_ratios")
    return {k: (tuple(cfg[k]) if isinstance(cfg[k], list) else cfg[k]) for k in keys if k in cfg}


def finish(model: nn.Module, info: ModelInfo, preprocessing: Mapping[str, Any],
           extract_feat: Optional[Callable[..., Any]] = None) -> nn.Module:
    """Attach what ``get_model`` promises: ``model.mcbeit``, ``model.pretrained_cfg`` (the model's own timm
    configuration, if any, updated with ``preprocessing``) and, where the class has none, ``model.extract_feat``."""
    own = getattr(model, "pretrained_cfg", None)
    cfg = dict(own) if isinstance(own, Mapping) else {}
    cfg.update({k: v for k, v in preprocessing.items() if v is not None})
    cfg.setdefault("crop_mode", "center")
    if info.classes:
        cfg["label_names"] = list(info.classes)
    model.pretrained_cfg = cfg
    model.mcbeit = info
    if extract_feat is not None:
        model.extract_feat = types.MethodType(extract_feat, model)
    elif not callable(getattr(model, "extract_feat", None)):
        raise TypeError(f"{type(model).__name__} has no extract_feat")  # pragma: no cover - every kind has one
    return model


def classifier_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A timm ``Beit`` classifier's ``extract_feat``: (B,3,H,W) -> the pooled feature (B,D) its head reads (mean
    of the patch tokens after ``fc_norm``, or the CLS token after ``norm``)."""
    return model.forward_head(model.forward_features(x), pre_logits=True)


def imagenet_classes() -> list[str]:
    """ImageNet-1k's class names (torchvision's list, shipped with it)."""
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])
