"""VQ-KD teachers: frozen image models whose patch features the tokenizer learns to reconstruct.

Built from files only; nothing downloads. ``build_teacher(kind, weight_path, input_size)``:

* ``clip``: an OpenAI CLIP ViT visual tower (OpenAI's names: ``conv1``, ``class_embedding``,
  ``positional_embedding``, ``ln_pre``, ``transformer.resblocks.N.*``, ``ln_post``, ``proj``; the
  ``visual.`` prefix of a whole CLIP model optional, its text tower ignored and listed; a TorchScript
  archive such as OpenAI's ``ViT-B-16.pt`` is read with ``torch.jit.load(...).state_dict()``), converted by
  timm's own ``_convert_openai_clip`` into a timm CLIP ``VisionTransformer`` (pre-norm, QuickGELU, LN eps
  1e-5). Output ``ln_post(all tokens)[:, 1:] @ proj`` (512-d for ViT-B/16), as the original's
  ``encode_image(x, return_all_tokens=True) @ visual.proj``. Input normalisation: CLIP's mean / std.
* ``dino``: a DINO ViT file (timm ``vit_base_patch16_224`` names, no head): output ``norm(x)[:, 1:]``
  (768-d for ViT-B/16). ImageNet mean / std.
* any other value: a timm model name (this package's ``beit_*_8k_vocab`` included) plus a weights file
  (``model`` / ``state_dict`` / bare; ``module.`` prefixes dropped; a ``head`` of another class count
  dropped and listed): output ``forward_features(x)`` without its prefix (CLS) tokens. The model's
  ``pretrained_cfg`` mean / std (ImageNet's when it has none).

The teacher takes the tokenizer's input x in [-1, 1] and sees ``((x + 1) / 2 - mean) / std`` (the
original's ``ScalingLayerForClip`` / ``ScalingLayerForIM``: ``((x + 1) * 127.5).clamp(0, 255) / 255``
first). ``input_size`` is ``--teacher_input_size``: unlike the original, which stores it and never uses it,
the images are resized (bicubic) to it when it differs from theirs. A position embedding of another grid is
resized (bicubic) to ``input_size``.
"""
from __future__ import annotations

import logging
import os
import zipfile
from functools import partial
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mcbeit.errors import InputError

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TEACHER_FILES = {
    "clip": "an OpenAI CLIP ViT visual tower (e.g. OpenAI's ViT-B-16.pt, or a state dict with its visual.* names)",
    "dino": "a DINO ViT file (e.g. dino_vitbase16_pretrain.pth, timm vit_base_patch16_224 names)",
}


class Teacher(nn.Module):
    """A frozen teacher: ``forward(x in [-1, 1]) -> (B, N, out_dim)`` patch features, float32."""

    def __init__(self, model: nn.Module, features: Callable[[nn.Module, torch.Tensor], torch.Tensor], kind: str,
                 mean: Sequence[float], std: Sequence[float], input_size: int, out_dim: int, patch_size: int):
        super().__init__()
        self.model, self._features, self.kind = model, features, kind
        self.input_size, self.out_dim, self.patch_size = int(input_size), int(out_dim), int(patch_size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.random_weights = False
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> "Teacher":
        return super().train(False)                                                  # always in eval mode

    @property
    def grid(self) -> int:
        return self.input_size // self.patch_size

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = ((x.float() + 1.0) * 127.5).clamp(0.0, 255.0) / 255.0                  # [-1, 1] -> [0, 1]
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bicubic", align_corners=False)
        x = (x - self.mean) / self.std
        return self._features(self.model, x).float()

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, input_size={self.input_size}, out_dim={self.out_dim}"


# ---------------------------------------------------------------------- files
def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A state dict from a checkpoint (safe loader; under 'model' / 'state_dict' / 'module' or bare) or a
    TorchScript archive (OpenAI's CLIP .pt files)."""
    from mcbeit.models.checkpoint import read_checkpoint

    if not os.path.isfile(path):
        raise InputError(f"--teacher_weight {path!r} does not exist")
    ckpt: Mapping[str, Any]
    if _is_torchscript(path):  # TorchScript code is not Python: loading it runs no pickled callable
        ckpt = torch.jit.load(path, map_location="cpu").state_dict()
    else:
        ckpt = read_checkpoint(path)
    for key in ("model", "state_dict", "module"):
        if isinstance(ckpt.get(key), Mapping):
            ckpt = ckpt[key]
            break
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in ckpt.items()
          if isinstance(v, torch.Tensor)}
    if not sd:
        raise InputError(f"--teacher_weight {path}: no tensors found (expected a state dict, maybe under 'model')")
    return sd


def _is_torchscript(path: str) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.split("/", 1)[-1].startswith("code/") for n in z.namelist())
    except zipfile.BadZipFile:
        return False


