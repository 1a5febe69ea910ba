"""The ``customized`` tokenizer: a small tokenizer of one's own, random or trained.

Heads (``config['head']``):

* ``logits`` (format version 1, the default): the DALL-E encoder architecture at a small width
  (default: n_hid 16, one block per group, 8192 words, f8; about 0.55 GFLOPs and 1.1 M
  parameters per 112 px image) whose 1x1 output conv gives the logits; with ``cosine_scale`` > 0
  the logits are scaled cosines to the output conv's rows (the random tokenizer of the
  no-argument pre-training run).
* ``vq`` (format version 2): a VQ-VAE trained by ``mcbeit-tokenizer train``. The same encoder's
  output conv gives ``embed_dim`` channels, l2-normalised per token; a codebook of
  ``vocab_size`` l2-normalised codes (``codebook`` buffer, V x embed_dim); a decoder (the DALL-E
  blocks in reverse, nearest 2x upsampling, f8) back to pixels. Logits are
  ``-logit_scale * ||z - e_v||^2`` (negative squared distances between the token's normalised
  feature z and each code e_v; argmax = the nearest code, ``softmax(logits / T)`` the mc-BEiT
  soft targets). With unit vectors ``||z - e||^2 = 2 - 2 cos`` lies in [0, 4]; ``logit_scale``
  (default 50) gives the same logit range as the random cosine head (``100 * cos``), i.e.
  targets peaked on a few nearby codes at the default temperature 4.

Every head uses the original's 'customized' input normalisation ``(x - 0.5) / 0.5``. Files:

    {'kind': 'customized', 'format_version': 2, 'config': {...}, 'state_dict': {...}}

written by :func:`save_custom_tokenizer` (``custom_tokenizer_payload`` gives the dict) and read
back with ``torch.load(weights_only=True)`` by :func:`load_custom_tokenizer` or
``build_tokenizer('customized', path)``, which also accept version-1 files, a training
checkpoint ``checkpoint-<epoch>.pth`` of ``mcbeit-tokenizer train`` (the payload sits under its
``'tokenizer'`` key) and a training output folder (its ``tokenizer.pth``).
"""

from __future__ import annotations

import os
import pickle
from collections import OrderedDict
from typing import Any, Dict, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from mcbeit.models.checkpoint import compare_state_dict

from .base import Normalize, check_token_ids
from .dalle import DallEConv2d, DallEEncoder, DallEEncoderBlock, upsampling_groups

CUSTOM_FORMAT_VERSION = 2
CUSTOM_DEFAULT_CONFIG: Dict[str, int] = dict(
    group_count=4, n_hid=16, n_blk_per_group=1, input_channels=3, vocab_size=8192
)
CUSTOM_HEADS = ("logits", "vq")
# Defaults of the VQ head (format version 2).
VQ_DEFAULT_EMBED_DIM = 32
VQ_DEFAULT_LOGIT_SCALE = 50.0
# Scale of the cosine head used when the tokenizer has random weights (see ``cosine_scale``).
RANDOM_COSINE_SCALE = 100.0
TOKENIZER_EXPORT_NAME = "tokenizer.pth"  # written beside the checkpoints of ``mcbeit-tokenizer train``
_CONFIG_KEYS = frozenset(CUSTOM_DEFAULT_CONFIG) | {"cosine_scale", "head", "embed_dim", "logit_scale"}


class CustomDecoder(nn.Module):
    """f8 decoder of the VQ head: the encoder's blocks in reverse order.

    ``input`` (1x1 conv, embed_dim -> 2^(g-1) n_hid), ``group_count`` groups of residual blocks
    (widths 2^(g-1) n_hid ... n_hid) with a nearest 2x upsampling after every group but the
    last, then ReLU and a 3x3 conv to ``output_channels``. Output: images in the tokenizer's
    normalised space (``(x - 0.5) / 0.5``).
    """

    def __init__(self, embed_dim: int, group_count: int, n_hid: int, n_blk_per_group: int, output_channels: int = 3):
        super().__init__()
        width_in = n_hid * 2 ** (group_count - 1)
        layers: "OrderedDict[str, nn.Module]" = OrderedDict()
        layers["input"] = DallEConv2d(embed_dim, width_in, 1)
        layers.update(upsampling_groups(DallEEncoderBlock, width_in, n_hid, group_count, n_blk_per_group))
        layers["output"] = nn.Sequential(
            OrderedDict([("relu", nn.ReLU()), ("conv", DallEConv2d(n_hid, output_channels, 3))])
        )
        self.blocks = nn.Sequential(layers)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """Code vectors (B, embed_dim, h, w) -> normalised images (B, C, 8h, 8w)."""
        return self.blocks(codes)


