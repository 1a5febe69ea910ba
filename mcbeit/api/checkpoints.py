"""Rebuilding a model from a file: the kind read from the checkpoint's ``format``, the architecture from its flags
(``args``, through the command's own configuration class: the same builder the command trained with) or, for a
released file, from its weights. Used by :func:`mcbeit.api.get_model`."""
from __future__ import annotations

import dataclasses
import logging
import os
from argparse import Namespace
from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch import nn

from mcbeit.api.models import ModelInfo, classifier_features, finish, hub_cache_path, imagenet_classes
from mcbeit.errors import InputError
from mcbeit.models.checkpoint import (CheckpointError, extract_state_dict, filter_pretraining_state_dict,
                                      holds_whole_model, load_into, read_checkpoint, resolve_source)

__all__ = ["model_from_file", "preset_model", "named_pretraining_model", "named_classifier", "method_of_name"]

log = logging.getLogger(__name__)

_TOKENIZER_FORMATS = ("mcbeit-tokenizer-v1", "mcbeit-vqkd-v1")


def _args(ckpt: Mapping) -> dict:
    args = ckpt.get("args")
    if isinstance(args, Namespace):
        return dict(vars(args))
    return dict(args) if isinstance(args, Mapping) else {}


def _local(spec: str) -> str:
    """The local file or folder behind ``spec``; a URL only from torch hub's cache (nothing is downloaded)."""
    if spec.startswith(("https://", "http://")):
        cached = hub_cache_path(spec)
        if not os.path.isfile(cached):
            raise InputError(f"{spec}: nothing is downloaded here; fetch the file and pass its path (or put it at "
                             f"{cached}, where a URL is looked up)")
        return cached
    try:
        return resolve_source(spec, "checkpoint")
    except CheckpointError as exc:
        raise InputError(str(exc)) from None


def model_from_file(spec: str) -> nn.Module:
    """A checkpoint file, a run's output folder, a DeepSpeed folder, an ``mcbeit-export`` folder or a released
    file -> the model it holds (weights loaded, every key accounted for)."""
    folder = os.path.expanduser(spec)
    if os.path.isdir(folder) and all(os.path.isfile(os.path.join(folder, f))
                                     for f in ("config.json", "model.safetensors")):
        return _exported(folder)
    path = _local(spec)
    try:
        ckpt = read_checkpoint(path)
    except CheckpointError as exc:
        raise InputError(str(exc)) from None
    fmt = ckpt.get("format") if isinstance(ckpt, Mapping) else None
    if fmt == "mcbeit-pretrain-v1" or ckpt.get("role") == "teacher":
        return _pretraining(ckpt, path)
    if fmt == "mcbeit-finetune-v1":
        return _finetuned(ckpt, path)
    if fmt == "mcbeit-seg-v1":
        return _segmentor(ckpt, path)
    if fmt == "mcbeit-det-v1":
        return _detector(ckpt, path)
    if fmt in _TOKENIZER_FORMATS or ckpt.get("kind") == "customized":
        raise InputError(f"{path} is a tokenizer (written by mcbeit-tokenizer / mcbeit-vqkd), not a model: build it "
                         f"with mcbeit.build_tokenizer(KIND, {path!r}) / mcbeit.build_vqkd_tokenizer, or pass it as "
                         "inference_model(..., tokenizer=) of a pre-training model")
    if fmt is not None:
        raise InputError(f"{path}: a checkpoint of format {fmt!r}, which get_model does not know")
    return _released(ckpt, path)


# ---------------------------------------------------------------------- pre-training models
def method_of_name(name: str) -> str:
    if name.startswith("conmim_"):
        return "conmim"
    return "beitv2" if name.endswith("_cls_pt") else "mcbeit"


def _config_class(method: str):
    from mcbeit.config.pretrain import BeitPretrainConfig, BeitV2PretrainConfig, ConMIMPretrainConfig, PretrainConfig

    return {"mcbeit": PretrainConfig, "beit": BeitPretrainConfig, "beitv2": BeitV2PretrainConfig,
            "conmim": ConMIMPretrainConfig}[method]


def _method_of(sd: Mapping[str, torch.Tensor], args: Mapping[str, Any]) -> str:
    """The pre-training method of a state dict and its flags (recorded as ``method`` since this API; inferred for
    older files and released ones: projectors = ConMIM, patch aggregation or a VQ-KD tokenizer = BEiT v2, hard
    targets = BEiT, else mc-BEiT)."""
    if args.get("method"):
        return str(args["method"])
    if any(k.startswith("projectors.") for k in sd):
        return "conmim"
    if any(k.startswith("cls_pt_layers.") for k in sd) or args.get("tokenizer_weight") is not None \
            or args.get("discrete_vae_type") == "vqkd":
        return "beitv2"
    if args.get("hard_targets"):
        return "beit"
    return "mcbeit"