def _resize_pos(sd: dict[str, torch.Tensor], key: str, grid: int, prefix_tokens: int, notes: list[str]) -> None:
    from mcbeit.models.position_resize import interpolate_pos_embed

    pe = sd.get(key)
    if pe is not None and pe.shape[-2] != grid * grid + prefix_tokens:
        sd[key] = interpolate_pos_embed(pe, (grid, grid), num_extra=prefix_tokens)
        notes.append(f"{key} resized from {pe.shape[-2] - prefix_tokens} to {grid}x{grid} positions")


def _resize_rel_tables(sd: dict[str, torch.Tensor], own: Mapping[str, torch.Tensor], grid: int,
                       notes: list[str]) -> None:
    from mcbeit.models.position_resize import interpolate_rel_pos_table

    for key, table in list(sd.items()):
        if key.endswith("relative_position_bias_table") and key in own and table.shape != own[key].shape:
            try:
                sd[key] = interpolate_rel_pos_table(table, own[key].shape[0], (grid, grid))
            except Exception as exc:  # scipy's spline needs more than a 3x3 source table
                raise InputError(f"teacher: {key} {tuple(table.shape)} cannot be resized to a {grid}x{grid} patch "
                                 f"grid ({exc}); use the --teacher_input_size the file was trained at") from None
            notes.append(f"{key} resized to the {grid}x{grid} grid")


def _load_strict(model: nn.Module, sd: Mapping[str, torch.Tensor], what: str) -> None:
    from mcbeit.models.checkpoint import compare_state_dict

    report = compare_state_dict(model, sd)
    if report:
        raise InputError(f"{what} does not fit the teacher model:\n{report.describe()}")
    model.load_state_dict(sd, strict=True)


# ---------------------------------------------------------------------- CLIP
_CLIP_TEXT = ("token_embedding.", "ln_final.", "text_projection", "logit_scale", "positional_embedding",
              "transformer.")


def clip_visual_model(width: int, depth: int, heads: int, patch: int, out_dim: int, image_size: int) -> nn.Module:
    """timm's CLIP image tower (``vit_base_patch16_clip_quickgelu_224``'s design) at any size."""
    from timm.layers import LayerNorm
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=image_size, patch_size=patch, embed_dim=width, depth=depth, num_heads=heads,
                             pre_norm=True, norm_layer=partial(LayerNorm, eps=1e-5), act_layer="quick_gelu",
                             num_classes=out_dim, global_pool="token")


def _clip_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.head(model.forward_features(x)[:, 1:])                           # ln_post(tokens)[:, 1:] @ proj