class CustomTokenizer(DallEEncoder):
    """A small DALL-E-style encoder with (x - 0.5) / 0.5 input normalisation (see the module doc).

    ``head='logits'``: ``cosine_scale`` > 0 replaces the output convolution's plain logits by
    ``cosine_scale * cos(centred features, output-conv row)``: a random-projection quantiser.
    With random weights the plain logits are nearly flat (softmax(L / 4) is almost uniform and
    the argmax collapses onto a handful of words), so the random tokenizer of the no-argument
    run uses the cosine head: every word is used and the soft targets are peaked, as with a
    trained tokenizer, while the targets stay a fixed function of the pixels.

    ``head='vq'``: a VQ-VAE tokenizer with a decoder (``has_decoder``): logits are
    ``-logit_scale * ||z - e_v||^2`` over the l2-normalised codes ``e_v``.
    """

    kind = "customized"

    def __init__(self, image_size: int = 112, input_transform=None, cosine_scale: float = 0.0,
                 head: str = "logits", embed_dim: Optional[int] = None, logit_scale: Optional[float] = None,
                 **config: int):
        unknown = set(config) - _CONFIG_KEYS
        if unknown:
            raise ValueError(f"unknown customized tokenizer config keys {sorted(unknown)}; known: {sorted(_CONFIG_KEYS)}")
        if head not in CUSTOM_HEADS:
            raise ValueError(f"customized tokenizer head must be one of {CUSTOM_HEADS}, got {head!r}")
        if head == "vq" and cosine_scale:
            raise ValueError("cosine_scale belongs to the 'logits' head; the 'vq' head's logits are distances")
        if head != "vq" and (embed_dim is not None or logit_scale is not None):
            raise ValueError("embed_dim and logit_scale belong to the 'vq' head (pass head='vq')")
        merged = {**CUSTOM_DEFAULT_CONFIG, **{k: int(v) for k, v in config.items()}}
        if input_transform is None:
            input_transform = Normalize((0.5,) * merged["input_channels"], (0.5,) * merged["input_channels"])
        super().__init__(image_size=image_size, input_transform=input_transform, **merged)
        self.cosine_scale = float(cosine_scale)
        self.head = head
        if head == "vq":
            self.embed_dim = int(VQ_DEFAULT_EMBED_DIM if embed_dim is None else embed_dim)
            self.logit_scale = float(VQ_DEFAULT_LOGIT_SCALE if logit_scale is None else logit_scale)
            if self.embed_dim < 1 or self.logit_scale <= 0:
                raise ValueError(f"vq head needs embed_dim >= 1 and logit_scale > 0, got {self.embed_dim}, {self.logit_scale}")
            width = self.n_hid * 2 ** (self.group_count - 1)
            self.blocks.output.conv = DallEConv2d(width, self.embed_dim, 1)  # features, not vocabulary logits
            codes = F.normalize(torch.randn(self.vocab_size, self.embed_dim), dim=1)
            self.register_buffer("codebook", codes)  # (V, embed_dim), unit rows; trained by EMA
            self.decoder = CustomDecoder(self.embed_dim, self.group_count, self.n_hid, self.n_blk_per_group,
                                         self.input_channels)

    @property
    def config(self) -> Dict[str, Any]:
        if self.head == "vq":
            return {**super().config, "head": "vq", "embed_dim": self.embed_dim, "logit_scale": self.logit_scale}
        return {**super().config, "cosine_scale": self.cosine_scale}

    # ------------------------------------------------------------------ VQ head
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """VQ head: normalised images (B,C,H,W) -> l2-normalised float32 token features (B, embed_dim, h, w)."""
        self._require_vq("encode")
        features = super().compute_logits(images)  # the encoder with its embed_dim output conv
        return F.normalize(features.float(), dim=1)

    def code_vectors(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B,h,w) long -> their codes (B, embed_dim, h, w)."""
        self._require_vq("code_vectors")
        return F.embedding(ids, self.codebook).permute(0, 3, 1, 2)

    def distance_logits(self, features: torch.Tensor) -> torch.Tensor:
        """``-logit_scale * ||z - e_v||^2`` for unit features z (B,D,h,w) and unit codes: (B,V,h,w), float32."""
        with torch.autocast(features.device.type, enabled=False):
            cos = torch.einsum("bdhw,vd->bvhw", features.float(), self.codebook.float())
            return self.logit_scale * (2.0 * cos - 2.0)

    def compute_logits(self, images: torch.Tensor) -> torch.Tensor:
        if self.head == "vq":
            return self.distance_logits(self.encode(images))
        if not self.cosine_scale:
            return super().compute_logits(images)
        hidden = F.relu(self.blocks[:-1](images))                      # (B, C, h, w) before the output conv
        hidden = F.normalize(hidden - hidden.mean(dim=1, keepdim=True), dim=1)
        words = F.normalize(self.blocks.output.conv.w.flatten(1), dim=1)  # (V, C)
        return self.cosine_scale * torch.einsum("bchw,vc->bvhw", hidden, words)  # (B, V, h, w)

    # ------------------------------------------------------------------ decoding
    @property
    def has_decoder(self) -> bool:
        return self.head == "vq"

    def to_pixels(self, normalised: torch.Tensor) -> torch.Tensor:
        """Decoder output (normalised space) -> float32 images in [0, 1]."""
        t = self.input_transform
        mean, std = (t.mean, t.std) if isinstance(t, Normalize) else ((0.5,) * 3, (0.5,) * 3)
        x = normalised.float()
        mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        return (x * std_t + mean_t).clamp(0.0, 1.0)

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.has_decoder:
            return super().decode(ids)
        ids = check_token_ids(ids, self.vocab_size)
        return self.to_pixels(self.decoder(self.code_vectors(ids)))

    def _require_vq(self, what: str) -> None:
        if self.head != "vq":
            raise RuntimeError(f"{what} needs the 'vq' head; this customized tokenizer has the {self.head!r} head")


def custom_tokenizer_payload(tokenizer: CustomTokenizer) -> Dict[str, Any]:
    """The file contents of :func:`save_custom_tokenizer` (tensors detached, on the CPU)."""
    if not isinstance(tokenizer, CustomTokenizer):
        raise TypeError(
            f"save_custom_tokenizer expects a CustomTokenizer (kind 'customized'), got {type(tokenizer).__name__}; "
            "its file reloads with the customized (x - 0.5) / 0.5 normalisation"
        )
    return {
        "kind": "customized",
        "format_version": CUSTOM_FORMAT_VERSION,
        "config": dict(tokenizer.config),
        "state_dict": {k: v.detach().cpu() for k, v in tokenizer.state_dict().items()},
    }


def save_custom_tokenizer(tokenizer: CustomTokenizer, path) -> None:
    """Write a :class:`CustomTokenizer` (config + weights) to ``path``."""
    payload = custom_tokenizer_payload(tokenizer)
    payload["state_dict"] = {k: v.clone() for k, v in payload["state_dict"].items()}
    torch.save(payload, os.fspath(path))


def _resolve_path(path: str) -> str:
    if os.path.isdir(path):
        export = os.path.join(path, TOKENIZER_EXPORT_NAME)
        if os.path.isfile(export):
            return export
        raise ValueError(
            f"customized tokenizer weights must be a file written by save_custom_tokenizer or a checkpoint of "
            f"mcbeit-tokenizer train; the folder {path} holds no {TOKENIZER_EXPORT_NAME}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"customized tokenizer weight file {path} does not exist")
    return path


def load_custom_tokenizer(path, image_size: int = 112) -> CustomTokenizer:
    """Read a customized tokenizer (``torch.load(weights_only=True)``): a file of
    :func:`save_custom_tokenizer` (format version 1 or 2), a ``checkpoint-<epoch>.pth`` of
    ``mcbeit-tokenizer train`` (its ``'tokenizer'`` entry) or that run's output folder."""
    path = _resolve_path(os.fspath(path))
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{path} could not be read with torch.load(weights_only=True): {err}") from None
    if isinstance(payload, Mapping) and "kind" not in payload and isinstance(payload.get("tokenizer"), Mapping):
        payload = payload["tokenizer"]  # a training checkpoint of mcbeit-tokenizer train
    if not isinstance(payload, Mapping) or payload.get("kind") != "customized":
        kind = payload.get("kind") if isinstance(payload, Mapping) else type(payload).__name__
        raise ValueError(
            f"{path} is not a customized tokenizer file (expected a dict with kind='customized', "
            f"config and state_dict, or a checkpoint of mcbeit-tokenizer train; got kind={kind!r})"
        )
    version = payload.get("format_version", 1)
    if version > CUSTOM_FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {version}; this mcbeit reads up to {CUSTOM_FORMAT_VERSION}")
    config: Optional[Mapping[str, Any]] = payload.get("config")
    state_dict = payload.get("state_dict")
    if not isinstance(config, Mapping) or not isinstance(state_dict, Mapping):
        raise ValueError(f"{path}: 'config' and 'state_dict' must both be dicts")
    tokenizer = CustomTokenizer(image_size=image_size, **config)
    report = compare_state_dict(tokenizer, state_dict)
    if report:
        raise ValueError(f"{path}: state_dict does not match its config {dict(config)}:\n{report.describe()}")
    tokenizer.load_state_dict(state_dict, strict=True)
    tokenizer.random_weights = False
    return tokenizer