def _size_of_width(width: int) -> tuple[Optional[str], Optional[int]]:
    """(size name, heads) of a BEiT width (the family's sizes: models.segmentation's table), or (None, None)."""
    from mcbeit.models.segmentation import BEIT_SIZES

    return next(((name, heads) for name, (dim, _, heads) in BEIT_SIZES.items() if dim == width), (None, None))


def _mim_kwargs(sd: Mapping[str, torch.Tensor], method: str, args: Mapping[str, Any]) -> tuple[str, dict]:
    """(timm name, create_model kwargs) of the MIM model whose weights ``sd`` are (width, depth, tables, layer
    scale, vocabulary, grid and the method's heads all read from the weights; the name from the flags if given)."""
    from mcbeit.models.export import architecture_from_weights, grid_side

    width = int(sd["patch_embed.proj.weight"].shape[0])
    patch = int(sd["patch_embed.proj.weight"].shape[-1])
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    size, heads = _size_of_width(width)
    table = sd.get("rel_pos_bias.relative_position_bias_table", sd.get("blocks.0.attn.relative_position_bias_table"))
    if table is not None:
        heads = int(table.shape[1])
    name = args.get("model")
    if not name:
        if size is None:
            raise InputError(f"a pre-training state dict of width {width}: not a BEiT size (192, 384, 768, 1024)")
        name = {"conmim": f"conmim_{size}_patch16_224", "beitv2": f"beit_{size}_patch16_224_8k_vocab_cls_pt"}.get(
            method, f"beit_{size}_patch16_224_8k_vocab")
        if method == "beitv2" and not any(k.startswith("cls_pt_layers.") for k in sd):
            name = name[:-len("_cls_pt")]
    side = grid_side(sd)
    arch = architecture_from_weights(sd)  # the position parameters and layer scale the weights hold
    kwargs: dict[str, Any] = dict(
        depth=depth, num_heads=heads, embed_dim=width, use_shared_rel_pos_bias=arch["use_shared_rel_pos_bias"],
        use_abs_pos_emb=arch["use_abs_pos_emb"], init_values=arch["init_values"],
        img_size=side * patch if side else int(args.get("input_size") or 224))
    if method == "conmim":
        kwargs.update(proj_hidden_dim=int(sd["projectors.0.weight"].shape[0]),
                      proj_dim=int(sd["projectors.6.weight"].shape[0]))
    else:
        kwargs["vocab_size"] = int(sd["lm_head.weight"].shape[0])
    if name.endswith("_cls_pt"):
        head_layers = len({k.split(".")[1] for k in sd if k.startswith("cls_pt_layers.")})
        kwargs.update(head_layers=head_layers, shared_lm_head="cls_pt_lm_head.weight" not in sd,
                      early_layers=int(args.get("early_layers") or max(1, depth - 3)))
    return name, kwargs


def _mim_info(name: str, method: str, args: Mapping[str, Any], source: Optional[str], model: nn.Module,
              imagenet_norm: Optional[bool] = None) -> tuple[ModelInfo, dict]:
    """The pre-training model's info (its masks and tokenizer, by its method's configuration: the file's flags
    over the method's defaults) and its preprocessing."""
    from mcbeit.config.fields import from_flags
    from mcbeit.data.transforms import normalisation

    cfg = from_flags(_config_class(method), args)
    size = int(model.patch_embed.img_size[0])
    if imagenet_norm is None:  # released files without flags: BEiT v2 and ConMIM take ImageNet's mean / std
        imagenet_norm = bool(args["imagenet_default_mean_and_std"]) if "imagenet_default_mean_and_std" in args \
            else method in ("beitv2", "conmim")
    mean, std = normalisation(imagenet_norm)
    tokenizer = {k: getattr(cfg, k) for k in ("discrete_vae_type", "discrete_vae_weight_path", "tokenizer_weight",
                                              "tokenizer_model", "codebook_size", "codebook_dim") if hasattr(cfg, k)}
    patches, default = int(model.patch_embed.num_patches), 196  # the recipes' counts are for 14 x 14 patches
    num, least = cfg.num_mask_patches, cfg.min_mask_patches_per_block
    if "num_mask_patches" not in args and patches != default:  # a model built by name at another size
        num = max(1, round(num * patches / default))
        least = max(1, min(num, round(least * patches / default)))
    settings = dict(
        input_size=size, second_input_size=int(getattr(cfg, "second_input_size", None) or size),
        mask_type=cfg.mask_type, num_mask_patches=num, mask_ratio=cfg.mask_ratio, min_mask_patches_per_block=least,
        max_mask_patches_per_block=cfg.max_mask_patches_per_block, exact_masks=method == "beitv2",
        second_interpolation=getattr(cfg, "second_interpolation", "lanczos"), tokenizer=tokenizer)
    pre = dict(input_size=(3, size, size), interpolation="bicubic", crop_pct=1.0, mean=tuple(mean), std=tuple(std))
    return ModelInfo("pretrain", name, source, [], method, settings), pre