def _clip_teacher(path: str, input_size: int) -> Teacher:
    from timm.models.vision_transformer import _convert_openai_clip

    sd = _read_state_dict(path)
    if any(k.startswith("visual.") for k in sd):
        text = sorted(k for k in sd if not k.startswith("visual."))
        unknown = [k for k in text if not k.startswith(_CLIP_TEXT)]
        if unknown:
            raise InputError(f"--teacher_weight {path}: keys neither visual.* nor CLIP's text tower: {unknown[:10]}")
        if text:
            log.info("CLIP teacher %s: the text tower is not used (%d keys: token_embedding, transformer.*, ...)",
                     path, len(text))
        sd = {k: v for k, v in sd.items() if k.startswith("visual.")}
    else:
        sd = {"visual." + k: v for k, v in sd.items()}
    for need in ("visual.conv1.weight", "visual.proj", "visual.class_embedding", "visual.positional_embedding"):
        if need not in sd:
            raise InputError(f"--teacher_weight {path} is not an OpenAI CLIP ViT visual tower: it has no "
                             f"{need[len('visual.'):]} (expected {TEACHER_FILES['clip']})")
    width, _, patch, _ = sd["visual.conv1.weight"].shape
    depth = len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")})
    out_dim = sd["visual.proj"].shape[1]
    model = clip_visual_model(width, depth, max(1, width // 64), patch, out_dim, input_size)
    converted = _convert_openai_clip(sd, model)
    notes: list[str] = []
    _resize_pos(converted, "pos_embed", input_size // patch, 1, notes)
    _load_strict(model, converted, f"--teacher_weight {path} (CLIP)")
    for n in notes:
        log.info("CLIP teacher %s: %s", path, n)
    return Teacher(model, _clip_features, "clip", CLIP_MEAN, CLIP_STD, input_size, out_dim, patch)


# ---------------------------------------------------------------------- DINO and timm models
def _prefix_free_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.forward_features(x)[:, getattr(model, "num_prefix_tokens", 1):]


def dino_model(width: int, depth: int, heads: int, patch: int, image_size: int) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=image_size, patch_size=patch, embed_dim=width, depth=depth, num_heads=heads,
                             num_classes=0, global_pool="token")


def _dino_teacher(path: str, input_size: int) -> Teacher:
    sd = _read_state_dict(path)
    if "cls_token" not in sd or "patch_embed.proj.weight" not in sd:
        raise InputError(f"--teacher_weight {path} is not a DINO ViT file: no cls_token / patch_embed.proj.weight "
                         f"(expected {TEACHER_FILES['dino']})")
    head = sorted(k for k in sd if k.startswith("head."))
    if head:
        log.info("DINO teacher %s: %s not used (the patch features are the target)", path, head)
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    width, _, patch, _ = sd["patch_embed.proj.weight"].shape
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    model = dino_model(width, depth, max(1, width // 64), patch, input_size)
    notes: list[str] = []
    _resize_pos(sd, "pos_embed", input_size // patch, 1, notes)
    _load_strict(model, sd, f"--teacher_weight {path} (DINO)")
    return Teacher(model, _prefix_free_features, "dino", IMAGENET_MEAN, IMAGENET_STD, input_size, width, patch)


def _create_timm(name: str, input_size: int, **kwargs: Any) -> nn.Module:
    import timm

    import mcbeit.models  # noqa: F401  (registers this package's timm names)

    try:
        return timm.create_model(name, pretrained=False, img_size=input_size, **kwargs)
    except TypeError:
        return timm.create_model(name, pretrained=False, **kwargs)


def _timm_teacher(name: str, path: str, input_size: int) -> Teacher:
    import timm

    import mcbeit.models  # noqa: F401

    if not timm.is_model(name):
        raise InputError(f"--teacher_model_type {name!r} is neither clip, dino nor a timm model name")
    sd = _read_state_dict(path)
    extra = {}
    if "lm_head.weight" in sd and name.endswith(("_8k_vocab", "_8k_vocab_cls_pt")):  # a pre-training checkpoint
        extra["vocab_size"] = sd["lm_head.weight"].shape[0]                        # of its tokenizer's vocabulary
    model = _create_timm(name, input_size, **extra)
    own = model.state_dict()
    head = sorted(k for k in sd if k.startswith("head.") and (k not in own or sd[k].shape != own[k].shape))
    if head:
        log.info("teacher %s: its head %s (another class count) is not used; the patch features are", path, head)
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
        model = _create_timm(name, input_size, num_classes=0, **extra)
    drop = sorted(k for k in sd if k.endswith("relative_position_index") and k not in model.state_dict())
    sd = {k: v for k, v in sd.items() if k not in drop}
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", (16, 16))
    patch = patch[0] if isinstance(patch, (tuple, list)) else int(patch)
    notes: list[str] = []
    _resize_pos(sd, "pos_embed", input_size // patch, getattr(model, "num_prefix_tokens", 1), notes)
    _resize_rel_tables(sd, model.state_dict(), input_size // patch, notes)
    _load_strict(model, sd, f"--teacher_weight {path} ({name})")
    for n in notes:
        log.info("teacher %s: %s", path, n)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean, std = tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
    with torch.no_grad():
        out_dim = _prefix_free_features(model.eval(), torch.zeros(1, 3, input_size, input_size)).shape[-1]
    return Teacher(model, _prefix_free_features, name, mean, std, input_size, out_dim, patch)


# ---------------------------------------------------------------------- entry point
def build_teacher(kind: str, weight_path: str | None, input_size: int = 224, random_ok: bool = False) -> Teacher:
    """The frozen teacher ``kind`` from ``weight_path`` (see the module doc). Without a file: an error naming
    the file to pass, or with ``random_ok`` (the embedded demonstration) a RANDOM tiny CLIP-style tower."""
    kind = str(kind).strip()
    if not weight_path:
        what = TEACHER_FILES.get(kind.lower(), f"the weights of the timm model {kind}")
        if not random_ok:
            raise InputError(f"the {kind} teacher needs its weights: pass --teacher_weight <file>, {what}. "
                             f"Nothing is downloaded.")
        log.warning("VQ-KD teacher: RANDOM weights (a tiny CLIP-style tower, 192-d, 512-d output): the tokenizer "
                    "learns to reconstruct meaningless features. Fine for the demonstration and tests; for a real "
                    "tokenizer pass --teacher_weight (%s).", what)
        model = clip_visual_model(192, 4, 3, 16, 512, input_size)
        teacher = Teacher(model, _clip_features, "clip", CLIP_MEAN, CLIP_STD, input_size, 512, 16)
        teacher.random_weights = True
        return teacher
    path = os.fspath(weight_path)
    if kind.lower() == "clip":
        teacher = _clip_teacher(path, input_size)
    elif kind.lower() == "dino":
        teacher = _dino_teacher(path, input_size)
    else:
        teacher = _timm_teacher(kind, path, input_size)
    log.info("VQ-KD teacher %s from %s: %d-d patch features at %d px", kind, path, teacher.out_dim, input_size)
    return teacher