def _pretraining(ckpt: Mapping, path: str) -> nn.Module:
    import timm

    args = _args(ckpt)
    # ConMIM: the EMA teacher is the network the method produces (fine-tuning takes it); a checkpoint-E.pth has
    # it under 'teacher', its checkpoint_copy-E.pth under 'model'
    sd = extract_state_dict({"model": ckpt["teacher"]} if isinstance(ckpt.get("teacher"), Mapping) else ckpt)
    method = _method_of(sd, args)
    name, kwargs = _mim_kwargs(sd, method, args)
    model = timm.create_model(name, pretrained=False, **kwargs)
    load_into(model, filter_pretraining_state_dict(sd, model), strict=True)
    info, pre = _mim_info(name, method, args, path, model)
    return finish(model, info, pre)


def named_pretraining_model(name: str, arch: str, method: str, kwargs: Mapping[str, Any], file: Optional[str],
                            imagenet_norm: Optional[bool] = None) -> nn.Module:
    """``arch`` with ``kwargs`` (random weights), the weights of ``file`` loaded strictly when given."""
    import timm

    model = timm.create_model(arch, pretrained=False, **kwargs)
    if file is not None:
        path = _local(file)
        load_into(model, filter_pretraining_state_dict(read_checkpoint(path), model), strict=True)
    info, pre = _mim_info(name, method, {}, file and _local(file), model, imagenet_norm)
    return finish(model, info, pre)


# ---------------------------------------------------------------------- classifiers
def _classifier_classes(ckpt: Mapping, num_classes: int) -> list:
    classes = [str(c) for c in (ckpt.get("classes") or [])]
    if not classes and num_classes == 1000:
        classes = imagenet_classes()  # a 1000-way head without names: ImageNet-1k's
    return classes if len(classes) == num_classes else []


def _finetuned(ckpt: Mapping, path: str) -> nn.Module:
    from mcbeit.config.fields import from_flags
    from mcbeit.config.finetune import FinetuneConfig
    from mcbeit.models.export import eval_data_config
    from mcbeit.models.linear_probe import LinearProbe

    args = _args(ckpt)
    cfg = from_flags(FinetuneConfig, args)
    nb = int(args.get("nb_classes") or 0)
    if nb <= 0:
        raise InputError(f"{path}: the checkpoint does not record its number of classes (nb_classes)")
    model = cfg.build_classifier(nb)
    extract = classifier_features
    if cfg.linear_probe:
        model, extract = LinearProbe(model, nb, cfg.probe_layer, cfg.probe_pool), None
    load_into(model, extract_state_dict(ckpt, ("model", "module")), strict=True)
    info = ModelInfo("classifier", cfg.model, path, _classifier_classes(ckpt, nb), None,
                     {"linear_probe": bool(cfg.linear_probe)})
    return finish(model, info, eval_data_config(args, cfg.input_size), extract)


def named_classifier(name: str, arch: str, kwargs: Mapping[str, Any], file: Optional[str],
                     imagenet_norm: Optional[bool] = None) -> nn.Module:
    """timm's ``arch`` with ``kwargs``; ``file`` through the BEiT family's one conversion (a head of another size
    is left fresh and said so)."""
    import timm

    from mcbeit.config.finetune import uses_imagenet_mean_and_std
    from mcbeit.models.beit_weights import load_pretrained
    from mcbeit.models.export import eval_data_config

    model = timm.create_model(arch, pretrained=False, **kwargs)
    source = None
    if file is not None:
        source = _local(file)
        report = load_pretrained(model, source)
        if report.fresh:
            log.warning("%s: no weights in %s for %s (left at their initialisation)", name, file,
                        ", ".join(report.fresh[:6]))
    imagenet = uses_imagenet_mean_and_std(arch) if imagenet_norm is None else imagenet_norm
    pre = eval_data_config({"imagenet_default_mean_and_std": imagenet}, int(model.patch_embed.img_size[0]))
    classes = imagenet_classes() if model.num_classes == 1000 else []
    return finish(model, ModelInfo("classifier", name, source, classes), pre, classifier_features)


def _exported(folder: str) -> nn.Module:
    """An ``mcbeit-export`` folder, through timm's own ``local-dir:`` loader."""
    import timm

    model = timm.create_model(f"local-dir:{os.path.abspath(folder)}", pretrained=True)
    cfg = dict(model.pretrained_cfg)
    classes = list(cfg.get("label_names") or [])
    if not classes and model.num_classes == 1000:
        classes = imagenet_classes()
    info = ModelInfo("classifier", type(model).__name__, folder, classes if len(classes) == model.num_classes else [])
    return finish(model, info, cfg, classifier_features)


# ---------------------------------------------------------------------- dense models
def _seg_settings(cfg) -> dict:
    """The test pipeline (its ``transform``: mmseg's resize, views) and the sliding window of ``cfg``."""
    return dict(img_scale=tuple(cfg.img_scale), test_mode=cfg.test_mode, stride=cfg.stride_or_default,
                aug_test=bool(cfg.aug_test), eval_ratios=tuple(cfg.eval_ratios), crop_size=cfg.crop_size,
                transform=cfg.test_transform())


def _seg_preprocessing(cfg) -> dict:
    from mcbeit.data.seg_transforms import IMAGENET_MEAN_255, IMAGENET_STD_255

    return dict(input_size=(3, cfg.crop_size, cfg.crop_size), interpolation="bilinear", crop_pct=1.0,
                mean=tuple(m / 255 for m in IMAGENET_MEAN_255), std=tuple(s / 255 for s in IMAGENET_STD_255),
                **{k: v for k, v in _seg_settings(cfg).items() if k != "transform"})


def _segmentor(ckpt: Mapping, path: str) -> nn.Module:
    from mcbeit.config.fields import from_flags
    from mcbeit.config.segmentation import SegmentationConfig
    from mcbeit.models.segmentation import load_segmentation_checkpoint

    args = _args(ckpt)
    cfg = from_flags(SegmentationConfig, args)
    num_classes = int(ckpt.get("num_classes") or args.get("num_classes") or 0)
    model = cfg.build_segmentor(num_classes)
    load_segmentation_checkpoint(model, path)
    classes = [str(c) for c in ckpt.get("classes") or []]
    info = ModelInfo("segmentation", str(args.get("config") or cfg.model), path,
                     classes if len(classes) == num_classes else [], None, _seg_settings(cfg))
    return finish(model, info, _seg_preprocessing(cfg))


def _det_preprocessing(cfg) -> dict:
    from mcbeit.models.detection import IMAGENET_MEAN, IMAGENET_STD

    return dict(input_size=(3, cfg.image_size, cfg.image_size), interpolation="bilinear", crop_pct=1.0,
                mean=IMAGENET_MEAN, std=IMAGENET_STD, image_size=cfg.image_size)


def _detector(ckpt: Mapping, path: str) -> nn.Module:
    from mcbeit.config.detection import DetectionConfig
    from mcbeit.config.fields import from_flags
    from mcbeit.models.detection import load_detection_checkpoint

    args = _args(ckpt)
    cfg = dataclasses.replace(from_flags(DetectionConfig, args), grad_checkpointing=False)
    num_classes = int(ckpt.get("num_classes") or args.get("num_classes") or 0)
    model = cfg.build_detector(num_classes)
    load_detection_checkpoint(model, path)
    categories = [tuple(c) for c in ckpt.get("categories") or []]
    info = ModelInfo("detection", str(args.get("config") or cfg.model), path, [str(n) for _, n in categories],
                     None, dict(image_size=cfg.image_size, category_ids=[int(i) for i, _ in categories]))
    return finish(model, info, _det_preprocessing(cfg))


def _coco_categories() -> list[tuple[int, str]]:
    """COCO's 80 (category id, name) pairs: torchvision's list, shipped with it, is indexed by the category id."""
    from torchvision.models.detection import MaskRCNN_ResNet50_FPN_V2_Weights

    names = MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1.meta["categories"]
    return [(i, c) for i, c in enumerate(names) if c not in ("__background__", "N/A")]


def _load_dense(model: nn.Module, source: Optional[str], prefixes: tuple[str, str], load_whole, load_backbone) -> None:
    """A whole dense model's file (its backbone and head ``prefixes``) loads whole; another is a backbone's."""
    if source is None:
        return
    if holds_whole_model(read_checkpoint(source), "model|module", *prefixes):
        load_whole(model, source)
    else:
        log.info("%s", load_backbone(model, source).summary("backbone from"))


def preset_model(name: str, kind: str, file: Optional[str], kwargs: Mapping[str, Any]) -> nn.Module:
    """A segmentation / detection preset (the seeds' config names) with ``num_classes`` (ADE20K's 150 / COCO's 80
    by default); ``file``: a whole model's weights (a checkpoint of ours, unilm's released ADE20K files), or a
    backbone's (a pre-training or fine-tuning file, through the BEiT conversion: the rest stays fresh)."""
    unknown = sorted(set(kwargs) - {"num_classes"})
    if unknown:
        raise InputError(f"get_model({name!r}): a preset takes num_classes= only, not {unknown}")
    source = _local(file) if file is not None else None
    if kind == "segmentation":
        from mcbeit.config.segmentation import PRESETS, SegmentationConfig
        from mcbeit.data.segmentation import ADE20K_CLASSES
        from mcbeit.models import segmentation

        cfg = SegmentationConfig(**PRESETS[name])
        num_classes = int(kwargs.get("num_classes", 150))
        model = cfg.build_segmentor(num_classes)
        _load_dense(model, source, ("backbone.", "decode_head."), segmentation.load_segmentation_checkpoint,
                    segmentation.load_backbone_weights)
        classes = list(ADE20K_CLASSES) if num_classes == 150 else []
        info = ModelInfo("segmentation", name, source, classes, None, _seg_settings(cfg))
        return finish(model, info, _seg_preprocessing(cfg))
    from mcbeit.config.detection import PRESETS, DetectionConfig
    from mcbeit.models import detection

    cfg = DetectionConfig(**PRESETS[name])
    num_classes = int(kwargs.get("num_classes", 80))
    model = cfg.build_detector(num_classes)
    _load_dense(model, source, ("backbone.body.", "roi_heads."), detection.load_detection_checkpoint,
                detection.load_backbone_weights)
    coco = _coco_categories() if num_classes == 80 else [(i, str(i)) for i in range(1, num_classes + 1)]
    info = ModelInfo("detection", name, source, [n for _, n in coco] if num_classes == 80 else [], None,
                     dict(image_size=cfg.image_size, category_ids=[i for i, _ in coco]))
    return finish(model, info, _det_preprocessing(cfg))


# ---------------------------------------------------------------------- released files
def _released(ckpt: Mapping, path: str) -> nn.Module:
    """A released file (no ``format``): a whole segmentor / detector needs its preset; pre-training weights build
    the MIM model; a classifier's, timm's ``Beit`` (via the export reader: architecture from the weights)."""
    from mcbeit.models.beit_weights import PRETRAINING_ONLY
    from mcbeit.models.export import ExportError, load_for_export

    if holds_whole_model(ckpt, "model|module", "backbone.", "decode_head."):
        raise InputError(f"{path} is a whole segmentor without this package's flags: name its config, "
                         "mcbeit.get_model(PRESET, pretrained=FILE) (presets: mcbeit.list_models(kind="
                         "'segmentation'))")
    if holds_whole_model(ckpt, "model|module", "backbone.body.", "roi_heads."):
        raise InputError(f"{path} is a whole detector without this package's flags: name its config, "
                         "mcbeit.get_model(PRESET, pretrained=FILE) (presets: mcbeit.list_models(kind='detection'))")
    try:
        sd = extract_state_dict(ckpt)
    except CheckpointError as exc:
        raise InputError(str(exc)) from None
    if "patch_embed.proj.weight" not in sd:
        raise InputError(f"{path}: not a BEiT-family model (no patch_embed.proj.weight among its keys)")
    args = _args(ckpt)
    if any(k.startswith(PRETRAINING_ONLY) for k in sd):
        return _pretraining(ckpt, path)
    overrides = {}
    if not args.get("model"):
        size, _ = _size_of_width(int(sd["patch_embed.proj.weight"].shape[0]))
        overrides["model"] = f"beit_{size}_patch16_224" if size else None
    try:
        exp = load_for_export(path, overrides=overrides)
    except ExportError as exc:
        raise InputError(f"{path}: {exc}") from None
    classes = _classifier_classes(ckpt, exp.model.num_classes)
    return finish(exp.model, ModelInfo("classifier", exp.name, path, classes), exp.data_config, classifier_features)
